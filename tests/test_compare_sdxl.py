"""scripts/compare_diffusers.py on the tiny SDXL base and refiner (folders and single files): every stage, SDXL's
pooled vector, time ids and added vector y among them, agrees with diffusers' StableDiffusionXL(Img2Img)Pipeline.

Tolerances: stages 1e-4 max abs, images (float, [0, 1]) 2e-3 (measured: stages <= 5e-5, images ~3e-6).
"""

import re

import numpy as np
import pytest
from conftest import run_main
from PIL import Image

from ldm.cli import compare_diffusers
from ldm.pipelines.pipeline import Pipeline

PROMPT = "a red circle at the top left"
STAGES = (
    "text embeddings",
    "pooled text vector",
    "time ids",
    "added vector y",
    "first U-Net prediction",
    "final latents",
)
IMAGES = "images (np, [0,1])"


def _stage(out: str, name: str) -> float:
    return float(re.search(r"\n  " + re.escape(name) + r"\s+(\S+)", out).group(1))


def _run(argv, capsys) -> str:
    code, out, err = run_main(compare_diffusers.main, argv, capsys)
    assert code == 0, err
    for stage in STAGES:
        assert _stage(out, stage) <= 1e-4, (stage, out)
    assert _stage(out, IMAGES) <= 2e-3, out
    return out


def _picture(path, size=(133, 70)):
    """A PNG of another size than the model's (the script fits it to --height/--width)."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, size[0])[None, :]
    a[8:40, 8:40] = (40, 160, 220)
    Image.fromarray(a).save(path)
    return path


@pytest.fixture(scope="module")
def xl_files(tiny_sdxl_folder, tiny_refiner_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare_sdxl")
    return {
        "sdxl": Pipeline.from_pretrained(tiny_sdxl_folder).save_single_file(root / "base.safetensors"),
        "refiner": Pipeline.from_pretrained(tiny_refiner_folder).save_single_file(root / "refiner.safetensors"),
        "picture": _picture(root / "input.png"),
    }


def test_base_folder_txt2img(tiny_sdxl_folder, capsys):
    argv = ["--weights", str(tiny_sdxl_folder), "--prompt", PROMPT, "--negative-prompt", "blurry", "--steps", "3"]
    out = _run(argv, capsys)
    assert "(sdxl, txt2img, 64x64, 3 DDIM steps" in out and "diffusers' StableDiffusionXLPipeline" in out
    assert "time ids: 64, 64, 0, 0, 64, 64" in out and ", y (2, 1568)" in out


def test_base_single_file_img2img(xl_files, capsys):
    """A single file: diffusers converts the U-Net itself and shares our VAE and text encoders."""
    argv = ["--weights", str(xl_files["sdxl"]), "--prompt", PROMPT, "--image", str(xl_files["picture"])]
    out = _run([*argv, "--height", "64", "--width", "64", "--steps", "4"], capsys)
    assert "(sdxl, img2img, 64x64" in out and "StableDiffusionXLImg2ImgPipeline" in out
    assert "input.png, strength 0.75" in out and "time ids: 64, 64, 0, 0, 64, 64" in out


def test_refiner_folder_refines_a_synthetic_picture(tiny_refiner_folder, capsys):
    out = _run(["--weights", str(tiny_refiner_folder), "--prompt", PROMPT, "--steps", "4"], capsys)
    assert "(sdxl_refiner, img2img, 64x64" in out and "a synthetic test picture" in out
    assert "time ids: 64, 64, 0, 0, 6" in out and "StableDiffusionXLImg2ImgPipeline" in out


def test_refiner_single_file_read_whole_by_diffusers(tiny_refiner_folder, xl_files, capsys):
    """--diffusers-config: diffusers' from_single_file converts every part of the file itself."""
    argv = ["--weights", str(xl_files["refiner"]), "--diffusers-config", str(tiny_refiner_folder), "--prompt", PROMPT]
    argv += ["--negative-prompt", "blurry", "--image", str(xl_files["picture"]), "--strength", "0.5", "--steps", "4"]
    out = _run(argv, capsys)
    assert "(sdxl_refiner, img2img, 64x128" in out and "input.png, strength 0.5" in out  # 70x133 rounded down


def test_unet_mode_feeds_the_added_vector(tiny_sdxl_folder, xl_files, capsys):
    for weights, width in ((tiny_sdxl_folder, 1568), (xl_files["refiner"], 1312)):
        code, out, err = run_main(compare_diffusers.main, ["--weights", str(weights), "--height", "32"], capsys)
        assert code == 0, err
        assert f"added y      (2, {width})" in out
        assert float(re.search(r"max \|diff\|\s+(\S+)", out).group(1)) <= 1e-5, out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--image", "x.png"], "--image is for pipeline mode: add --prompt"),
        (["--prompt", "x", "--image", "missing.png"], "--image missing.png: not found"),
        (["--prompt", "x", "--strength", "0"], "--strength 0.0 must be in (0, 1]"),
        (["--prompt", "x", "--strength", "0.2", "--steps", "4"], "samples no step"),
        (["--prompt", "x", "--diffusers-config", "."], "no model_index.json there"),
    ],
)
def test_refusals_before_loading(argv, message, capsys):
    code, _, err = run_main(compare_diffusers.main, argv, capsys)
    assert code == 2 and err == f"error: {err.removeprefix('error: ').strip()}\n" and message in err, err


def test_refusals_that_need_the_model(tiny_sdxl_folder, tmp_path, capsys):
    (tmp_path / "not-a-picture.png").write_text("text")
    cases = [
        (["--image", str(tmp_path / "not-a-picture.png")], "not a picture PIL can read"),
        (["--diffusers-config", str(tiny_sdxl_folder)], "--diffusers-config is for a single-file --weights"),
        (["--strength", "0.5"], "--strength is for img2img: add --image FILE"),
    ]
    for extra, message in cases:
        argv = ["--weights", str(tiny_sdxl_folder), "--prompt", PROMPT, *extra]
        code, _, err = run_main(compare_diffusers.main, argv, capsys)
        last = err.strip().splitlines()[-1]  # after the loaders' progress bars
        assert code == 2 and last.startswith("error: ") and message in last and err.count("error:") == 1, err
