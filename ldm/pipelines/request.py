"""One request object: every generation parameter, validated in one place.

The Python call (`Pipeline(...)`), `ldm txt2img`, the PNG metadata writer and reader (and later the HTTP
API) all go through `GenerationRequest`; a PNG written by ldm gives its request back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ldm.sampling.names import check_eta, resolve_name

OUTPUT_TYPES = ("pil", "np", "latent")
# torch's CPU generator (mt19937) keeps 32 bits of a seed: 2**32 + k would draw the same noise as k
MAX_SEED = 2**32 - 1
MAX_STEPS = 1000  # every SD1/SD2/SDXL schedule has 1000 training timesteps (checked again per model)
MAX_PIXELS_PER_SIDE = 16384  # far beyond any SD model; the memory check refuses most sizes well before

# Choices of the image-to-image settings: ours, and the labels AUTOMATIC1111 shows and writes (read as ours)
MASKED_CONTENT = {
    "original": "original",
    "fill": "fill",
    "latent_noise": "latent noise",
    "latent_nothing": "latent nothing",
}
INPAINT_AREAS = {"whole": "Whole picture", "masked": "Only masked"}
RESIZE_MODES = {"resize": "Just resize", "crop": "Crop and resize", "fill": "Resize and fill"}
HIRES_UPSCALERS = {"latent": "Latent", "latent_nearest": "Latent (nearest)", "lanczos": "Lanczos"}
DEFAULT_STRENGTH = 0.75  # img2img without a mask (A1111's default denoising strength); with a mask: 1.0


def choice(value: Any, choices: dict[str, str], what: str) -> str:
    """Our name for `value`: one of ours, or an A1111 label (case-insensitive); ValueError naming the choices."""
    if isinstance(value, str):
        if value in choices:
            return value
        lowered = value.strip().lower()
        for ours, label in choices.items():
            if lowered in (ours, label.lower(), ours.replace("_", " ")):
                return ours
    raise ValueError(
        f"{what} {value!r} is not one of {', '.join(choices)} (or {', '.join(map(repr, choices.values()))})"
    )


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. None means "the model's / the sampler's default" where the field says so."""

    prompt: str | tuple[str, ...]
    negative_prompt: str | tuple[str, ...] | None = None
    steps: int = 25
    guidance_scale: float | None = None  # None: the model's recommended value (Pipeline.default_guidance)
    guidance_rescale: float = 0.0
    eta: float | None = None  # None: the sampler's default (0 for DDIM); only samplers that take eta accept one
    seed: int = 0  # image i of the request uses seed + i
    height: int | None = None  # None: the model's default size
    width: int | None = None
    num_images: int = 1  # per prompt
    sampler: str = "ddim"  # ours or an AUTOMATIC1111 name; stored as ours
    schedule: str = "default"  # sigma schedule: default, karras, exponential, beta (or A1111's labels)
    clip_skip: int = 1
    lora_scale: float = 1.0  # strength of the LoRA adapters held by the U-Net, for this call only
    # image to image (used when an input image is given)
    strength: float | None = None  # how much to change: the tail of the plan sampled; None: 0.75, 1.0 with a mask
    resize_mode: str = "resize"  # input not at the requested size: resize, crop (and resize), fill (resize and fill)
    # inpainting (used when a mask is given; white = repaint)
    mask_blur: int = 4  # Gaussian blur radius of the mask, pixels (A1111's default 4)
    masked_content: str = "original"  # what the masked area starts from: original, fill, latent_noise, latent_nothing
    inpaint_area: str = "whole"  # whole (the picture) or masked (only the masked region, cropped, at full size)
    inpaint_padding: int = 32  # pixels around the masked region with inpaint_area="masked"
    invert_mask: bool = False  # repaint the black part instead
    outpaint: tuple[int, int, int, int] | None = None  # extend the input by (left, top, right, bottom) px, then inpaint
    # hires fix (txt2img): generate, upscale by hires_scale, then an img2img pass at hires_strength
    hires_scale: float | None = None  # None: off
    hires_strength: float = 0.7  # A1111's default denoising strength of the second pass
    hires_steps: int = 0  # steps of the second pass; 0: the same as steps
    hires_upscaler: str = "latent"  # latent (bilinear), latent_nearest, lanczos (on the decoded pixels)
    # SDXL's added conditioning (other models take none): the size/crop ids, and the refiner's aesthetic scores
    original_size: tuple[int, int] | None = None  # (height, width) the model is told the picture had; None: the size
    crop_top_left: tuple[int, int] = (0, 0)  # (top, left) crop the model is told was taken
    target_size: tuple[int, int] | None = None  # (height, width); None: the size
    aesthetic_score: float = 6.0  # refiner: the score conditioning the prompt (diffusers' default)
    negative_aesthetic_score: float = 2.5  # refiner: the score conditioning the negative prompt
    # base + refiner ("ensemble of experts"): the fraction of the plan the base samples before the refiner
    refiner_switch: float = 0.8  # used only when a refiner model is given

    def __post_init__(self):
        info, schedule = resolve_name(self.sampler, None if self.schedule == "default" else self.schedule)
        object.__setattr__(self, "sampler", info.name)
        object.__setattr__(self, "schedule", schedule)
        if isinstance(self.prompt, list):
            object.__setattr__(self, "prompt", tuple(self.prompt))
        if isinstance(self.negative_prompt, list):
            object.__setattr__(self, "negative_prompt", tuple(self.negative_prompt))
        for name in ("outpaint", "original_size", "crop_top_left", "target_size"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name, choices in (
            ("masked_content", MASKED_CONTENT),
            ("inpaint_area", INPAINT_AREAS),
            ("resize_mode", RESIZE_MODES),
            ("hires_upscaler", HIRES_UPSCALERS),
        ):
            object.__setattr__(self, name, choice(getattr(self, name), choices, name))
        self.validate()

    @property
    def prompts(self) -> list[str]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        return list(self.prompt) if isinstance(self.prompt, tuple) else []

    @property
    def negative_prompts(self) -> list[str] | None:
        """One negative prompt per prompt, or None (unconditional)."""
        if self.negative_prompt is None:
            return None
        if isinstance(self.negative_prompt, str):
            return [self.negative_prompt] * len(self.prompts)
        return list(self.negative_prompt) if isinstance(self.negative_prompt, tuple) else [self.negative_prompt]

    def validate(self) -> None:
        """Raise ValueError naming the first bad parameter and what it accepts."""

        def finite(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        prompts = self.prompts
        negatives = self.negative_prompts
        problems = [
            (
                not prompts or not all(isinstance(p, str) for p in prompts),
                "prompt must be a string or a list of strings",
            ),
            (
                negatives is not None and not all(isinstance(n, str) for n in negatives),
                "negative_prompt must be a string, a list of strings (one per prompt) or None",
            ),
            (
                negatives is not None and len(negatives) != len(prompts),
                f"{len(negatives or [])} negative prompts for {len(prompts)} prompts; give one each",
            ),
            (not _is_int(self.steps) or self.steps < 1, f"steps must be an integer >= 1, got {self.steps!r}"),
            (
                _is_int(self.steps) and self.steps > MAX_STEPS,
                f"steps {self.steps} is more than the {MAX_STEPS} timesteps Stable Diffusion models are trained on",
            ),
            (
                self.guidance_scale is not None and not (finite(self.guidance_scale) and self.guidance_scale >= 0),
                f"guidance_scale must be >= 0 (a finite number), got {self.guidance_scale}",
            ),
            (
                not (finite(self.guidance_rescale) and 0 <= self.guidance_rescale <= 1),
                f"guidance_rescale must be in 0..1, got {self.guidance_rescale}",
            ),
            (
                self.eta is not None and not (finite(self.eta) and self.eta >= 0),
                f"eta must be >= 0 (a finite number), got {self.eta}",
            ),
            (
                not _is_int(self.num_images) or self.num_images < 1,
                f"num_images must be >= 1 (an integer), got {self.num_images!r}",
            ),
            (
                not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED - (self.num_images * len(prompts) - 1),
                f"seed must be an integer in 0 .. 2**32-1 for every image (seed + i; the CPU generator keeps 32 bits), "
                f"got {self.seed!r}",
            ),
            (
                self.height is not None and (not _is_int(self.height) or self.height < 8 or self.height % 8),
                f"height {self.height!r} must be a positive multiple of 8",
            ),
            (
                self.width is not None and (not _is_int(self.width) or self.width < 8 or self.width % 8),
                f"width {self.width!r} must be a positive multiple of 8",
            ),
            (
                not _is_int(self.clip_skip) or self.clip_skip < 1,
                f"clip_skip must be an integer >= 1 (1 = the text encoder's last layer), got {self.clip_skip!r}",
            ),
            (not finite(self.lora_scale), f"lora_scale must be a finite number, got {self.lora_scale}"),
            (
                self.strength is not None and not (finite(self.strength) and 0 <= self.strength <= 1),
                f"strength must be in 0..1 (0 keeps the image, 1 redraws it), got {self.strength!r}",
            ),
            (
                not _is_int(self.mask_blur) or not 0 <= self.mask_blur <= 256,
                f"mask_blur must be an integer number of pixels in 0..256, got {self.mask_blur!r}",
            ),
            (
                not _is_int(self.inpaint_padding) or not 0 <= self.inpaint_padding <= MAX_PIXELS_PER_SIDE,
                f"inpaint_padding must be an integer number of pixels >= 0, got {self.inpaint_padding!r}",
            ),
            (not isinstance(self.invert_mask, bool), f"invert_mask must be true or false, got {self.invert_mask!r}"),
            (
                self.outpaint is not None
                and not (
                    isinstance(self.outpaint, tuple)
                    and len(self.outpaint) == 4
                    and all(_is_int(v) and 0 <= v <= MAX_PIXELS_PER_SIDE for v in self.outpaint)
                    and any(self.outpaint)
                ),
                f"outpaint must be (left, top, right, bottom) pixels, integers >= 0, not all 0, got {self.outpaint!r}",
            ),
            (
                self.hires_scale is not None and not (finite(self.hires_scale) and 1 <= self.hires_scale <= 8),
                f"hires_scale must be in 1..8 (the final size over the first pass's), got {self.hires_scale!r}",
            ),
            (
                not (finite(self.hires_strength) and 0 < self.hires_strength <= 1),
                f"hires_strength must be in (0, 1] (the second pass's denoising strength), got {self.hires_strength!r}",
            ),
            (
                not _is_int(self.hires_steps) or not 0 <= self.hires_steps <= MAX_STEPS,
                f"hires_steps must be an integer in 0..{MAX_STEPS} (0: the same as steps), got {self.hires_steps!r}",
            ),
            (
                not (finite(self.refiner_switch) and 0 < self.refiner_switch < 1),
                f"refiner_switch must be in (0, 1) (the fraction of the steps the base model samples), "
                f"got {self.refiner_switch!r}",
            ),
        ]
        for name in ("original_size", "target_size", "crop_top_left"):
            value = getattr(self, name)
            low = 0 if name == "crop_top_left" else 1
            if (value is not None or name == "crop_top_left") and not (
                isinstance(value, tuple) and len(value) == 2 and all(_is_int(v) and low <= v <= 65536 for v in value)
            ):
                raise ValueError(f"{name} must be (height, width) or (top, left): two integers >= {low}, got {value!r}")
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            if not (finite(getattr(self, name)) and 0 <= getattr(self, name) <= 10):
                raise ValueError(
                    f"{name} must be in 0..10 (the refiner's aesthetic score), got {getattr(self, name)!r}"
                )
        for bad, message in problems:
            if bad:
                raise ValueError(message)
        check_eta(resolve_name(self.sampler, self.schedule)[0], self.eta)

    def replace(self, **changes: Any) -> GenerationRequest:
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown generation parameter {sorted(unknown)[0]!r}")
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("prompt", "negative_prompt"):
            if isinstance(d[key], tuple):
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown generation parameter {sorted(unknown)[0]!r}; known: {', '.join(sorted(names))}")
        return cls(**data)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
