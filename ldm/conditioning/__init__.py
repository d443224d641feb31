"""Prompts -> Conditioning: what the U-Net is conditioned on, as one object the pipeline passes on.

    conditioner = TextConditioner(tokenizer, text_encoder)         # built once per pipeline
    cond, uncond = conditioner.encode(["a cat"], [""], clip_skip=1)
    cond.context                                                    # (B, 77*k, dim) cross-attention tokens

A `Conditioning` holds the context tokens and has room for what other model families and prompt features
add: a pooled text vector and extra conditioning ids (SDXL's size/crop ids), and a per-step schedule
(prompt editing: `at(step)` gives the conditioning of a sampling step). The U-Net does not know which text
model fed it (stable-diffusion.cpp's conditioner idea); precomputed embeddings (diffusers'
`prompt_embeds` / `negative_prompt_embeds`) enter as `Conditioning(context=...)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from ldm.models.clip import TextEncoder


@dataclass(frozen=True)
class Conditioning:
    """Conditioning of a batch: context tokens (B, L, dim), optionally a pooled vector (B, P) and extra
    tensors (B, ...) by name, and a per-step schedule [(last_step, Conditioning), ...] (ascending)."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    schedule: tuple[tuple[int, Conditioning], ...] = ()

    def __post_init__(self):
        if not isinstance(self.context, torch.Tensor) or self.context.ndim != 3:
            shape = tuple(self.context.shape) if isinstance(self.context, torch.Tensor) else type(self.context)
            raise ValueError(f"conditioning context must be a (batch, tokens, width) tensor, got {shape}")
        for name, t in [("pooled", self.pooled), *self.extra.items()]:
            if t is not None and t.shape[0] != self.batch:
                raise ValueError(f"conditioning {name} has batch {t.shape[0]}, the context {self.batch}")

    @property
    def batch(self) -> int:
        return self.context.shape[0]

    def at(self, step: int) -> Conditioning:
        """The conditioning of sampling step `step` (itself when nothing is scheduled)."""
        for last, cond in self.schedule:
            if step <= last:
                return cond
        return self

    def repeat_interleave(self, n: int) -> Conditioning:
        """Each row n times in a row (prompt p's images are rows p*n .. p*n+n-1, diffusers' order)."""
        if n == 1:
            return self
        return Conditioning(
            self.context.repeat_interleave(n, dim=0),
            None if self.pooled is None else self.pooled.repeat_interleave(n, dim=0),
            {k: v.repeat_interleave(n, dim=0) for k, v in self.extra.items()},
            tuple((last, c.repeat_interleave(n)) for last, c in self.schedule),
        )

    def to(self, device=None, dtype=None) -> Conditioning:
        """Moved to `device`; context and pooled vector cast to `dtype`. The extra tensors keep their dtype:
        they are ids (SDXL's sizes: 1500 is not a bfloat16 number), turned into features by their reader."""
        return Conditioning(
            self.context.to(device=device, dtype=dtype),
            None if self.pooled is None else self.pooled.to(device=device, dtype=dtype),
            {k: v.to(device=device) for k, v in self.extra.items()},
            tuple((last, c.to(device, dtype)) for last, c in self.schedule),
        )

    def with_extra(self, **tensors: torch.Tensor) -> Conditioning:
        """The same conditioning with extra tensors (B, ...) added or replaced, at every scheduled step too."""
        return Conditioning(
            self.context,
            self.pooled,
            {**self.extra, **tensors},
            tuple((last, c.with_extra(**tensors)) for last, c in self.schedule),
        )

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Rows of several conditionings as one batch (their context lengths must agree)."""
        first = items[0]
        lengths = {c.context.shape[1:] for c in items}
        if len(lengths) != 1:
            raise ValueError(f"cannot batch conditionings of context shapes {sorted(lengths)}; encode them together")
        pooled = None if first.pooled is None else torch.cat([c.pooled for c in items])  # type: ignore[misc]
        extra = {k: torch.cat([c.extra[k] for c in items]) for k in first.extra}
        return replace(first, context=torch.cat([c.context for c in items]), pooled=pooled, extra=extra, schedule=())


class TextConditioner:
    """SD1 / SD2 text conditioning: one CLIP text encoder, its context tokens (no pooled vector).

    Built once per pipeline around its tokenizer and text model (the public `pipe.tokenizer` and
    `pipe.text_encoder`); encoding is per call and keeps no state.
    """

    def __init__(self, tokenizer, text_model):
        self.encoder = TextEncoder(tokenizer, text_model)

    def encode(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, clip_skip: int = 1
    ) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond), contexts (B, 77*k, dim) with the same k. negative_prompts None = "" each."""
        cond, uncond = self.encoder.encode_with_negative(prompts, negative_prompts, clip_skip)
        return Conditioning(cond), Conditioning(uncond)
