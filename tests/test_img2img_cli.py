"""`ldm img2img` / scripts/img2img.py: bad input is one line, exit 2, nothing written; PNGs regenerate themselves;
txt2img's hires fix reproduces itself from its PNG bit for bit."""

import numpy as np
import pytest
from PIL import Image

from ldm.cli import img2img, txt2img
from ldm.outputs import parse_parameters, read_generation
from tests.conftest import run_main


@pytest.fixture
def files(tmp_path):
    a = np.full((64, 64, 3), 240, np.uint8)
    a[8:24, 8:24] = (220, 30, 30)
    Image.fromarray(a).save(tmp_path / "in.png")
    m = np.zeros((64, 64), np.uint8)
    m[32:, 32:] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    return tmp_path


def _run(argv, capsys):
    return run_main(img2img.main, argv, capsys)


def _refused(argv, capsys, out, *words):
    code, stdout, err = _run([*argv, "--out", str(out)], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_bad_inputs_are_one_line_exit_2_nothing_written(tiny_sd_folder, files, capsys):
    out = files / "out"
    base = ["--weights", str(tiny_sd_folder), "--prompt", "x", "--steps", "2"]
    (files / "notimage.png").write_text("hello")
    data = (files / "in.png").read_bytes()
    (files / "truncated.png").write_bytes(data[: len(data) // 2])
    black = files / "black.png"
    Image.new("L", (64, 64), 0).save(black)
    _refused(base, capsys, out, "--image")
    _refused([*base, "--image", str(files / "missing.png")], capsys, out, "missing.png", "not found")
    _refused([*base, "--image", str(files / "notimage.png")], capsys, out, "notimage.png")
    _refused([*base, "--image", str(files / "truncated.png")], capsys, out, "truncated.png")
    _refused([*base, "--image", str(files)], capsys, out, "--image")
    _refused([*base, "--image", str(files / "in.png"), "--mask", str(black)], capsys, out, "all black")
    _refused([*base, "--image", str(files / "in.png"), "--strength", "1.5"], capsys, out, "strength")
    _refused([*base, "--image", str(files / "in.png"), "--strength", "-0.1"], capsys, out, "strength")
    _refused([*base, "--image", str(files / "in.png"), "--mask-from-alpha"], capsys, out, "no transparency")
    _refused([*base, "--image", str(files / "in.png"), "--outpaint", "up=3"], capsys, out, "outpaint")
    _refused([*base, "--image", str(files / "in.png"), "--masked-content", "paint"], capsys, out, "paint")
    # an output too large for memory is refused with the estimate, before the model is loaded
    _refused(
        ["--prompt", "x", "--image", str(files / "in.png"), "--width", "65536", "--height", "65536"],
        capsys,
        out,
        "65536",
    )


def test_inpaint_metadata_and_from_png(tiny_sd_folder, files, capsys):
    out = files / "out"
    argv = ["--weights", str(tiny_sd_folder), "--image", str(files / "in.png"), "--mask", str(files / "mask.png")]
    argv += ["--prompt", "a cat", "--steps", "3", "--seed", "7", "--mask-blur", "2", "--out", str(out)]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    path = stdout.strip()
    image = Image.open(path)
    params = parse_parameters(image.text["parameters"])
    assert params["extra"]["Denoising strength"] == "1"
    assert params["extra"]["Mask blur"] == "2"
    assert params["extra"]["Masked content"] == "original"
    assert params["extra"]["Inpaint area"] == "Whole picture"
    g = read_generation(path)
    assert g.request.mask_blur == 2 and g.request.strength == 1.0
    # unmasked pixels are the input's
    a, b = np.asarray(image), np.asarray(Image.open(files / "in.png"))
    assert (a[:20, :20] == b[:20, :20]).all()
    # --from-png without the mask is refused; with it, the same pixels
    again = ["--weights", str(tiny_sd_folder), "--image", str(files / "in.png"), "--from-png", path]
    code, _, err = _run([*again, "--out", str(files / "o2")], capsys)
    assert code == 2 and "--mask" in err
    code, stdout, err = _run([*again, "--mask", str(files / "mask.png"), "--out", str(files / "o3")], capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(stdout.strip())), a)


def test_a1111_text_reads_back_image_fields(tmp_path):
    from ldm.outputs import _from_parameters

    text = (
        "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.55, "
        "Mask blur: 8, Masked content: latent noise, Inpaint area: Only masked, Masked area padding: 16, "
        "Mask mode: Inpaint not masked"
    )
    r = _from_parameters(tmp_path / "x.png", text).request
    assert (r.strength, r.mask_blur, r.masked_content, r.inpaint_area, r.inpaint_padding, r.invert_mask) == (
        0.55,
        8,
        "latent_noise",
        "masked",
        16,
        True,
    )
    hires = "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.4, "
    hires += "Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent (nearest)"
    r = _from_parameters(tmp_path / "x.png", hires).request
    assert (r.hires_scale, r.hires_strength, r.hires_steps, r.hires_upscaler, r.strength) == (
        2.0,
        0.4,
        10,
        "latent_nearest",
        None,
    )


def test_hires_fix_reproduces_itself_from_its_png(tiny_sd_folder, tmp_path, capsys):
    argv = ["--weights", str(tiny_sd_folder), "--prompt", "a cat", "--steps", "4", "--seed", "3"]
    argv += ["--hires-scale", "1.5", "--hires-steps", "3", "--hires-strength", "0.5", "--sampler", "euler_a"]
    code, stdout, err = run_main(txt2img.main, [*argv, "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    first = stdout.strip()
    assert Image.open(first).size == (96, 96)
    text = Image.open(first).text["parameters"]
    assert "Hires upscale: 1.5" in text and "Hires steps: 3" in text and "Denoising strength: 0.5" in text
    code, stdout, err = run_main(
        txt2img.main, ["--weights", str(tiny_sd_folder), "--from-png", first, "--out", str(tmp_path / "b")], capsys
    )
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(stdout.strip())))


def test_rgba_input_flattened_or_used_as_mask(tiny_sd_folder, files, capsys):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 255
    rgba[:, 40:, 3] = 0  # transparent right side
    Image.fromarray(rgba, "RGBA").save(files / "rgba.png")
    base = ["--weights", str(tiny_sd_folder), "--image", str(files / "rgba.png"), "--prompt", "x", "--steps", "2"]
    code, stdout, err = _run([*base, "--out", str(files / "flat")], capsys)
    assert code == 0, err
    code, stdout, err = _run([*base, "--mask-from-alpha", "--mask-blur", "0", "--out", str(files / "alpha")], capsys)
    assert code == 0, err
    out = np.asarray(Image.open(stdout.strip()))
    assert (out[:, :40] == 200).all()  # the opaque part kept, bit for bit


def test_mask_of_another_size_is_resized_with_a_warning(tiny_sd_folder, files, capsys):
    Image.open(files / "mask.png").resize((32, 32)).convert("RGB").save(files / "small.png")
    argv = ["--weights", str(tiny_sd_folder), "--image", str(files / "in.png"), "--mask", str(files / "small.png")]
    code, stdout, err = _run([*argv, "--prompt", "x", "--steps", "2", "--out", str(files / "o")], capsys)
    assert code == 0, err
    assert "warning:" in err and "32x32" in err


def test_help_shows_defaults(capsys):
    code, out, _ = _run(["--help"], capsys)
    assert code == 0
    for flag in ("--image", "--mask", "--strength", "--mask-blur", "--masked-content", "--inpaint-area", "--outpaint"):
        assert flag in out
    assert "(default: original)" in out.replace("\n", " ").replace("  ", " ") or "original" in out
