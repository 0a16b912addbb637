"""A step type defined outside mlopt, in this one module: importing it (or naming it in MLOPT_PASSES)
adds `toy_scale` to the recipe schema, `mlopt run`, the reports and the Python API (mlopt.toy_scale)."""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mlopt.core.contracts import Pass, StepContext, StepResult
from mlopt.core.sections import Table


class ScaleConfig(BaseModel):
    """Multiply every parameter of the model by a factor."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["toy_scale"] = "toy_scale"
    factor: float = Field(gt=0, description="what every parameter is multiplied by")


class ScalePass(Pass):
    name = "toy_scale"
    config_class = ScaleConfig

    def run(self, artifact: Any, config: ScaleConfig, ctx: StepContext) -> StepResult:
        import torch

        module = copy.deepcopy(artifact.require_torch(self.name))
        rows = []
        with torch.no_grad():
            for name, param in module.named_parameters():
                before = float(param.abs().sum())
                param.mul_(config.factor)
                rows.append([name, before, float(param.abs().sum())])
        ratio = sum(r[2] for r in rows) / sum(r[1] for r in rows)
        table = Table(title="toy_scale: sum of |w| per parameter", columns=["parameter", "before", "after"], rows=rows)
        return StepResult(artifact=artifact.derive(self.name, module=module), metrics={"weight_scale": ratio},
                          sections=[table])
