"""mlopt on many encoder families: export, ptq and a prune -> distil -> ptq recipe on each, one Markdown table.

    python benchmarks/encoder_families.py [--families bert,modernbert] [--work-dir DIR]

No pretrained weights are needed (nothing is downloaded): each family is built by transformers from a small
random config (hidden size 32, 2 layers, 4 heads, feed-forward 64), with a WordPiece vocabulary of the most
frequent words of `english.py`'s English prose, and saved as a Hugging Face folder. On it, in child processes:
`mlopt export` (onnxruntime checked against PyTorch), `mlopt ptq` (auto: its candidates timed at batch 1), and a
recipe that prunes half the heads and a quarter of the feed-forward width (`--importance activation
--reconstruct`), distils one epoch on the text against the unpruned model and quantizes. The table gives each
command's exit code, the heads and feed-forward width before and after, what the pruning kept whole, and the
pooled cosine to the original after the distillation and after INT8. It measures that every family runs end
to end, not how good a random model gets.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# family: (config class, model class, config overrides) in transformers
FAMILIES = {
    "bert": ("BertConfig", "BertModel", {}),
    "roberta": ("RobertaConfig", "RobertaModel", {"max_position_embeddings": 132}),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", {"max_position_embeddings": 132}),
    "electra": ("ElectraConfig", "ElectraModel", {"embedding_size": 16}),
    "albert": ("AlbertConfig", "AlbertModel", {"embedding_size": 16}),
    "mpnet": ("MPNetConfig", "MPNetModel", {}),
    "camembert": ("CamembertConfig", "CamembertModel", {"max_position_embeddings": 132}),
    "deberta-v2": ("DebertaV2Config", "DebertaV2Model", {}),
    "distilbert": ("DistilBertConfig", "DistilBertModel", {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64}),
    "modernbert": ("ModernBertConfig", "ModernBertModel", {"global_attn_every_n_layers": 1, "local_attention": 16,
                                                            "bos_token_id": 2, "eos_token_id": 3, "cls_token_id": 2,
                                                            "sep_token_id": 3}),
    "mobilebert": ("MobileBertConfig", "MobileBertModel", {"embedding_size": 32, "intra_bottleneck_size": 32,
                                                            "true_hidden_size": 32, "num_feedforward_networks": 1}),
    "ernie": ("ErnieConfig", "ErnieModel", {}),
    "data2vec-text": ("Data2VecTextConfig", "Data2VecTextModel", {"max_position_embeddings": 132}),
    "megatron-bert": ("MegatronBertConfig", "MegatronBertModel", {}),
    "xlm-roberta-xl": ("XLMRobertaXLConfig", "XLMRobertaXLModel", {"max_position_embeddings": 132}),
}

RECIPE = """version: 1
model:
  spec: hf:${MODEL}
data:
  source: text:${TEXT}
  max_length: 64
  batch_size: 16
steps:
  - type: prune
    head_ratio: 0.5
    ratio: 0.25
    importance: activation
    reconstruct: true
    calibration_samples: 64
  - type: distill
    epochs: 1
    lr: 0.0005
  - type: ptq
    batch_sizes: [1]
"""


def build(family: str, folder: Path, lines: list[str]) -> None:
    """A random encoder of `family` with a WordPiece tokenizer of the text's most frequent words."""
    import torch
    import transformers

    words = collections.Counter(w for line in lines for w in re.findall(r"[a-z]+", line.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w, _ in words.most_common(600)]
    folder.mkdir(parents=True)
    transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    config_class, model_class, extra = FAMILIES[family]
    common = {"vocab_size": len(vocab), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 64, "max_position_embeddings": 130, "pad_token_id": 0}
    if family == "distilbert":
        common = {"vocab_size": len(vocab), "pad_token_id": 0}
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**{**common, **extra}))
    model.save_pretrained(folder)


def mlopt(args: list[str], log: Path, env: dict | None = None) -> int:
    with log.open("w") as f:
        return subprocess.run([sys.executable, "-m", "mlopt", *args], stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})}, cwd=ROOT, timeout=1800).returncode


def steps(report: Path) -> dict[str, dict]:
    if not report.exists():
        return {}
    data = json.loads(report.read_text())
    return {s["type"]: s for s in data.get("steps", [])}


def bars(step: dict, title: str) -> str:
    found = next((s for s in step.get("sections", []) if s.get("title") == title), None)
    if not found:
        return "-"
    before, after = found["series"]["before"], found["series"]["after"]
    return f"{int(sum(before))} -> {int(sum(after))}"


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from english import english_lines

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", help="comma-separated (default: all): " + ", ".join(FAMILIES))
    p.add_argument("--work-dir", type=Path, help="keep the models, outputs and logs here")
    args = p.parse_args()
    names = args.families.split(",") if args.families else list(FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        p.error(f"unknown families: {', '.join(unknown)}")
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="encoder_families-") as tmp:
        work = (args.work_dir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        lines = english_lines()[:400]
        text = work / "english.txt"
        text.write_text("\n".join(lines) + "\n")
        recipe = work / "recipe.yaml"
        recipe.write_text(RECIPE)
        for family in names:
            folder = work / family
            out = work / f"{family}-out"
            if not folder.exists():
                build(family, folder, lines)
            out.mkdir(exist_ok=True)
            print(f"{family} ...", flush=True)
            rc_export = mlopt(["export", "--model", f"hf:{folder}", "--data", f"text:{text}", "--out",
                               str(out / "export"), "--overwrite"], out / "export.log")
            rc_ptq = mlopt(["ptq", "--model", f"hf:{folder}", "--data", f"text:{text}", "-b", "1", "-n", "5",
                            "--out", str(out / "ptq"), "--overwrite"], out / "ptq.log")
            rc_recipe = mlopt(["run", str(recipe), "--out", str(out / "recipe"), "--overwrite"], out / "recipe.log",
                              {"MODEL": str(folder), "TEXT": str(text)})
            ran = steps(out / "recipe" / "report.json")
            prune, distill, ptq = (ran.get(k, {}) for k in ("prune", "distill", "ptq"))
            pm, dm, qm = (s.get("metrics", {}) for s in (prune, distill, ptq))
            kept = next((s for s in prune.get("sections", []) if s.get("title") == "groups kept whole"), None)
            rows.append([family, rc_export, rc_ptq, rc_recipe, bars(prune, "attention heads per block"),
                         bars(prune, "output channels per layer"), pm.get("refitted_linears", "-"),
                         len(kept["rows"]) if kept else 0,
                         f"{dm['cosine']:.4f}" if "cosine" in dm else "-",
                         f"{qm['cosine_mean']:.4f}" if "cosine_mean" in qm else "-"])
    print()
    print("| family | export | ptq | recipe | heads (all blocks) | pruned layers' output channels | Linears "
          "refitted | groups kept whole | cosine after distil | cosine after INT8 (to distilled) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print("\nexport / ptq / recipe: the exit code of each command (0: it ran and passed its checks)")


if __name__ == "__main__":
    main()
