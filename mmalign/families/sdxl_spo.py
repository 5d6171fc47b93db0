"""SPO / D3PO on an SDXL UNet (`modality: sdxl_spo`): the step likelihood over the `sdxl` family's
parts (two text encoders, add_time_ids), online rounds as `sd_spo`. Sampling, validation and
export are the `sdxl` family's."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mmalign.families import sd_spo, sdxl


def build(cfg: Any, use_cache: bool = True, trained: bool = True) -> tuple[Any, Any, None]:
    """(UNet, StepLikelihood over the sdxl likelihood, None); never from a cache."""
    from mmalign.modalities.step_sampler import build_step

    return build_step(cfg, sdxl.build, trained)


FAMILY = replace(sdxl.FAMILY, name="sdxl_spo", summary="SPO / D3PO on an SDXL UNet", build=build,
                 source=sd_spo.source, step=True, cache=False)
