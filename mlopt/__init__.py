"""mlopt: make PyTorch models smaller and faster, and measure what it produced.

The Python API (mlopt.api) loads on first use, so `import mlopt` stays light: `mlopt.run(recipe)`,
`mlopt.Recipe`, `mlopt.RunResult`, `mlopt.step(type, model, ...)` and one function per step type
(`mlopt.prune(model, example_input, ratio=0.5)`, `mlopt.export(...)`, ...).
"""

import importlib
from types import ModuleType
from typing import Any

__version__ = "0.1.0"


class _CallablePackage(ModuleType):
    """A package that shares its name with an API function: `mlopt.run(recipe)`, `mlopt.export(model, x)`.

    Importing a submodule (mlopt.run.runner) binds the package to the name, never the function, so the
    package itself is made callable and calls the function of its name in mlopt.api.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module("mlopt.api"), self.__name__.rpartition(".")[2])(*args, **kwargs)


for _name in ("run", "export"):  # their __init__ modules are empty: nothing heavy loads here
    importlib.import_module(f"mlopt.{_name}").__class__ = _CallablePackage
del _name


def __getattr__(name: str) -> Any:
    if name.startswith("__") or name == "api":  # `from mlopt import api` asks before importing it
        raise AttributeError(f"module 'mlopt' has no attribute {name!r}")
    try:
        return getattr(importlib.import_module("mlopt.api"), name)
    except AttributeError:
        raise AttributeError(f"module 'mlopt' has no attribute {name!r}") from None
