"""Flow-GRPO / DanceGRPO on SD3 / SD3.5 (`modality: sd3_grpo`): the flow SDE step likelihood
(mmalign/modalities/flow_sde.py) over the `sd3` family's parts, trained on trajectories the current
policy samples every `grpo.round_steps` steps (mmalign/modalities/grpo_source.py). Sampling
pipeline, validation and export are the `sd3` family's."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mmalign.families import sd3


def build(cfg: Any, use_cache: bool = True, trained: bool = True) -> tuple[Any, Any, None]:
    """(SD3Transformer2DModel, FlowStepLikelihood over the sd3 likelihood, None); never from a cache."""
    from mmalign.modalities.grpo_source import build_flow

    return build_flow(cfg, sd3.build, trained)


def source(cfg: Any, likelihood: Any) -> Any:
    """The online GRPO rounds (`GRPOSource`)."""
    from mmalign.modalities.grpo_source import build_source

    return build_source(cfg, likelihood)


FAMILY = replace(sd3.FAMILY, name="sd3_grpo", summary="Flow-GRPO / DanceGRPO: SDE trajectories, online rounds (SD3)",
                 build=build, source=source, cache=False)
