"""The pixel side of img2img, inpainting and outpainting: reading the input image and mask, fitting them to
the requested size, and pasting the result back. PIL and numpy only (no torch): the CLI checks its inputs
with these before any model is loaded.

Behaviour follows AUTOMATIC1111's web UI (its resize modes, mask blur, "masked content: fill", "inpaint
area: only masked" and final overlay) and diffusers' VaeImageProcessor (LANCZOS resizing, masks binarized
at 0.5). Masks are "L" images: white (255) = repaint, black (0) = keep.

Input files are hostile until checked: `load_image` opens regular files only (never hangs on a FIFO),
refuses images of more than MAX_PIXELS before decoding them, and turns every failure into a one-line
ValueError naming the flag, the file and the fix.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import warnings
from typing import IO, Any

import numpy as np
from PIL import Image, ImageChops, ImageFile, ImageFilter, UnidentifiedImageError

from ldm.formats.metadata import one_line, open_regular

# 8192x8192 RGB is 200 MB of pixels and a 1024x1024 latent: far beyond what SD models are run at; the
# check comes from the header, before a byte of pixels is decoded
MAX_PIXELS = 8192 * 8192
MAX_OUTPAINT = 8192  # pixels added on one side by --outpaint

RESIZE_MODES = ("resize", "crop", "fill")
RESIZE_MODE_LABELS = {"resize": "Just resize", "crop": "Crop and resize", "fill": "Resize and fill"}

# what PIL raises while decoding a damaged file besides OSError (plugins index, unpack and divide)
_DECODE_ERRORS = (OSError, EOFError, ValueError, SyntaxError, struct.error, IndexError, TypeError, ZeroDivisionError)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

# --------------------------------------------------------------------------- reading files


def load_image(path: str | os.PathLike, what: str = "--image") -> Image.Image:
    """The image in `path`, fully decoded, in its own mode (RGBA stays RGBA).

    Decoded while the file is open (a lazy PIL image would read it again later, maybe after it changed);
    PIL's LOAD_TRUNCATED_IMAGES is held False meanwhile and put back, so that a cut download is an error
    here whatever another library set it to, and stays what it was for everyone else.
    """
    with contextlib.ExitStack() as stack:
        image = _open_image(_open_file(stack, path, what), path, what)
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            image.load()
        except Image.DecompressionBombError as e:  # a size some plugins (ICO, ICNS) only choose now
            image.close()
            raise ValueError(f"{what} {path}: too many pixels ({one_line(str(e), 120)}); downscale it first") from None
        except _DECODE_ERRORS as e:
            image.close()
            raise ValueError(
                f"{what} {path}: is truncated or corrupt ({one_line(str(e), 120)}); re-save or download it again"
            ) from None
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved
    return image


def image_size(path: str | os.PathLike, what: str = "--image") -> tuple[int, int]:
    """(width, height) of the image in `path`, from its header only (no pixel is decoded): what the memory
    check needs before a model is loaded. The same errors as load_image for a file that is missing, not an
    image or too large."""
    with contextlib.ExitStack() as stack:
        image = _open_image(_open_file(stack, path, what), path, what)
        size = image.size
        image.close()
    return size


def _open_file(stack: contextlib.ExitStack, path: str | os.PathLike, what: str) -> IO[bytes]:
    """`path` opened for reading in `stack` if it is a regular file; the error, naming `what`, otherwise.

    Entered here rather than wrapping the caller's `with`: errors of the body must not be renamed."""
    try:
        f, _, _ = stack.enter_context(open_regular(path))
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: not found; check the path") from None
    except ValueError as e:  # a folder, FIFO or device (with its fix), or a file that cannot be read
        message = str(e)
        if "; " not in message:
            message += "; check the file's permissions"
        raise ValueError(f"{what} {message}") from None
    return f


def _open_image(f: IO[bytes], path: str | os.PathLike, what: str) -> Image.Image:
    """The lazily opened image of `f` (header read, no pixels), checked against MAX_PIXELS.

    PIL's own decompression-bomb warning is an error here: ldm would only run out of memory later."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(f)
    except UnidentifiedImageError:
        raise ValueError(f"{what} {path}: not an image PIL can read; pass a PNG, JPEG or WebP file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{what} {path}: too many pixels ({one_line(str(e), 120)}); downscale it first") from None
    except _DECODE_ERRORS as e:
        raise ValueError(
            f"{what} {path}: is truncated or corrupt ({one_line(str(e), 120)}); re-save or download it again"
        ) from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise ValueError(
            f"{what} {path}: {width}x{height} is too many pixels (more than {MAX_PIXELS}, 8192x8192); "
            "downscale it first"
        )
    return image


# --------------------------------------------------------------------------- modes


def has_alpha(image: Image.Image) -> bool:
    """Whether `image` has transparency: an alpha channel, or a transparent colour (PNG's tRNS chunk, GIF)."""
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """`image` as RGB (a new image), transparency flattened onto `background` (white, as A1111 does).

    16-bit greyscale is scaled to 8 bits: PIL's own conversion clips it, turning most of it white."""
    if has_alpha(image):
        rgba = _rgba(image)
        flat = Image.new("RGBA", image.size, (*background, 255))
        return Image.alpha_composite(flat, rgba).convert("RGB")
    if image.mode == "RGB":
        return image.copy()
    if image.mode == "I" or image.mode.startswith("I;16"):
        return _gray8(image).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ValueError(f"a {image.mode} image cannot be converted to RGB ({e}); save it as RGB first") from None


def _rgba(image: Image.Image) -> Image.Image:
    """`image` as RGBA; premultiplied "La" goes through "LA" (PIL converts La to nothing else)."""
    return (image.convert("LA") if image.mode == "La" else image).convert("RGBA")


def _gray8(image: Image.Image) -> Image.Image:
    """An "I;16" or "I" image as 8-bit "L", 65535 -> 255. An "I" image is 16-bit data when any value passes
    255 (how PIL gives 16-bit PNGs and TIFFs), 8-bit data otherwise."""
    values = np.asarray(image).astype(np.int64)
    if image.mode.startswith("I;16") or values.max(initial=0) > 255:
        values = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.int64)
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))


def alpha_mask(image: Image.Image) -> Image.Image:
    """The repaint mask ("L") of `image`'s transparency, for --mask-from-alpha: transparent -> 255 (repaint),
    opaque -> 0 (keep), 255 - alpha in between. ValueError if it has no transparency."""
    if not has_alpha(image):
        raise ValueError(
            f"the image ({image.mode}) has no alpha channel to take a mask from; pass --mask, or an RGBA image"
        )
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA", "PA") else _rgba(image).getchannel("A")
    return ImageChops.invert(alpha)


def prepare_mask(mask: Image.Image, size: tuple[int, int], what: str = "--mask") -> tuple[Image.Image, list[str]]:
    """(the "L" mask of `size` (width, height), notes on what was done to it, for the caller to warn with).

    A colour mask is read by its luminance; a transparent one is laid on black first (transparent = keep,
    as an eraser leaves it); one of another size is resized (bilinear: it is blurred and binarized later).
    `what` names it in the notes, e.g. "--mask m.png".
    """
    width, height = _check_size(size, "the mask size")
    notes: list[str] = []
    if mask.mode == "L" and not has_alpha(mask):
        gray = mask.copy()
    else:
        if has_alpha(mask) and np.asarray(alpha_mask(mask)).any():
            notes.append(f"{what} has transparent pixels: read as black (keep)")
        rgb = np.asarray(to_rgb(mask, background=(0, 0, 0)))
        if (rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 1] != rgb[..., 2]).any():
            notes.append(f"{what} is in colour: its brightness is used (white = repaint, black = keep)")
        gray = Image.fromarray(rgb).convert("L")
    if gray.size != (width, height):
        w, h = gray.size
        stretched = "" if w * height == h * width else " (stretched: another aspect ratio)"
        notes.append(f"{what} is {w}x{h}, the image {width}x{height}: resized{stretched}")
        gray = gray.resize((width, height), Image.Resampling.BILINEAR)
    return gray, notes


# --------------------------------------------------------------------------- resizing


def resize_image(
    image: Image.Image,
    width: int,
    height: int,
    mode: str = "resize",
    resample: Image.Resampling = Image.Resampling.LANCZOS,
) -> Image.Image:
    """`image` at width x height, A1111's way `mode` names:

    * "resize" ("Just resize"): stretched, aspect ratio ignored (diffusers' default);
    * "crop" ("Crop and resize"): scaled to cover the size, the centre kept (one resampling: the crop is
      the resize's source box);
    * "fill" ("Resize and fill"): scaled to fit, centred, the empty bands filled with the image's edge
      rows or columns repeated.

    An image already at the size comes back as an identical copy, whatever the mode.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r} is not one of {', '.join(RESIZE_MODES)}")
    width, height = _check_size((width, height), "the size to resize to")
    if image.size == (width, height):
        return image.copy()
    if mode == "resize":
        return image.resize((width, height), resample)
    iw, ih = image.size
    if mode == "crop":
        scale = max(width / iw, height / ih)
        bw, bh = width / scale, height / scale
        x0, y0 = max(0.0, (iw - bw) / 2), max(0.0, (ih - bh) / 2)  # max, min: float rounding stays inside
        return image.resize((width, height), resample, box=(x0, y0, min(iw, x0 + bw), min(ih, y0 + bh)))
    scale = min(width / iw, height / ih)
    fw, fh = min(width, max(1, round(iw * scale))), min(height, max(1, round(ih * scale)))
    fitted = image.resize((fw, fh), resample)
    return _extend_edges(fitted, (width - fw) // 2, (height - fh) // 2, width, height)


def _extend_edges(image: Image.Image, x0: int, y0: int, width: int, height: int) -> Image.Image:
    """A width x height canvas holding `image` at (x0, y0), the rest its edge columns then rows repeated
    (corners from the corner pixels). PIL crop and paste keep any mode, palettes included."""
    fw, fh = image.size
    canvas = image.crop((-x0, -y0, width - x0, height - y0))
    nearest = Image.Resampling.NEAREST
    right, bottom = width - x0 - fw, height - y0 - fh
    if x0 > 0:
        canvas.paste(image.crop((0, 0, 1, fh)).resize((x0, fh), nearest), (0, y0))
    if right > 0:
        canvas.paste(image.crop((fw - 1, 0, fw, fh)).resize((right, fh), nearest), (x0 + fw, y0))
    if y0 > 0:
        canvas.paste(canvas.crop((0, y0, width, y0 + 1)).resize((width, y0), nearest), (0, 0))
    if bottom > 0:
        canvas.paste(canvas.crop((0, y0 + fh - 1, width, y0 + fh)).resize((width, bottom), nearest), (0, y0 + fh))
    return canvas


def resize_mode_from_label(label: str | int) -> str:
    """Our resize mode for `label`: ours, A1111's label (any case) or A1111's number (0, 1, 2; also as text,
    as its API and infotext give it)."""
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(RESIZE_MODES):
        return RESIZE_MODES[label]
    if isinstance(label, str):
        text = label.strip()
        if text in ("0", "1", "2"):
            return RESIZE_MODES[int(text)]
        for ours, a1111 in RESIZE_MODE_LABELS.items():
            if text.lower() in (ours, a1111.lower()):
                return ours
    labels = ", ".join(map(repr, RESIZE_MODE_LABELS.values()))
    raise ValueError(f"resize mode {label!r} is not one of {', '.join(RESIZE_MODES)} (or A1111's {labels}, 0, 1, 2)")


# --------------------------------------------------------------------------- masks


def blur_mask(mask: Image.Image, radius: int) -> Image.Image:
    """The mask Gaussian-blurred by `radius` pixels (A1111's "Mask blur", 4 by default): the seam between
    kept and repainted pixels fades instead of cutting. Radius 0: an unchanged copy."""
    if not _is_int(radius) or radius < 0:
        raise ValueError(f"mask blur must be an integer >= 0 (pixels), got {radius!r}")
    if radius == 0:
        return mask.copy()
    return mask.filter(ImageFilter.GaussianBlur(radius))


def binarize(mask: Image.Image) -> np.ndarray:
    """float32 (H, W) of 0 and 1: 1 where the mask is at least half white (diffusers' mask processor)."""
    values = np.asarray(_gray(mask), dtype=np.float32) / 255.0
    return (values >= 0.5).astype(np.float32)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "masked content: fill": the masked pixels (mask >= 128) replaced by the colours of the
    unmasked ones spread inwards, smoothly (a pull-push pyramid: each coarser level averages the known
    pixels of 2x2 blocks; going back up, unknown pixels take the upsampled coarser colour). Unmasked pixels
    come back bit for bit; a mask covering everything gives the image's mean colour."""
    _check_rgb(image, "the image to fill")
    _check_same_size(mask, image, "the mask", "the image to fill")
    pixels = np.asarray(image)
    hole = np.asarray(_gray(mask)) >= 128
    if not hole.any():
        return image.copy()
    if hole.all():
        mean = np.rint(pixels.reshape(-1, 3).mean(axis=0)).astype(np.uint8)
        return Image.fromarray(np.broadcast_to(mean, pixels.shape).copy())
    spread = _pull_push(pixels.astype(np.float32), (~hole).astype(np.float32))
    filled = np.clip(np.rint(spread), 0, 255).astype(np.uint8)
    return Image.fromarray(np.where(hole[..., None], filled, pixels))


def _pull_push(values: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """`values` (H, W, C) with the pixels of weight < 1 completed from coarser averages of the known ones."""
    h, w = weight.shape
    if (h == 1 and w == 1) or weight.min() >= 1.0:
        return values
    ph, pw = h + h % 2, w + w % 2  # padded with weight 0 to even sides
    padded_w = np.zeros((ph, pw), np.float32)
    padded_w[:h, :w] = weight
    padded_v = np.zeros((ph, pw, values.shape[2]), np.float32)
    padded_v[:h, :w] = values * weight[..., None]
    wsum = padded_w.reshape(ph // 2, 2, pw // 2, 2).sum(axis=(1, 3))
    vsum = padded_v.reshape(ph // 2, 2, pw // 2, 2, -1).sum(axis=(1, 3))
    coarse = _pull_push(vsum / np.maximum(wsum, 1e-12)[..., None], np.minimum(wsum, 1.0))
    bilinear = Image.Resampling.BILINEAR
    channels = [Image.fromarray(coarse[..., c]).resize((pw, ph), bilinear) for c in range(values.shape[2])]
    up = np.stack([np.asarray(c) for c in channels], axis=-1)[:h, :w]
    return values * weight[..., None] + up * (1.0 - weight[..., None])


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """A1111's "Inpaint area: only masked": the box (x0, y0, x1, y1), x1 and y1 exclusive, of the mask's
    non-black pixels, grown by `padding` on every side, then grown (never shrunk) to the aspect ratio
    width:height around its centre, kept inside the mask: shifted off an edge it passes, clamped where it
    is larger than the mask (the crop is resized to width x height anyway)."""
    if not _is_int(padding) or padding < 0:
        raise ValueError(f"inpaint padding must be an integer >= 0 (pixels), got {padding!r}")
    width, height = _check_size((width, height), "the inpainting size")
    marked = np.asarray(_gray(mask)) > 0
    if not marked.any():
        raise ValueError("the mask is all black: nothing to inpaint; paint the area to repaint white")
    cols, rows = np.flatnonzero(marked.any(axis=0)), np.flatnonzero(marked.any(axis=1))
    mw, mh = mask.size
    x0, x1 = max(0, int(cols[0]) - padding), min(mw, int(cols[-1]) + 1 + padding)
    y0, y1 = max(0, int(rows[0]) - padding), min(mh, int(rows[-1]) + 1 + padding)
    bw, bh = x1 - x0, y1 - y0
    if bw * height > bh * width:  # too wide for width:height: taller
        y0, y1 = _grow((y0, y1), -(-bw * height // width), mh)
    else:
        x0, x1 = _grow((x0, x1), -(-bh * width // height), mw)
    return x0, y0, x1, y1


def _grow(span: tuple[int, int], length: int, limit: int) -> tuple[int, int]:
    """`span` grown to `length` around its centre, shifted inside 0..limit, clamped to it if longer."""
    start, end = span
    extra = length - (end - start)
    start, end = start - extra // 2, end + extra - extra // 2
    if start < 0:
        start, end = 0, end - start
    if end > limit:
        start, end = start - (end - limit), limit
    return max(0, start), end


def overlay(
    original: Image.Image,
    generated: Image.Image,
    alpha: Image.Image,
    box: tuple[int, int, int, int] | None = None,
) -> Image.Image:
    """A1111's final paste of an inpainting: generated * alpha/255 + original * (1 - alpha/255), in integers
    so that alpha 0 gives the original's pixels back bit for bit and alpha 255 the generated ones.

    With `box` (x0, y0, x1, y1), `generated` is the work region of "only masked": it is resized (LANCZOS)
    to the box and pasted there over the original first; `alpha` is always the full-size mask.
    """
    _check_rgb(original, "the original image")
    _check_rgb(generated, "the generated image")
    _check_same_size(alpha, original, "the overlay mask", "the original image")
    if box is None:
        _check_same_size(generated, original, "the generated image", "the original image")
        full = generated
    else:
        x0, y0, x1, y1 = _check_box(box, original.size)
        size = (x1 - x0, y1 - y0)
        part = generated if generated.size == size else generated.resize(size, Image.Resampling.LANCZOS)
        full = original.copy()
        full.paste(part, (x0, y0))
    a = np.asarray(_gray(alpha), dtype=np.uint32)[..., None]
    mixed = (np.asarray(full, np.uint32) * a + np.asarray(original, np.uint32) * (255 - a) + 127) // 255
    return Image.fromarray(mixed.astype(np.uint8))


# --------------------------------------------------------------------------- outpainting

_OUTPAINT_PART = re.compile(r"\s*([A-Za-z]+)\s*=\s*([0-9]+)\s*")
_OUTPAINT_FORM = "use side=pixels with sides left, top, right, bottom, e.g. --outpaint left=128,bottom=64"


def parse_outpaint(text: str) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixels to add, from "left=128,bottom=64": each side at most once, values
    whole numbers from 1 to MAX_OUTPAINT, spaces allowed."""
    sides = {"left": 0, "top": 0, "right": 0, "bottom": 0}
    seen: set[str] = set()
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"--outpaint {text!r} is empty; {_OUTPAINT_FORM}")
    for part in text.split(","):
        match = _OUTPAINT_PART.fullmatch(part)
        side = match.group(1).lower() if match else ""
        if match is None or side not in sides:
            raise ValueError(f"--outpaint: bad part {part.strip()!r}; {_OUTPAINT_FORM}")
        if side in seen:
            raise ValueError(f"--outpaint: {side} is given twice in {text!r}; give each side once")
        digits = match.group(2)
        value = int(digits) if len(digits) <= 6 else MAX_OUTPAINT + 1
        if not 1 <= value <= MAX_OUTPAINT:
            raise ValueError(f"--outpaint: {part.strip()!r} must add 1 to {MAX_OUTPAINT} pixels; {_OUTPAINT_FORM}")
        seen.add(side)
        sides[side] = value
    return sides["left"], sides["top"], sides["right"], sides["bottom"]


def outpaint_canvas(
    image: Image.Image, left: int, top: int, right: int, bottom: int
) -> tuple[Image.Image, Image.Image]:
    """(the canvas: `image` extended by the given pixels on each side, the new area filled with colours
    spread from its edges (fill_masked); the mask: 255 on the new area, 0 on the original pixels)."""
    _check_rgb(image, "the image to outpaint")
    for name, value in (("left", left), ("top", top), ("right", right), ("bottom", bottom)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"outpaint {name} must be an integer >= 0 (pixels), got {value!r}")
    w, h = image.size
    size = (w + left + right, h + top + bottom)
    canvas = Image.new("RGB", size)
    canvas.paste(image, (left, top))
    mask = Image.new("L", size, 255)
    mask.paste(0, (left, top, left + w, top + h))
    return fill_masked(canvas, mask), mask


def outpaint_keep_alpha(alpha: Image.Image, mask: Image.Image) -> Image.Image:
    """The overlay alpha of an outpainting: `alpha` (the blurred mask) with 0 wherever `mask` (the canvas's
    mask of outpaint_canvas) keeps the pixel, so that the blur never lets the original pixels change."""
    _check_same_size(alpha, mask, "the overlay alpha", "the outpainting mask")
    values = np.asarray(_gray(alpha)).copy()
    values[binarize(mask) == 0] = 0
    return Image.fromarray(values)


# --------------------------------------------------------------------------- checks


def _gray(mask: Image.Image) -> Image.Image:
    return mask if mask.mode == "L" else mask.convert("L")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_size(size: Any, what: str) -> tuple[int, int]:
    if not (isinstance(size, tuple | list) and len(size) == 2 and all(_is_int(s) and s >= 1 for s in size)):
        raise ValueError(f"{what} must be (width, height), positive integers; got {size!r}")
    return size[0], size[1]


def _check_rgb(image: Image.Image, what: str) -> None:
    if image.mode != "RGB":
        raise ValueError(f"{what} is {image.mode}, not RGB; convert it with to_rgb first")


def _check_same_size(image: Image.Image, other: Image.Image, what: str, other_what: str) -> None:
    if image.size != other.size:
        (w, h), (ow, oh) = image.size, other.size
        raise ValueError(f"{what} is {w}x{h}, {other_what} {ow}x{oh}; they must be the same size")


def _check_box(box: Any, size: tuple[int, int]) -> tuple[int, int, int, int]:
    w, h = size
    if not (isinstance(box, tuple | list) and len(box) == 4 and all(_is_int(v) for v in box)):
        raise ValueError(f"the overlay box must be (x0, y0, x1, y1), integers; got {box!r}")
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"the overlay box {tuple(box)} is not a non-empty box inside the {w}x{h} image")
    return x0, y0, x1, y1
