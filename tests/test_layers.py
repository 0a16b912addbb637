"""The house rules the import linter cannot see: every step module is a registered step type and sits
in the steps layer of the import contract, and the contracts themselves hold."""

import importlib
import os
import pkgutil
from pathlib import Path

from mlopt.core.contracts import PASSES
from mlopt.run.recipe import PASS_HOMES

ROOT = Path(__file__).resolve().parent.parent


def _layers() -> list[list[str]]:
    from importlinter import api

    config = api.read_configuration(os.fspath(ROOT / "pyproject.toml"))
    contract = next(c for c in config["contracts_options"] if c["type"] == "layers")
    return [[m.strip() for m in layer.replace(":", "|").split("|")] for layer in contract["layers"]]


def test_every_step_module_defines_a_registered_step_and_is_in_the_steps_layer():
    steps_layer = next(layer for layer in _layers() if "mlopt.compress.prune" in layer)
    modules = [f"{home}.{m.name}" for home in PASS_HOMES
               for m in pkgutil.iter_modules(importlib.import_module(home).__path__) if not m.ispkg]
    defined = {p.__module__ for p in PASSES.values()}
    assert sorted(modules) == sorted(steps_layer)
    assert set(modules) <= defined, f"modules defining no step type: {set(modules) - defined}"


def test_core_imports_no_heavy_library():
    import subprocess
    import sys

    code = ("import sys, mlopt.core.contracts, mlopt.core.sections, mlopt.core.errors, mlopt.core.fsutil, "
            "mlopt.core.console; print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'transformers', "
            "'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
