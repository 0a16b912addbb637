"""Gates: one row per gate from the chain comparison's figures, and their JUnit XML."""

import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest

from mlopt.run.gates import JUNIT_CLASSNAME, evaluate_gates, junit_xml
from mlopt.run.recipe import GatesConfig
from mlopt.runtime.artifacts import Artifact

LABELED = SimpleNamespace(labeled=True, name="digits")


def _comparison(base_acc, final_acc, base_ms, final_ms):
    return {"baseline": "00-model", "final": "02-ptq", "models": [
        {"step": "00-model", "accuracy": base_acc, "latency_ms": {"1": base_ms, "8": 99.0}},
        {"step": "01-export", "accuracy": 0.0, "latency_ms": {"1": 1000.0, "8": 1000.0}},  # not compared
        {"step": "02-ptq", "accuracy": final_acc, "latency_ms": {"1": final_ms, "8": 99.0}},
    ]}


@pytest.fixture
def final(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\0" * 500_000)  # only its size is read: 0.5 MB
    return Artifact(format="onnx", sample_shape=(1, 8, 8), num_classes=10, onnx_path=path, origin="final")


def test_every_gate_is_one_row_read_from_the_comparison(final):
    gates = GatesConfig(max_accuracy_drop=0.01, min_speedup=2.0, max_latency_ms=1.5, max_size_mb=0.5)
    rows = evaluate_gates(gates, Artifact("torch", None, None, origin="base"), final, LABELED,
                          _comparison(0.9, 0.89, 3.0, 1.5))
    assert [r["gate"] for r in rows] == ["max_accuracy_drop", "min_speedup", "max_latency_ms", "max_size_mb"]
    by = {r["gate"]: r for r in rows}
    # every threshold met exactly: each passes (<= and >=)
    assert by["max_accuracy_drop"]["measured"] == pytest.approx(0.01) and by["max_accuracy_drop"]["passed"]
    assert by["min_speedup"] == {"gate": "min_speedup", "expected": ">= 2.0", "measured": 2.0, "baseline": 3.0,
                                 "final": 1.5, "passed": True}
    assert by["max_latency_ms"]["measured"] == 1.5 and by["max_latency_ms"]["passed"]
    assert by["max_size_mb"]["measured"] == 0.5 and by["max_size_mb"]["passed"]


def test_gates_fail_past_their_thresholds(final):
    gates = GatesConfig(max_accuracy_drop=0.01, min_speedup=2.0, max_latency_ms=1.5, max_size_mb=0.4)
    rows = evaluate_gates(gates, Artifact("torch", None, None), final, LABELED, _comparison(0.9, 0.85, 3.0, 2.0))
    assert {r["gate"]: r["passed"] for r in rows} == {"max_accuracy_drop": False, "min_speedup": False,
                                                      "max_latency_ms": False, "max_size_mb": False}
    assert {r["gate"]: r["measured"] for r in rows} == {"max_accuracy_drop": 0.05, "min_speedup": 1.5,
                                                        "max_latency_ms": 2.0, "max_size_mb": 0.5}


def test_latency_gates_read_their_batch_size(final):
    rows = evaluate_gates(GatesConfig(min_speedup=1.0, batch_size=8), Artifact("torch", None, None), final, None,
                          _comparison(None, None, 3.0, 1.0))
    assert rows[0]["measured"] == 1.0 and rows[0]["baseline"] == rows[0]["final"] == 99.0


def test_accuracy_gate_needs_labels(final):
    from mlopt.core.errors import InputError

    unlabeled = SimpleNamespace(labeled=False, name="random:1x8x8")
    with pytest.raises(InputError, match="max_accuracy_drop gate needs labelled data"):
        evaluate_gates(GatesConfig(max_accuracy_drop=0.01), Artifact("torch", None, None), final, unlabeled,
                       _comparison(0.9, 0.9, 1.0, 1.0))


def test_junit_escapes_names_and_messages():
    nasty = "a<b & c>\"d'e"
    rows = [{"gate": nasty, "expected": "<= 1 & \"x\"", "measured": "'<'", "passed": False},
            {"gate": "max_size_mb", "expected": "<= 30", "measured": 2.5, "passed": True}]
    text = junit_xml(rows, suite=f"recipe {nasty}")
    root = ET.fromstring(text.encode())  # well-formed despite the markup characters
    assert root.tag == "testsuite" and root.get("name") == f"recipe {nasty}"
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("2", "1", "0")
    failed, passed = root.findall("testcase")
    assert failed.get("name") == nasty and failed.get("classname") == JUNIT_CLASSNAME
    assert failed.find("failure").get("message") == "expected <= 1 & \"x\", measured '<'"
    assert passed.get("name") == "max_size_mb" and passed.find("failure") is None


def test_gates_of_the_other_model_family_are_refused():
    from mlopt.core.errors import InputError
    from mlopt.run.gates import check_family

    with pytest.raises(InputError, match="min_decode_speedup gate applies to decoder language models only"):
        check_family(GatesConfig(min_decode_speedup=2.0), decoder=False)
    with pytest.raises(InputError, match="max_accuracy_drop gate does not apply to a decoder language model"):
        check_family(GatesConfig(max_accuracy_drop=0.01), decoder=True)
    text = SimpleNamespace(text=True)
    check_family(GatesConfig(max_ppl_increase=0.05, max_size_mb=10), decoder=True, data=text)  # the decoder's own
    with pytest.raises(InputError, match="max_ppl_increase gate needs text"):
        check_family(GatesConfig(max_ppl_increase=0.05), decoder=True, data=None)
    with pytest.raises(InputError, match="add an export or ptq step"):
        check_family(GatesConfig(max_size_mb=10), decoder=True, data=text, exported=False)
    with pytest.raises(InputError, match="gates.batch_size does not apply to a decoder"):
        check_family(GatesConfig(min_decode_speedup=2.0, batch_size=8), decoder=True, data=text)


def test_a_decoder_gate_on_an_image_model_stops_before_any_step(tmp_path):
    from typer.testing import CliRunner

    from mlopt.cli.main import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nmodel: {spec: 'torchvision:resnet18'}\ndata: {source: digits, image_size: 32, channels: 3}\n"
                      "steps: [{type: train, epochs: 1}]\ngates: {max_ppl_increase: 0.05}\n")
    result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "max_ppl_increase gate applies to decoder language models only" in result.output
    assert not (tmp_path / "out").exists()


def test_the_cosine_gate_reads_the_chains_fidelity_to_the_baseline(final):
    """min_cosine: the final model's cosine to the baseline's sentence embeddings, from the chain comparison."""
    from mlopt.core.errors import InputError
    from mlopt.run.gates import check_family

    text = SimpleNamespace(text=True, labeled=False, name="text:lines.txt")
    comparison = {"baseline": "input", "final": "03-ptq", "models": [
        {"step": "input", "accuracy": None, "cosine": 1.0, "latency_ms": {"1": 9.0}},
        {"step": "03-ptq", "accuracy": None, "cosine": 0.9812, "latency_ms": {"1": 3.0}}]}
    for threshold, passed in ((0.98, True), (0.99, False)):
        rows = evaluate_gates(GatesConfig(min_cosine=threshold, min_speedup=3.0), Artifact("torch", None, None),
                              final, text, comparison)
        assert rows[0] == {"gate": "min_cosine", "expected": f">= {threshold}", "measured": 0.9812, "passed": passed}
        assert rows[1]["gate"] == "min_speedup" and rows[1]["passed"]
    with pytest.raises(InputError, match="min_cosine gate compares outputs on unlabelled data"):
        check_family(GatesConfig(min_cosine=0.99), decoder=False, data=SimpleNamespace(text=False, labeled=True))
    with pytest.raises(InputError, match="the min_cosine gate does not apply to a decoder"):
        check_family(GatesConfig(min_cosine=0.99), decoder=True, data=text)
    with pytest.raises(InputError, match="min_cosine gate needs data to compare outputs on"):
        check_family(GatesConfig(min_cosine=0.99), decoder=False, data=None)
    with pytest.raises(InputError, match="max_accuracy_drop gate needs labelled data, and text:FILE has none"):
        check_family(GatesConfig(max_accuracy_drop=0.01), decoder=False, data=text)
