"""The pixel side of img2img / inpainting / outpainting (ldm.pipelines.images): reading hostile image files,
mode conversions, masks, A1111's resize modes, fill, crop region, overlay and outpainting. Small synthetic
images only: offline and fast."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFile

from ldm.pipelines import images
from ldm.pipelines.images import (
    RESIZE_MODE_LABELS,
    RESIZE_MODES,
    alpha_mask,
    binarize,
    blur_mask,
    crop_region,
    fill_masked,
    has_alpha,
    image_size,
    load_image,
    outpaint_canvas,
    outpaint_keep_alpha,
    overlay,
    parse_outpaint,
    prepare_mask,
    resize_image,
    resize_mode_from_label,
    to_rgb,
)


def noise(width: int, height: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def square_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- reading files


def test_load_image_decodes_in_its_own_mode(tmp_path):
    rgba = noise(24, 16, 4)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.mode == "RGBA" and image.size == (24, 16)
    assert np.array_equal(np.asarray(image), rgba)
    assert image_size(tmp_path / "a.png") == (24, 16)


def test_load_image_missing_folder_and_fifo(tmp_path):
    with pytest.raises(ValueError) as e:
        load_image(tmp_path / "nope.png")
    assert f"--image {tmp_path / 'nope.png'}: not found" in one_line_error(e)
    with pytest.raises(ValueError) as e:
        load_image(tmp_path, what="--mask")
    assert one_line_error(e).startswith(f"--mask {tmp_path}: not a regular file but a folder")
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(tmp_path / "pipe.png")  # no writer: opening it for reading the usual way would hang
    with pytest.raises(ValueError) as e:
        load_image(tmp_path / "pipe.png")
    assert "a FIFO" in one_line_error(e)
    with pytest.raises(ValueError, match="a FIFO"):
        image_size(tmp_path / "pipe.png")
    with pytest.raises(ValueError, match="not found"):
        image_size(tmp_path / "nope.png")


def test_load_image_unreadable(tmp_path, monkeypatch):
    path = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(path)
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root reads through chmod 000
        path.chmod(0)
        try:
            with pytest.raises(ValueError, match="cannot be read"):
                load_image(path)
        finally:
            path.chmod(0o644)
    real_open = os.open

    def refusing_open(name, *args, **kwargs):
        if os.fspath(name) == os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    with pytest.raises(ValueError) as e:
        load_image(path)
    message = one_line_error(e)
    assert message.startswith(f"--image {path}: cannot be read (Permission denied)")
    assert "permissions" in message


def test_load_image_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are not pixels\n" * 10)
    with pytest.raises(ValueError) as e:
        load_image(path)
    assert f"--image {path}: not an image" in one_line_error(e)
    with pytest.raises(ValueError, match="not an image"):
        image_size(path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="not an image"):
        load_image(tmp_path / "empty.png")


def test_load_image_truncated_whatever_load_truncated_images_says(tmp_path, monkeypatch):
    path = tmp_path / "cut.png"
    Image.fromarray(noise(64, 64)).save(path)  # noise does not compress: half the file is half the pixels
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert image_size(path) == (64, 64)  # the header is intact
    for flag in (False, True):
        monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", flag)
        with pytest.raises(ValueError) as e:
            load_image(path)
        assert f"--image {path}: is truncated or corrupt" in one_line_error(e)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is flag  # put back as found


def test_too_many_pixels_from_the_header(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 30)).save(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    for read in (load_image, image_size):
        with pytest.raises(ValueError) as e:
            read(path)
        assert f"--image {path}: 40x30 is too many pixels" in one_line_error(e)
    monkeypatch.setattr(images, "MAX_PIXELS", 1200)
    assert load_image(path).size == (40, 30)


@pytest.mark.parametrize("limit", [500, 1000])  # PIL's error (over twice its limit), and its warning
def test_pil_decompression_bomb_check_is_an_error(tmp_path, monkeypatch, limit):
    path = tmp_path / "bomb.png"
    Image.new("L", (40, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ValueError) as e:
        load_image(path)
    assert f"--image {path}: too many pixels (Image size (1200 pixels)" in one_line_error(e)


# --------------------------------------------------------------------------- modes


def test_to_rgb_flattens_transparency_onto_the_background():
    rgba = Image.new("RGBA", (4, 2), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (10, 20, 30, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    assert has_alpha(rgba) and not has_alpha(Image.new("RGB", (2, 2)))
    rgb = to_rgb(rgba)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((2, 0)) == (10, 20, 30)
    assert all(abs(v - 127) <= 1 for v in rgb.getpixel((1, 0)))
    assert to_rgb(rgba, background=(0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)
    la = Image.new("LA", (2, 2), (50, 0))
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("La", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_to_rgb_palette_transparency_and_other_modes():
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    assert has_alpha(p)
    assert to_rgb(p).getpixel((0, 0)) == (255, 255, 255) and to_rgb(p).getpixel((1, 0)) == (0, 0, 255)
    assert to_rgb(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    assert [to_rgb(sixteen).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255,) * 3]
    assert to_rgb(Image.new("I", (1, 1), 65535)).getpixel((0, 0)) == (255, 255, 255)
    rgb = Image.fromarray(noise(4, 4))
    copy = to_rgb(rgb)
    assert copy is not rgb and np.array_equal(np.asarray(copy), np.asarray(rgb))


def test_alpha_mask_is_the_inverse_of_alpha():
    rgba = Image.fromarray(np.dstack([noise(3, 1)] + [np.array([[0, 128, 255]], np.uint8)]))
    assert list(np.asarray(alpha_mask(rgba))[0]) == [255, 127, 0]
    assert alpha_mask(rgba).mode == "L"
    assert list(np.asarray(alpha_mask(Image.new("LA", (1, 1), (9, 255))))[0]) == [0]
    with pytest.raises(ValueError, match="no alpha channel"):
        alpha_mask(Image.new("RGB", (2, 2)))


def test_prepare_mask_modes_and_notes():
    mask, notes = prepare_mask(square_mask((8, 8), (0, 0, 4, 8)), (8, 8))
    assert mask.mode == "L" and notes == []
    gray_rgb = Image.new("RGB", (8, 8), (200, 200, 200))
    mask, notes = prepare_mask(gray_rgb, (8, 8))
    assert mask.getpixel((0, 0)) == 200 and notes == []
    mask, notes = prepare_mask(Image.new("RGB", (8, 8), (255, 0, 0)), (8, 8))
    assert mask.getpixel((0, 0)) == Image.new("RGB", (1, 1), (255, 0, 0)).convert("L").getpixel((0, 0))
    assert notes and "in colour" in notes[0]
    rgba = Image.new("RGBA", (8, 8), (255, 255, 255, 255))
    rgba.putpixel((0, 0), (255, 255, 255, 0))
    mask, notes = prepare_mask(rgba, (8, 8))
    assert mask.getpixel((0, 0)) == 0 and mask.getpixel((1, 1)) == 255  # transparent = keep
    assert notes == ["--mask has transparent pixels: read as black (keep)"]
    mask, notes = prepare_mask(Image.new("1", (8, 8), 1), (8, 8))
    assert mask.mode == "L" and mask.getpixel((0, 0)) == 255 and notes == []
    mask, _ = prepare_mask(Image.fromarray(np.full((8, 8), 65535, np.uint16)), (8, 8))
    assert mask.getpixel((3, 3)) == 255


def test_prepare_mask_resizes_with_a_note():
    mask, notes = prepare_mask(square_mask((32, 32), (0, 0, 16, 32)), (64, 64), what="--mask m.png")
    assert mask.size == (64, 64) and mask.getpixel((0, 0)) == 255 and mask.getpixel((63, 0)) == 0
    assert notes == ["--mask m.png is 32x32, the image 64x64: resized"]
    _, notes = prepare_mask(Image.new("L", (32, 16)), (64, 64))
    assert notes == ["--mask is 32x16, the image 64x64: resized (stretched: another aspect ratio)"]
    with pytest.raises(ValueError, match="must be \\(width, height\\)"):
        prepare_mask(Image.new("L", (8, 8)), (0, 8))


# --------------------------------------------------------------------------- resizing


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("source", [(48, 32), (32, 48), (16, 16)])
def test_resize_sizes_and_identity(mode, source):
    image = Image.fromarray(noise(*source))
    assert resize_image(image, 40, 24, mode).size == (40, 24)
    assert resize_image(image, 24, 40, mode).size == (24, 40)
    same = resize_image(image, *source, mode=mode)
    assert same is not image and np.array_equal(np.asarray(same), np.asarray(image))


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_resize_odd_sizes(mode):
    for source, target in [((1, 7), (1, 17)), ((1, 1), (9, 5)), ((39, 1), (2, 49)), ((5, 3), (3, 5))]:
        assert resize_image(Image.fromarray(noise(*source)), *target, mode=mode).size == target


def test_resize_is_diffusers_default():
    image = Image.fromarray(noise(30, 20))
    expected = image.resize((16, 16), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(resize_image(image, 16, 16)), np.asarray(expected))


def test_crop_keeps_the_centre():
    pixels = noise(64, 32)
    out = resize_image(Image.fromarray(pixels), 32, 32, "crop")
    assert np.array_equal(np.asarray(out), pixels[:, 16:48])  # scale 1: the centre, untouched
    wide = np.zeros((32, 96, 3), np.uint8)
    wide[:, 32:64] = (0, 255, 0)
    out = np.asarray(resize_image(Image.fromarray(wide), 16, 16, "crop")).astype(int)
    assert (np.abs(out[:, 4:12] - (0, 255, 0)) <= 2).all()  # the green centre third survives the halving


def test_fill_bands_repeat_the_edges():
    pixels = noise(32, 16)
    out = np.asarray(resize_image(Image.fromarray(pixels), 32, 32, "fill"))
    assert np.array_equal(out[8:24], pixels)  # fits at scale 1, centred
    assert (out[:8] == pixels[0]).all() and (out[24:] == pixels[-1]).all()
    out = np.asarray(resize_image(Image.fromarray(noise(16, 32)), 32, 32, "fill"))
    assert (out[:, :8] == out[:, 8:9]).all() and (out[:, 24:] == out[:, 23:24]).all()
    out = np.asarray(resize_image(Image.fromarray(noise(64, 16)), 32, 16, "fill"))
    assert out.shape == (16, 32, 3) and (out[:4] == out[4]).all() and (out[12:] == out[11]).all()


def test_resize_mode_errors_and_labels():
    with pytest.raises(ValueError, match="resize mode 'stretch' is not one of resize, crop, fill"):
        resize_image(Image.new("RGB", (4, 4)), 8, 8, "stretch")
    with pytest.raises(ValueError, match="positive integers"):
        resize_image(Image.new("RGB", (4, 4)), 0, 8)
    for number, (ours, label) in enumerate(RESIZE_MODE_LABELS.items()):
        assert resize_mode_from_label(ours) == ours
        assert resize_mode_from_label(label) == ours
        assert resize_mode_from_label(label.upper()) == ours
        assert resize_mode_from_label(number) == ours
        assert resize_mode_from_label(str(number)) == ours
    for bad in ("stretch", 3, "3", True, None):
        with pytest.raises(ValueError) as e:
            resize_mode_from_label(bad)  # type: ignore[arg-type]
        assert "'Just resize'" in one_line_error(e)


# --------------------------------------------------------------------------- masks


def test_blur_and_binarize():
    mask = square_mask((64, 64), (16, 16, 48, 48))
    same = blur_mask(mask, 0)
    assert same is not mask and np.array_equal(np.asarray(same), np.asarray(mask))
    blurred = np.asarray(blur_mask(mask, 4))
    assert blurred.dtype == np.uint8 and blurred[32, 32] == 255 and blurred[0, 0] == 0
    assert 64 < blurred[16, 32] < 192 and 0 < blurred[14, 32] < blurred[18, 32] < 255  # the edge fades
    with pytest.raises(ValueError, match="mask blur must be an integer >= 0"):
        blur_mask(mask, -1)
    gray = Image.fromarray(np.array([[0, 127, 128, 255]], np.uint8))
    b = binarize(gray)
    assert b.dtype == np.float32 and b.shape == (1, 4) and list(b[0]) == [0, 0, 1, 1]


def test_fill_masked_spreads_the_surroundings():
    pixels = np.zeros((40, 40, 3), np.uint8)
    pixels[:] = (200, 50, 30)
    pixels[10:30, 10:30] = noise(20, 20)  # what the mask hides must not show through
    mask = square_mask((40, 40), (10, 10, 30, 30))
    out = np.asarray(fill_masked(Image.fromarray(pixels), mask)).astype(int)
    assert (np.abs(out[10:30, 10:30] - (200, 50, 30)) <= 1).all()
    known = np.asarray(mask) < 128
    assert np.array_equal(out[known], pixels[known])
    half = np.zeros((16, 32, 3), np.uint8)
    half[:, :16] = (255, 0, 0)
    half[:, 16:] = (0, 0, 255)
    out = np.asarray(fill_masked(Image.fromarray(half), square_mask((32, 16), (12, 0, 20, 16)))).astype(int)
    assert out[8, 12, 0] > out[8, 19, 0] and out[8, 19, 2] > out[8, 12, 2]  # each side's colour spreads in
    everything = fill_masked(Image.fromarray(noise(9, 7)), Image.new("L", (9, 7), 255))
    assert len(np.unique(np.asarray(everything).reshape(-1, 3), axis=0)) == 1
    assert everything.getpixel((0, 0)) == tuple(np.rint(noise(9, 7).reshape(-1, 3).mean(0)).astype(int))
    nothing = fill_masked(Image.fromarray(noise(9, 7)), Image.new("L", (9, 7), 0))
    assert np.array_equal(np.asarray(nothing), noise(9, 7))
    with pytest.raises(ValueError, match="the mask is 8x8, the image to fill 9x7"):
        fill_masked(Image.fromarray(noise(9, 7)), Image.new("L", (8, 8)))
    with pytest.raises(ValueError, match="not RGB"):
        fill_masked(Image.new("RGBA", (8, 8)), Image.new("L", (8, 8)))


def test_crop_region():
    mask = square_mask((64, 64), (20, 20, 30, 30))  # a 10x10 blob
    assert crop_region(mask, 4, 64, 64) == (16, 16, 34, 34)
    assert crop_region(mask, 0, 512, 512) == (20, 20, 30, 30)
    assert crop_region(mask, 4, 128, 64) == (7, 16, 43, 34)  # widened to 2:1 around its centre
    assert crop_region(mask, 4, 64, 128) == (16, 7, 34, 43)
    edge = square_mask((64, 64), (0, 20, 10, 30))
    assert crop_region(edge, 4, 64, 64) == (0, 16, 18, 34)  # padding cut at the edge, then shifted off it
    right = square_mask((64, 64), (54, 20, 64, 30))
    assert crop_region(right, 4, 64, 64) == (46, 16, 64, 34)
    assert crop_region(mask, 4, 256, 64) == (0, 16, 64, 34)  # 72 wide wanted: clamped to the mask
    assert crop_region(Image.new("L", (64, 64), 255), 32, 64, 64) == (0, 0, 64, 64)
    with pytest.raises(ValueError, match="the mask is all black"):
        crop_region(Image.new("L", (64, 64)), 4, 64, 64)
    with pytest.raises(ValueError, match="inpaint padding must be an integer >= 0"):
        crop_region(mask, -1, 64, 64)


def test_overlay_keeps_the_original_bit_for_bit():
    original, generated = noise(32, 24, seed=1), noise(32, 24, seed=2)
    alpha = np.zeros((24, 32), np.uint8)
    alpha[:, 16:] = 255
    alpha[:, 8:16] = np.arange(8, dtype=np.uint8)[None] * 30
    out = np.asarray(overlay(Image.fromarray(original), Image.fromarray(generated), Image.fromarray(alpha)))
    assert np.array_equal(out[:, :8], original[:, :8]) and np.array_equal(out[:, 16:], generated[:, 16:])
    a = alpha[:, 8:16, None] / 255
    expected = generated[:, 8:16] * a + original[:, 8:16] * (1 - a)
    assert (np.abs(out[:, 8:16] - expected) <= 0.5 + 1e-9).all()


def test_overlay_with_a_box():
    original = noise(32, 32, seed=1)
    alpha = np.asarray(square_mask((32, 32), (8, 8, 24, 24)))
    region = Image.new("RGB", (8, 8), (0, 255, 0))  # the work region at half the box's size
    out = np.asarray(overlay(Image.fromarray(original), region, Image.fromarray(alpha), box=(8, 8, 24, 24)))
    assert np.array_equal(out[alpha == 0], original[alpha == 0])
    assert (out[8:24, 8:24] == (0, 255, 0)).all()
    with pytest.raises(ValueError, match="not a non-empty box inside the 32x32 image"):
        overlay(Image.fromarray(original), region, Image.fromarray(alpha), box=(8, 8, 40, 24))
    with pytest.raises(ValueError, match="the generated image is 8x8, the original image 32x32"):
        overlay(Image.fromarray(original), region, Image.fromarray(alpha))
    with pytest.raises(ValueError, match="the overlay mask is 8x8"):
        overlay(Image.fromarray(original), region, Image.new("L", (8, 8)), box=(8, 8, 24, 24))


# --------------------------------------------------------------------------- outpainting


def test_parse_outpaint():
    assert parse_outpaint("left=128,bottom=64") == (128, 0, 0, 64)
    assert parse_outpaint(" right = 32 ") == (0, 0, 32, 0)
    assert parse_outpaint("top=8, left=16 ,right=24,bottom=40") == (16, 8, 24, 40)
    for bad, message in [
        ("", "is empty"),
        ("left=128,", "bad part ''"),
        ("up=8", "bad part 'up=8'"),
        ("left:8", "bad part 'left:8'"),
        ("left=-8", "bad part 'left=-8'"),
        ("left=8.5", "bad part 'left=8.5'"),
        ("left=0", "must add 1 to 8192 pixels"),
        ("left=" + "9" * 5000, "must add 1 to 8192 pixels"),
        ("left=8,left=16", "left is given twice"),
    ]:
        with pytest.raises(ValueError) as e:
            parse_outpaint(bad)
        assert message in one_line_error(e)
        assert "left=128,bottom=64" in str(e.value) or "twice" in str(e.value)


def test_outpaint_canvas_and_keep_alpha():
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[:] = (10, 120, 240)
    canvas, mask = outpaint_canvas(Image.fromarray(pixels), 8, 0, 0, 4)
    assert canvas.size == mask.size == (24, 20) and canvas.mode == "RGB" and mask.mode == "L"
    c, m = np.asarray(canvas).astype(int), np.asarray(mask)
    assert np.array_equal(c[0:16, 8:24], pixels) and (m[0:16, 8:24] == 0).all()
    assert (m[:, :8] == 255).all() and (m[16:] == 255).all()
    assert (np.abs(c[m == 255] - (10, 120, 240)) <= 1).all()  # spread from the edge
    alpha = blur_mask(mask, 4)
    kept = np.asarray(outpaint_keep_alpha(alpha, mask))
    assert (kept[m == 0] == 0).all() and np.array_equal(kept[m == 255], np.asarray(alpha)[m == 255])
    assert np.asarray(alpha)[m == 0].any()  # the blur did reach into the original: forced back to 0
    generated = Image.fromarray(noise(24, 20))
    out = np.asarray(overlay(canvas, generated, Image.fromarray(kept)))
    assert np.array_equal(out[0:16, 8:24], pixels)
    with pytest.raises(ValueError, match="outpaint left must be an integer >= 0"):
        outpaint_canvas(Image.fromarray(pixels), -1, 0, 0, 0)
    with pytest.raises(ValueError, match="the overlay alpha is 8x8"):
        outpaint_keep_alpha(Image.new("L", (8, 8)), mask)


def test_no_torch_needed():
    """The CLI checks its inputs with this module before loading a model: importing it loads no torch."""
    code = "import sys, ldm.pipelines.images; assert 'torch' not in sys.modules, 'torch was imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
