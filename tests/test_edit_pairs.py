"""Edit pairs from an edit model's own samples: `mmalign generate` of a tiny FLUX.1-Kontext pipeline
on prompt records {"prompt": instruction, "source_image": path} (each sample equals the pipeline
called by hand with that source and seed), `mmalign score` (a user scorer), `mmalign build-pairs
scores` writing {source_image, prompt, chosen, rejected} with the source copied beside the pairs,
and that file training the edit family."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusion_fixtures import write_image
from flux_kontext_fixtures import save_tiny_flux_kontext_pipeline

from mmalign.cli import main
from mmalign.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SAMPLING = ["--set", "num_inference_steps=2", "--set", "height=32", "--set", "width=32", "--set", "max_area=1024",
            "--set", "_auto_resize=false"]  # Kontext rescales its target to max_area; sources taken as they are
SCORER = """import numpy as np
from PIL import Image


def redness(conditions, outputs):  # outputs: the samples' image paths
    return [float(np.asarray(Image.open(path).convert("RGB"))[..., 0].mean()) for path in outputs]
"""


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return save_tiny_flux_kontext_pipeline(tmp_path_factory.mktemp("kontext") / "pipeline")


def edit_prompts(root: Path) -> Path:
    """Two instructions about two 32×32 sources (paths relative to the prompt file) and one 40×24
    source (another size: its own pipeline call)."""
    (root / "src").mkdir(parents=True)
    for name, (w, h) in {"a": (32, 32), "b": (32, 32), "c": (40, 24)}.items():
        write_image(root / "src" / f"{name}.png", w, h, seed=ord(name))
    rows = [{"prompt": "make it red", "source_image": "src/a.png"},
            {"prompt": "add a star", "source_image": "src/b.png"},
            {"prompt": "remove the circle", "source_image": "src/c.png"}]
    path = root / "edits.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_generate_score_build_pairs_and_train_an_edit_model(pipeline, tmp_path, capsys):
    from diffusers import FluxKontextPipeline
    from PIL import Image

    prompts, samples = edit_prompts(tmp_path / "prompts"), tmp_path / "samples"
    assert main(["generate", "--model", str(pipeline), "--prompts", str(prompts), "--out", str(samples),
                 "--num-samples", "2", "--batch-size", "6", "--seed", "3", *SAMPLING]) == 0
    rows = [json.loads(line) for line in open(samples / "manifest.jsonl")]
    assert len(rows) == 6 and all(r["kind"] == "image" for r in rows)
    assert [Path(r["source_image"]).name for r in rows] == ["a.png", "a.png", "b.png", "b.png", "c.png", "c.png"]
    # each sample is the Kontext pipeline on its own source and seed (the 40×24 source in its own call)
    pipe = FluxKontextPipeline.from_pretrained(pipeline)
    pipe.set_progress_bar_config(disable=True)
    for row in (rows[1], rows[4]):
        source = Image.open(row["source_image"]).convert("RGB")
        with torch.no_grad():
            generator = [torch.Generator().manual_seed(row["seed"])]
            expected = pipe(prompt=[row["prompt"]], image=[source], generator=generator, num_inference_steps=2,
                            height=32, width=32, max_area=1024, _auto_resize=False, output_type="np").images[0]
        got = np.asarray(Image.open(samples / row["path"]), dtype=np.int16)
        assert np.abs(got - (expected * 255).round().astype(np.int16)).max() <= 1, row["id"]

    scorer = tmp_path / "rewards.py"
    scorer.write_text(SCORER)
    assert main(["score", str(samples), "--scorer", f"python:{scorer}:redness"]) == 0
    assert main(["build-pairs", "scores", str(samples), "--out", str(tmp_path / "pairs")]) == 0
    pairs = [json.loads(line) for line in open(tmp_path / "pairs" / "pairs.jsonl")]
    scored = {r["id"]: r["score"] for r in (json.loads(line) for line in open(samples / "manifest.jsonl"))}
    assert len(pairs) == 3
    for index, pair in enumerate(pairs):
        chosen, rejected = pair["ids"]
        assert scored[chosen] > scored[rejected]  # best vs worst of the prompt's two samples
        assert pair["source_image"] == f"images/pairs-{index:06d}-source0.png"  # copied beside the pairs
        original = next(r for r in rows if r["id"] == chosen)["source_image"]
        assert (tmp_path / "pairs" / pair["source_image"]).read_bytes() == Path(original).read_bytes()
        assert {"prompt", "chosen", "rejected"} <= pair.keys()

    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "tiny" / "flux_kontext_dpo.yaml"), f"model.path={pipeline}",
                 f"data.train={tmp_path / 'pairs' / 'pairs.jsonl'}", "train.max_steps=1", "train.batch_size=2",
                 f"train.output_dir={run}", "train.progress=false", "train.tensorboard=false",
                 "train.log_every=1"]) == 0
    logged = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_an_edit_prompt_file_is_checked(pipeline, tmp_path, capsys):
    from mmalign.generate.prompts import read_prompts

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "make it red", "source_image": "missing.png"}) + "\n")
    with pytest.raises(DataError, match="line 1, source_image: image not found"):
        read_prompts(path)
    write_image(tmp_path / "a.png", 32, 32, seed=0)
    path.write_text(json.dumps({"prompt": "make it red", "source_images": ["a.png", "a.png"]}) + "\n")
    assert read_prompts(path)[0]["source_images"] == [str((tmp_path / "a.png").resolve())] * 2
    code = main(["generate", "--model", str(pipeline), "--prompts", str(path), "--out", str(tmp_path / "s"),
                 *SAMPLING])
    out = capsys.readouterr().out  # reported: Kontext takes one source per prompt
    assert code == 1 and "1 failed" in out and "2 source images; FluxKontextPipeline takes one per prompt" in out
    assert not (tmp_path / "s" / "manifest.jsonl").read_text().strip()
