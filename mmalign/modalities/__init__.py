"""The likelihood machinery the model families (`mmalign/families/`) are built from: token
log-probs (causal_lm, llava), the diffusion / flow ELBO and its parts (diffusion, flow, audio,
the latent cache), the step likelihood and its online sampler (SPO / D3PO). Heavy libraries
(transformers, diffusers) are imported only when a family is built.

`build_modality(cfg)` is the family's `build` for `cfg.modality`; `build_source(cfg, likelihood, processor)`
its online data source (`online:` rounds, the family's own, or None)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmalign.types import DataSource, Likelihood


def known_modalities() -> list[str]:
    """Every registered family name (`mmalign.families`)."""
    from mmalign.families import family_names

    return family_names()


def build_modality(cfg: Any) -> tuple[Any, Any, Any]:
    """(model, likelihood, processor) for `cfg.modality` (its family's `build`)."""
    from mmalign.families import get_family

    return get_family(cfg.modality).build(cfg)


def build_source(cfg: Any, likelihood: Likelihood, processor: Any = None) -> DataSource | None:
    """The run's online data source: the `online:` rounds (`mmalign.online.OnlineSource`, sampled
    through the family's descriptor) when `cfg.online` is set, else the family's own source (SPO
    rounds), else None (data from files). `processor`: the family's processor (text sampling)."""
    from mmalign.families import get_family

    if cfg.online is not None:
        from mmalign.online import build_online_source

        return build_online_source(cfg, likelihood, processor)
    family = get_family(cfg.modality)
    return None if family.source is None else family.source(cfg, likelihood)
