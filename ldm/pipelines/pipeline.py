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
import dataclasses
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ldm.conditioning import Conditioning, TextConditioner
from ldm.conditioning.sdxl import SDXLConditioner, add_time_ids, label_vector
from ldm.formats.pipeline_files import (
    read_diffusers_folder,
    read_single_file,
    write_diffusers_folder,
    write_single_file,
)
from ldm.models.lora import lora_scale
from ldm.models.unet import UNet
from ldm.models.vae import VAE, to_numpy, to_pil
from ldm.pipelines import img2img, memory
from ldm.pipelines.request import DEFAULT_STRENGTH, OUTPUT_TYPES, GenerationRequest
from ldm.sampling.denoiser import Denoiser
from ldm.sampling.noise import Noise, randn
from ldm.sampling.plan import SamplingPlan
from ldm.sampling.samplers import check_eta, resolve_sampler
from ldm.sampling.schedule import NoiseSchedule

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEMO_MODEL = ASSETS / "demo" / "ldm-shapes-demo.safetensors"


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
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(names)}")
    return names[dtype]


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
    layout = torch.channels_last if fast_layout else torch.contiguous_format
    torch.nn.Module.to(module, memory_format=layout)  # type: ignore[call-overload]  # torch's stubs lack it
    return module


FAMILIES = ("sd", "sdxl", "sdxl_refiner")


class Pipeline:
    """Public parts: `unet` (ldm.UNet), `vae` (ldm.models.vae.VAE), `text_encoder` (transformers CLIPTextModel),
    `tokenizer` (CLIPTokenizer), `schedule` (ldm.sampling.schedule.NoiseSchedule); SDXL adds `text_encoder_2`
    (CLIPTextModelWithProjection, OpenCLIP ViT-bigG) and `tokenizer_2`, and the SDXL refiner has only those
    two (`text_encoder` and `tokenizer` are None), as diffusers' SDXL pipelines hold them."""

    def __init__(
        self,
        unet: UNet,
        vae: VAE,
        text_encoder,
        tokenizer,
        schedule: NoiseSchedule,
        default_size: tuple[int, int] = (512, 512),
        model_path: Path | None = None,
        default_guidance: float = 7.5,
        text_encoder_2=None,
        tokenizer_2=None,
        zero_empty_negative: bool = True,
    ):
        self.unet = unet.eval()
        self.vae = vae.eval()
        self.text_encoder = None if text_encoder is None else text_encoder.eval()
        self.tokenizer = tokenizer
        self.text_encoder_2 = None if text_encoder_2 is None else text_encoder_2.eval()
        self.tokenizer_2 = tokenizer_2
        # SDXL: an empty negative prompt is a zero conditioning (diffusers' force_zeros_for_empty_prompt, A1111)
        self.zero_empty_negative = bool(zero_empty_negative)
        _check_parts(unet, text_encoder, text_encoder_2)
        self.schedule = schedule
        self.default_size = tuple(default_size)
        self.default_guidance = float(default_guidance)  # the model's recommended guidance scale
        self.compiled = False
        self.model_path = Path(model_path) if model_path is not None else None
        self._conditioner: Any = None
        self._conditioner_parts: tuple = ()

    @property
    def family(self) -> str:
        """ "sd" (SD 1.x / 2.x: one text encoder), "sdxl" (two, and the added vector) or "sdxl_refiner" (bigG only,
        aesthetic-score ids)."""
        if self.unet.config.adm_in_channels is None:
            return "sd"
        return "sdxl_refiner" if self.text_encoder is None else "sdxl"

    @property
    def conditioner(self):
        """Prompts -> Conditioning (TextConditioner, or SDXLConditioner), built once (again only if a tokenizer or
        text encoder is replaced)."""
        parts = (self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2)
        if self._conditioner is None or any(a is not b for a, b in zip(parts, self._conditioner_parts)):
            if self.family == "sd":
                self._conditioner = TextConditioner(self.tokenizer, self.text_encoder)
            else:
                self._conditioner = SDXLConditioner(*parts)
            self._conditioner_parts = parts
        return self._conditioner

    def encode_prompts(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, clip_skip: int = 1
    ) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond) Conditionings of prompts, one row each (SDXL: an empty negative prompt gives zeros when
        the model asks for it, `zero_empty_negative`)."""
        if self.family == "sd":
            return self.conditioner.encode(prompts, negative_prompts, clip_skip)
        return self.conditioner.encode(
            prompts, negative_prompts, clip_skip, zero_empty_negative=self.zero_empty_negative
        )

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        prediction_type: str | None = None,
        ema: bool = True,
    ) -> Pipeline:
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
            hint = (
                " — it looks like a model hub id; ldm never downloads: fetch the files yourself and pass "
                "their local path"
                if "/" in str(path) and not str(path).startswith((".", "/"))
                else ""
            )
            raise FileNotFoundError(
                f"{path}: not found{hint}; pass a .safetensors/.ckpt checkpoint or a diffusers "
                "folder (put checkpoints in weights/)"
            )
        if prediction_type not in (None, "epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        device = pick_device(device)
        dtype = pick_dtype(device, dtype)
        if path.is_dir():
            parts = read_diffusers_folder(path, prediction_type, ema)
        else:
            parts = read_single_file(path, prediction_type, ema)
        return cls(**parts).to(device, dtype)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move U-Net and text encoder to device/dtype. The VAE follows bfloat16 (float32's range: no
        overflow; 4x faster decoding on CPUs with bf16 units) and otherwise stays float32 (SD's VAE
        overflows in float16: NaN / black images)."""
        prepare_for_inference(self.unet.to(device=device, dtype=dtype), device or self.device)
        for encoder in (self.text_encoder, self.text_encoder_2):
            if encoder is not None:
                encoder.to(device=device, dtype=dtype)
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

        if self.device.type == "cpu" and not any(
            shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++", "c++") if c
        ):
            raise RuntimeError(
                "torch.compile on a CPU needs a C++ compiler (g++ or clang++ on PATH, or $CXX); "
                "install one, or run without compiling"
            )
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
        """One safetensors file in the original SD layout, with the configs in its metadata so it loads back
        exactly (ldm.formats.pipeline_files.write_single_file)."""
        return write_single_file(self, path)

    def save_diffusers(self, folder: str | os.PathLike) -> Path:
        """A diffusers folder that `Pipeline.from_pretrained` and diffusers' `StableDiffusionPipeline` both load
        (ldm.formats.pipeline_files.write_diffusers_folder); never a half-written folder."""
        return write_diffusers_folder(self, folder)

    # ------------------------------------------------------------------ generation

    def encode_prompt(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None, clip_skip: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, negative context), each (B, 77*k, dim)."""
        cond, uncond = self.encode_prompts(prompts, negative_prompts, clip_skip)
        return cond.context, uncond.context

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        *,
        prompt_embeds: torch.Tensor | Conditioning | None = None,
        negative_prompt_embeds: torch.Tensor | Conditioning | None = None,
        image: Any = None,
        mask: Any = None,
        paste: bool = True,
        output_type: str = "pil",
        progress: bool = True,
        callback: Callable[[dict], None] | None = None,
        refiner: Pipeline | None = None,
        **parameters: Any,
    ):
        """Images for each prompt (num_images each, in prompt order); image i starts from seed + i.

        `parameters` are the fields of `GenerationRequest` (steps=25, guidance_scale=None (the model's
        recommended value), guidance_rescale=0, eta=None, seed=0, height/width=None (the model's size),
        num_images=1, sampler="ddim", schedule="default", clip_skip=1, lora_scale=1), validated there.
        prompt_embeds / negative_prompt_embeds: precomputed conditioning instead of prompts (as diffusers';
        a (B, L, dim) tensor or a Conditioning; without a negative one, `negative_prompt` or "" is encoded).

        output_type: "pil" -> list of PIL images, "np" -> float32 (B, H, W, 3) in [0, 1],
        "latent" -> the final (B, 4, h, w) latents (scaled, as the U-Net sees them).
        guidance_scale <= 1 runs the conditional prediction only (as diffusers).

        image: img2img from this picture (PIL, or an 8-bit-like array / tensor in [0, 1]); `strength` (default
        0.75) is how much of the plan is sampled. mask: inpainting (white = repaint; default strength 1.0), with
        an inpainting U-Net (9 input channels) or an ordinary one; `paste` puts the result back into the picture
        through the blurred mask, so that the pixels outside it are the input's (AUTOMATIC1111's overlay).
        refiner: an SDXL refiner Pipeline that samples the steps after `refiner_switch` (default 0.8) of the way.
        """
        if prompt_embeds is None and prompt is None:
            raise ValueError("give a prompt (or prompt_embeds)")
        if prompt is None:
            prompt = "" if _batch(prompt_embeds) == 1 else [""] * _batch(prompt_embeds)
        prompt = prompt if isinstance(prompt, str) else tuple(prompt)
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            negative_prompt = tuple(negative_prompt)
        try:
            request = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, **parameters)
        except TypeError as e:  # an unknown keyword
            raise ValueError(f"{e}; the generation parameters are {', '.join(REQUEST_FIELDS)}") from None
        conditioning = None
        if prompt_embeds is not None:
            conditioning = self._given_conditioning(request, prompt_embeds, negative_prompt_embeds)
        return self.generate(
            request,
            image=image,
            mask=mask,
            paste=paste,
            conditioning=conditioning,
            output_type=output_type,
            progress=progress,
            callback=callback,
            refiner=refiner,
        )

    # ---- the stages of a request ------------------------------------------------------------------

    def resolve(
        self, request: GenerationRequest, image_size: tuple[int, int] | None = None, masked: bool = False
    ) -> GenerationRequest:
        """The request with the model's defaults filled in (size, guidance scale, eta, strength), checked against
        the model. image_size: (width, height) of an input image (img2img: the default size follows it);
        masked: the request inpaints (a mask, or outpainting)."""
        f = self.vae.downsample_factor
        strength = request.strength
        if image_size is not None:
            height, width = img2img.work_size(request, image_size, f)
            if strength is None:
                strength = 1.0 if masked or request.outpaint is not None else DEFAULT_STRENGTH
            if request.hires_scale is not None:
                raise ValueError(
                    "hires fix is for txt2img; with an input image, ask img2img for the size you want (height, width)"
                )
        else:
            height = request.height or self.default_size[0]
            width = request.width or self.default_size[1]
            if request.outpaint is not None:
                raise ValueError("outpaint extends an input image: give one (image=..., --image FILE)")
        for name, side in (("height", height), ("width", width)):
            if side % f or side < f:
                raise ValueError(f"{name} {side} must be a positive multiple of {f} (the VAE's downsampling)")
        if request.steps > self.schedule.num_train_timesteps:
            raise ValueError(
                f"steps {request.steps} is more than this model's {self.schedule.num_train_timesteps} timesteps"
            )
        guidance = self.default_guidance if request.guidance_scale is None else request.guidance_scale
        info = resolve_sampler(request.sampler, request.schedule)[0]
        return request.replace(
            height=height, width=width, guidance_scale=guidance, eta=check_eta(info, request.eta), strength=strength
        )

    def encode(self, request: GenerationRequest) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond) of the request's prompts, one row per image (prompt p's images in a row)."""
        cond, uncond = self.encode_prompts(request.prompts, request.negative_prompts, request.clip_skip)
        return cond.repeat_interleave(request.num_images), uncond.repeat_interleave(request.num_images)

    def added_conditioning(
        self, request: GenerationRequest, cond: Conditioning, uncond: Conditioning
    ) -> tuple[Conditioning, Conditioning]:
        """SDXL: (cond, uncond) with their size/crop ids (the refiner's: size, crop and aesthetic score) for the
        request's size, as `time_ids` (B, 6 or 5); other models take none. Each pass (hires fix, refiner) gets the
        ids of its own size and model."""
        if self.family == "sd":
            return cond, uncond
        assert request.height is not None and request.width is not None  # resolved
        size = (request.height, request.width)
        original, target = request.original_size or size, request.target_size or size
        if self.family == "sdxl_refiner":
            ids = add_time_ids(original, request.crop_top_left, target, request.aesthetic_score)
            negative_ids = add_time_ids(original, request.crop_top_left, target, request.negative_aesthetic_score)
        else:
            ids = negative_ids = add_time_ids(original, request.crop_top_left, target)
        return (
            cond.with_extra(time_ids=ids.expand(cond.batch, -1)),
            uncond.with_extra(time_ids=negative_ids.expand(uncond.batch, -1)),
        )

    def denoiser(
        self,
        request: GenerationRequest,
        cond: Conditioning,
        uncond: Conditioning,
        *,
        inpaint_inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
        after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> Denoiser:
        """The U-Net wrapped for the samplers: prediction type -> x_0, guidance bound in. inpaint_inputs: (mask,
        masked-image latents), (B, 1, h, w) and (B, 4, h, w), joined to the latents for a 9-channel inpainting
        U-Net; after_step: the blend of inpainting with an ordinary U-Net (Denoiser.step_done)."""
        unet, device = self.unet, self.device
        cond, uncond = self.added_conditioning(request, cond, uncond)
        added = self.family != "sd"

        def model(x: torch.Tensor, t: torch.Tensor, c: Conditioning) -> torch.Tensor:
            if inpaint_inputs is not None:  # [latents, mask, masked image] as diffusers joins them
                k = x.shape[0] // inpaint_inputs[0].shape[0]  # 2 under guidance: [uncond; cond]
                extra = [v.repeat(k, 1, 1, 1).to(device=x.device, dtype=x.dtype) for v in inpaint_inputs]
                x = torch.cat([x, *extra], dim=1)
            y = None
            if added:  # SDXL's added vector: pooled text and the ids' sinusoidal features
                assert c.pooled is not None
                y = label_vector(c.pooled.float(), c.extra["time_ids"].float())
            return unet(x, t.to(device), c.context, y)

        assert request.guidance_scale is not None  # resolved
        return Denoiser(
            model,
            self.schedule.prediction_type,
            cond=cond.to(device, self.dtype),
            uncond=uncond.to(device, self.dtype),
            guidance_scale=request.guidance_scale,
            guidance_rescale=request.guidance_rescale,
            model_dtype=self.dtype,
            conditioning=None if not (cond.schedule or uncond.schedule) else lambda i: (cond.at(i), uncond.at(i)),
            after_step=after_step,
        )

    def plan(self, request: GenerationRequest) -> SamplingPlan:
        """The levels the sampler visits (all of them for txt2img; img2img takes a tail)."""
        return resolve_sampler(request.sampler, request.schedule)[0].make_plan(
            self.schedule, request.steps, request.schedule
        )

    def initial_noise(self, request: GenerationRequest, batch: int) -> tuple[torch.Tensor, Noise]:
        """x_T ~ N(0, I) drawn image by image from seed + i (diffusers' randn_tensor), and the call's Noise."""
        assert request.height is not None and request.width is not None  # resolved
        f = self.vae.downsample_factor
        noise = Noise.from_seeds([request.seed + i for i in range(batch)])
        shape = (batch, self.vae.latent_channels, request.height // f, request.width // f)
        return randn(shape, noise.generator, device=self.device, dtype=torch.float32), noise

    def sample(
        self,
        request: GenerationRequest,
        denoiser: Denoiser,
        x: torch.Tensor,
        plan: SamplingPlan,
        noise: Noise,
        *,
        progress: bool = True,
        callback: Callable[[dict], None] | None = None,
    ) -> torch.Tensor:
        """Run the request's sampler over `plan` from x, with this call's own state (text key/value cache,
        LoRA strength), never state left on the shared modules."""
        info = resolve_sampler(request.sampler, request.schedule)[0]
        cache = contextlib.nullcontext() if self.compiled else self.unet.cached_context()
        with cache, lora_scale(request.lora_scale):
            return info.fn(denoiser, x, plan, noise=noise, eta=request.eta or 0.0, callback=callback, progress=progress)

    def decode(self, latents: torch.Tensor, output_type: str = "pil", request: GenerationRequest | None = None):
        if output_type == "latent":
            return latents
        release_freed_memory()  # before the VAE's large activations, not on top of the loop's freed heap
        decoded = self.vae.decode(latents.float())
        self.check_finite(decoded, "the decoded images", request)
        return to_pil(decoded) if output_type == "pil" else to_numpy(decoded)

    def check_memory(self, request: GenerationRequest) -> None:
        """ValueError before allocating anything when the request's images cannot fit in the device's free memory
        (ldm.pipelines.memory: U-Net activations at the latent size, VAE decode at the image size)."""
        assert request.height is not None and request.width is not None  # resolved
        images = len(request.prompts) * request.num_images
        height, width = self.final_size(request)
        needed = memory.estimate(
            height,
            width,
            images,
            guidance=(request.guidance_scale or 0) > 1,
            model_channels=self.unet.config.model_channels,
            latent_channels=self.vae.latent_channels,
            downsample=self.vae.downsample_factor,
            dtype_bytes=self.dtype.itemsize,
        )
        memory.check(
            needed,
            f"{images} image(s) of {width}x{height}",
            str(self.device),
            fix="ask for a smaller size or fewer images at once",
        )

    def check_finite(self, x: torch.Tensor, what: str, request: GenerationRequest | None = None) -> None:
        """ValueError naming the likely cause when `x` holds NaN or inf: such a result would be a black or
        noise image presented as a success."""
        finite = torch.isfinite(x)
        if bool(finite.all()):
            return
        causes = []
        if request is not None:
            if request.guidance_scale is not None and request.guidance_scale > 50:
                causes.append(f"guidance_scale {request.guidance_scale:g} is far above the usual 1..15")
            if request.eta is not None and request.eta > 1:
                causes.append(f"eta {request.eta:g} is above 1 (DDIM's eta: 0 deterministic, 1 DDPM-like)")
        if self.dtype == torch.float16:
            causes.append("float16 overflowed: run with dtype float32 or bfloat16")
        if not causes:
            causes.append("the model's weights or the settings; try fewer extreme settings or float32")
        bad = int((~finite).sum())
        raise ValueError(
            f"{what} hold {bad} NaN/inf values of {finite.numel()} (nothing was saved); likely cause: "
            + "; ".join(causes)
        )

    def check_refiner(self, refiner: Pipeline, request: GenerationRequest, masked: bool) -> None:
        """ValueError unless `refiner` can take over this request's run: an SDXL refiner (or any SDXL model) with
        this model's latent space and noise schedule, for txt2img or img2img without a mask or hires fix."""
        if self.family == "sd" or refiner.family == "sd":
            raise ValueError(
                f"a refiner continues an SDXL run with an SDXL model; got a {self.family} base and a "
                f"{refiner.family} refiner"
            )
        if masked or request.outpaint is not None or request.hires_scale is not None:
            raise ValueError("a refiner works with txt2img and img2img; not with a mask, outpainting or hires fix")
        if refiner.vae.latent_channels != self.vae.latent_channels or not torch.equal(
            refiner.schedule.alphas_cumprod, self.schedule.alphas_cumprod
        ):
            raise ValueError("the refiner has another latent space or noise schedule than the base; it cannot continue")

    def final_size(self, request: GenerationRequest) -> tuple[int, int]:
        """(height, width) of the images a resolved request makes (hires fix: the upscaled size)."""
        assert request.height is not None and request.width is not None  # resolved
        if request.hires_scale is None:
            return request.height, request.width
        f = self.vae.downsample_factor
        return (int(request.height * request.hires_scale) // f * f, int(request.width * request.hires_scale) // f * f)

    @torch.no_grad()
    def generate(
        self,
        request: GenerationRequest,
        *,
        image: Any = None,
        mask: Any = None,
        paste: bool = True,
        conditioning: tuple[Conditioning, Conditioning] | None = None,
        output_type: str = "pil",
        progress: bool = True,
        callback: Callable[[dict], None] | None = None,
        refiner: Pipeline | None = None,
    ):
        """One request through the stages: encode -> plan -> start latents -> sample -> decode.

        txt2img (no image): the whole plan from noise, then the hires pass when hires_scale is set. img2img
        (image): the VAE's latent of the image noised to the start of the plan's tail. Inpainting (mask, or
        outpaint): the same, with the mask given to a 9-channel U-Net or the known region put back after each
        step for an ordinary one, and the result pasted into the picture (`paste`). `conditioning` (cond,
        uncond), one row per image, replaces the encoding of the request's prompts. `refiner`: an SDXL refiner
        pipeline that samples the plan's steps after `request.refiner_switch` (txt2img and img2img)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if mask is not None and image is None:
            raise ValueError("a mask needs the image it applies to (image=...)")
        if image is not None:
            image = img2img.as_pil(image, "image")
        request = self.resolve(request, image.size if image is not None else None, masked=mask is not None)
        if refiner is not None:
            self.check_refiner(refiner, request, masked=mask is not None)
        self.check_memory(request)
        cond, uncond = self.encode(request) if conditioning is None else conditioning
        inputs = None
        if image is None:
            latents, noise = self.txt2img_latents(request, cond, uncond, refiner, progress=progress, callback=callback)
            if request.hires_scale is not None:
                latents = self.hires_latents(
                    request, cond, uncond, latents, noise, progress=progress, callback=callback
                )
        else:
            inputs, notes = img2img.prepare(request, image, mask)
            for note in notes:
                warnings.warn(note, stacklevel=2)
            latents = self.img2img_latents(request, cond, uncond, inputs, refiner, progress=progress, callback=callback)
        self.check_finite(latents, "the sampled latents", request)
        if output_type == "latent":
            return latents
        decoded = self.decode(latents, "np", request)
        if inputs is not None and paste:
            decoded = img2img.paste(decoded, inputs)
        if output_type == "np":
            return decoded
        from PIL import Image

        return [Image.fromarray((a * 255).round().astype("uint8")) for a in decoded]

    def txt2img_latents(
        self,
        request: GenerationRequest,
        cond: Conditioning,
        uncond: Conditioning,
        refiner: Pipeline | None = None,
        **run: Any,
    ) -> tuple[torch.Tensor, Noise]:
        """The whole plan sampled from x_T ~ N(0, I) (seed + i per image); the latents and the call's Noise."""
        plan = self.plan(request)
        x, noise = self.initial_noise(request, cond.batch)
        denoiser = self.denoiser(request, cond, uncond)
        x = self.sample_with_refiner(request, denoiser, x * plan.noise_scale, plan, noise, refiner=refiner, **run)
        return x, noise

    def sample_with_refiner(
        self,
        request: GenerationRequest,
        denoiser: Denoiser,
        x: torch.Tensor,
        plan: SamplingPlan,
        noise: Noise,
        *,
        refiner: Pipeline | None = None,
        **run: Any,
    ) -> torch.Tensor:
        """`sample`, or with a refiner the "ensemble of experts" of SDXL: this model samples the plan's steps down
        to `request.refiner_switch` of the way (diffusers' denoising_end), the refiner the rest of the same plan
        from the latents reached (its denoising_start), drawing on from the same generators."""
        if refiner is None:
            return self.sample(request, denoiser, x, plan, noise, **run)
        k = switch_step(plan, request.refiner_switch, self.schedule.num_train_timesteps)
        if k:
            x = self.sample(request, denoiser, x, plan[:k], noise, **run)
        return refiner.refine(request, x, plan[k:], noise, **run) if k < len(plan) else x

    def refine(
        self, request: GenerationRequest, x: torch.Tensor, plan: SamplingPlan, noise: Noise, **run: Any
    ) -> torch.Tensor:
        """As the refiner of another model's run: sample `plan` (the end of that run's plan) from its latents x, at
        the plan's first level, with this model's own conditioning of the request's prompts."""
        if self.vae.latent_channels != x.shape[1]:
            raise ValueError(f"the refiner's latents have {self.vae.latent_channels} channels, the base's {x.shape[1]}")
        cond, uncond = self.encode(request)
        return self.sample(request, self.denoiser(request, cond, uncond), x, plan, noise, **run)

    def encode_image(self, pixels: torch.Tensor, noise: Noise) -> torch.Tensor:
        """(1, 3, H, W) pixels in [-1, 1] -> one float32 latent per image of the call, each drawn from the image's
        own generator (diffusers' retrieve_latents with a generator per image)."""
        return self.vae.encode(pixels, _generators(noise)).float()

    def img2img_latents(
        self,
        request: GenerationRequest,
        cond: Conditioning,
        uncond: Conditioning,
        inputs: img2img.ImageInputs,
        refiner: Pipeline | None = None,
        **run: Any,
    ) -> torch.Tensor:
        """img2img and inpainting: the plan's tail from the image's latents, as diffusers' img2img and inpainting
        pipelines, draw for draw from each image's generator: the image's latent (when needed), the start noise,
        the masked image's latent (inpainting; an ordinary U-Net does not use it, its draw is made all the same),
        then the sampler's own noise."""
        assert request.strength is not None  # resolved
        batch, device = cond.batch, self.device
        noise = Noise.from_seeds([request.seed + i for i in range(batch)])
        plan = self.plan(request).tail(request.strength)
        pixels = img2img.to_tensor(inputs.init)
        masked = inputs.mask is not None
        inpaint_unet = self.unet.config.in_channels > self.vae.latent_channels
        full = masked and request.strength == 1.0  # diffusers' inpainting starts from pure noise then
        image_latents = None
        if not (full and inpaint_unet):
            image_latents = self.encode_image(pixels, noise)
        f = self.vae.downsample_factor
        shape = (batch, self.vae.latent_channels, request.height // f, request.width // f)  # type: ignore[operator]
        eps = randn(shape, noise.generator, device=device, dtype=torch.float32)
        if not masked:
            assert image_latents is not None
            if not len(plan):  # strength 0 (or too few steps to keep one): the image, through the VAE
                return image_latents
            x = plan.add_noise(image_latents, eps)
            inputs_9 = None
            if inpaint_unet:  # an inpainting U-Net asked to redo the whole picture: all mask, nothing kept (A1111)
                blank = self.vae.encode(torch.zeros_like(pixels), sample=False).float()
                ones = torch.ones((batch, 1, *shape[-2:]), device=device)
                inputs_9 = (ones, blank.expand(batch, -1, -1, -1))
            denoiser = self.denoiser(request, cond, uncond, inpaint_inputs=inputs_9)
            return self.sample_with_refiner(request, denoiser, x, plan, noise, refiner=refiner, **run)
        assert inputs.mask is not None
        pixel_mask = torch.from_numpy(inputs.mask)[None, None]
        latent_mask = F.interpolate(pixel_mask, size=shape[-2:]).to(device)  # nearest, as diffusers
        inpaint_inputs = None
        if inpaint_unet:
            masked_latents = self.encode_image(pixels * (pixel_mask < 0.5), noise)
            inpaint_inputs = (latent_mask.expand(batch, -1, -1, -1), masked_latents)
        else:  # diffusers encodes the masked image for every U-Net: the same draws keep the sampler's noise its own
            randn((batch, *shape[1:]), _generators(noise), device=device, dtype=self.vae.dtype)
        start = image_latents
        if start is not None and request.masked_content in ("latent_noise", "latent_nothing"):
            fill = randn(shape, noise.generator, device=device) if request.masked_content == "latent_noise" else 0
            start = start * (1 - latent_mask) + fill * latent_mask
        if not len(plan):
            assert start is not None
            return start
        x = eps * plan.noise_scale if full or start is None else plan.add_noise(start, eps)
        after_step = None
        if not inpaint_unet:
            known, n = image_latents, len(plan)
            assert known is not None

            def after_step(i: int, x: torch.Tensor) -> torch.Tensor:
                # the known region at the level the step landed on (clean after the last step), as diffusers
                level = known if i == n - 1 else plan.add_noise(known, eps, i + 1)
                return (1 - latent_mask) * level + latent_mask * x

        denoiser = self.denoiser(request, cond, uncond, inpaint_inputs=inpaint_inputs, after_step=after_step)
        return self.sample(request, denoiser, x, plan, noise, **run)

    def hires_latents(
        self,
        request: GenerationRequest,
        cond: Conditioning,
        uncond: Conditioning,
        latents: torch.Tensor,
        noise: Noise,
        **run: Any,
    ) -> torch.Tensor:
        """Hires fix's second pass: the first pass's latents upscaled (in latent space, or decoded, resized with
        Lanczos and encoded again), then `hires_steps` steps of img2img at `hires_strength`, drawing on from each
        image's generator. As AUTOMATIC1111 runs it, the pass is the last hires_steps steps of a plan of
        int(hires_steps / hires_strength) steps."""
        assert request.hires_scale is not None
        height, width = self.final_size(request)
        f = self.vae.downsample_factor
        if request.hires_upscaler == "lanczos":
            from PIL import Image

            pictures = self.decode(latents, "pil", request)
            pixels = torch.cat(
                [img2img.to_tensor(p.resize((width, height), Image.Resampling.LANCZOS)) for p in pictures]
            )
            gens = _generators(noise)
            up = torch.cat([self.vae.encode(pixels[i : i + 1], [g]).float() for i, g in enumerate(gens)])
        else:
            mode = "nearest" if request.hires_upscaler == "latent_nearest" else "bilinear"
            up = F.interpolate(latents, size=(height // f, width // f), mode=mode)
        steps = request.hires_steps or request.steps
        total = min(int(steps / min(request.hires_strength, 0.999)), self.schedule.num_train_timesteps)
        second = request.replace(height=height, width=width, steps=total)
        plan = self.plan(second)
        plan = plan[max(len(plan) - steps, 0) :]
        eps = noise.randn_like(up)
        x = plan.add_noise(up, eps)
        return self.sample(second, self.denoiser(second, cond, uncond), x, plan, noise, **run)

    def _given_conditioning(self, request: GenerationRequest, prompt_embeds, negative_prompt_embeds):
        cond = prompt_embeds if isinstance(prompt_embeds, Conditioning) else Conditioning(prompt_embeds)
        if negative_prompt_embeds is None:
            negatives = request.negative_prompts or [""] * cond.batch
            uncond = self.encode_prompts([""] * cond.batch, negatives, request.clip_skip)[1]
        elif isinstance(negative_prompt_embeds, Conditioning):
            uncond = negative_prompt_embeds
        else:
            uncond = Conditioning(negative_prompt_embeds)
        if uncond.context.shape != cond.context.shape:
            raise ValueError(
                f"negative_prompt_embeds {tuple(uncond.context.shape)} and prompt_embeds "
                f"{tuple(cond.context.shape)} differ in shape; give both for the same prompts"
            )
        if cond.context.shape[-1] != self.unet.config.context_dim:
            raise ValueError(
                f"prompt_embeds are {cond.context.shape[-1]} wide, this U-Net takes {self.unet.config.context_dim}"
            )
        if self.family != "sd" and (cond.pooled is None or uncond.pooled is None):
            raise ValueError(
                "an SDXL model also needs the pooled text vectors: pass prompt_embeds (and negative_prompt_embeds) as "
                "ldm.conditioning.Conditioning(context=..., pooled=...), as diffusers' pooled_prompt_embeds"
            )
        return cond.repeat_interleave(request.num_images), uncond.repeat_interleave(request.num_images)


def switch_step(plan: SamplingPlan, switch: float, num_train_timesteps: int) -> int:
    """Steps of `plan` the base model takes before the refiner: those at timesteps >= T (1 - switch), as diffusers'
    denoising_end / denoising_start pick them (0.8 of 25 "leading" steps: the first 20)."""
    cutoff = int(round(num_train_timesteps - switch * num_train_timesteps))
    return int((plan.timesteps.float() >= cutoff).sum())


def _check_parts(unet: UNet, text_encoder, text_encoder_2) -> None:
    """The U-Net and the text encoders belong to one model family (ValueError naming what was found)."""
    config = unet.config
    if config.adm_in_channels is None:
        if text_encoder is None or text_encoder_2 is not None:
            raise ValueError(
                "an SD1/SD2 U-Net (no added conditioning vector) takes one text encoder (text_encoder), "
                f"got text_encoder={type(text_encoder).__name__}, text_encoder_2={type(text_encoder_2).__name__}"
            )
        return
    if text_encoder_2 is None:
        raise ValueError(
            f"an SDXL U-Net (added vector of {config.adm_in_channels}) needs the OpenCLIP ViT-bigG text encoder "
            "(text_encoder_2); none was given"
        )
    width = text_encoder_2.config.hidden_size + (0 if text_encoder is None else text_encoder.config.hidden_size)
    if width != config.context_dim:
        kind = "CLIP-L + bigG" if text_encoder is not None else "bigG only (refiner)"
        raise ValueError(
            f"the text encoders ({kind}) give {width}-wide context, this U-Net takes {config.context_dim}: "
            + (
                "an SDXL refiner U-Net takes the bigG encoder alone"
                if text_encoder is not None and text_encoder_2.config.hidden_size == config.context_dim
                else "an SDXL base U-Net takes both CLIP-L and bigG"
            )
        )


REQUEST_FIELDS = [f.name for f in dataclasses.fields(GenerationRequest) if f.name not in ("prompt", "negative_prompt")]


def _generators(noise: Noise) -> list[torch.Generator]:
    gens = noise.generator
    if gens is None:
        raise ValueError("image-to-image needs seeded generators (Noise.from_seeds)")
    return list(gens) if isinstance(gens, list) else [gens]


def _batch(embeds) -> int:
    return embeds.batch if isinstance(embeds, Conditioning) else int(embeds.shape[0])
