"""VLM image terms (`loss.image_term`): one more forward of the chosen answers with a modified
image, through the SAME likelihood, for the policy and the reference.

- `mdpo` (Wang et al. 2024, "mDPO"): m' = a corruption of the example's image (`loss.corruption`:
  crop keeping 1-20% of the area, as mDPO's code; DDPM noise; pixel masking; mmalign.data.corrupt).
  Terms: conditional -log σ(β[(log π(yw|m,x) - log πref(yw|m,x)) - (log π(yw|m',x) - log πref(yw|m',x))])
  and anchor -log σ(β (log π(yw|m,x) - log πref(yw|m,x)) - δ).
- `realign` (Re-Align style visual term): m' = the image of another training example (chosen
  with a seeded offset, skipping examples with the very same image values); term: the same
  conditional form, the answer with its own image ≻ with the other image.

Per-example total: main loss + `loss.image_term_weight` x Σ terms (times the example's weight).
The true-image log-likelihoods log π(yw|m,x) are the main forward's chosen items (plain sums,
also when `loss.dense_gamma` re-scores the main loss). The modified images are made ONCE per
micro-step from the step's seed and the example's row, then scored by the policy and by the
reference, so both see the same m'. A precomputed reference cannot score images made during
training: refused (also by config validation). Metrics: `<term>/<name>` per term (e.g.
`mdpo/conditional`, `mdpo/anchor`) and `<term>/logps_modified` (policy log π(yw|m',x)).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import Tensor

from mmalign.config import LossConfig
from mmalign.data.corrupt import corrupt_image
from mmalign.data.media import record_images
from mmalign.errors import ConfigError, DataError
from mmalign.layout import chosen_rejected
from mmalign.losses import IMAGE_TERMS
from mmalign.seeds import mix_seed
from mmalign.types import Likelihood, LogpOutput, PairLogps, PreferenceBatch, ScoresModifiedImages

Score = Callable[[PreferenceBatch, torch.Generator], tuple[LogpOutput, LogpOutput]]
OTHER_IMAGE_TRIES = 8  # offsets tried before accepting another example whose image is the same


def record_seed(seed: int, index: int) -> int:
    """The seed of example `index`'s modified image in the micro-step with seed `seed`."""
    return mix_seed(seed, index + 1)


def _images(record: dict[str, Any], where: str) -> list[Any]:
    images = record_images(record)
    if not images:
        raise DataError(f"{where}: loss.image_term needs an image per example, this one has none")
    return images


class ImageTerms:
    """Adds one `IMAGE_TERMS` entry to per-example pair losses (see the module docstring).

    likelihood: the trainer's likelihood, with the `ScoresModifiedImages` ability (collates and
        scores the modified items, and reads the images to corrupt); pool: the training records,
        where `realign` finds other images (read by index only).
    """

    def __init__(self, cfg: LossConfig, likelihood: Likelihood, kind: str, strategy: str,
                 pool: Sequence[dict[str, Any]]) -> None:
        if cfg.image_term not in IMAGE_TERMS:
            raise ConfigError(f"loss.image_term '{cfg.image_term}' is not one of none, {', '.join(IMAGE_TERMS)}")
        if kind != "pair":
            raise ConfigError(f"loss.image_term '{cfg.image_term}' needs paired data (chosen/rejected), got '{kind}'")
        if strategy == "precomputed":
            raise ConfigError(f"loss.image_term '{cfg.image_term}' scores a freshly modified image every step, "
                              "which a precomputed reference cannot: use reference.strategy frozen or lora_disabled")
        if not isinstance(likelihood, ScoresModifiedImages):
            raise ConfigError(f"loss.image_term '{cfg.image_term}' scores answers with modified images, which "
                              f"{type(likelihood).__name__} cannot: use a VLM modality (llava)")
        self.cfg, self.name, self.spec = cfg, cfg.image_term, IMAGE_TERMS[cfg.image_term]
        self.likelihood, self.pool = likelihood, pool
        self.reader: ScoresModifiedImages = likelihood  # the same object, through its image ability
        if self.spec.image == "other" and len(pool) < 2:
            raise DataError(f"loss.image_term '{self.name}' takes another example's image: it needs >= 2 examples")
        self.params = {"crop": {"scale": tuple(cfg.corruption_crop_scale)},
                       "noise": {"step": cfg.corruption_noise_step},
                       "mask": {"ratio": cfg.corruption_mask_ratio, "patch": cfg.corruption_mask_patch}}[cfg.corruption]

    # -- the modified items --------------------------------------------------------------
    def _corrupted(self, images: list[Any], where: str, generator: torch.Generator,
                   root: str | None) -> list[Any]:
        return [corrupt_image(self.reader.read_image(v, f"{where}, image {j}", root), self.cfg.corruption,
                              generator, **self.params) for j, v in enumerate(images)]

    def _other(self, images: list[Any], index: int, generator: torch.Generator) -> tuple[list[Any], str | None]:
        """Another example's images (as many as the prompt expects) and that example's data folder."""
        n = len(self.pool)
        other, source = images, {}
        for _ in range(OTHER_IMAGE_TRIES):
            j = (index + 1 + int(torch.randint(0, n - 1, (), generator=generator))) % n  # never `index` itself
            source = self.pool[j]
            other = _images(source, f"example {j}")
            if other != images:
                break
        return [other[k % len(other)] for k in range(len(images))], source.get("_root")

    def modified_records(self, records: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
        """One unpaired item per record: its prompt and chosen answer with the modified images
        (PIL images for `mdpo`, the other example's image values for `realign`). Deterministic in
        (seed, row)."""
        out = []
        for i, r in enumerate(records):
            index = int(r.get("_index", i))
            where = f"example {index}"
            generator = torch.Generator().manual_seed(record_seed(seed, index))
            images, root = _images(r, where), r.get("_root")
            if self.spec.image == "corrupt":  # PIL images: no folder needed any more
                new, root = self._corrupted(images, where, generator, root), None
            else:
                new, root = self._other(images, index, generator)
            out.append({"images": new, "prompt": r["prompt"], "completion": r["chosen"], "label": True,
                        "_index": index, **({"_root": root} if root else {})})
        return out

    # -- the terms -------------------------------------------------------------------------
    def _hyperparameters(self, fn: Callable[..., Tensor]) -> dict[str, Any]:
        known = {"beta": self.cfg.beta, "anchor_delta": self.cfg.anchor_delta}
        names = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
        return {k: known[k] for k in names if k in known}

    def terms(self, policy: PairLogps, reference: PairLogps) -> dict[str, Tensor]:
        """{term name: (B,)} from (true image, modified image) log-likelihoods as chosen/rejected."""
        return {key: fn(policy, reference, **self._hyperparameters(fn)) for key, fn in self.spec.terms.items()}

    def add(self, records: list[dict[str, Any]], seed: int, policy_out: LogpOutput, ref_out: LogpOutput,
            losses: Tensor, metrics: dict[str, Tensor], score: Score,
            device: torch.device | str = "cpu") -> tuple[Tensor, dict[str, Tensor]]:
        """losses (B,) + weight x Σ terms, and metrics with the terms added (`loss` updated).

        policy_out, ref_out: the main forward's (2B,) outputs (chosen items first); score(batch,
        generator): the trainer's policy + reference scoring of one batch."""
        batch = self.likelihood.collate(self.modified_records(records, seed), "unpaired").to(device)
        policy_mod, ref_mod = score(batch, torch.Generator().manual_seed(seed))
        policy = PairLogps(chosen_rejected(policy_out.logps)[0], policy_mod.logps)
        reference = PairLogps(chosen_rejected(ref_out.logps)[0], ref_mod.logps)
        values = self.terms(policy, reference)
        extra = torch.stack(list(values.values())).sum(0)
        if any("weight" in r for r in records):
            extra = extra * torch.tensor([float(r.get("weight", 1.0)) for r in records], device=extra.device)
        losses = losses + self.cfg.image_term_weight * extra.to(losses.dtype)
        metrics = dict(metrics, loss=losses.detach())
        metrics.update({f"{self.name}/{key}": v.detach() for key, v in values.items()})
        metrics[f"{self.name}/logps_modified"] = policy_mod.logps.detach()
        return losses, metrics


def build_image_terms(cfg: Any, likelihood: Likelihood, kind: str, strategy: str,
                      pool: Sequence[dict[str, Any]]) -> ImageTerms | None:
    """The run's `ImageTerms`, or None when `loss.image_term` is none."""
    if cfg.loss.image_term == "none":
        return None
    return ImageTerms(cfg.loss, likelihood, kind, strategy, pool)
