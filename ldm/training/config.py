"""The settings of a training run: one dataclass, validated at construction, stored in every checkpoint.

`RESUME_MUST_MATCH` names the fields a resumed run must share with the checkpoint it resumes.
"""

from __future__ import annotations

import dataclasses
import math
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
    "aesthetic_score",
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
    aesthetic_score: float = 6.0  # an SDXL refiner --base: the aesthetic-score id of every item (diffusers' default)
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
        numeric = _range_problems(self)  # before anything is loaded or written (and before torch is imported)
        if numeric:
            raise ValueError(numeric[0])
        problems = [
            (self.mode not in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (self.decoder_only and self.mode != "vae", "decoder_only is for mode vae (it trains a VAE's decoder)"),
            (self.decoder_only and not self.base, "decoder_only needs --base: the VAE whose decoder to fine-tune"),
            (self.mixed_precision not in MIXED_PRECISION, f"mixed_precision must be one of {MIXED_PRECISION}"),
            (self.lr_scheduler not in LR_SCHEDULERS, f"lr_scheduler must be one of {LR_SCHEDULERS}"),
            (self.optimizer not in ("adamw", "adamw8bit"), "optimizer must be adamw or adamw8bit"),
            (
                self.mode in ("full", "lora") and not self.base,
                f"mode {self.mode} needs --base (the model to fine-tune)",
            ),
            (
                self.mode == "scratch" and not self.vae and not self.base,
                "mode scratch needs --vae (a VAE trained with --mode vae) or --base to take the VAE from",
            ),
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


# --------------------------------------------------------------------------- ranges of the numeric settings

MAX_STEPS = 10_000_000  # checkpoint folders are named step-NNNNNNN
MAX_SEED = 2**32 - 1  # torch's CPU generator keeps 32 bits of a seed (validation images use seed, seed+1, ...)
SCHEDULE_STEPS = 1000  # the training timesteps of every SD schedule: validation sampling takes at most these

# field -> (low, high, what the range means): integers, inclusive
INT_RANGES: dict[str, tuple[int, int, str]] = {
    "resolution": (8, 8192, "a positive multiple of 8, at most 8192"),
    "batch_size": (1, 65536, ">= 1"),
    "grad_accum": (1, 65536, ">= 1"),
    "max_steps": (1, MAX_STEPS, f">= 1 and at most {MAX_STEPS:,}"),
    "stop_at": (0, MAX_STEPS, "0 (run to max_steps) or a step <= max_steps"),
    "warmup_steps": (0, MAX_STEPS, ">= 0 and at most max_steps"),
    "lora_rank": (1, 4096, "in 1..4096"),
    "save_every": (1, MAX_STEPS, ">= 1"),
    "keep_checkpoints": (0, 1_000_000, ">= 1, or 0 to keep every checkpoint"),
    "validate_every": (0, MAX_STEPS, ">= 0 (0 = only at the end)"),
    "validation_steps": (1, SCHEDULE_STEPS, f"in 1..{SCHEDULE_STEPS} (the schedule's training timesteps)"),
    "log_every": (1, MAX_STEPS, ">= 1"),
    "seed": (0, MAX_SEED, f"in 0..{MAX_SEED}"),
    "num_workers": (0, 1024, "in 0..1024 (0 = load data in the training process)"),
}
INF = float("inf")
# field -> (low, high, low included, high included, what the range means): finite floats
FLOAT_RANGES: dict[str, tuple[float, float, bool, bool, str]] = {
    "lr": (0.0, 1.0, False, True, "> 0 and at most 1"),
    "text_encoder_lr": (0.0, 1.0, False, True, "> 0 and at most 1"),
    "text_init_std": (0.0, 10.0, True, True, "in [0, 10] (0 = CLIP's 0.02)"),
    "caption_dropout": (0.0, 1.0, True, True, "in [0, 1]"),
    "aesthetic_score": (0.0, 10.0, True, True, "in [0, 10] (the LAION aesthetic scale; 6 is usual)"),
    "shapes_two_objects": (0.0, 1.0, True, True, "in [0, 1]"),
    "adam_beta1": (0.0, 1.0, True, False, "in [0, 1)"),
    "adam_beta2": (0.0, 1.0, True, False, "in [0, 1)"),
    "weight_decay": (0.0, 1.0, True, True, "in [0, 1]"),
    "adam_eps": (0.0, 1.0, False, True, "> 0 and at most 1"),
    "max_grad_norm": (0.0, INF, True, False, ">= 0 (0 = no clipping)"),
    "ema_decay": (0.0, 1.0, True, False, "0 (off) or in (0, 1)"),
    "snr_gamma": (0.0, INF, True, False, ">= 0 (0 = off)"),
    "offset_noise": (0.0, 1.0, True, True, "in [0, 1] (0 = off)"),
    "kl_weight": (0.0, INF, True, False, ">= 0"),
    "lora_alpha": (0.0, INF, False, False, "> 0"),
    "validation_guidance": (0.0, 100.0, True, True, "in [0, 100]"),
}
OPTIONAL = ("text_encoder_lr", "lora_alpha")  # None: the default (lr, rank)


def _range_problems(c: TrainConfig) -> list[str]:
    """Every numeric setting: its type, finiteness and range (plus the few that depend on each other)."""
    problems = []
    for name, (low, high, meaning) in INT_RANGES.items():
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{name} must be an integer {meaning}, got {value!r}")
        elif not low <= value <= high:
            problems.append(f"{name} {value} must be {meaning}")
    for name, (lo, hi, low_in, high_in, meaning) in FLOAT_RANGES.items():
        value = getattr(c, name)
        if value is None and name in OPTIONAL:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{name} must be a number {meaning}, got {value!r}")
            continue
        inside = (lo <= value if low_in else lo < value) and (value <= hi if high_in else value < hi)
        if not math.isfinite(value) or not inside:
            problems.append(f"{name} {value} must be {meaning}")
    if problems:
        return problems
    if c.resolution % 8:
        problems.append(f"resolution {c.resolution} must be a positive multiple of 8")
    if c.stop_at > c.max_steps:
        problems.append(f"stop_at {c.stop_at} must be <= max_steps {c.max_steps} (0 = run to max_steps)")
    if c.warmup_steps > c.max_steps:
        problems.append(f"warmup_steps {c.warmup_steps} must be <= max_steps {c.max_steps}")
    n_images = max(len(c.validation_prompts), 4)  # validation image i uses seed + i
    if c.seed > MAX_SEED - (n_images - 1):
        problems.append(f"seed {c.seed} must be in 0..{MAX_SEED - (n_images - 1)} (validation images use seed + i)")
    return problems
