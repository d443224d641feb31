"""`benchmark.py --model sdxl` at toy widths (--unet-config tiny, TINY_SDXL): the U-Net step report with diffusers
holding our own tensors, the random SDXL folder both libraries load, and the end-to-end children's report. The
full-size run (docs/benchmarks.md) is by hand: it takes tens of minutes and ~20 GB.
"""

import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_sdxl_unet import SDXL_BASE_DIFFUSERS

from ldm.cli import benchmark
from ldm.cli.benchmark import TINY_SDXL, random_sdxl_folder
from ldm.formats.checkpoint import unet_to_diffusers_state_dict
from ldm.models.unet import UNetConfig

ROW_FIELDS = {
    "size",
    "dtype",
    "baseline",
    "ldm_s",
    "diffusers_s",
    "speedup",
    "rel_diff_vs_diffusers",
    "rel_diff_vs_fp32",
    "tflop",
    "attention_tflop",
    "ldm_tflops",
    "diffusers_tflops",
    "ldm_pct_of_peak",
    "times_ldm",
    "times_diffusers",
}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny random SDXL folder, in a cache dir of its own (the e2e test reuses it from there)."""
    parts = TINY_SDXL
    return random_sdxl_folder(
        tmp_path_factory.mktemp("bench-cache"),
        unet=parts["unet"],
        text=parts["text"],
        text_2=parts["text_2"],
        vae=parts["vae"],
    )


def test_published_configs_build_sdxl():
    """The full-size configs are SDXL base's (the U-Net's is ours); the tiny U-Net takes the tiny encoders' output:
    the two hidden widths as context, the bigG projection and 6 ids x 256 as the added vector."""
    assert {k: benchmark.SDXL_UNET[k] for k in SDXL_BASE_DIFFUSERS} == SDXL_BASE_DIFFUSERS
    assert benchmark.sdxl_unet_config() == UNetConfig.sdxl()
    tiny = benchmark.sdxl_unet_config(TINY_SDXL["unet"])
    assert tiny.context_dim == TINY_SDXL["text"]["hidden_size"] + TINY_SDXL["text_2"]["hidden_size"]
    assert tiny.adm_in_channels == TINY_SDXL["text_2"]["projection_dim"] + 6 * 256
    assert tiny.attention_levels == (1, 2) and tiny.head_dim == 8


def test_diffusers_unet_holds_our_tensors():
    ours = benchmark.random_unet(benchmark.sdxl_unet_config(TINY_SDXL["unet"]))
    theirs, tensors, nbytes = benchmark.shared_diffusers_unet(ours)
    mapped = unet_to_diffusers_state_dict(ours.state_dict(), ours.config)
    held = theirs.state_dict()
    assert tensors == len(mapped) == len(held)
    assert all(held[k].data_ptr() == v.data_ptr() for k, v in mapped.items())
    assert nbytes == 4 * sum(p.numel() for p in ours.parameters())
    with torch.no_grad():  # one tensor: a change of ours is a change of theirs
        ours.out[2].bias.add_(1.0)
    assert torch.equal(theirs.conv_out.bias, ours.out[2].bias)


def test_unet_step_report(tmp_path, monkeypatch, capsys):
    # the matmul peak's 2048^2 products take seconds and are not what is tested here
    monkeypatch.setattr(benchmark, "matmul_peak", lambda dtype, device: 1e11)
    out = tmp_path / "bench.json"
    argv = ["--model", "sdxl", "--unet-config", "tiny", "--only", "unet", "--sizes", "64", "--dtypes", "bf16", "fp32"]
    rc = benchmark.main(argv + ["--repeats", "1", "--warmup", "0", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["model"] == "sdxl" and r["unet_config"] == "tiny" and r["machine"]["device"] == "cpu"
    assert r["settings"]["sizes"] == [64] and "e2e" not in r
    assert r["unet_parameters"] == 3_245_700
    tiny = benchmark.random_unet(benchmark.sdxl_unet_config(TINY_SDXL["unet"]))
    assert r["unet_weights_shared"]["tensors"] == len(tiny.state_dict())
    rows = {u["dtype"]: u for u in r["unet"]}
    assert [(u["size"], u["dtype"]) for u in r["unet"]] == [(64, "bf16"), (64, "fp32")]  # in the order asked
    assert all(set(u) == ROW_FIELDS for u in r["unet"])
    assert rows["fp32"]["rel_diff_vs_diffusers"] < 1e-5  # same weights, same inputs (y vs added_cond_kwargs)
    assert rows["fp32"]["baseline"] == "diffusers fp32" and rows["bf16"]["baseline"] == "diffusers bf16 autocast"
    assert rows["bf16"]["rel_diff_vs_diffusers"] < 0.1 and rows["bf16"]["rel_diff_vs_fp32"] < 0.1  # fp32 ran first
    assert all(u["tflop"] > 0 and len(u["times_ldm"]) == len(u["times_diffusers"]) == 1 for u in r["unet"])
    text = capsys.readouterr().out
    assert "model: sdxl" in text and "sdxl U-Net step" in text and "| 64 | fp32 |" in text
    assert "holds ldm's own" in text and r["unet_process_peak_gib"] > 0


def test_sdxl_only_runs_its_sections():
    with pytest.raises(SystemExit):
        benchmark.main(["--model", "sdxl", "--only", "parts"])
    with pytest.raises(SystemExit):
        benchmark.main(["--unet-config", "tiny"])  # sd15 has no tiny


def test_random_folder_loads_in_diffusers(tiny_folder):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from safetensors import safe_open

    again = random_sdxl_folder(
        tiny_folder.parent,
        unet=TINY_SDXL["unet"],
        text=TINY_SDXL["text"],
        text_2=TINY_SDXL["text_2"],
        vae=TINY_SDXL["vae"],
    )
    assert again == tiny_folder  # written once
    assert benchmark._config_tag(dict.fromkeys(TINY_SDXL, {})) == ""  # the published configs: random-sdxl-seed0
    assert tiny_folder.name.startswith("random-sdxl-") and tiny_folder.name != "random-sdxl-seed0"
    with safe_open(str(tiny_folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_slice("conv_in.weight").get_dtype() == "F16"  # half the disk
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_folder, local_files_only=True, dtype=torch.float32)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler) and pipe.scheduler.config.timestep_spacing == "leading"
    assert pipe.unet.dtype == pipe.text_encoder_2.dtype == torch.float32
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.tokenizer_2.pad_token == "!"
    assert pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.unet.config.cross_attention_dim == 64 and pipe.text_encoder_2.config.projection_dim == 32
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=1, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_e2e_report(tiny_folder, tmp_path, monkeypatch, capsys):
    """The end-to-end section on the tiny folder (found in --cache-dir), its children run in this process: the
    command lines _run_child builds go to main() here instead of a fresh Python (seconds of imports each)."""
    real_run = subprocess.run
    commands = []

    def in_process(cmd, **kwargs):
        if cmd[1:3] != ["-m", "ldm.cli.benchmark"]:
            return real_run(cmd, **kwargs)
        commands.append(cmd)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = benchmark.main(cmd[3:])
        return subprocess.CompletedProcess(cmd, code, stdout.getvalue(), "")

    monkeypatch.setattr(subprocess, "run", in_process)
    out = tmp_path / "bench.json"
    argv = ["--model", "sdxl", "--unet-config", "tiny", "--only", "e2e", "--cache-dir", str(tiny_folder.parent)]
    assert benchmark.main(argv + ["--e2e-size", "64", "--steps", "1", "--dtypes", "fp32", "--json", str(out)]) == 0
    assert [c[c.index("--child") + 1] for c in commands] == ["ldm", "diffusers"]
    assert all(c[0] == sys.executable and "--model" in c and c[c.index("--model") + 1] == "sdxl" for c in commands)
    r = json.loads(out.read_text())
    assert r["weights"] == str(tiny_folder)
    e = r["e2e"]
    assert (e["model"], e["size"], e["steps"], e["sampler"], e["guidance_scale"]) == ("sdxl", 64, 1, "euler", 5.0)
    for key in ("ldm_fp32", "diffusers_fp32"):
        assert e[key]["run_peak_gib"] > 0 and e[key]["load_peak_gib"] > 0 and e[key]["finite"]
    assert e["image_max_abs_ldm_vs_diffusers"] <= 2 / 255  # same latents; PIL rounding (64 px: no tiled decode)
    assert e["peak_ratio_fp32"] > 0 and [x["library"] for x in e["runs"]] == ["ldm", "diffusers"]
    text = capsys.readouterr().out
    assert "end to end: txt2img 64x64, 1 euler steps, guidance 5" in text and "| ldm_fp32 |" in text
