"""Flow-GRPO / DanceGRPO on FLUX.1 (`modality: flux_grpo`): the flow SDE step likelihood over the
`flux` family's parts (its 2×2 packed velocity unpacked back to latents), trained on trajectories
the current policy samples every `grpo.round_steps` steps. FLUX.1-dev is guidance-distilled:
`grpo.guidance: 1` (DanceGRPO's cfg 0) with the guidance embedding of the `flux` family."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mmalign.families import flux


def build(cfg: Any, use_cache: bool = True, trained: bool = True) -> tuple[Any, Any, None]:
    """(FluxTransformer2DModel, FlowStepLikelihood over the flux likelihood, None); never from a cache."""
    from mmalign.modalities.flow_sde import unpack_latents
    from mmalign.modalities.grpo_source import build_flow

    return build_flow(cfg, flux.build, trained, unpack_latents)


def source(cfg: Any, likelihood: Any) -> Any:
    """The online GRPO rounds (`GRPOSource`)."""
    from mmalign.modalities.grpo_source import build_source

    return build_source(cfg, likelihood)


FAMILY = replace(flux.FAMILY, name="flux_grpo", summary="Flow-GRPO / DanceGRPO: SDE trajectories, online rounds (FLUX.1)",
                 build=build, source=source, cache=False)
