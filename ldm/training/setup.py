"""What the training loop trains and on what data, for each mode.

`load_dataset(c)` -> the items; `build_models(c, dataset)` -> the mode's models (DiffusionModels or
VAEModels: trainable parameters, loss, export, validation); `build_data(c, models, dataset)` -> the
global batches (with latents and text cached when asked). The loop (ldm.training.loop) drives them.

full     fine-tune every U-Net weight of --base (VAE and text encoder frozen)
lora     LoRA adapters on the U-Net attention projections of --base; base weights untouched
         (both for SD1/SD2 and SDXL bases; SDXL: both text encoders frozen, each item conditioned on its
         caption's context and pooled vector and on its own size/crop ids, the refiner on --aesthetic-score)
scratch  a new U-Net (given config) and a new text encoder, trained jointly, on a given VAE
vae      a diffusers AutoencoderKL (new from a config, or the --base one), reconstruction + KL;
         --decoder-only trains the decoder alone, so the latent space (and a U-Net trained on it) is kept
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ldm.conditioning.sdxl import AESTHETIC_SCORE
from ldm.models.clip import count_chunks, encode_ids, load_tokenizer, tokenize
from ldm.sampling.schedule import NoiseSchedule
from ldm.training import data as d
from ldm.training.config import TrainConfig
from ldm.training.losses import diffusion_loss, vae_loss

# the text encoder of models trained from scratch when no --text-config is given: small, CLIP-shaped
DEFAULT_SCRATCH_TEXT: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=128,
)


def _json_or_dict(value, what: str) -> dict:
    if isinstance(value, dict):
        return value
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"{what} {value}: no such file; pass a JSON file of {what} fields")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


class Denoiser(nn.Module):
    """The module accelerate wraps (DDP syncs what requires grad): U-Net, plus the text encoder
    when it trains. forward(x_t, t, context=None, ids=None, y=None): ids are encoded here when given;
    y is an SDXL U-Net's added vector (ldm.conditioning.sdxl.label_vector), None for SD1/SD2."""

    def __init__(self, unet, text_encoder=None):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, x, t, context=None, ids=None, y=None):
        if ids is not None:
            context = encode_ids(self.text_encoder, ids)
        return self.unet(x, t, context, y)


def sdxl_text(
    conditioner, captions: Sequence[str], num_chunks: int | None = None, zero_empty: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning of training captions: (context (B, 77k, D), pooled (B, P)), k = num_chunks
    (default: the longest caption's). An empty caption (dropped for unconditional training) is all zeros when
    `zero_empty` (the base's force_zeros_for_empty_prompt): the unconditional input SDXL was trained with
    (sgm zeroes dropped embeddings) and that its guidance samples from."""
    captions = list(captions)
    k = num_chunks or max(count_chunks(tokenizer, captions) for tokenizer, _ in conditioner.encoders)
    # the conditioner's per-chunk encoding: a cache stacks the contexts of every caption, so k is fixed here
    cond = conditioner.encode_chunks(captions, 1, k)
    context, pooled = cond.context, cond.pooled
    if zero_empty:
        empty = torch.tensor([c == "" for c in captions], device=context.device)
        context, pooled = context.masked_fill(empty[:, None, None], 0), pooled.masked_fill(empty[:, None], 0)
    return context, pooled


class DiffusionModels:
    """U-Net modes (full, lora, scratch). validation_prompts: the prompts of the validation grid.

    SDXL (an SDXL U-Net, `sdxl` = the base pipeline's text_encoder_2, tokenizer_2, zero_empty_negative and
    default_guidance): the text encoders stay frozen; each item is conditioned on its caption's context and
    pooled vector (`sdxl_text`) and on its size/crop ids (`time_ids`); the refiner (text_encoder None) on
    `aesthetic_score` in place of the target size."""

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        schedule: NoiseSchedule,
        train_te: bool,
        lora: bool,
        resolution: int,
        validation_prompts: Sequence[str] = (),
        *,
        sdxl: dict[str, Any] | None = None,
        aesthetic_score: float = AESTHETIC_SCORE,
    ):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.schedule, self.train_te, self.lora, self.resolution = schedule, train_te, lora, resolution
        self.validation_prompts = list(validation_prompts)
        self.sdxl, self.aesthetic_score = dict(sdxl or {}), float(aesthetic_score)
        if (unet.config.adm_in_channels is not None) != bool(self.sdxl):
            raise ValueError("DiffusionModels: an SDXL U-Net needs the sdxl parts (text_encoder_2...), others none")
        if train_te and self.sdxl:
            raise ValueError("DiffusionModels: training SDXL's text encoders is not supported")
        self.conditioner = None
        if self.sdxl:
            from ldm.conditioning.sdxl import SDXLConditioner

            self.conditioner = SDXLConditioner(tokenizer, text_encoder, self.sdxl["tokenizer_2"], self.text_encoder_2)
            self.text_encoder_2.requires_grad_(False).eval()
        self.vae.requires_grad_(False).eval()
        if self.text_encoder is not None:
            self.text_encoder.requires_grad_(train_te).train(train_te)
        self.unet.train()
        self._module = Denoiser(unet, text_encoder if train_te else None)

    @property
    def text_encoder_2(self):
        return self.sdxl.get("text_encoder_2")

    @property
    def family(self) -> str:
        """As Pipeline.family: "sd", "sdxl" or "sdxl_refiner"."""
        if not self.sdxl:
            return "sd"
        return "sdxl_refiner" if self.text_encoder is None else "sdxl"

    def trainable_named_parameters(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in self._module.named_parameters() if p.requires_grad}

    def to(self, device) -> DiffusionModels:
        """Every module on `device` (accelerate's): the trained one would be moved by `prepare`, but the
        frozen VAE and text encoders encode each batch there too. A no-op on the CPU."""
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if module is not None:
                module.to(device)
        return self

    def trained_module(self) -> nn.Module:
        return self._module

    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE posterior, already in the U-Net's latent scale."""
        return d.vae_latent_distribution(self.vae)(pixels)

    @torch.no_grad()
    def encode_text(self, captions: list[str], num_chunks: int | None = None) -> d.TextEncoding:
        """The context (B, T, D) of captions; SDXL: (context, pooled) (`sdxl_text`)."""
        if self.conditioner is not None:
            return sdxl_text(self.conditioner, captions, num_chunks, self.sdxl.get("zero_empty_negative", True))
        return encode_ids(self.text_encoder, tokenize(self.tokenizer, captions, num_chunks))

    def count_chunks(self, captions: list[str]) -> int:
        """77-token chunks of the longest caption (over both tokenizers for SDXL)."""
        if self.conditioner is not None:
            return max(count_chunks(tokenizer, captions) for tokenizer, _ in self.conditioner.encoders)
        return count_chunks(self.tokenizer, captions)

    def time_ids(self, batch: dict, n: int) -> torch.Tensor:
        """SDXL's size/crop ids of the batch's n items, float32 (n, 6): each item's original (h, w) and crop
        (top, left) (`ldm.training.data.Placement`), then the target (R, R); the refiner's (n, 5) end with the
        aesthetic score instead. Items that record no placement (procedural data, drawn at R x R, uncropped):
        original = target, crop (0, 0)."""
        R = self.resolution
        if "original_size" in batch:
            original, crop = batch["original_size"].float(), batch["crop_top_left"].float()
        else:
            if "latent_mean" in batch or "latents" in batch:  # cached pictures whose sizes were not kept
                raise ValueError(
                    "the cached items have no original sizes and crops, which SDXL is conditioned on; "
                    "cache with cache_latents_and_text(..., with_sizes=True)"
                )
            original, crop = torch.tensor([[R, R]], dtype=torch.float32).expand(n, 2), torch.zeros(n, 2)
        last = [R, R] if self.family == "sdxl" else [self.aesthetic_score]
        return torch.cat([original, crop, torch.tensor([last], dtype=torch.float32).expand(n, -1)], dim=1)

    def added_vector(self, batch: dict, pooled: torch.Tensor | None, n: int, device) -> torch.Tensor | None:
        """An SDXL U-Net's y (n, adm_in_channels): the pooled text and the items' size/crop ids; None for SD1/SD2."""
        if not self.sdxl:
            return None
        from ldm.conditioning.sdxl import label_vector

        if pooled is None:
            raise ValueError(
                "an SDXL U-Net needs each item's pooled text vector; the batch has a context only "
                "(a cache made with an SD text encoder?): cache again with this model"
            )
        return label_vector(pooled.to(device).float(), self.time_ids(batch, n).to(device))

    def loss(self, wrapped, batch: dict, g: torch.Generator, sl: slice, c: TrainConfig) -> torch.Tensor:
        device = next(self.unet.parameters()).device
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]
        else:
            mean, std = self.encode_images(batch["pixels"])
        # z ~ N(mean, std^2), drawn for the global batch (process-count independent), then sliced
        latents = d.sample_gaussian(mean.to(device), std.to(device), g, c.batch_size, sl)
        pooled = batch.get("pooled")
        if "context" in batch:
            context, ids = batch["context"].to(device), None
        elif self.train_te:
            context, ids = None, tokenize(self.tokenizer, batch["caption"]).to(device)
        else:
            encoded, ids = self.encode_text(batch["caption"]), None
            context, pooled = encoded if isinstance(encoded, tuple) else (encoded, None)
        y = self.added_vector(batch, pooled, latents.shape[0], device)

        def denoise(x_t, t):
            return wrapped(x_t, t, context=context, ids=ids, y=y)

        return diffusion_loss(denoise, self.schedule, latents, g, sl, c.batch_size, c.snr_gamma, c.offset_noise)

    def pipeline(self):
        from ldm.pipelines.pipeline import Pipeline

        pipe = Pipeline(
            self.unet,
            self.vae,
            self.text_encoder,
            self.tokenizer,
            self.schedule,
            (self.resolution, self.resolution),
            **self.sdxl,
        )
        return pipe

    def export(self, out: Path, c: TrainConfig) -> dict:
        was_training = self.unet.training
        files = {}
        try:
            if self.lora:
                from ldm.models.lora import save_lora

                files["lora"] = str(save_lora(self.unet, out / "lora.safetensors", metadata={"ldm_base": str(c.base)}))
            else:
                pipe = self.pipeline()
                files["model"] = str(pipe.save_single_file(out / "model.safetensors"))
                if c.export_diffusers:
                    target = out / "diffusers"
                    if target.exists():
                        shutil.rmtree(target)
                    files["diffusers"] = str(pipe.save_diffusers(target))
        finally:
            self._restore_modes(was_training)
        return files

    def _restore_modes(self, unet_training: bool) -> None:
        """Back to training after a Pipeline (which sets every module to eval) exported or sampled."""
        self.unet.train(unet_training)
        if self.text_encoder is not None:
            self.text_encoder.train(self.train_te)

    def validate(self, path: Path, c: TrainConfig) -> str:
        from ldm.training.grid import save_grid

        was_training = self.unet.training
        prompts = self.validation_prompts
        try:
            pipe = self.pipeline()
            images = []
            for i, prompt in enumerate(prompts):
                images += pipe(
                    prompt,
                    steps=c.validation_steps,
                    guidance_scale=c.validation_guidance,
                    seed=c.seed + i,
                    progress=False,
                )
            return str(save_grid(images, path, captions=prompts))
        finally:
            self._restore_modes(was_training)


class VAEModels:
    """Mode vae. dataset: the training images, to fit the scaling factor at export (not needed with
    decoder_only); validation_images (n, 3, R, R): the top row of the validation grid."""

    def __init__(
        self,
        vae,
        decoder_only: bool = False,
        dataset=None,
        validation_images: torch.Tensor | None = None,
    ):
        self.vae, self.decoder_only = vae, decoder_only
        self.dataset, self.validation_images = dataset, validation_images
        self.vae.requires_grad_(True).train()
        if decoder_only:  # the encoder (and so every latent a U-Net was trained on) stays exactly as it is
            self.vae.model.encoder.requires_grad_(False)
            self.vae.model.quant_conv.requires_grad_(False)

    def trainable_named_parameters(self):
        return {k: p for k, p in self.vae.named_parameters() if p.requires_grad}

    def to(self, device) -> VAEModels:
        self.vae.to(device)
        return self

    def trained_module(self):
        return self.vae

    def loss(self, wrapped, batch, g, sl, c: TrainConfig):
        vae = wrapped.module if hasattr(wrapped, "module") else wrapped
        loss, _ = vae_loss(vae, batch["pixels"].to(vae.device), g, sl, c.batch_size, c.kl_weight)
        return loss

    @torch.no_grad()
    def fit_scaling_factor(self, dataset, n: int = 256) -> float:
        """1 / std of the latent means over up to n data images: the U-Net then sees unit-variance
        latents (how SD's 0.18215 was chosen). Stored in the VAE config."""
        was = self.vae.training
        self.vae.eval()
        try:
            idx = range(min(n, len(dataset)))
            means = [
                self.vae.model.encode(torch.stack([dataset[i]["pixels"] for i in idx[s : s + 32]])).latent_dist.mean
                for s in range(0, len(idx), 32)
            ]
            factor = float(1.0 / torch.cat(means).std())
        finally:
            self.vae.train(was)
        self.vae.model.register_to_config(scaling_factor=factor)
        self.vae.scaling_factor = factor
        return factor

    def export(self, out: Path, c: TrainConfig) -> dict:
        from ldm.formats.checkpoint import save_safetensors
        from ldm.models.vae import vae_metadata, vae_to_original_state_dict

        # decoder only: the latents are unchanged, and so must be the scale a U-Net was trained with
        if not self.decoder_only and self.dataset is None:
            raise ValueError("VAEModels.export fits the scaling factor on the data: build it with a dataset")
        files = {
            "scaling_factor": self.vae.scaling_factor if self.decoder_only else self.fit_scaling_factor(self.dataset)
        }
        path = out / "vae.safetensors"
        save_safetensors(vae_to_original_state_dict(self.vae, prefix=""), path, metadata=vae_metadata(self.vae))
        files["vae"] = str(path)
        return files

    @torch.no_grad()
    def validate(self, path: Path, c: TrainConfig) -> str:
        from ldm.models.vae import to_pil
        from ldm.training.grid import save_grid

        images = self.validation_images  # (n, 3, R, R) data images: top row, reconstructions below
        if images is None:
            raise ValueError("VAEModels.validate needs validation_images: build it with a dataset")
        was = self.vae.training
        self.vae.eval()
        try:
            recon = self.vae.decode(self.vae.encode(images, sample=False))
            return str(save_grid(to_pil(images) + to_pil(recon), path, rows=2))
        finally:
            self.vae.train(was)


def validation_prompts(c: TrainConfig, dataset=None) -> list[str]:
    """--validation-prompts, else the first 4 distinct non-empty captions of the data (none without data)."""
    if c.validation_prompts or dataset is None:
        return list(c.validation_prompts)
    captions = getattr(dataset, "captions", None) or [dataset[i]["caption"] for i in range(min(len(dataset), 64))]
    return [x for x in dict.fromkeys(captions) if x][:4]


def validation_images(dataset, n: int = 4) -> torch.Tensor:
    """The first n items' pixels (n, 3, R, R), as the data gives them before training."""
    return torch.stack([dataset[i]["pixels"] for i in range(min(n, len(dataset)))])


def build_models(c: TrainConfig, dataset=None):
    """The models of c.mode: VAEModels for vae, else DiffusionModels. dataset (from `load_dataset`):
    where the validation inputs and the VAE's scaling factor come from; without it the models train
    and export, but U-Net modes validate on --validation-prompts only and a new VAE cannot export."""
    sdxl: dict[str, Any] = {}  # an SDXL base's other parts (DiffusionModels' sdxl)
    if c.mode == "vae":
        from diffusers import AutoencoderKL

        from ldm.models.vae import VAE, load_vae

        if c.base:
            vae = load_vae(c.base)
        else:
            torch.manual_seed(c.seed)
            cfg = _json_or_dict(c.vae_config, "vae_config") if c.vae_config else {}
            vae = VAE(AutoencoderKL(**cfg))
        images = validation_images(dataset) if dataset is not None else None
        return VAEModels(vae, c.decoder_only, dataset, images)

    if c.mode in ("full", "lora"):
        from ldm.pipelines.pipeline import Pipeline

        pipe = Pipeline.from_pretrained(c.base, device="cpu", dtype=torch.float32, prediction_type=c.prediction_type)
        unet, vae, text_encoder, tokenizer, schedule = (
            pipe.unet,
            pipe.vae,
            pipe.text_encoder,
            pipe.tokenizer,
            pipe.schedule,
        )
        train_te = c.train_text_encoder and c.mode == "full"
        if pipe.family != "sd":
            if train_te:
                raise ValueError(
                    f"--train-text-encoder: {c.base} is an SDXL model ({pipe.family}), whose two text encoders "
                    "cannot be trained here; drop the flag (the U-Net trains, the text encoders stay frozen)"
                )
            sdxl = dict(
                text_encoder_2=pipe.text_encoder_2,
                tokenizer_2=pipe.tokenizer_2,
                zero_empty_negative=pipe.zero_empty_negative,
                default_guidance=pipe.default_guidance,
            )
        if c.vae:  # e.g. a decoder fine-tuned with --mode vae --decoder-only; the export carries it
            from ldm.models.vae import load_vae

            base_scale, vae = vae.scaling_factor, load_vae(c.vae)
            if sdxl and vae.scaling_factor != base_scale:
                # same latent space, same scale: a bare SDXL VAE file stores none and reads as SD's 0.18215
                note = f"--vae {c.vae}: latent scale {vae.scaling_factor:g}; using the SDXL base's {base_scale:g}"
                print(note, file=sys.stderr)
                vae.model.register_to_config(scaling_factor=base_scale)
                vae.scaling_factor = base_scale
        if c.mode == "lora":
            from ldm.models.lora import add_lora

            unet.requires_grad_(False)
            torch.manual_seed(c.seed)
            add_lora(unet, rank=c.lora_rank, alpha=c.lora_alpha)
        else:
            unet.requires_grad_(True)
    else:  # scratch
        from transformers import CLIPTextConfig, CLIPTextModel

        from ldm.models.unet import UNet, UNetConfig
        from ldm.models.vae import load_vae

        if c.unet_config in ("sd15", "sd21"):
            unet_config = getattr(UNetConfig, c.unet_config)()
        elif c.unet_config:
            unet_config = UNetConfig.from_dict(_json_or_dict(c.unet_config, "unet_config"))
        else:
            raise ValueError("mode scratch needs --unet-config (sd15, sd21 or a JSON file of UNetConfig fields)")
        if unet_config.adm_in_channels is not None:
            raise ValueError(
                f"--unet-config {c.unet_config}: an SDXL-like U-Net (adm_in_channels); mode scratch builds "
                "SD1/SD2-like models (one text encoder): drop adm_in_channels, or fine-tune an SDXL --base"
            )
        text_fields = _json_or_dict(c.text_config, "text_config") if c.text_config else DEFAULT_SCRATCH_TEXT
        text_config = CLIPTextConfig(**text_fields)
        if text_config.hidden_size != unet_config.context_dim:
            raise ValueError(
                f"text encoder width {text_config.hidden_size} differs from the U-Net context_dim "
                f"{unet_config.context_dim}; make them equal"
            )
        torch.manual_seed(c.seed)  # reproducible initialization
        unet = UNet(unet_config)
        text_encoder = CLIPTextModel(text_config)
        if c.text_init_std:
            # distinct words from the start: with CLIP's 0.02 init, words the U-Net cannot use yet
            # (e.g. positions) get no gradient to tell them apart and stay nearly equal
            with torch.no_grad():
                cast(nn.Embedding, text_encoder.get_input_embeddings()).weight.normal_(0.0, c.text_init_std)
        source = c.vae or c.base
        assert source is not None  # TrainConfig requires one of them
        vae = load_vae(source)
        tokenizer = load_tokenizer()
        schedule = NoiseSchedule(prediction_type=c.prediction_type or "epsilon")
        train_te = not c.freeze_text_encoder
    if c.zero_terminal_snr:
        if schedule.prediction_type != "v_prediction":
            raise ValueError(
                f"zero_terminal_snr needs v_prediction (an {schedule.prediction_type} model cannot "
                "predict at SNR 0); add --prediction-type v_prediction"
            )
        schedule = dataclasses.replace(schedule, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if vae.latent_channels != unet.config.in_channels:  # a --vae that does not fit the U-Net
        raise ValueError(
            f"VAE {c.vae or c.base} has {vae.latent_channels} latent channels, the U-Net takes "
            f"{unet.config.in_channels}; use a VAE with the U-Net's latent space"
        )
    if c.gradient_checkpointing:
        unet.gradient_checkpointing = True
        if train_te and text_encoder is not None:
            text_encoder.gradient_checkpointing_enable()
    return DiffusionModels(
        unet,
        vae,
        text_encoder,
        tokenizer,
        schedule,
        train_te,
        c.mode == "lora",
        c.resolution,
        validation_prompts(c, dataset),
        sdxl=sdxl,
        aesthetic_score=c.aesthetic_score,
    )


# --------------------------------------------------------------------------- data

HUGE_DATASET = 10_000_000  # procedural datasets: items are i.i.d. by construction, no shuffle needed


class Data:
    """Global batches in an order that depends only on (seed, epoch); each process reads its slice."""

    def __init__(self, dataset, batch_size: int, seed: int, num_workers: int = 0):
        self.dataset, self.batch_size, self.seed, self.num_workers = dataset, batch_size, seed, num_workers
        check_dataset_size(dataset, batch_size)
        self.batches_per_epoch = len(dataset) // batch_size

    def epoch_order(self, epoch: int) -> Sequence[int]:
        n = len(self.dataset)
        if n >= HUGE_DATASET:
            start = epoch * self.batches_per_epoch * self.batch_size
            return range(start % n, start % n + self.batches_per_epoch * self.batch_size)
        return d.epoch_permutation(n, self.seed, epoch)

    def batches(self, start_micro: int, sl: slice):
        """Endless local batches, starting at global micro-batch `start_micro` (exact resume)."""
        from torch.utils.data import DataLoader

        epoch, skip = divmod(start_micro, self.batches_per_epoch)
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            # a seeded generator: the loader must not draw from (and shift) the global RNG
            g = torch.Generator().manual_seed(self.seed + epoch)
            local = _LocalBatches(self, epoch, skip, sl)
            yield from DataLoader(self.dataset, batch_sampler=local, num_workers=self.num_workers, generator=g)
            epoch, skip = epoch + 1, 0


class _LocalBatches:
    """This process's slice of each global batch of one epoch, produced lazily (epochs can be huge)."""

    def __init__(self, data: Data, epoch: int, skip: int, sl: slice):
        self.data, self.epoch, self.skip, self.sl = data, epoch, skip, sl

    def __len__(self) -> int:
        return self.data.batches_per_epoch - self.skip

    def __iter__(self):
        order, bs = self.data.epoch_order(self.epoch), self.data.batch_size
        for b in range(self.skip, self.data.batches_per_epoch):
            yield list(order[b * bs : (b + 1) * bs])[self.sl]


def check_dataset_size(dataset, batch_size: int) -> None:
    """At least one global batch (checked after the scan, before any model is loaded)."""
    if len(dataset) < batch_size:
        raise ValueError(
            f"the dataset has {len(dataset)} usable items, fewer than --batch-size {batch_size}; "
            "add images or lower the batch size"
        )


def check_against_models(c: TrainConfig, models: DiffusionModels | VAEModels) -> None:
    """Settings that can only be checked against the loaded models (before anything is trained or written)."""
    schedule = getattr(models, "schedule", None)
    if schedule is not None and c.validation_steps > schedule.num_train_timesteps:
        raise ValueError(
            f"validation_steps {c.validation_steps} must be at most the model's {schedule.num_train_timesteps} "
            "training timesteps"
        )


def load_dataset(c: TrainConfig, main: bool = True) -> torch.utils.data.Dataset:
    """The training items (scanned and checked: fails fast, before any model is loaded)."""
    dataset: torch.utils.data.Dataset
    if c.data == "shapes":
        from ldm.demo.shapes import ShapesDataset

        dataset = ShapesDataset(
            seed=c.seed, image_size=c.resolution, p_two=c.shapes_two_objects, caption_dropout=c.caption_dropout
        )
    else:
        dataset = d.load_training_dataset(
            c.data,
            c.resolution,
            crop="center" if c.center_crop else "random",
            random_flip=c.random_flip,
            caption_dropout=c.caption_dropout,
            seed=c.seed,
        )
        scan = getattr(dataset, "scan", None)
        if main and scan is not None:
            print(scan.summary())
    return dataset


def build_data(c: TrainConfig, models: DiffusionModels | VAEModels, dataset, main: bool = True) -> Data:
    """The global batches of `dataset`; with --cache (U-Net modes) its latents and text computed once."""
    if isinstance(models, DiffusionModels) and c.cache:
        if models.train_te:
            raise ValueError(
                "--cache with a trained text encoder: only latents could be cached; train without "
                "--cache or freeze the text encoder"
            )
        k = models.count_chunks(list(dataset.captions))  # one context length for every cached item
        dataset = d.cache_latents_and_text(
            dataset,
            models.encode_images,
            lambda caps: models.encode_text(caps, num_chunks=k),
            batch_size=8,
            progress=main,
            with_sizes=models.family != "sd",  # SDXL's size/crop ids
        )
    return Data(dataset, c.batch_size, c.seed, c.num_workers)
