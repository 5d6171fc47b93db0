"""Test bodies shared by the flow-matching image families (tests/test_qwen_image.py,
test_qwen_image_edit.py, test_flux_kontext.py, test_flux2.py, test_flux2_dev.py, test_zimage.py; the dpo
and logp checks also serve test_qwen_image_edit_plus.py and test_wan.py).

Each family's test file keeps what is its own (the equality to its diffusers pipeline: encode_prompt,
the transformer's inputs, the official script's loss, the shift) and holds one `FlowFamilyCase`: what
differs between the families in the checks below. Nothing here is keyed by family name
(tests/test_families.py): every fact about a family comes in through its case object.

The shared checks, for a likelihood with logp = -0.5 · mean((v̂ - v)²) per item:
  - dpo at policy == reference: every logit 0, loss = log 2 exactly;
  - cached == uncached: the same draw (noise, σ, dropped captions bit for bit) and the same logps;
  - refusals: null_prompt zeros and a non-velocity prediction type;
  - the CLI: 2 steps of the tiny config (first loss log 2: LoRA B = 0), then every export format
    reloaded by the family's pipeline gives the merged transformer's output;
  - validation: the grid is the pipeline's own images for the same seeds."""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusion_fixtures import build_for, draw_for, indexed_pairs, perturbed, uncached

from mmalign.cli import main
from mmalign.config import Config, ConfigError, from_dict
from mmalign.losses import dpo_loss
from mmalign.types import Draw

ROOT = Path(__file__).resolve().parents[1]
EDIT_PAIRS = ROOT / "datasets" / "edit_pairs" / "train.jsonl"  # the shipped edit sample


@dataclass(frozen=True)
class FlowFamilyCase:
    """What the shared checks need to know of one family."""

    modality: str  # the config's modality (the family's name)
    save_pipeline: Callable[[Path], Path]  # writes the tiny pipeline folder at the path, returns it
    pipeline_class: str  # the diffusers pipeline that reloads the exports
    tiny_config: str  # configs/tiny/<tiny_config>.yaml
    build: dict[str, Any] = field(default_factory=dict)  # diffusion settings of `built` (resolution, ...)
    edit: bool = False  # the `pairs` fixture writes edit pairs (a source image each)
    recognised_as: str = ""  # what family_for_folder names the tiny folder; "" = the modality
    zeros_null_prompt: bool = False  # null_prompt zeros has a counterpart in its sampling (FLUX): accepted

    def build_for(self, pipeline: Path, data: Path, **diffusion: Any):
        return build_for(pipeline, data, self.modality, **dict(self.build, **diffusion))


def pipeline_and_built(case: FlowFamilyCase):
    """The module-scoped `pipeline` (the tiny folder) and `built` ((transformer, likelihood,
    processor) on the module's `pairs`) fixtures: `pipeline, built = pipeline_and_built(CASE)`."""

    @pytest.fixture(scope="module")
    def pipeline(tmp_path_factory):
        return case.save_pipeline(tmp_path_factory.mktemp(case.modality) / "pipeline")

    @pytest.fixture(scope="module")
    def built(pipeline, pairs):
        return case.build_for(pipeline, pairs["path"])

    return pipeline, built


def pairs_fixture(case: FlowFamilyCase):
    """The module-scoped `pairs` fixture ({"path": the jsonl, "records": with `_index`}): 4 image pairs,
    or 4 edit pairs (a source image each) for an edit family: `pairs = pairs_fixture(CASE)`."""

    @pytest.fixture(scope="module")
    def pairs(tmp_path_factory):
        if not case.edit:
            return indexed_pairs(tmp_path_factory.mktemp("pairs"))
        from qwen_image_edit_fixtures import write_edit_pairs

        path = write_edit_pairs(tmp_path_factory.mktemp("edit_pairs"), 4)
        return {"path": path, "records": [dict(json.loads(line), _index=i) for i, line in enumerate(open(path))]}

    return pairs


def prompts_of(records: list[dict]) -> list[str]:
    return [r["prompt"] for r in records] * 2  # chosen rows, then rejected rows


def pipe_of(case: FlowFamilyCase, likelihood, transformer, scheduler=None, **parts: Any):
    """The family's diffusers pipeline around the likelihood's own VAE, text encoders and tokenizers
    (text_encoder, text_encoder_2, ... in order) and `transformer`; `parts`: any further component."""
    import diffusers

    for i, (encoder, tokenizer) in enumerate(zip(likelihood.text_encoders, likelihood.tokenizers)):
        suffix = f"_{i + 1}" if i else ""
        parts.update({f"text_encoder{suffix}": encoder, f"tokenizer{suffix}": tokenizer})
    return getattr(diffusers, case.pipeline_class)(scheduler=scheduler or likelihood.scheduler, vae=likelihood.vae,
                                                   transformer=transformer, **parts)


def scored(built, records: list[dict]):
    """(batch, draw, the likelihood's logps output) of the built transformer on a pair batch of
    `records` drawn with seed 0."""
    transformer, likelihood, _ = built
    batch, draw = draw_for(likelihood, records)
    return batch, draw, likelihood.logps(transformer, batch, draw)


def recorded_call(likelihood, records: list[dict], recording) -> tuple[dict, dict, torch.Tensor]:
    """(the last call `recording` saw from the likelihood, the draw's values, x_t = (1 - σ) x0 + σ ε)
    for a pair batch of `records` drawn with seed 0."""
    batch, draw = draw_for(likelihood, records)
    likelihood.logps(recording, batch, draw)
    v = draw.values
    sigma = v["sigmas"].view(-1, *[1] * (v["latents"].dim() - 1))
    return recording.calls[-1], v, (1 - sigma) * v["latents"] + sigma * v["noise"]


def unshifted(likelihood, **config: Any):
    """The family's Euler scheduler at shift 1: with sigmas [1, σ_g] its only step is at σ_g."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(likelihood.scheduler.config, shift=1.0, **config)


def assert_minus_half_mse(out, mse: torch.Tensor) -> None:
    """The likelihood's per-item mse is `mse` (computed by hand) and its logp is exactly -0.5 of it."""
    torch.testing.assert_close(out.diagnostics["mse"], mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logps, -0.5 * out.diagnostics["mse"], rtol=0, atol=0)


def assert_oracle_scores_zero(likelihood, oracle: torch.nn.Module, batch, draw) -> None:
    """A denoiser that predicts the target exactly: error 0 (so the target's sign is the model's)."""
    assert likelihood.logps(oracle, batch, draw).diagnostics["mse"].abs().max().item() < 1e-12


def dpo_is_log_2_at_policy_equals_reference(built, records: list[dict], beta: float = 2000.0) -> None:
    """Policy == reference (a deep copy) on one draw: every logit 0, so the loss is log 2 exactly; the
    chosen and rejected logps differ (the check is not 0 == 0) and are finite."""
    transformer, likelihood, _ = built
    batch, draw = draw_for(likelihood, records)
    reference = likelihood.logps(transformer, batch, draw)
    same = likelihood.logps(copy.deepcopy(transformer), batch, draw)
    n = len(records)
    assert torch.isfinite(reference.logps).all() and reference.logps.shape == (2 * n,)
    assert not torch.equal(reference.logps[:n], reference.logps[n:])  # chosen and rejected differ
    loss = dpo_loss(same.pairs(), reference.pairs(), beta=beta)
    torch.testing.assert_close(loss, torch.full((n,), math.log(2)), rtol=0, atol=0)


def folder_recognition_and_refusals(case: FlowFamilyCase, pipeline: Path, data: Path) -> None:
    """The tiny folder is recognised by its layout; an epsilon prediction type is refused, and so is
    null_prompt zeros (one line naming it) unless the family's sampling has a counterpart of it."""
    from mmalign.families import family_for_folder

    assert family_for_folder(pipeline).name == (case.recognised_as or case.modality)
    if case.zeros_null_prompt:
        assert case.build_for(pipeline, data, null_prompt="zeros")[1].settings.null_prompt == "zeros"
    else:
        with pytest.raises(ConfigError, match="null_prompt: zeros"):
            case.build_for(pipeline, data, null_prompt="zeros")
    with pytest.raises(ValueError, match="velocity"):
        case.build_for(pipeline, data, prediction_type="epsilon")


def cache_config(case: FlowFamilyCase, pipeline: Path, data: Path, cache_dir: Path) -> Config:
    return from_dict(Config, {"modality": case.modality, "model": {"path": str(pipeline)}, "data": {"train": str(data)},
                              "diffusion": {"resolution": 16, "caption_dropout": 0.5, "cache_dir": str(cache_dir),
                                            "cache_dtype": "float32", "cache_shard_size": 2},
                              "train": {"progress": False}})


EXACT = ("noise", "sigmas", "timesteps", "caption_dropped", "latents")  # drawn or stored bit for bit


def cached_equals_uncached(case: FlowFamilyCase, pipeline: Path, data: Path, records: list[dict],
                           cache_dir: Path, seeds: int = 3):
    """`mmalign cache` then training from it (no VAE, no text encoder loaded): for each seed the same
    draw (EXACT keys bit for bit, the conditioning to 1e-6) and the same reference and policy logps and
    dpo loss as the uncached likelihood; both caption paths (kept, dropped) were read. Returns
    (plain, cached) likelihoods for the family's own checks of what the cache stores."""
    import mmalign.modalities.cache_writer as cw
    from mmalign.modalities import build_modality

    cfg = cache_config(case, pipeline, data, cache_dir)
    model, plain = uncached(cfg)
    cw.write_cache(cfg, plain)
    model_c, cached, _ = build_modality(cfg)
    assert cached.vae is None and cached.text_encoders == [] and type(cached.latents).__name__ == "CachedLatents"
    assert cached.objective.shift == plain.objective.shift
    batch, batch_c = plain.collate(records, "pair"), cached.collate(records, "pair")
    policy, dropped = perturbed(model), set()
    for seed in range(seeds):
        v = plain.draw(batch, torch.Generator().manual_seed(seed)).values
        w = cached.draw(batch_c, torch.Generator().manual_seed(seed)).values
        assert v.keys() == w.keys()
        for key in EXACT:
            assert torch.equal(v[key], w[key]), key
        for key in v.keys() - set(EXACT):
            torch.testing.assert_close(w[key], v[key], rtol=0, atol=1e-6, msg=key)
        dropped.update(v["caption_dropped"].tolist())
        ref, ref_c = plain.logps(model, batch, Draw(v)), cached.logps(model_c, batch_c, Draw(w))
        torch.testing.assert_close(ref_c.logps, ref.logps, rtol=0, atol=1e-6)
        pol, pol_c = plain.logps(policy, batch, Draw(v)), cached.logps(policy, batch_c, Draw(w))
        torch.testing.assert_close(pol_c.logps, pol.logps, rtol=0, atol=1e-6)
        torch.testing.assert_close(dpo_loss(pol_c.pairs(), ref_c.pairs(), beta=2000.0),
                                   dpo_loss(pol.pairs(), ref.pairs(), beta=2000.0), rtol=0, atol=1e-3)
    assert dropped == {True, False}
    return plain, cached


def train_two_steps(case: FlowFamilyCase, pipeline: Path, data: Path, run: Path) -> None:
    """`mmalign train` of the tiny config for 2 steps: step 1's loss is log 2 (LoRA B = 0: policy ==
    reference), every loss finite, and by step 2 the policy's mse has moved off the reference's."""
    assert main(["train", str(ROOT / "configs" / "tiny" / f"{case.tiny_config}.yaml"), f"model.path={pipeline}",
                 f"data.train={data}", "train.max_steps=2", "train.batch_size=2", f"train.output_dir={run}",
                 "train.progress=false", "train.tensorboard=false", "train.log_every=1"]) == 0
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["mse/policy"] != rows[-1]["mse/ref"]


def cli_trains_and_exports_every_format(case: FlowFamilyCase, pipeline: Path, data: Path, tmp_path: Path, capsys,
                                        output: Callable[[torch.nn.Module], torch.Tensor]) -> None:
    """Train 2 steps, then `mmalign export` in each of the family's formats: the merged pipeline, the
    bare transformer folder and the LoRA loaded into the base pipeline all give the merged trained
    transformer's `output` (the family's transformer call on fixed inputs), which differs from the
    untrained one's. A bare component folder gets a model_index for the LoRA's base."""
    import diffusers

    from mmalign.export import find_run, load_trained, write_model_index
    from mmalign.families import get_family

    run = tmp_path / "run"
    train_two_steps(case, pipeline, data, run)
    trained, _ = load_trained(find_run(run))
    merged = copy.deepcopy(trained).merge_and_unload().eval()
    expected = output(merged)
    Pipeline = getattr(diffusers, case.pipeline_class)
    base = pipeline
    if not (pipeline / "model_index.json").is_file():
        base = shutil.copytree(pipeline, tmp_path / "base")
        write_model_index(base, case.pipeline_class)
    assert (expected - output(Pipeline.from_pretrained(base).transformer)).abs().max() > 1e-6
    for fmt in get_family(case.modality).export_formats:
        out = tmp_path / fmt
        assert main(["export", str(run), "--to", str(out), "--format", fmt]) == 0, capsys.readouterr().err
        if fmt == "merged":
            loaded = Pipeline.from_pretrained(out).transformer
        elif fmt == "unet":
            loaded = type(merged).from_pretrained(out)
        else:
            pipe = Pipeline.from_pretrained(base)
            pipe.load_lora_weights(out)
            loaded = pipe.transformer
        torch.testing.assert_close(output(loaded), expected, rtol=1e-5, atol=1e-5, msg=fmt)


def validation_grid_is_the_pipelines_own(built, tmp_path: Path, scale: float,
                                         **guidance: Any) -> Callable[..., np.ndarray]:
    """`validate_images` at guidance `scale` for one prompt and seeds 0, 1 writes a 1 × 2 grid whose
    pixels are (±1) the family's own pipeline called with `guidance` for the same seeds. Returns, for
    the family's further checks, max |grid - the pipeline's images| as a function of other guidance."""
    from PIL import Image

    from mmalign.modalities.validation import sampling_pipeline, validate_images

    transformer, likelihood, _ = built
    out = validate_images(likelihood, transformer, 1, tmp_path, ["a red circle"], [0, 1], 2, scale)
    grid = np.asarray(Image.open(tmp_path / "grid.png"), dtype=np.int16)
    assert out["validation/images"] == 2 and grid.shape[1] == 2 * grid.shape[0]

    def direct(**kwargs: Any) -> np.ndarray:
        pipe = sampling_pipeline(likelihood, transformer)
        generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
        with torch.no_grad():
            images = pipe(prompt=["a red circle"] * 2, generator=generators, num_inference_steps=2, height=16,
                          width=16, output_type="np", **kwargs).images
        return np.concatenate([(im * 255).round().astype(np.int16) for im in images], axis=1)

    assert np.abs(grid - direct(**guidance)).max() <= 1
    return lambda **kwargs: np.abs(grid - direct(**kwargs)).max()
