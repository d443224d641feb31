"""The settings of a training run: one dataclass, validated at construction, stored in every checkpoint.

`RESUME_MUST_MATCH` names the fields a resumed run must share with the checkpoint it resumes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MODES = ("full", "lora", "scratch", "vae")
MIXED_PRECISION = ("no", "bf16", "fp16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
# fields that must match to resume a run (others, e.g. max_steps or save_every, may change)
RESUME_MUST_MATCH = (
    "mode",
    "base",
    "vae",
    "data",
    "resolution",
    "batch_size",
    "grad_accum",
    "seed",
    "lr",
    "lr_scheduler",
    "warmup_steps",
    "unet_config",
    "text_config",
    "vae_config",
    "lora_rank",
    "lora_alpha",
    "train_text_encoder",
    "text_encoder_lr",
    "decoder_only",
    "freeze_text_encoder",
    "text_init_std",
    "cache",
    "center_crop",
    "random_flip",
    "caption_dropout",
    "snr_gamma",
    "offset_noise",
    "ema_decay",
    "optimizer",
    "prediction_type",
    "zero_terminal_snr",
)


@dataclass
class TrainConfig:
    data: str  # image folder, "shapes" (procedural demo dataset) or a Hugging Face datasets name
    output_dir: str = "runs/train"
    mode: str = "full"  # full | lora | scratch | vae
    base: str | None = None  # checkpoint to start from (full / lora; vae: optional)
    # scratch: the VAE to train the U-Net on (trained with mode=vae); full/lora: replaces the base's
    vae: str | None = None
    unet_config: str | dict | None = None  # scratch: "sd15", "sd21", a JSON file or a dict (UNetConfig fields)
    text_config: str | dict | None = None  # scratch: CLIPTextConfig JSON file or dict (default: a small one)
    vae_config: str | dict | None = None  # vae from scratch: AutoencoderKL config JSON file or dict
    train_text_encoder: bool = False  # full: also fine-tune the text encoder (scratch: see freeze_text_encoder)
    text_encoder_lr: float | None = None  # peak learning rate of the text encoder when it trains (default: lr)
    freeze_text_encoder: bool = False  # scratch: keep the new text encoder at its random init (not trained)
    text_init_std: float = 0.0  # scratch: std of the new token embeddings (0 = CLIP's 0.02)
    prediction_type: str | None = None  # default: the base model's ("epsilon" from scratch)
    zero_terminal_snr: bool = False  # rescale the schedule to SNR 0 at t = T-1, sample "trailing" (Lin et al. 2024)
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False
    caption_dropout: float = 0.0  # probability of an empty caption (for classifier-free guidance)
    shapes_two_objects: float = 0.3  # data=shapes: share of two-object scenes
    cache: bool = False  # precompute VAE latents (and text embeddings when the text encoder is frozen)
    batch_size: int = 1  # global batch per micro-step, over all processes
    grad_accum: int = 1
    max_steps: int = 1000  # optimizer steps (the LR schedule spans them)
    stop_at: int = 0  # end the run after this step (0 = at max_steps), schedule unchanged; resumable
    lr: float = 1e-4
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    max_grad_norm: float = 1.0  # 0 = no clipping
    mixed_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0  # 0 = no EMA; e.g. 0.9999 for long runs
    snr_gamma: float = 0.0  # min-SNR-gamma loss weighting (Hang et al. 2023); 0 = off, 5 is usual
    offset_noise: float = 0.0  # offset noise strength (e.g. 0.05-0.1): darker darks, brighter brights
    kl_weight: float = 1e-6  # vae mode: weight of the KL term
    decoder_only: bool = False  # vae mode: train the decoder alone (encoder, latents and scaling factor kept)
    lora_rank: int = 4
    lora_alpha: float | None = None  # default: rank
    save_every: int = 500
    keep_checkpoints: int = 2
    validate_every: int = 0  # 0 = only at the end
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int = 25
    validation_guidance: float = 7.5
    log_every: int = 1
    seed: int = 0
    num_workers: int = 0
    resume: str | None = None  # "latest" or a checkpoint folder
    export_diffusers: bool = False

    def __post_init__(self):
        problems = [
            (self.mode not in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (
                self.resolution < 8 or self.resolution % 8,
                f"resolution {self.resolution} must be a positive multiple of 8",
            ),
            (self.batch_size < 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum < 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.max_steps < 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.lr <= 0, f"lr must be > 0, got {self.lr}"),
            (
                self.text_encoder_lr is not None and not self.text_encoder_lr > 0,
                f"text_encoder_lr must be > 0, got {self.text_encoder_lr}",
            ),
            (self.decoder_only and self.mode != "vae", "decoder_only is for mode vae (it trains a VAE's decoder)"),
            (self.decoder_only and not self.base, "decoder_only needs --base: the VAE whose decoder to fine-tune"),
            (self.mixed_precision not in MIXED_PRECISION, f"mixed_precision must be one of {MIXED_PRECISION}"),
            (self.lr_scheduler not in LR_SCHEDULERS, f"lr_scheduler must be one of {LR_SCHEDULERS}"),
            (not 0 <= self.caption_dropout <= 1, f"caption_dropout must be in [0, 1], got {self.caption_dropout}"),
            (self.ema_decay != 0 and not 0 < self.ema_decay < 1, "ema_decay must be 0 (off) or in (0, 1)"),
            (self.optimizer not in ("adamw", "adamw8bit"), "optimizer must be adamw or adamw8bit"),
            (
                self.mode in ("full", "lora") and not self.base,
                f"mode {self.mode} needs --base (the model to fine-tune)",
            ),
            (
                self.mode == "scratch" and not self.vae and not self.base,
                "mode scratch needs --vae (a VAE trained with --mode vae) or --base to take the VAE from",
            ),
            (self.save_every < 1, f"save_every must be >= 1, got {self.save_every}"),
            (self.stop_at < 0, f"stop_at must be >= 0, got {self.stop_at}"),
            (
                not 0 <= self.shapes_two_objects <= 1,
                f"shapes_two_objects must be in [0, 1], got {self.shapes_two_objects}",
            ),
            (self.lora_rank < 1, f"lora_rank must be >= 1, got {self.lora_rank}"),
            (
                self.prediction_type not in (None, "epsilon", "v_prediction"),
                f"prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}",
            ),
            (
                self.zero_terminal_snr and self.mode == "vae",
                "zero_terminal_snr is a noise schedule for diffusion training; mode vae has none",
            ),
        ]
        for bad, message in problems:
            if bad:
                raise ValueError(message)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
