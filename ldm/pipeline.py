"""Text to image: wires the tokenizer, text encoder, U-Net, sampler and VAE together.

    pipe = Pipeline.from_pretrained("weights/v1-5-pruned-emaonly.safetensors")
    images = pipe("a photo of a cat", steps=25, guidance_scale=7.5, seed=0)

Seed semantics: image i of a call starts from noise drawn by
`torch.Generator("cpu").manual_seed(seed + i)` (shape (1, 4, h, w)), so any image of a
batch can be regenerated alone with seed + i; for one image this is exactly
diffusers' `torch.randn((1, 4, h, w), generator=Generator().manual_seed(seed))`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from ldm.checkpoint import (UNET_PREFIX, atomic_dir, load_unet, read_state_dict, save_safetensors, stored_json,
                            unet_from_single_file)
from ldm.samplers import SAMPLERS, cfg_combine, randn
from ldm.schedule import NoiseSchedule
from ldm.text import SD1_PREFIX, TextEncoder, detect_kind, load_text_encoder, load_tokenizer, text_encoder_from_single_file
from ldm.unet import UNet
from ldm.vae import VAE, load_vae, to_numpy, to_pil, vae_metadata, vae_to_original_state_dict

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODEL = ASSETS / "demo" / "ldm-shapes-demo.safetensors"
PIPELINE_METADATA = "ldm_pipeline"  # safetensors metadata: prediction type, size, text encoder config
OUTPUT_TYPES = ("pil", "np", "latent")


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The given device (checked to exist), else cuda, then mps, then cpu."""
    if device is not None and str(device) != "auto":
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device}: CUDA is not available on this machine; use 'auto' or 'cpu'")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"device {device}: Apple MPS is not available on this machine; use 'auto' or 'cpu'")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """float16 on GPUs, float32 elsewhere, unless asked."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(names)}")
    return names[dtype]


def _single_file_metadata(path: Path) -> dict:
    return stored_json(path, PIPELINE_METADATA) or {}


def release_freed_memory() -> None:
    """Give freed heap memory back to the operating system (glibc's malloc_trim; a no-op elsewhere).

    glibc keeps the memory of freed tensors for reuse; after an SD1.5 sampling loop at 512x512 that
    is ~0.3 GB, and the VAE decode's activations would be allocated on top of it: trimming first
    lowers the process's peak resident memory by about that much (docs/benchmarks.md).
    """
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to do
        pass


def prepare_for_inference(module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """Memory layout for fast inference, chosen by measurement (docs/benchmarks.md).

    bfloat16 / float16 on CPUs and CUDA GPUs: channels_last (NHWC), where oneDNN / cuDNN reduced-
    precision convolutions run natively (2x faster U-Net convs than NCHW under autocast on this
    CPU) and the transformer blocks' image <-> token reshapes become free views. float32: the
    default NCHW, whose oneDNN convolutions were 13% faster here at 512x512 (and converting
    would copy the conv weights out of the memory-mapped file: +2.4 GB resident for SD1.5).
    The values computed are the same either way (within float rounding).
    """
    first = next(module.parameters(), None)
    reduced = first is not None and first.dtype in (torch.bfloat16, torch.float16)
    fast_layout = reduced and torch.device(device).type in ("cpu", "cuda")
    torch.nn.Module.to(module, memory_format=torch.channels_last if fast_layout else torch.contiguous_format)
    return module


def _schedule(config: dict | None, prediction_type: str | None) -> NoiseSchedule:
    """The schedule of a stored DDIMScheduler config, or SD's when there is none; a given prediction_type
    overrides the config's (without either: epsilon)."""
    if config is None:
        return NoiseSchedule(prediction_type=prediction_type or "epsilon")
    if prediction_type:
        config = {**config, "prediction_type": prediction_type}
    return NoiseSchedule.from_diffusers_config(config)


class Pipeline:
    """Public parts: `unet` (ldm.UNet), `vae` (ldm.vae.VAE), `text_encoder` (transformers CLIPTextModel),
    `tokenizer` (CLIPTokenizer), `schedule` (ldm.schedule.NoiseSchedule)."""

    def __init__(self, unet: UNet, vae: VAE, text_encoder, tokenizer, schedule: NoiseSchedule,
                 default_size: tuple[int, int] = (512, 512), model_path: Path | None = None,
                 default_guidance: float = 7.5):
        self.unet = unet.eval()
        self.vae = vae.eval()
        self.text_encoder = text_encoder.eval()
        self.tokenizer = tokenizer
        self.schedule = schedule
        self.default_size = tuple(default_size)
        self.default_guidance = float(default_guidance)  # the model's recommended guidance scale
        self.compiled = False
        self.model_path = Path(model_path) if model_path is not None else None

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, prediction_type: str | None = None,
                        ema: bool = True) -> Pipeline:
        """A single-file checkpoint (.safetensors / .ckpt), a diffusers folder, or (None) the embedded demo model.

        prediction_type: "epsilon" or "v_prediction"; default from the folder's scheduler config or
        the file's metadata, else "epsilon" for SD1 and "v_prediction" for SD2 (the 768-v models;
        pass "epsilon" for SD 2.x-base files).
        """
        if path is None:
            if not DEMO_MODEL.is_file():
                raise FileNotFoundError(
                    f"the embedded demo model ({DEMO_MODEL}) is not in this installation; pass a Stable Diffusion "
                    "checkpoint, e.g. --weights weights/v1-5-pruned-emaonly.safetensors"
                )
            path = DEMO_MODEL
        path = Path(path)
        if not path.exists():
            hint = (" — it looks like a model hub id; ldm never downloads: fetch the files yourself and pass "
                    "their local path" if "/" in str(path) and not str(path).startswith((".", "/")) else "")
            raise FileNotFoundError(f"{path}: not found{hint}; pass a .safetensors/.ckpt checkpoint or a diffusers "
                                    "folder (put checkpoints in weights/)")
        if prediction_type not in (None, "epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        device = pick_device(device)
        dtype = pick_dtype(device, dtype)
        if path.is_dir():
            pipe = cls._from_diffusers_folder(path, prediction_type, ema)
        else:
            pipe = cls._from_single_file(path, prediction_type, ema)
        return pipe.to(device, dtype)

    @classmethod
    def _from_diffusers_folder(cls, folder: Path, prediction_type: str | None, ema: bool) -> Pipeline:
        for part in ("unet", "vae", "text_encoder", "tokenizer"):
            if not (folder / part).is_dir():
                raise ValueError(f"{folder}: not a diffusers pipeline folder (no {part}/ inside); pass the folder "
                                 "that holds model_index.json, or a single .safetensors file")
        unet = load_unet(folder)
        vae = load_vae(folder)
        text_encoder = load_text_encoder(folder / "text_encoder")
        tokenizer = load_tokenizer(folder / "tokenizer")
        sched_file = folder / "scheduler" / "scheduler_config.json"
        sched_cfg = None
        if sched_file.is_file():
            try:
                sched_cfg = json.loads(sched_file.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{sched_file}: not valid JSON ({e})") from None
        schedule = _schedule(sched_cfg, prediction_type)
        sample = json.loads((folder / "unet" / "config.json").read_text()).get("sample_size", 64)
        side = int(sample if isinstance(sample, int) else sample[0]) * vae.downsample_factor
        return cls(unet, vae, text_encoder, tokenizer, schedule, (side, side), folder)

    @classmethod
    def _from_single_file(cls, path: Path, prediction_type: str | None, ema: bool) -> Pipeline:
        sd = read_state_dict(path)
        meta = _single_file_metadata(path)
        unet = unet_from_single_file(path, sd, ema=ema, dtype=torch.float32)
        vae = load_vae(path)
        kind = meta.get("text_kind") or detect_kind(sd)
        text_encoder = text_encoder_from_single_file(sd, kind, config=meta.get("text_encoder_config"))
        del sd
        pad = meta.get("pad_token") or ("!" if kind == "sd2" else None)
        tokenizer = load_tokenizer(pad_token=pad)
        sd2 = kind == "sd2"
        prediction_type = prediction_type or meta.get("prediction_type") or ("v_prediction" if sd2 else "epsilon")
        # save_single_file stores the schedule; other single files (and ours saved before) hold SD's
        schedule = _schedule(meta.get("scheduler"), prediction_type)
        side = meta.get("sample_size") or (768 if sd2 and prediction_type == "v_prediction" else 512)
        return cls(unet, vae, text_encoder, tokenizer, schedule, (side, side), path,
                   default_guidance=meta.get("guidance_scale") or 7.5)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move U-Net and text encoder to device/dtype. The VAE follows bfloat16 (float32's range: no
        overflow; 4x faster decoding on CPUs with bf16 units) and otherwise stays float32 (SD's VAE
        overflows in float16: NaN / black images)."""
        prepare_for_inference(self.unet.to(device=device, dtype=dtype), device or self.device)
        self.text_encoder.to(device=device, dtype=dtype)
        vae_dtype = None if dtype is None else (torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
        # nn.Module.to: diffusers' own .to() warns about fp32 modules on every bf16 cast (there are none here)
        torch.nn.Module.to(self.vae, device=device, dtype=vae_dtype)
        prepare_for_inference(self.vae, device or self.device)
        return self

    def compile(self, **kwargs) -> Pipeline:
        """Compile the U-Net with torch.compile (inductor; kwargs go to it, e.g. mode="max-autotune").

        The first call pays the compilation (~1 min for the demo model on 2 CPU cores, several for
        SD1.5; needs a C++ compiler on CPUs), later steps run the fused code. The cross-attention
        key/value cache is not used then (a new text per image would recompile).
        """
        import shutil

        if self.device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++",
                                                                           "clang++", "c++") if c):
            raise RuntimeError("torch.compile on a CPU needs a C++ compiler (g++ or clang++ on PATH, or $CXX); "
                               "install one, or run without compiling")
        self.unet.compile(**kwargs)
        self.compiled = True
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def model_name(self) -> str:
        return self.model_path.name if self.model_path is not None else "in-memory"

    # ------------------------------------------------------------------ saving

    def save_single_file(self, path: str | os.PathLike) -> Path:
        """One safetensors file in the original SD layout (model.diffusion_model.*, first_stage_model.*,
        cond_stage_model.transformer.*), with the configs in its metadata so it loads back exactly."""
        if self.unet.config.context_dim != self.text_encoder.config.hidden_size:
            raise ValueError("U-Net context width and text encoder width differ")
        tensors = {UNET_PREFIX + k: v for k, v in self.unet.state_dict().items()}
        tensors.update(vae_to_original_state_dict(self.vae))
        # the original SD1 layout nests the text model under text_model.
        for k, v in self.text_encoder.state_dict().items():
            key = k if k.startswith("text_model.") else "text_model." + k
            tensors[SD1_PREFIX + key] = v
        meta = {
            "ldm_unet_config": json.dumps(self.unet.config.to_dict()),
            PIPELINE_METADATA: json.dumps({
                "prediction_type": self.schedule.prediction_type,
                "scheduler": self.schedule.to_diffusers_config(),
                "sample_size": self.default_size[0],
                "guidance_scale": self.default_guidance,
                "text_kind": "sd1",
                "text_encoder_config": self.text_encoder.config.to_dict(),
                "pad_token": self.tokenizer.pad_token,
            }),
            **vae_metadata(self.vae),
        }
        save_safetensors(tensors, path, metadata=meta)
        return Path(path)

    def save_diffusers(self, folder: str | os.PathLike) -> Path:
        """A diffusers folder (unet, vae, text_encoder, tokenizer, scheduler, model_index.json) that both
        `Pipeline.from_pretrained` and diffusers' `StableDiffusionPipeline.from_pretrained` load.
        Written to a temporary sibling folder, then renamed: never a half-written folder."""
        from ldm.checkpoint import save_unet_diffusers
        from ldm.vae import save_vae_diffusers

        folder = Path(folder)
        if folder.exists():
            raise FileExistsError(f"{folder} already exists; choose a new folder (nothing is overwritten)")

        def write(tmp: Path) -> None:
            save_unet_diffusers(self.unet, tmp / "unet")
            unet_cfg = json.loads((tmp / "unet" / "config.json").read_text())
            unet_cfg["sample_size"] = self.default_size[0] // self.vae.downsample_factor
            (tmp / "unet" / "config.json").write_text(json.dumps(unet_cfg, indent=2) + "\n")
            save_vae_diffusers(self.vae, tmp / "vae")
            self.text_encoder.save_pretrained(str(tmp / "text_encoder"), safe_serialization=True)
            self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            (tmp / "scheduler").mkdir()
            (tmp / "scheduler" / "scheduler_config.json").write_text(
                json.dumps(self.schedule.to_diffusers_config(), indent=2) + "\n")
            index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                     "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                     "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
                     "safety_checker": [None, None], "feature_extractor": [None, None],
                     "requires_safety_checker": False}
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

        atomic_dir(folder, write)  # the rename fails on a non-empty folder that appeared meanwhile
        return folder

    # ------------------------------------------------------------------ generation

    def encode_prompt(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None,
                      clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, negative context), each (B, 77*k, dim)."""
        encoder = TextEncoder(self.tokenizer, self.text_encoder)
        return encoder.encode_with_negative(prompts, negative_prompts, clip_skip)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        steps: int = 25,
        guidance_scale: float | None = None,
        eta: float = 0.0,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        output_type: str = "pil",
        sampler: str = "ddim",
        clip_skip: int = 1,
        guidance_rescale: float = 0.0,
        progress: bool = True,
        callback: Callable[[dict], None] | None = None,
    ):
        """Images for each prompt (num_images each, in prompt order); image i starts from seed + i.

        output_type: "pil" -> list of PIL images, "np" -> float32 (B, H, W, 3) in [0, 1],
        "latent" -> the final (B, 4, h, w) latents (scaled, as the U-Net sees them).
        guidance_scale <= 1 runs the conditional prediction only (as diffusers); None takes the
        model's recommended value (`default_guidance`: 7.5 unless the model file says otherwise).
        """
        if guidance_scale is None:
            guidance_scale = self.default_guidance
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height = height or self.default_size[0]
        width = width or self.default_size[1]
        f = self.vae.downsample_factor
        problems = [
            (not prompts, "prompt is empty; pass a string or a list of strings"),
            (not isinstance(steps, int) or steps < 1, f"steps must be an integer >= 1, got {steps!r}"),
            (guidance_scale < 0, f"guidance_scale must be >= 0, got {guidance_scale}"),
            (eta < 0, f"eta must be >= 0, got {eta}"),
            (num_images < 1, f"num_images must be >= 1, got {num_images}"),
            (height % f or height < f, f"height {height} must be a positive multiple of {f}"),
            (width % f or width < f, f"width {width} must be a positive multiple of {f}"),
            (output_type not in OUTPUT_TYPES, f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}"),
            (sampler not in SAMPLERS, f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}"),
        ]
        for bad, message in problems:
            if bad:
                raise ValueError(message)
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = None if negative_prompt is None else [negative_prompt] * len(prompts)
        else:
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one each")

        device, dtype = self.device, self.dtype
        cond, uncond = self.encode_prompt(prompts, negatives, clip_skip)
        # prompt p's images are rows p*num_images .. (p+1)*num_images-1 (diffusers' order)
        cond = cond.repeat_interleave(num_images, dim=0)
        uncond = uncond.repeat_interleave(num_images, dim=0)
        batch = cond.shape[0]
        use_cfg = guidance_scale > 1.0
        context = torch.cat([uncond, cond]) if use_cfg else cond  # (2B or B, 77*k, dim)

        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
        shape = (batch, self.unet.config.in_channels, height // f, width // f)
        latents = randn(shape, generators, device=device, dtype=torch.float32)  # x_T ~ N(0, I)

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_in = torch.cat([x, x]) if use_cfg else x
            out = self.unet(x_in.to(dtype), t.to(device), context).float()
            if not use_cfg:
                return out
            out_uncond, out_cond = out.chunk(2)
            return cfg_combine(out_uncond, out_cond, guidance_scale, guidance_rescale)

        timesteps = self.schedule.timesteps(steps, device=device)
        # the text's cross-attention keys/values: once per image, not per step
        with contextlib.nullcontext() if self.compiled else self.unet.cached_context(context):
            latents = SAMPLERS[sampler](denoise, latents, self.schedule, timesteps, eta=eta, generator=generators,
                                        callback=callback, progress=progress)
        if output_type == "latent":
            return latents
        release_freed_memory()  # before the VAE's large activations, not on top of the loop's freed heap
        decoded = self.vae.decode(latents.float())
        return to_pil(decoded) if output_type == "pil" else to_numpy(decoded)
