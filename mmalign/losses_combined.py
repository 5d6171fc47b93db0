"""Several losses at once (MPO; TRL 1.16's `loss_type=[...]`, `loss_weights=[...]`,
shared/METHODS.md A.9): `loss.name: [sigmoid-like, ..., sft]` with `loss.weights`,

    loss_i = sum_k w_k loss_k,i   (B,), then the trainer's mean over the batch,

which equals TRL's sum_k w_k mean_batch(loss_k). `combined_spec` builds one `LossSpec` from the
registered ones, so the trainer feeds a combination like any single loss: its function takes
the union of the components' hyperparameters, batch fields and statistics, and hands each
component only the keywords it declares. The f-divergence (`loss.f_divergence_type`) is applied
per component, to those whose spec has `f_divergence` and needs a reference; the others (the
`sft` entry) see the raw log-likelihoods. RPO is `[dpo, sft]` with weights `[1, alpha]`: the
same numbers as `loss.name: dpo` with `loss.sft_weight: alpha`.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

from torch import Tensor

from mmalign.losses import LossSpec, Statistic, f_divergence_pairs, get_loss

__all__ = ["combined_spec", "loss_names", "loss_spec_for"]

F_KEYS = ("f_divergence_type", "f_alpha_divergence_coef")


def loss_names(name: str | Sequence[str]) -> list[str]:
    """`loss.name` as a list of registered names (one for a plain string)."""
    return [name] if isinstance(name, str) else list(name)


def combined_spec(names: Sequence[str], weights: Sequence[float] | None = None) -> LossSpec:
    """One `LossSpec` for sum_k w_k loss_k over the registered losses `names` (weights default 1).

    All components take the same data kind; a statistic keyword shared by two components must
    be the same `Statistic`. Unknown names raise `get_loss`'s ValueError."""
    names = list(names)
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if not names or len(weights) != len(names):
        raise ValueError(f"loss.weights needs one weight per loss: {len(weights)} weights for {len(names)} losses")
    specs = [get_loss(n) for n in names]
    kinds = {s.kind for s in specs}
    if len(kinds) > 1:
        raise ValueError(f"losses {names} take different data kinds ({', '.join(sorted(kinds))}): they cannot be combined")
    fields: list[str] = []
    statistics: dict[str, Statistic] = {}
    keywords: list[str] = []
    for name, spec in zip(names, specs):
        for f in spec.fields:
            if f not in fields:
                fields.append(f)
        for key, stat in spec.statistics.items():
            if statistics.setdefault(key, stat) is not stat:
                raise ValueError(f"loss '{name}' declares statistic {key!r} differently from another component")
        for key in _keyword_only(spec.fn):
            if key not in keywords:
                keywords.append(key)
    takes_f = [s.f_divergence and s.needs_reference for s in specs]
    parameters = [inspect.Parameter("policy", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                  inspect.Parameter("reference", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)]
    defaults = {"f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5}
    for key in keywords + ([k for k in F_KEYS] if any(takes_f) else []):
        parameters.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=defaults.get(key, _REQUIRED)))

    def combined(policy: Any, reference: Any = None, **kwargs: Any) -> Tensor:
        kind = kwargs.pop("f_divergence_type", "reverse_kl")
        alpha = kwargs.pop("f_alpha_divergence_coef", 0.5)
        scored = None
        total = None
        for spec, weight, transform in zip(specs, weights, takes_f):
            pol, ref = policy, reference
            if transform and kind != "reverse_kl":
                scored = scored or f_divergence_pairs(policy, reference, kind, alpha)
                pol, ref = scored
            own = set(_keyword_only(spec.fn))
            value = spec.fn(pol, ref if spec.needs_reference else None,
                            **{k: v for k, v in kwargs.items() if k in own and v is not _REQUIRED})
            total = weight * value if total is None else total + weight * value
        return total

    combined.__name__ = "+".join(names)
    combined.__doc__ = " + ".join(f"{w:g} * {n}" for n, w in zip(names, weights))
    combined.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return LossSpec(combined, specs[0].kind, needs_reference=any(s.needs_reference for s in specs),
                    fields=tuple(fields), statistics=statistics,
                    f_divergence=False,  # applied inside, per component
                    batch_level=any(s.batch_level for s in specs))


_REQUIRED = object()  # a component keyword with no default that the trainer did not supply


def loss_spec_for(name: str | Sequence[str], weights: Sequence[float] | None = None) -> LossSpec:
    """The spec the trainer feeds: the registered one for a single name without weights, else a combination."""
    names = loss_names(name)
    if len(names) == 1 and weights is None:
        return get_loss(names[0])
    return combined_spec(names, weights)


def _keyword_only(fn: Any) -> list[str]:
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
