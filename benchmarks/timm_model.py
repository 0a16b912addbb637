"""timm classifiers as mlopt model specs, for `prune_torchvision.py --timm`: `benchmarks.timm_model:NAME` builds
timm's NAME with random weights (`pip install timm`; not a dependency of mlopt)."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)

    def make(num_classes: int = 10) -> Any:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes)

    return make
