"""SDXL conditioning: two CLIP text encoders -> context and pooled vector; size/crop ids -> the added vector.

    conditioner = SDXLConditioner(tokenizer, text_encoder, tokenizer_2, text_encoder_2)
    cond, uncond = conditioner.encode(["a cat"])        # no negative prompt: uncond is all zeros
    cond.context, cond.pooled                           # (B, 77*k, 768+1280), (B, 1280)
    ids = add_time_ids((1024, 1024), (0, 0), (1024, 1024))
    y = label_vector(cond.pooled, ids)                  # (B, 1280 + 6*256): the U-Net's label_emb input

As Stability's sgm (GeneralConditioner) and diffusers' StableDiffusionXLPipeline.encode_prompt:

* context: each encoder's output of its penultimate layer (hidden_states[-2]), WITHOUT the final layer norm
  (unlike SD2), CLIP ViT-L's 768 then bigG's 1280 along the width. clip_skip counts from there: ours 1 =
  hidden_states[-2], N = hidden_states[-(N+1)]; diffusers' clip_skip k is our k+1 (its None our 1).
* pooled: text_encoder_2's `text_embeds`, its final-layer-normed last layer at the EOS token through
  `text_projection`.
* Long prompts are chunked as SD1/SD2's (ldm.models.clip.tokenize); each chunk goes through both encoders
  and the chunks are joined along the sequence. The pooled vector is the first chunk's (as AUTOMATIC1111),
  so a long prompt's first 77 context tokens and its pooled vector are what diffusers gives (it truncates).
* An empty negative prompt (every one "", or none given) gives all-zero uncond context and pooled vector
  when `zero_empty_negative` (the base model's `force_zeros_for_empty_prompt`; AUTOMATIC1111 does the same).
* The refiner has no CLIP ViT-L: text_encoder (and tokenizer) None, a 1280-wide context.
* tokenizer_2 pads with "!" (id 0): load_tokenizer(pad_token="!"), diffusers' SDXL tokenizer_2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ldm.conditioning import Conditioning
from ldm.models.clip import CONTEXT_LENGTH, count_chunks, tokenize
from ldm.models.unet import timestep_embedding

TIME_ID_DIM = 256  # sinusoidal features per size/crop id (diffusers' addition_time_embed_dim)
AESTHETIC_SCORE = 6.0  # the refiner's defaults (diffusers' StableDiffusionXLImg2ImgPipeline)
NEGATIVE_AESTHETIC_SCORE = 2.5


class SDXLConditioner:
    """SDXL text conditioning: CLIP ViT-L (`text_encoder`, a CLIPTextModel, or None for the refiner) and
    OpenCLIP ViT-bigG (`text_encoder_2`, a CLIPTextModelWithProjection), each with its tokenizer.

    Built once per pipeline around its public parts; encoding is per call and keeps no state. The output is on
    text_encoder_2's device and in its dtype.
    """

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2):
        if text_encoder is not None and tokenizer is None:
            raise ValueError("text_encoder is given without its tokenizer; pass both (or neither, for the refiner)")
        if not hasattr(text_encoder_2, "text_projection"):
            raise ValueError(
                f"text_encoder_2 is a {type(text_encoder_2).__name__}; SDXL's pooled vector needs a "
                "CLIPTextModelWithProjection (with text_projection)"
            )
        for model in (text_encoder, text_encoder_2):
            if model is not None and model.config.max_position_embeddings < CONTEXT_LENGTH:
                raise ValueError(
                    f"text model has {model.config.max_position_embeddings} positions, {CONTEXT_LENGTH} needed"
                )
        self.tokenizer, self.text_encoder = tokenizer, None if text_encoder is None else text_encoder.eval()
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2.eval()

    @property
    def encoders(self) -> list[tuple]:
        """(tokenizer, text model) pairs in the order their contexts are joined: CLIP ViT-L first."""
        pairs = [(self.tokenizer_2, self.text_encoder_2)]
        return pairs if self.text_encoder is None else [(self.tokenizer, self.text_encoder), *pairs]

    @property
    def context_dim(self) -> int:
        return sum(model.config.hidden_size for _, model in self.encoders)

    @property
    def pooled_dim(self) -> int:
        return self.text_encoder_2.config.projection_dim

    def encode(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
        clip_skip: int = 1,
        zero_empty_negative: bool = True,
        negative_clip_skip: int | None = None,
    ) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond): contexts (B, 77*k, context_dim) with the same k, pooled (B, pooled_dim).

        negative_prompts None = "" each. negative_clip_skip None = clip_skip (as the web UIs do); 1 reproduces
        diffusers, which ignores clip_skip for the negative prompt.
        """
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, e.g. [prompt]")
        prompts = list(prompts)
        negatives = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one each")
        k = max(count_chunks(tokenizer, prompts + negatives) for tokenizer, _ in self.encoders)
        cond = self.encode_chunks(prompts, clip_skip, k)
        if zero_empty_negative and all(n == "" for n in negatives):
            assert cond.pooled is not None
            return cond, Conditioning(torch.zeros_like(cond.context), torch.zeros_like(cond.pooled))
        return cond, self.encode_chunks(negatives, clip_skip if negative_clip_skip is None else negative_clip_skip, k)

    def encode_chunks(self, prompts: list[str], clip_skip: int, num_chunks: int) -> Conditioning:
        """The Conditioning of prompts encoded as num_chunks 77-token chunks each (training stacks captions of one
        chunk count), without the empty-negative rule."""
        device, dtype = self.text_encoder_2.device, self.text_encoder_2.dtype
        layers = min(model.config.num_hidden_layers for _, model in self.encoders)
        if not 1 <= clip_skip < layers:  # at least one layer run
            raise ValueError(
                f"clip_skip must be in 1..{layers - 1} (1 = penultimate layer, SDXL's own), got {clip_skip}"
            )
        contexts = []
        with torch.no_grad():
            for tokenizer, model in self.encoders:
                ids = tokenize(tokenizer, prompts, num_chunks)  # (B, k, 77)
                B, k, T = ids.shape
                out = model(ids.reshape(B * k, T).to(model.device), output_hidden_states=True)
                hidden = out.hidden_states[-(clip_skip + 1)]  # no final layer norm
                contexts.append(hidden.reshape(B, k * T, -1).to(device, dtype))
            # `out` is text_encoder_2's (the last pair): the pooled vector of each prompt's first chunk
            pooled = out.text_embeds.reshape(B, k, -1)[:, 0].to(device, dtype)
        return Conditioning(torch.cat(contexts, dim=-1), pooled)


def add_time_ids(
    original_size: Sequence[int],
    crop_top_left: Sequence[int],
    target_size: Sequence[int],
    aesthetic_score: float | None = None,
) -> torch.Tensor:
    """SDXL's size/crop ids, float32: base (6,) = original (h, w), crop (top, left), target (h, w); with an
    aesthetic score (the refiner, e.g. AESTHETIC_SCORE / NEGATIVE_AESTHETIC_SCORE) (5,) = original (h, w),
    crop (top, left), score; target_size is then unused. As diffusers' `_get_add_time_ids`."""
    for name, pair in (
        ("original_size", original_size),
        ("crop_top_left", crop_top_left),
        ("target_size", target_size),
    ):
        if len(pair) != 2:
            raise ValueError(f"{name} must be two numbers (height, width) or (top, left), got {tuple(pair)}")
    last = tuple(target_size) if aesthetic_score is None else (aesthetic_score,)
    return torch.tensor([*original_size, *crop_top_left, *last], dtype=torch.float32)


def label_vector(pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """The U-Net's added-vector input y: cat(pooled (B, P), [cos | sin] features of each id, TIME_ID_DIM each)
    -> (B, P + n*256) in pooled's dtype; time_ids (n,) for every row or (B, n). diffusers' "text_time" embedding
    (add_time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)); sgm's ConcatTimestepEmbedderND.
    """
    if time_ids.ndim == 1:
        time_ids = time_ids.expand(pooled.shape[0], -1)
    if pooled.ndim != 2 or time_ids.ndim != 2 or time_ids.shape[0] != pooled.shape[0]:
        raise ValueError(
            f"label_vector takes pooled (B, P) and time_ids (n,) or (B, n), got {tuple(pooled.shape)} and "
            f"{tuple(time_ids.shape)}"
        )
    B, n = time_ids.shape
    features = timestep_embedding(time_ids.reshape(-1).to(pooled.device), TIME_ID_DIM)  # (B*n, 256) float32
    return torch.cat([pooled, features.reshape(B, n * TIME_ID_DIM).to(pooled.dtype)], dim=-1)
