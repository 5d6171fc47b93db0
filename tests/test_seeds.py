"""mix_seed returns, at every call site, exactly the value of the formula it replaced: each
expected number below is the old formula worked out by hand (pinned as a literal)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mmalign.seeds import MICRO, ROW, RUN, STEP, mix_seed


def test_strides_are_the_old_magic_numbers():
    assert (RUN, ROW, STEP, MICRO) == (1_000_003, 7_919, 1_009, 101)


@pytest.mark.parametrize("value, expected", [
    # builders/onpolicy.sample_seed: (seed*1_000_003 + index*1_009 + sample) % 2**63, seed 3, index 5, sample 2
    (mix_seed(3, 5, 2, strides=(RUN, STEP, 1)), 3_005_056),
    # ... and one that wraps: seed 2**62, index 7, sample 1
    (mix_seed(2**62, 7, 1, strides=(RUN, STEP, 1)), 4_611_686_018_427_394_968),
    # builders/corrupt.corruption_seed: (seed*1_000_003 + index*7_919) % 2**63, seed 3, index 5
    (mix_seed(3, 5), 3_039_604),
    # ... a negative seed wraps into [0, 2**63): seed -1, index 0
    (mix_seed(-1, 0), 9_223_372_036_853_775_805),
    # modalities/diffusion.example_generators: (base*1_000_003 + row*7_919 + 17) % 2**63, base 11, row 4
    (mix_seed(11, 4, offset=17), 11_031_726),
    # modalities/cache_writer.fixed_crop_fraction: (crop_seed*1_000_003 + 2*row + (split != "train")) % 2**63
    (mix_seed(42, 9, True, strides=(RUN, 2, 1)), 42_000_145),
    (mix_seed(42, 9, False, strides=(RUN, 2, 1)), 42_000_144),
    # modalities/step_sampler round sampler: t.seed*7919 + r (not reduced), seed 3, round 4
    (mix_seed(3, 4, strides=(ROW, 1), wrap=False), 23_761),
    # modalities/step_sampler round generator: t.seed*1_000_003 + r*7_919 + 17 (not reduced)
    (mix_seed(3, 4, offset=17, wrap=False), 3_031_702),
    # train/image_terms.record_seed: (seed*1_000_003 + (index+1)*7_919) % 2**63, seed 3, index 5
    (mix_seed(3, 5 + 1), 3_047_523),
    # train/trainer.step_seed: (seed*1_000_003 + step*1_009 + micro*101 + rank) % 2**63, 3, 10, 2, 1
    (mix_seed(3, 10, 2, 1, strides=(RUN, STEP, MICRO, 1)), 3_010_302),
    # data/preference.StreamSampler epoch permutation: seed*1_000_003 + epoch (not reduced)
    (mix_seed(3, 7, strides=(RUN, 1), wrap=False), 3_000_016),
    (mix_seed(2**62, 1, strides=(RUN, 1), wrap=False), 4_611_699_853_485_443_186_163_713),
    # scoring/train_step_aware.split_pairs: seed*7_919 + 1 (not reduced)
    (mix_seed(3, strides=(ROW,), offset=1, wrap=False), 23_758),
    # scoring/train_step_aware.step_generator: seed*1_000_003 + step*7_919 + 17 (not reduced),
    # also for the negative steps it is called with (-1 - start)
    (mix_seed(3, 5, offset=17, wrap=False), 3_039_621),
    (mix_seed(0, -1, offset=17, wrap=False), -7_902),
])
def test_mix_seed_equals_the_old_formulas(value, expected):
    assert value == expected and type(value) is int


def test_terms_and_strides_must_match():
    with pytest.raises(ValueError, match="2 terms but 3 strides"):
        mix_seed(1, 2, strides=(RUN, ROW, STEP))


def test_migrated_helpers_keep_their_values():
    from mmalign.builders.corrupt import corruption_seed
    from mmalign.builders.onpolicy import sample_seed
    from mmalign.data.preference import StreamSampler
    from mmalign.scoring.train_step_aware import step_generator

    assert sample_seed(3, 5, 2) == 3_005_056
    assert corruption_seed(3, 5) == 3_039_604
    assert step_generator(3, 5).initial_seed() == 3_039_621
    assert step_generator(0, -1).initial_seed() == 2**64 - 7_902  # torch's mapping of the negative seed
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(3_000_016))
    assert torch.equal(StreamSampler(10, 3)._perm(7), expected)


def test_off_limits_formulas_match_their_mix_seed_form():
    """The formulas still written out in other modules equal the mix_seed call that should replace them."""
    from mmalign.train.image_terms import record_seed
    from mmalign.train.trainer import step_seed

    for seed in (0, 3, 2**40, -5):
        for i in (0, 1, 17):
            assert record_seed(seed, i) == mix_seed(seed, i + 1)
            assert step_seed(seed, i, 2, 1) == mix_seed(seed, i, 2, 1, strides=(RUN, STEP, MICRO, 1))


def test_import_is_light():
    code = "import sys, mmalign.seeds, mmalign.errors; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
