"""Seeds derived from other seeds, by one documented formula instead of one per call site.

A derived seed is a weighted sum of integer terms plus an offset:

    mix_seed(a, b, c, strides=(s_a, s_b, s_c), offset=o) == (a*s_a + b*s_b + c*s_c + o) % 2**63

The strides are primes far apart (`RUN` = 1_000_003 for a run's seed, `ROW` = 7_919,
`STEP` = 1_009, `MICRO` = 101 for counters), so that neighbouring terms give unrelated seeds;
the default strides `(RUN, ROW)` are the common `seed * 1_000_003 + counter * 7_919`. The
reduction modulo 2**63 makes any sum a valid non-negative `torch.Generator` seed.
`wrap=False` returns the plain sum: call sites that never reduced keep their exact value
(torch maps a negative seed n to n + 2**64, not to n % 2**63, so the two differ for a
negative sum such as a step counter run backwards, and for sums of 2**63 or more).

No torch at import: any module may use it.
"""

from __future__ import annotations

RUN = 1_000_003  # stride of a run's (base) seed
ROW = 7_919  # stride of an example row, round or step (the 1000th prime)
STEP = 1_009  # stride of an optimizer step or a sample index
MICRO = 101  # stride of a micro-step within a step
WRAP = 2**63


def mix_seed(*terms: int, strides: tuple[int, ...] = (RUN, ROW), offset: int = 0, wrap: bool = True) -> int:
    """sum(term * stride) + offset over `terms` and `strides` (one stride per term, in order),
    reduced modulo 2**63 unless `wrap` is False. See the module docstring."""
    if len(terms) != len(strides):
        raise ValueError(f"mix_seed: {len(terms)} terms but {len(strides)} strides {strides}")
    value = sum(t * s for t, s in zip(terms, strides)) + offset
    return value % WRAP if wrap else value
