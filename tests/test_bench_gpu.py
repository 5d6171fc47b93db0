"""benchmarks/gpu.py: the GPU section's code, run with tiny shapes on CPU (`--tiny`)."""

import copy
import json
import math

import pytest
import torch

from benchmarks import gpu, gpu_pipelines, gpu_sdxl, gpu_text


def test_count_flops_of_a_linear_step_is_6nio():
    """Forward x @ W.T (2·n·i·o) + backward dX and dW (2·n·i·o each); the bias adds none."""
    n, i, o = 4, 16, 8
    layer = torch.nn.Linear(i, o)
    x = torch.randn(n, i, requires_grad=True)
    _, flops = gpu.count_flops(lambda: layer(x).sum().backward())
    assert flops == 6 * n * i * o


def test_peak_table_by_device_name():
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0  # SXM
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("NVIDIA H200") == 989.0
    assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.peak_tflops("NVIDIA H100 NVL") is None  # not in the table: absolute numbers only
    assert gpu.peak_tflops("Tesla T4") is None


def test_skips_with_one_line_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("GPU section skipped")


def test_full_size_configs_are_the_published_ones():
    u = gpu.SDXL_UNET
    assert u["block_out_channels"] == (320, 640, 1280) and u["transformer_layers_per_block"] == (1, 2, 10)
    # text_time: pooled bigG projection (1280) + 6 time ids x 256 = 2816; prompt width 768 + 1280 = 2048
    assert gpu.BIGG_TEXT["projection_dim"] + 6 * u["addition_time_embed_dim"] == u["projection_class_embeddings_input_dim"]
    assert gpu.CLIP_L_TEXT["hidden_size"] + gpu.BIGG_TEXT["hidden_size"] == u["cross_attention_dim"]
    v = gpu.CLIP_L336_VISION
    assert (v["image_size"] // v["patch_size"]) ** 2 == 576 and gpu.LLAMA2_7B["vocab_size"] == 32064


def unet_work_flops(s):
    """FLOPs of the UNet work of one Diffusion-DPO step counted apart: policy forward + backward
    and a frozen copy's forward, on inputs shaped like the draw (1 pair = 2 items)."""
    unet = gpu_sdxl.build_unet(s, "cpu").train()
    ref = copy.deepcopy(unet).eval().requires_grad_(False)
    side = s.resolution // 8
    parts = gpu_sdxl.sdxl_parts(s)
    kwargs = {"encoder_hidden_states": torch.randn(2, 77, parts["unet"]["cross_attention_dim"]),
              "added_cond_kwargs": {"text_embeds": torch.randn(2, parts["text_2"]["projection_dim"]),
                                    "time_ids": torch.randn(2, 6)}}
    x, t = torch.randn(2, 4, side, side), torch.tensor([3, 500])

    def step():
        unet(x, t, **kwargs).sample.pow(2).mean().backward()
        with torch.no_grad():
            ref(x, t, **kwargs)

    return gpu.count_flops(step)[1]


def test_tiny_run_writes_the_report(tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu.main(["--tiny", "--rows", "sdxl_full,llava", "--steps", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["section"] == "gpu" and report["tiny"] is True and report["peak_bf16_tflops"] is None
    assert [r["name"] for r in report["rows"]] == ["sdxl_full", "llava"]
    assert "sdxl_full" in report["table"] and report["device"] in report["table"]
    sdxl, llava = report["rows"]
    assert set(sdxl["sides"]) == {"recipe", "mmalign"} and set(llava["sides"]) == {"mmalign"}
    for side in [*sdxl["sides"].values(), *llava["sides"].values()]:
        assert len(side["losses"]) == 2 and all(math.isfinite(x) for x in side["losses"])
        assert side["pairs_per_s"] > 0 and side["step_flops"] > 0 and "peak_mib" in side
        assert side["tflops"] == pytest.approx(side["step_flops"] / side["step_ms_mean"] / 1e9)
        assert set(side["ms_per_step"]) == {*gpu.PHASES, "other"}
    mm, rec = sdxl["sides"]["mmalign"], sdxl["sides"]["recipe"]
    # mmalign trains from the cache: no VAE, no checkpointing; the recipe encodes every step, checkpointed
    assert mm["loaded_vae"] is False and mm["gradient_checkpointing"] is False and rec["gradient_checkpointing"]
    assert mm["ms_per_step"]["vae"] == 0 and rec["ms_per_step"]["vae"] > 0 and rec["ms_per_step"]["text_encoders"] > 0
    # step 0: policy == frozen reference on the same draw, so inside = 0 and the loss is log 2
    assert mm["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    # the recipe too (policy in train mode, copy in eval mode): it failed (1.12) while the CPU
    # VAE's channels-last latents sent the two modes through different bf16 conv kernels
    assert rec["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    # mmalign's cached step executes exactly the UNet work (counted apart here); the recipe adds
    # the VAE, both text encoders and the checkpointing recompute on top of the same work
    s = gpu.Settings(tiny=True).shrink()
    assert mm["step_flops"] == unet_work_flops(s) == sdxl["model_flops"]
    assert rec["step_flops"] > mm["step_flops"]
    assert rec["model_tflops"] == pytest.approx(sdxl["model_flops"] / rec["step_ms_mean"] / 1e9)
    assert llava["sides"]["mmalign"]["image_tokens"] == 16 and llava["sides"]["mmalign"]["reference"] == "lora_disabled"


def test_quick_is_one_command_of_the_issue_rows():
    """`--quick`: text at vocabulary 128,256, SD1.5 and SDXL Diffusion-DPO, Flow-DPO cache, few steps."""
    s, _ = gpu.parse(["--quick"])
    assert s.rows.split(",") == ["text_128k", "sd15_lora", "sdxl_lora", "flux_cache"]
    assert (s.steps, s.warmup, s.resolution, s.tiny) == (gpu.QUICK_STEPS, gpu.QUICK_WARMUP, 1024, False)
    tiny, _ = gpu.parse(["--quick", "--tiny"])
    assert tiny.rows == s.rows and tiny.steps == 3 and tiny.tiny
    # the full-size parts are the published architectures
    p = gpu_pipelines
    assert p.SD15_UNET["block_out_channels"] == (320, 640, 1280, 1280) and p.SD15_UNET["cross_attention_dim"] == 768
    assert p.FLUX["num_attention_heads"] * p.FLUX["attention_head_dim"] == 3072 and p.FLUX["joint_attention_dim"] == 4096
    assert p.T5_XXL["d_model"] == p.FLUX["joint_attention_dim"] and p.T5_XXL["d_ff"] == 10240
    assert gpu_text.FULL["hidden_size"] == 2048 and gpu_text.text_real.VOCAB == 128_256


def test_tiny_quick_pipeline_rows(tmp_path):
    """--quick --tiny's SD1.5 and FLUX rows on CPU: the same math on both sides of each row."""
    out = tmp_path / "gpu.json"
    assert gpu.main(["--quick", "--tiny", "--rows", "sd15_lora,flux_cache", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    sd15, flux = report["rows"]
    assert (sd15["name"], flux["name"]) == ("sd15_lora", "flux_cache") and "flux_cache" in report["table"]
    # SD1.5: step 0 has policy == reference (adapters off / a frozen copy), so both losses are log 2
    for side in sd15["sides"].values():
        assert side["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    mm, rec = sd15["sides"]["mmalign"], sd15["sides"]["recipe"]
    assert mm["loaded_vae"] is False and rec["ms_per_step"]["vae"] > 0 and mm["cache_mib"] > 0
    # FLUX: the cached side loads no text encoder and spends nothing in one; its losses equal the
    # uncached side's (float32 cache: the same latents and text states, the same draws)
    cached, uncached = flux["sides"]["cached"], flux["sides"]["uncached"]
    assert cached["loaded_text_encoders"] is False and uncached["loaded_text_encoders"] is True
    assert cached["ms_per_step"]["text_encoders"] == 0 and uncached["ms_per_step"]["text_encoders"] > 0
    assert cached["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert flux["max_loss_diff_first3"] <= 1e-4, flux["first_losses"]
    assert max(abs(a - b) for a, b in zip(cached["losses"], uncached["losses"])) <= 1e-4


def test_tiny_quick_text_row(tmp_path):
    """The text row on CPU (vocabulary 128,256, 2 layers): mmalign's chunked head, its packed
    batches and TRL score the same tokens: equal first losses."""
    row = gpu_text.text_row(tmp_path, True, 2, ("mmalign", "mmalign_packed", "trl"))
    assert row["name"] == "text_128k" and set(row["sides"]) == {"mmalign", "mmalign_packed", "trl"}
    assert row["length_mix"]["parameters"] > 2 * 128_256 * 64  # the untied head and the embedding
    assert row["sides"]["mmalign"]["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    for name in ("mmalign", "mmalign_packed"):
        assert row["max_loss_diff_first3"][name] <= 1e-4, (name, row["sides"][name]["losses"], row["sides"]["trl"]["losses"])
    for name in ("mmalign", "mmalign_packed"):  # the fast paths were used, not fallen back from
        assert row["sides"][name]["fallbacks"] == [], row["sides"][name]["fallbacks"]
    assert len(gpu_text.table_lines(row)) == 5


def test_attempt_frees_the_failed_side_before_the_retry(monkeypatch):
    """`--checkpointing auto`: after an out-of-memory error the failed side's objects (held by the
    exception's traceback frames, in reference cycles like a trainer's) are collected before the
    retry starts; freeing inside the `except` block collected nothing."""
    import gc
    import weakref

    dev = gpu.Device(tiny=True)
    dev.cuda = True  # free(): gc + empty_cache (a no-op without CUDA)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    seen = {}

    class Side:  # stands for a side's model / trainer: a reference cycle, as accelerate's wrappers make
        def __init__(self):
            self.me = self

    def run(checkpointing):
        if not checkpointing:
            side = Side()
            seen["first"] = weakref.ref(side)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        seen["alive_at_retry"] = seen["first"]() is not None
        return {"losses": [0.0], "gradient_checkpointing": checkpointing}

    gc.disable()  # only dev.free() may collect
    try:
        out = gpu.attempt(run, "auto", dev)
    finally:
        gc.enable()
    assert out["gradient_checkpointing"] is True and seen["alive_at_retry"] is False
    # "on" alone: the error is the side's result, and any other error is too (no retry)
    assert gpu.attempt(lambda c: run(False), "on", dev)["error"].startswith("out of memory")

    def broken(checkpointing):
        raise ValueError("bad shape")

    out = gpu.attempt(broken, "auto", dev)
    assert out["error"].startswith("ValueError: bad shape (at test_bench_gpu.py:") and out["gradient_checkpointing"] is False


def test_a_failed_row_leaves_the_others_and_every_finished_row_is_on_disk(monkeypatch, tmp_path):
    """Rows run in order, the report is rewritten after each one (a kill at the time limit keeps
    the finished rows), and a row that raises is recorded as failed while the next still runs."""
    out = tmp_path / "gpu.json"
    calls = []

    def fake_row(name, work, s, dev):
        calls.append(name)
        if name == "sd15_lora":
            raise RuntimeError("CUDA error: device-side assert")
        on_disk = json.loads(out.read_text())  # written when the previous row ended
        assert [r["name"] for r in on_disk["rows"]] == ["sd15_lora"] and on_disk["finished"] is False
        assert on_disk["rows"][0]["error"].startswith("RuntimeError: CUDA error") and "FAILED" in on_disk["table"]
        return {"name": name, "what": "fake", "sides": {"cached": {"error": "out of memory", "gradient_checkpointing": True}}}

    monkeypatch.setattr(gpu, "run_row", fake_row)
    assert gpu.main(["--tiny", "--rows", "sd15_lora,flux_cache", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert calls == ["sd15_lora", "flux_cache"] and report["finished"] is True
    assert [r["name"] for r in report["rows"]] == ["sd15_lora", "flux_cache"]
    assert "error" in report["rows"][0] and "error" not in report["rows"][1]
    assert all(r["seconds"] >= 0 for r in report["rows"]) and "out of memory" in report["table"]


def test_a_failed_text_side_leaves_the_others(monkeypatch, tmp_path):
    """text_128k: one side's process failing is that side's result; ratios use the sides that ran."""
    import benchmarks.__main__ as bench_main

    def fake_side(side, folder, threads, tag, module):
        if side == "mmalign":
            raise RuntimeError("mmalign run failed (exit 1); end of its log:\nTraceback ...\nValueError: boom")
        return {"pairs_per_s": 2.0, "losses": [0.69, 0.68, 0.67], "rss_growth_mib": 10.0, "fallbacks": []}

    monkeypatch.setattr(bench_main, "run_side", fake_side)
    monkeypatch.setattr(gpu_text, "prepare", lambda folder, s: {"sequence_tokens_median": 20.0, "sequence_tokens_p90": 30.0,
                                                                "sequence_tokens_max": 40, "parameters": 10**9})
    row = gpu_text.text_row(tmp_path, True, 2, ("mmalign", "trl", "trl_gc"))
    assert row["sides"]["mmalign"]["error"].endswith("ValueError: boom")
    assert row["speedup"] == {"trl": 1.0, "trl_gc": 1.0} and row["max_loss_diff_first3"]["trl_gc"] == 0.0
    assert any("FAILED: ValueError: boom" in line for line in gpu_text.table_lines(row))


def test_sigterm_during_a_row_keeps_the_finished_rows_on_disk(monkeypatch, tmp_path):
    """`timeout` kills with SIGTERM: the report on disk keeps the finished rows and names the row
    that was stopped; main's SIGTERM handler is removed again."""
    import os
    import signal

    out = tmp_path / "gpu.json"
    before = signal.getsignal(signal.SIGTERM)

    def fake_row(name, work, s, dev):
        if name == "flux_cache":
            os.kill(os.getpid(), signal.SIGTERM)  # the time limit, mid-row
        return {"name": name, "what": "fake", "sides": {}}

    monkeypatch.setattr(gpu, "run_row", fake_row)
    with pytest.raises(SystemExit) as stop:
        gpu.main(["--tiny", "--rows", "sd15_lora,flux_cache,sdxl_lora", "--out", str(out)])
    assert stop.value.code == 143 and signal.getsignal(signal.SIGTERM) == before
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["rows"]] == ["sd15_lora"] and report["stopped_during"] == "flux_cache"
    assert report["finished"] is False and "STOPPED" in report["table"]
