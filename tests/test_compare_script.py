"""scripts/compare_diffusers.py on small checkpoints: diffusers loads them its own way, outputs agree."""

import re

import pytest
from conftest import tiny_sd1_config, tiny_sd2_config
from safetensors.torch import save_file

from ldm.cli import compare_diffusers
from ldm.formats.checkpoint import save_unet_diffusers
from ldm.models.unet import UNet, random_weights_


def _max_diff(out: str) -> float:
    return float(re.search(r"max \|diff\|\s+(\S+)", out).group(1))


def test_single_file_and_folder(tmp_path, capsys):
    # 8 heads and 32 norm groups: what config detection assumes for a < 1024-wide context
    unet = random_weights_(UNet(tiny_sd1_config(num_heads=8, norm_groups=32)), seed=0)
    save_file({"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}, tmp_path / "m.safetensors")
    assert (
        compare_diffusers.main(["--weights", str(tmp_path / "m.safetensors"), "--height", "64", "--width", "64"]) == 0
    )
    out = capsys.readouterr().out
    assert _max_diff(out) <= 1e-5

    folder = save_unet_diffusers(random_weights_(UNet(tiny_sd2_config()), seed=1), tmp_path / "pipe" / "unet")
    assert compare_diffusers.main(["--weights", str(folder.parent), "--height", "48", "--width", "64"]) == 0
    assert _max_diff(capsys.readouterr().out) <= 1e-5


def test_bad_input_exit_codes(tmp_path, capsys):
    """More cases, each in a fresh process that never imports torch: tests/test_cli_faults.py."""
    assert compare_diffusers.main(["--weights", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors: not found" in capsys.readouterr().err
    assert compare_diffusers.main(["--height", "500"]) == 2
    assert capsys.readouterr().err == "error: --height 500 must be a multiple of 8 in 8 .. 8192\n"
    with pytest.raises(SystemExit) as e:
        compare_diffusers.main(["--height", "tall"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: argument --height: invalid int")


def test_unet_mode_on_float16_files(tmp_path, capsys):
    """float16 files (the demo model, most published checkpoints; a float16 diffusers folder): both U-Nets
    are compared in float32, as in pipeline mode, instead of failing on a dtype mismatch."""
    import torch

    from ldm.pipelines.pipeline import DEMO_MODEL

    assert compare_diffusers.main(["--weights", str(DEMO_MODEL), "--height", "64", "--width", "64"]) == 0
    out = capsys.readouterr().out
    assert "in_channels=4" in out and _max_diff(out) <= 1e-5, out

    half = random_weights_(UNet(tiny_sd1_config(num_heads=8, norm_groups=32)), seed=2).to(torch.float16)
    folder = save_unet_diffusers(half, tmp_path / "pipe" / "unet")
    assert compare_diffusers.main(["--weights", str(folder.parent), "--height", "32", "--width", "32"]) == 0
    assert _max_diff(capsys.readouterr().out) <= 1e-5


def _stage(out: str, name: str) -> float:
    return float(re.search(re.escape(name) + r"\s+(\S+)", out).group(1))


def test_pipeline_mode_folder_and_single_file(tiny_sd_folder, tmp_path, capsys):
    from ldm.pipelines.pipeline import Pipeline

    single = Pipeline.from_pretrained(tiny_sd_folder).save_single_file(tmp_path / "tiny.safetensors")
    for weights in (tiny_sd_folder, single):
        argv = ["--weights", str(weights), "--prompt", "a red circle", "--negative-prompt", "blurry", "--steps", "4"]
        assert compare_diffusers.main(argv) == 0
        out = capsys.readouterr().out
        for stage in ("text embeddings", "first U-Net prediction", "final latents", "images (np, [0,1])"):
            assert _stage(out, stage) <= 1e-4, (weights, stage, out)
        assert "PSNR" in out


def test_pipeline_mode_on_the_demo_model(capsys):
    """The demo model: a float16 single file, v-prediction on a zero-terminal-SNR schedule with trailing
    timesteps; diffusers' DDIMScheduler with the same settings gives the same images (measured: latents
    3.1e-6 apart, 136.7 dB)."""
    from ldm.pipelines.pipeline import DEMO_MODEL

    argv = [
        "--weights",
        str(DEMO_MODEL),
        "--prompt",
        "a red circle to the left of a blue square",
        "--steps",
        "25",
        "--guidance",
        "2.5",
    ]
    assert compare_diffusers.main(argv) == 0
    out = capsys.readouterr().out
    for stage in ("text embeddings", "first U-Net prediction", "final latents", "images (np, [0,1])"):
        assert _stage(out, stage) <= 1e-4, (stage, out)


def test_pipeline_mode_img2img(tiny_sd_folder, tmp_path, capsys):
    """--image: img2img through diffusers' StableDiffusionImg2ImgPipeline; an SD model has no SDXL rows."""
    import numpy as np
    from PIL import Image

    a = np.zeros((64, 64, 3), np.uint8)
    a[..., 1] = np.linspace(0, 255, 64)[:, None]
    a[16:48, 8:40] = (220, 40, 30)
    Image.fromarray(a).save(tmp_path / "in.png")
    argv = ["--weights", str(tiny_sd_folder), "--prompt", "a red circle", "--image", str(tmp_path / "in.png")]
    assert compare_diffusers.main([*argv, "--strength", "0.6", "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "(sd, img2img, 64x64" in out and "StableDiffusionImg2ImgPipeline" in out and "strength 0.6" in out
    for stage in ("text embeddings", "first U-Net prediction", "final latents", "images (np, [0,1])"):
        assert _stage(out, stage) <= 1e-4, (stage, out)
    assert "pooled text vector" not in out and "time ids" not in out and ", y (" not in out
