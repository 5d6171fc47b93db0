"""The current VLM families (Qwen2.5-VL, Qwen3-VL, Gemma 3, Idefics3, SmolVLM, LLaVA-OneVision),
each a tiny random model from its real transformers classes (tests/vlm_family_fixtures.py), loaded
through its family's `build` from a `save_pretrained` folder: answer-only log-probs equal the
manual formula (float64 log-softmax of the model's logits at the answer tokens), the family's chat
template and expanded image placeholders, several images per example, prompts and image tokens
never cut, LoRA on the language model only, one DPO step (loss log 2 at policy == reference) and
`mmalign export` merged / adapter folders that load with `from_pretrained`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from vlm_family_fixtures import allow_smolvlm_without_num2words, prompt, save_family

from mmalign.config import ConfigError, load_config
from mmalign.errors import DataError
from mmalign.families import get_family
from mmalign.toyvlm import draw_shape, make_shape_pairs

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny" / "llava_dpo.yaml"
NAMES = ["qwen2_5_vl", "qwen3_vl", "gemma3", "idefics3", "smolvlm", "llava_onevision"]

# The expanded tokens of one 32x32 image (hand-derived from the tiny configs, see the fixtures).
QWEN_IMAGE = ["<|vision_start|>"] + ["<|image_pad|>"] * 4 + ["<|vision_end|>"]  # 4x4 patches / 2x2 merge
IDEFICS_IMAGE = ["<fake_token_around_image>", "<global-img>"] + ["<image>"] * 4 + ["<fake_token_around_image>"]
EXPANDED = {"qwen2_5_vl": QWEN_IMAGE, "qwen3_vl": QWEN_IMAGE, "idefics3": IDEFICS_IMAGE, "smolvlm": IDEFICS_IMAGE,
            "gemma3": ["<start_of_image>"] + ["<image_soft_token>"] * 4 + ["<end_of_image>"],
            # base tile 4x4 + one 32 px grid tile 4x4 with a newline per row: 16 + 16 + 4
            "llava_onevision": ["<image>"] * 36}
# Where each family's language model lives (independent of the families' vision_parts).
LANGUAGE_MODEL = {"qwen2_5_vl": "model.language_model.", "qwen3_vl": "model.language_model.",
                  "gemma3": "model.language_model.", "idefics3": "model.text_model.", "smolvlm": "model.text_model.",
                  "llava_onevision": "model.language_model."}


allow_smolvlm_without_num2words()  # SmolVLM folders load through AutoProcessor in-process


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlm_shapes")
    return {"one": make_shape_pairs(6, 0, root / "one"), "two": make_shape_pairs(2, 1, root / "two", 2)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Each family's tiny model + processor folder, saved once per module on first use."""
    cache: dict[str, Path] = {}

    class Folders(dict):
        def __missing__(self, name: str) -> Path:
            cache[name] = save_family(name, tmp_path_factory.mktemp(name))
            self[name] = cache[name]
            return cache[name]

    return Folders()


def config(name: str, folder: Path, data: Path, *overrides: str):
    return load_config(TINY_CONFIG, [f"modality={name}", f"model.path={folder}", f"data.train={data}", "data.eval=",
                                     "data.max_length=160", *overrides])


def records(path: Path) -> list[dict]:
    out = [dict(json.loads(line), _index=i) for i, line in enumerate(open(path))]
    for r in out:
        r["images"] = [str(path.parent / v) for v in r["images"]]
    return out


def built(name, folders, shapes, *overrides: str):
    model, lik, processor = get_family(name).build(config(name, folders[name], shapes["one"], *overrides))
    return model.eval(), lik, processor


def manual_logp(model, processor, text: str, images: list, answer: str) -> float:
    """Reference: the one unpadded sequence through the model; per-token processor outputs
    (mm_token_type_ids, token_type_ids) extended with 0 (text) over the answer; float64
    log-softmax of the logits gathered at the answer words + eos."""
    tok = processor.tokenizer
    x = dict(processor(text=[text], images=images, return_tensors="pt", add_special_tokens=False))
    p = x["input_ids"][0].tolist()
    a = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    n = len(p) + len(a)
    for key, value in list(x.items()):
        if value.shape == (1, len(p)):
            x[key] = torch.cat([value, torch.full((1, len(a)), 1 if key == "attention_mask" else 0)], 1)
    x["input_ids"] = torch.tensor([p + a])
    assert x["attention_mask"].shape == (1, n)
    with torch.no_grad():
        logprobs = model(**x).logits[0].double().log_softmax(-1)
    return sum(float(logprobs[len(p) + i - 1, t]) for i, t in enumerate(a))


@pytest.mark.parametrize("name", NAMES)
def test_answer_only_logps_template_and_placeholders(name, folders, shapes):
    model, lik, processor = built(name, folders, shapes, "lora.enabled=false")
    recs = records(shapes["one"])[:2]
    batch = lik.collate(recs, "pair")
    with torch.no_grad():
        out = lik.logps(model, batch)
    images = [[lik.read_image(r["images"][0], "x")] for r in recs]
    expected = [manual_logp(model, processor, prompt(name, 1), images[i], r[k])
                for k in ("chosen", "rejected") for i, r in enumerate(recs)]
    torch.testing.assert_close(out.logps.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=2e-5)
    assert out.tokens.tolist() == [4.0] * 4  # "a red circle" + eos: prompt and image tokens do not count
    ids, mask = batch.inputs["input_ids"], batch.inputs["loss_mask"]
    # the family's template (written out above, independently of the processor's) with the image expanded
    want = processor(text=[prompt(name, 1)], images=images[0], return_tensors="pt", add_special_tokens=False)
    n_prompt = want["input_ids"].shape[1]
    assert torch.equal(ids[0, :n_prompt], want["input_ids"][0]) and mask[:, :n_prompt].sum() == 0
    tokens = processor.tokenizer.convert_ids_to_tokens(ids[0, :n_prompt])
    expanded = EXPANDED[name]
    assert [tokens[i:i + len(expanded)] == expanded for i in range(n_prompt)].count(True) == 1
    assert tokens.count(expanded[1]) == expanded.count(expanded[1])  # one image's tokens, all of them
    assert processor.tokenizer.decode(ids[0, n_prompt:]).split() == recs[0]["chosen"].split() + ["<eos>"]


@pytest.mark.parametrize("name", NAMES)
def test_two_images_per_example(name, folders, shapes):
    model, lik, processor = built(name, folders, shapes, "lora.enabled=false")
    recs = records(shapes["two"])
    with torch.no_grad():
        out = lik.logps(model, lik.collate(recs, "pair"))
    expected = [manual_logp(model, processor, prompt(name, 2), [lik.read_image(v, "x") for v in r["images"]], r[k])
                for k in ("chosen", "rejected") for r in recs]
    torch.testing.assert_close(out.logps.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=2e-5)
    changed = [dict(recs[0], images=[recs[0]["images"][0], draw_shape("green", "triangle")]), recs[1]]
    with torch.no_grad():
        diff = (lik.logps(model, lik.collate(changed, "pair")).logps - out.logps).abs()
    assert diff[0] > 1e-6 and diff[2] > 1e-6 and diff[1] == 0 and diff[3] == 0  # that example's items only


@pytest.mark.parametrize("name", NAMES)
def test_image_tokens_are_never_cut(name, folders, shapes):
    from mmalign.modalities.llava import LlavaLikelihood

    model, lik, processor = built(name, folders, shapes, "lora.enabled=false")
    rec = records(shapes["one"])[5]
    n_prompt = int(lik.encode_prompt(rec)["input_ids"].shape[1])
    n_image = int((lik.encode_prompt(rec)["input_ids"] == lik.image_token_id).sum())
    assert n_image == EXPANDED[name].count(processor.tokenizer.convert_ids_to_tokens(lik.image_token_id))
    tight = LlavaLikelihood(processor, model.config, max_length=n_prompt + 1)
    batch = tight.collate([rec], "pair")
    assert batch.inputs["loss_mask"].sum(-1).tolist() == [1, 1]  # answers cut, never the prompt
    assert (batch.inputs["input_ids"] == lik.image_token_id).sum() == 2 * n_image
    for cut in (n_prompt, n_prompt - 2):  # the limit falls at the prompt's end / inside it
        with pytest.raises(DataError, match=rf"example 5: prompt has {n_prompt} tokens .*never cut"):
            LlavaLikelihood(processor, model.config, max_length=cut).collate([rec], "pair")


@pytest.mark.parametrize("name", NAMES)
def test_lora_targets_only_the_language_model(name, folders, shapes):
    """Every Linear leaf name of the whole model (vision tower and projector included) as
    targets: exactly the language model's Linear layers get adapters."""
    from mmalign.train.setup import apply_lora

    base, _, _ = built(name, folders, shapes, "lora.enabled=false")
    linear = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    leaves = sorted({n.split(".")[-1] for n in linear if not n.split(".")[-1].isdigit()} - {"lm_head"})
    expected = {n for n in linear if n.startswith(LANGUAGE_MODEL[name])}
    assert linear - expected - {"lm_head"}  # the vision side has Linear layers too (the trap exists)
    cfg = config(name, folders[name], shapes["one"], "lora.enabled=true", f"lora.target_modules=[{','.join(leaves)}]")
    model, _, _ = get_family(name).build(cfg)
    wrapped = {n.removeprefix("base_model.model.") for n, m in apply_lora(model, cfg).named_modules()
               if hasattr(m, "lora_A")}
    assert wrapped == expected


def test_the_vlm_families_are_registered():
    from mmalign.families import family_names

    assert set(NAMES) | {"llava"} <= set(family_names())
    for name in NAMES:
        family = get_family(name)
        assert (family.kind, family.sample, family.export_formats) == ("vlm", "text", ("merged", "lora"))


def test_a_folder_of_another_family_is_refused(folders, shapes):
    with pytest.raises(ConfigError, match="holds a 'gemma3' model; modality 'qwen2_5_vl' loads qwen2_5_vl"):
        get_family("qwen2_5_vl").build(config("qwen2_5_vl", folders["gemma3"], shapes["one"]))


@pytest.mark.parametrize("name", NAMES)
def test_dpo_step_and_export_load_with_from_pretrained(name, folders, shapes, tmp_path):
    """Two LoRA DPO steps through the CLI (step 1: policy == reference, so loss = log 2), then
    `mmalign export`: the merged folder loads with AutoModelForImageTextToText and gives the
    trained logits; the adapter folder loads with PeftModel onto the base."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmalign.cli import main

    out, folder = tmp_path / "run", folders[name]
    assert main(["train", str(TINY_CONFIG), f"modality={name}", f"model.path={folder}", f"data.train={shapes['one']}",
                 "data.eval=", f"train.output_dir={out}", "train.max_steps=2", "train.batch_size=2", "optim.lr=0.05",
                 "optim.warmup_steps=0", "loss.sft_weight=0", "train.log_every=1", "train.progress=false",
                 "train.tensorboard=false", "data.max_length=160"]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert len(rows) == 2 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[1]["rewards/margins"] != 0.0
    assert main(["export", str(out), "--to", str(tmp_path / "merged"), "--format", "merged"]) == 0
    assert main(["export", str(out), "--to", str(tmp_path / "adapter"), "--format", "lora"]) == 0
    processor = AutoProcessor.from_pretrained(tmp_path / "merged")
    x = processor(text=[prompt(name, 1) + "a red circle"], images=[draw_shape("red", "circle")], return_tensors="pt",
                  add_special_tokens=False)
    with torch.no_grad():
        trained = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(folder),
                                            str(out / "final")).eval()(**x).logits
        base_logits = AutoModelForImageTextToText.from_pretrained(folder).eval()(**x).logits
        assert not torch.allclose(trained, base_logits, atol=1e-4)  # the adapters learned something
        merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
        assert type(merged).__name__ == type(AutoModelForImageTextToText.from_pretrained(folder)).__name__
        torch.testing.assert_close(merged(**x).logits, trained, rtol=1e-4, atol=1e-4)
        adapter = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(folder),
                                            str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(adapter(**x).logits, trained, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_chunked_lm_head_equals_full_logits_and_gradients(name, folders, shapes):
    """model.lm_head_chunk (issue 20): the answer tokens through the head in chunks give the full
    logits' log-probs and gradients (Gemma 3's soft-capping included), checked once per model."""
    recs = records(shapes["one"])[:2]
    results = []
    for chunk in (0, 3):
        model, lik, _ = built(name, folders, shapes, "lora.enabled=false", f"model.lm_head_chunk={chunk}")
        model.zero_grad()
        out = lik.logps(model, lik.collate(recs, "pair"))
        out.logps.sum().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((out.logps.detach(), grads, lik.checked))
    (full, g_full, checked_full), (mine, g_mine, checked) = results
    assert checked_full == {} and list(checked.values()) == [(False, True)]
    torch.testing.assert_close(mine, full, rtol=0, atol=1e-5)
    assert g_mine.keys() == g_full.keys() and g_full
    for k in g_full:
        torch.testing.assert_close(g_mine[k], g_full[k], rtol=1e-4, atol=1e-6, msg=k)
