"""The pixel side of image-to-image modes: what the sampler starts from and what is pasted back.

`prepare(request, image, mask)` turns a user's image (and mask) into the work image at the request's size,
the binary repaint mask at that size, and how the result is put back into the picture:

* outpainting first extends the canvas (new area filled from the edges, mask on it only);
* the mask is made single-channel and of the image's size (`images.prepare_mask`), inverted if asked,
  blurred by `mask_blur` (the blurred mask is the final paste's alpha, A1111's overlay);
* inpaint_area "whole": image and mask resized to the request's size by `resize_mode`; "masked": the masked
  region (plus padding, grown to the request's aspect ratio) is cropped, worked on at the request's size and
  pasted back at its place in the full-size picture;
* masked content "fill" spreads the surrounding colours into the masked area before encoding.

The binary mask follows diffusers' mask processor (>= 0.5 repaints), so that with mask_blur=0 and no paste the
images are diffusers' `StableDiffusionInpaintPipeline`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ldm.pipelines import images
from ldm.pipelines.request import GenerationRequest


@dataclass
class ImageInputs:
    init: Image.Image  # RGB at the work size (the request's height x width)
    mask: np.ndarray | None  # (H, W) float32 0/1 at the work size, 1 = repaint; None for img2img
    original: Image.Image | None = None  # RGB picture the result is pasted into (inpainting)
    alpha: Image.Image | None = None  # "L" paste alpha at the original's size (the blurred mask)
    box: tuple[int, int, int, int] | None = None  # where the work region sits in `original` ("masked" area)


def as_pil(image: Any, what: str = "image") -> Image.Image:
    """PIL images as given; numpy arrays (H, W[, C]) uint8 or float in [0, 1] and torch tensors ([1,] C, H, W)
    in [0, 1] as 8-bit images."""
    if isinstance(image, Image.Image):
        return image
    if hasattr(image, "detach"):  # a torch tensor: (1, C, H, W) / (C, H, W) -> (H, W, C)
        t = image.detach().cpu().float()
        if t.ndim == 4:
            if t.shape[0] != 1:
                raise ValueError(f"{what}: give one image, got a batch of {t.shape[0]}")
            t = t[0]
        if t.ndim == 3:
            t = t.permute(1, 2, 0)
        image = t.numpy()
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
            raise ValueError(f"{what}: expected (H, W), (H, W, 3) or (H, W, 4) pixels, got shape {a.shape}")
        if a.dtype != np.uint8:
            if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
                raise ValueError(f"{what}: float pixels must be finite and in [0, 1]")
            a = (a.astype(np.float64) * 255).round().astype(np.uint8)
        return Image.fromarray(a)
    raise ValueError(f"{what}: expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")


def work_size(request: GenerationRequest, size: tuple[int, int], factor: int = 8) -> tuple[int, int]:
    """(height, width) of the work image: the request's, else the input's (after outpainting) rounded down to
    a multiple of `factor` (as diffusers' image processor does)."""
    w, h = size
    if request.outpaint is not None:
        left, top, right, bottom = request.outpaint
        w, h = w + left + right, h + top + bottom
    height = request.height or h // factor * factor
    width = request.width or w // factor * factor
    if height < factor or width < factor:
        raise ValueError(f"the input image ({w}x{h}) is smaller than {factor}x{factor} pixels; give a larger one")
    return height, width


def prepare(request: GenerationRequest, image: Any, mask: Any = None) -> tuple[ImageInputs, list[str]]:
    """The work image, mask and paste of a resolved request (height/width set), and notes for the user."""
    assert request.height is not None and request.width is not None  # resolved
    notes: list[str] = []
    picture = images.to_rgb(as_pil(image, "image"))
    mask_l: Image.Image | None = None
    if mask is not None:
        mask_l, notes = images.prepare_mask(as_pil(mask, "mask"), picture.size)
        if request.invert_mask:
            mask_l = Image.eval(mask_l, lambda v: 255 - v)
    if request.outpaint is not None:
        picture, new_area = images.outpaint_canvas(picture, *request.outpaint)
        if mask_l is not None:  # a given mask repaints inside the old picture too
            grown = Image.new("L", picture.size, 0)
            grown.paste(mask_l, (request.outpaint[0], request.outpaint[1]))
            new_area = Image.fromarray(np.maximum(np.asarray(new_area), np.asarray(grown)))
        mask_l = new_area
    if mask_l is None:
        init = images.resize_image(picture, request.width, request.height, request.resize_mode)
        return ImageInputs(init, None), notes
    if not np.asarray(mask_l).any():
        raise ValueError("the mask is all black: nothing to repaint (white = repaint); give a mask with white areas")
    alpha = images.blur_mask(mask_l, request.mask_blur)
    if request.outpaint is not None and mask is None:
        alpha = images.outpaint_keep_alpha(alpha, mask_l)
    box = None
    if request.inpaint_area == "masked":
        box = images.crop_region(mask_l, request.inpaint_padding, request.width, request.height)
        init = picture.crop(box).resize((request.width, request.height), Image.Resampling.LANCZOS)
        work_mask = alpha.crop(box).resize((request.width, request.height), Image.Resampling.LANCZOS)
        original = picture
    else:
        init = images.resize_image(picture, request.width, request.height, request.resize_mode)
        work_mask = images.resize_image(alpha, request.width, request.height, request.resize_mode)
        original = init
        alpha = work_mask
    binary = images.binarize(work_mask)
    if not binary.any():
        raise ValueError(
            "the mask has no area left to repaint at the work size (white = repaint); give a larger white area"
        )
    if request.masked_content == "fill":
        init = images.fill_masked(init, Image.fromarray((binary * 255).astype(np.uint8)))
    return ImageInputs(init, binary, original, alpha, box), notes


def to_tensor(image: Image.Image):
    """(1, 3, H, W) float32 in [-1, 1], as diffusers' image processor (x / 255 * 2 - 1)."""
    import torch

    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1)[None] * 2.0 - 1.0


def paste(generated: np.ndarray, inputs: ImageInputs) -> np.ndarray:
    """Generated float images (B, h, w, 3) in [0, 1] put back into the picture through the blurred mask: where
    the alpha is 0 the input's pixels come back exactly (A1111's overlay)."""
    if inputs.original is None or inputs.alpha is None:
        return generated
    original = np.asarray(inputs.original, dtype=np.float32) / 255.0
    alpha = np.asarray(inputs.alpha, dtype=np.float32)[..., None] / 255.0
    out = []
    for g in generated:
        if inputs.box is not None:
            x0, y0, x1, y1 = inputs.box
            region = Image.fromarray((g * 255).round().astype(np.uint8)).resize(
                (x1 - x0, y1 - y0), Image.Resampling.LANCZOS
            )
            full = original.copy()
            full[y0:y1, x0:x1] = np.asarray(region, dtype=np.float32) / 255.0
            g = full
        blended = g * alpha + original * (1 - alpha)
        out.append(np.where(alpha == 0, original, blended).astype(np.float32))
    return np.stack(out)
