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

    def __post_init__(self):
        info, schedule = resolve_name(self.sampler, None if self.schedule == "default" else self.schedule)
        object.__setattr__(self, "sampler", info.name)
        object.__setattr__(self, "schedule", schedule)
        if isinstance(self.prompt, list):
            object.__setattr__(self, "prompt", tuple(self.prompt))
        if isinstance(self.negative_prompt, list):
            object.__setattr__(self, "negative_prompt", tuple(self.negative_prompt))
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
        ]
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
