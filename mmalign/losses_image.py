"""VLM image terms (`loss.image_term`, mmalign/train/image_terms.py): extra objectives on the chosen
answer scored with a modified image. Pure per-example functions, as in `mmalign.losses` (which
re-exports every name here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F
from torch import Tensor

from mmalign.types import PairLogps

__all__ = ["IMAGE_TERMS", "ImageTermSpec", "anchor_loss", "image_conditional_loss"]


# --------------------------------------------------------------------------- image terms (VLM)
# Extra terms on the chosen answer scored with a modified image (mmalign/train/image_terms.py).
# Their PairLogps hold chosen = log π(yw | m, x) (the true image m) and rejected =
# log π(yw | m', x) (the same answer with the modified image m'), for policy and reference.


def image_conditional_loss(policy: PairLogps, reference: PairLogps, *, beta: float) -> Tensor:
    """mDPO's conditional term (Wang et al. 2024, eq. 4), Re-Align's visual term: the answer is
    preferred with the true image m over the modified one m',

    -log sigma(beta [(log pi(yw|m,x) - log ref(yw|m,x)) - (log pi(yw|m',x) - log ref(yw|m',x))]),

    i.e. `dpo_loss` with the modified-image item as "rejected" (the same operations). Returns (B,)."""
    margin = (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)
    return -F.logsigmoid(beta * margin)


def anchor_loss(policy: PairLogps, reference: PairLogps, *, beta: float, anchor_delta: float = 0.0) -> Tensor:
    """mDPO's anchor (Wang et al. 2024, eq. 5): -log sigma(beta (log pi(yw|m,x) - log ref(yw|m,x)) - delta);
    keeps the chosen reward above delta (0 in mDPO). Reads only the `chosen` fields. Returns (B,)."""
    return -F.logsigmoid(beta * (policy.chosen - reference.chosen) - anchor_delta)


@dataclass(frozen=True)
class ImageTermSpec:
    """An extra VLM objective (`loss.image_term`): `image` names how the trainer modifies the
    image of each chosen item ("corrupt": `loss.corruption` of the same image; "other": another
    example's image), `terms` maps a metric name to a pure loss over the (true image, modified
    image) PairLogps; the trainer adds `loss.image_term_weight` x their sum."""

    image: str
    terms: dict[str, Callable[..., Tensor]]


IMAGE_TERMS: dict[str, ImageTermSpec] = {
    "mdpo": ImageTermSpec("corrupt", {"conditional": image_conditional_loss, "anchor": anchor_loss}),
    "realign": ImageTermSpec("other", {"visual": image_conditional_loss}),
}
