"""The inference speed paths (issue 6) compute what the plain path computes.

channels_last, cached text keys/values and native bfloat16 norms change how the U-Net runs, not
what it returns; each is checked here against the plain path (and against diffusers through the
pipeline parity tests, which run with them on).
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import diffusers_unet, tiny_sd1_config, tiny_sd2_config

from ldm.models.unet import GroupNorm32, UNet, kv_cache_active, random_weights_
from ldm.pipelines.pipeline import Pipeline, prepare_for_inference

ROOT = Path(__file__).resolve().parents[1]


def _inputs(config, seed=0, batch=2, side=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, side, side, generator=g)
    context = torch.randn(batch, 77, config.context_dim, generator=g)
    return x, torch.tensor([10, 900]), context


@pytest.mark.parametrize("make_config", [tiny_sd1_config, tiny_sd2_config])
@torch.no_grad()
def test_channels_last_and_cached_context_match_plain_and_diffusers(make_config):
    config = make_config()
    plain = random_weights_(UNet(config), seed=3).eval()
    fast = prepare_for_inference(copy.deepcopy(plain), "cpu")
    assert fast.input_blocks[0][0].weight.is_contiguous()  # float32 stays NCHW (faster here, no weight copy)
    fast.to(memory_format=torch.channels_last)  # the reduced-precision layout, checked in float32 here
    theirs = diffusers_unet(config, plain.state_dict())
    x, t, context = _inputs(config)
    ref = plain(x, t, context)
    with fast.cached_context(context):
        cached = fast(x, t, context)
        other = torch.randn_like(context)
        # another context inside the block is not served the cached keys/values
        torch.testing.assert_close(fast(x, t, other), plain(x, t, other), rtol=0, atol=1e-5)
    assert not kv_cache_active(), "cache left behind"
    torch.testing.assert_close(cached, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(cached, theirs(x, t, encoder_hidden_states=context).sample, rtol=0, atol=1e-5)


@torch.no_grad()
def test_cached_context_is_exact_and_cleared_on_error():
    config = tiny_sd1_config()
    unet = random_weights_(UNet(config), seed=4).eval()
    x, t, context = _inputs(config)
    ref = unet(x, t, context)
    with unet.cached_context(context):
        assert torch.equal(unet(x, t, context), ref)  # same arithmetic, computed once
    with pytest.raises(RuntimeError):
        with unet.cached_context(context):
            raise RuntimeError("boom")
    assert not kv_cache_active()


def test_bf16_group_norm_runs_natively_and_matches_the_float32_upcast():
    norm = GroupNorm32(4, 16)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    x = torch.randn(2, 16, 8, 8) * 3 + 1
    native = norm.to(torch.bfloat16)(x.to(torch.bfloat16))
    upcast = torch.nn.functional.group_norm(
        x.to(torch.bfloat16).float(), 4, norm.weight.float(), norm.bias.float(), norm.eps
    ).to(torch.bfloat16)
    assert native.dtype == torch.bfloat16
    torch.testing.assert_close(native.float(), upcast.float(), rtol=0, atol=0.05)  # ~2 bf16 ulps at |y| <= 4


@torch.no_grad()
def test_attention_slicing_gives_the_same_output():
    config = tiny_sd1_config()
    unet = random_weights_(UNet(config), seed=6).eval()
    x, t, context = _inputs(config, side=16)  # 256 tokens at the first level
    ref = unet(x, t, context)
    sliced = unet.set_attention_slicing(100)(x, t, context)  # 100 does not divide 256: a short last chunk
    torch.testing.assert_close(sliced, ref, rtol=0, atol=1e-6)
    assert unet.set_attention_slicing(None).input_blocks[1][1].transformer_blocks[0].attn1.query_chunk is None
    with pytest.raises(ValueError, match="query_chunk"):
        unet.set_attention_slicing(0)


def test_float16_pipeline_keeps_the_vae_in_float32(tiny_sd_folder):
    pipe = Pipeline.from_pretrained(tiny_sd_folder, device="cpu", dtype="float16")
    assert pipe.unet.input_blocks[0][0].weight.dtype == torch.float16 and pipe.vae.dtype == torch.float32
    image = pipe("a red circle", steps=2, guidance_scale=5, seed=0, output_type="np", progress=False)
    assert np.isfinite(image).all() and image.std() > 0


def test_in_place_silu_keeps_gradients():
    config = tiny_sd1_config()
    unet = random_weights_(UNet(config), seed=5)
    plain = copy.deepcopy(unet)
    for m in plain.modules():  # the same network with out-of-place SiLUs
        if isinstance(m, torch.nn.SiLU):
            m.inplace = False
    x, t, context = _inputs(config)
    unet(x, t, context).square().mean().backward()
    plain(x, t, context).square().mean().backward()
    for (name, a), b in zip(unet.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6, msg=name)


def test_pipeline_bf16_image_close_to_fp32(tiny_sd_folder):
    fp32 = Pipeline.from_pretrained(tiny_sd_folder, device="cpu", dtype="float32")
    bf16 = Pipeline.from_pretrained(tiny_sd_folder, device="cpu", dtype="bfloat16")
    assert bf16.vae.dtype == torch.bfloat16 and fp32.vae.dtype == torch.float32
    assert bf16.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert bf16.to(dtype=torch.float32).unet.input_blocks[0][0].weight.is_contiguous()  # and back
    a = fp32("a red circle", steps=10, guidance_scale=5, seed=1, output_type="np", progress=False)
    b = bf16("a red circle", steps=10, guidance_scale=5, seed=1, output_type="np", progress=False)
    psnr = 10 * np.log10(1 / np.mean((a.astype(np.float64) - b) ** 2))
    assert np.isfinite(b).all() and psnr >= 30, psnr


@pytest.mark.slow
def test_compiled_pipeline_matches_eager(tiny_sd_folder, monkeypatch):
    """Pipeline.compile (torch.compile, inductor): same images within float rounding; a clear error
    instead when the machine has no C++ compiler for inductor."""
    import shutil

    eager = Pipeline.from_pretrained(tiny_sd_folder, device="cpu", dtype="float32")
    compiled = Pipeline.from_pretrained(tiny_sd_folder, device="cpu", dtype="float32")
    with monkeypatch.context() as m:
        m.setattr(shutil, "which", lambda name: None)
        with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
            compiled.compile()
    assert not compiled.compiled
    if not any(shutil.which(c) for c in ("g++", "clang++", "c++")):
        return  # the refusal above is this machine's behavior; nothing to compile with
    compiled.compile()
    a = eager(["a red circle", "a blue square"], steps=3, guidance_scale=5, seed=2, output_type="np", progress=False)
    b = compiled(["a red circle", "a blue square"], steps=3, guidance_scale=5, seed=2, output_type="np", progress=False)
    assert compiled.compiled and np.abs(a - b).max() < 1e-4


@pytest.mark.slow
def test_benchmark_script_runs_on_a_small_folder(tiny_sd_folder, tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "benchmark.py"),
            "--weights",
            str(tiny_sd_folder),
            "--sizes",
            "64",
            "--dtypes",
            "fp32",
            "bf16",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--steps",
            "2",
            "--e2e-size",
            "64",
            "--memory-size",
            "128",
            "--profile-size",
            "64",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [(u["size"], u["dtype"]) for u in r["unet"]] == [(64, "fp32"), (64, "bf16")]
    assert r["unet"][0]["rel_diff_vs_diffusers"] < 1e-4 and r["unet"][0]["tflop"] > 0
    assert r["e2e"]["image_max_abs_ldm_vs_diffusers"] < 2e-3
    assert r["e2e"]["ldm_fp32"]["run_peak_gib"] > 0 and r["e2e"]["diffusers_fp32"]["run_peak_gib"] > 0
    assert {p["part"] for p in r["parts"]} == {"vae decode 512px", "text encode (prompt + empty negative)"}
    assert [m["job"] for m in r["memory"]] == [
        "vae-full",
        "vae-tiled",
        "unet-ldm",
        "unet-diffusers",
        "attn-full",
        "attn-sliced",
    ]
    assert all(m["peak_gib"] > 0 and m["finite"] for m in r["memory"])
    peak = {m["job"]: m["peak_gib"] for m in r["memory"]}
    assert peak["attn-sliced"] < peak["attn-full"] / 2  # 4x fewer queries at a time, 4x smaller score matrix
    assert [(q["library"], q["dtype"]) for q in r["profile"]] == [
        ("ldm", "fp32"),
        ("diffusers", "fp32"),
        ("ldm", "bf16"),
        ("diffusers", "bf16"),
    ]
    assert r["profile"][0]["self_s_by_op"]["convolution"] > 0
    assert "| 64 | fp32 |" in done.stdout


def test_benchmark_refuses_a_non_folder(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--weights", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "not a diffusers folder" in done.stderr


def test_benchmark_soak_mode_runs_and_judges_memory(tmp_path, capsys, monkeypatch):
    """`benchmark.py --only soak` (run by hand with 1000 generations, docs/benchmarks.md) on 3: RSS after the
    reference generation and the last, their ratio, the verdict and the exit code agree; growing RSS fails."""
    from ldm.cli import benchmark

    out = tmp_path / "soak.json"
    argv = ["--only", "soak", "--soak-n", "3", "--soak-reference", "2", "--soak-steps", "1", "--json", str(out)]
    rc = benchmark.main(argv)
    soak = json.loads(out.read_text())["soak"]
    assert soak["generations"] == 3 and soak["steps"] == 1 and soak["reference_generation"] == 2
    assert soak["rss_reference_mib"] > 0 and soak["ratio"] == soak["rss_last_mib"] / soak["rss_reference_mib"]
    assert rc == (0 if soak["passed"] else 1) and "weights" not in json.loads(out.read_text())
    assert "ratio" in capsys.readouterr().out

    readings = iter(range(100, 1000, 10))  # MiB: +10% from generation 2 to 3
    monkeypatch.setattr(benchmark, "rss_bytes", lambda: next(readings) * 2**20)
    assert benchmark.main(argv) == 1
    assert json.loads(out.read_text())["soak"]["passed"] is False and "FAIL" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        benchmark.main(["--only", "soak", "--soak-n", "3", "--soak-reference", "4"])
