#!/usr/bin/env python
"""Benchmark ldm against diffusers on the same weights: speed, memory, achieved FLOP/s.

Everything is measured side by side in one run, ldm and diffusers interleaved so machine noise
hits both alike; the figures that matter are the ratios (diffusers time / ldm time).

  unet     one classifier-free-guidance U-Net step (batch 2) at each --sizes, for each --dtypes:
           ldm as its pipeline runs it (channels_last, text keys/values cached across steps, bf16
           weights for bf16) against diffusers' UNet2DConditionModel (fp32, or fp32 weights under
           bf16 autocast for bf16); output difference; FLOPs (torch.utils.flop_counter) and the
           achieved FLOP/s as a share of a matmul peak measured in this run.
  profile  self time per op type (convolution, attention, matmul, norms, copies, ...) of one U-Net
           step of each library at --profile-size: where the time goes.
  parts    VAE decode and prompt encoding, ldm against diffusers.
  memory   large images (--memory-size): VAE decode whole and tiled, one U-Net step of each
           library; and one 512px self-attention on the plain SDPA kernel, whole and sliced
           (UNet.set_attention_slicing); each in a fresh process: peak memory of the job alone.
  e2e      txt2img at --e2e-size, --steps DDIM steps, guidance 7.5, each library in a fresh child
           process (so peak memory is its own): time, peak RSS (CPU) or peak allocated (CUDA),
           the image; ldm bf16 against ldm fp32 as PSNR.
  soak     (run by hand, not part of the default set) --soak-n generations of --soak-steps DDIM steps in
           this one process through Pipeline.from_pretrained() (the embedded demo model, or --weights):
           resident memory after generation --soak-reference and after the last; passes (exit 0) when
           the last is within --soak-tolerance of the reference, otherwise exit 1.

Weights: an SD1.5-size model with random weights (written once as a diffusers folder under
--cache-dir), or --weights (a diffusers folder).

--model sdxl (SDXL base: a 2.6B-parameter U-Net, random weights unless --weights) runs two of them:
  unet     one classifier-free-guidance step at --sizes (default 1024: 128x128 latents, context (2, 77, 2048),
           added vector (2, 2816)) as above, with diffusers' UNet2DConditionModel holding ldm's own float32
           parameter tensors (two 10.3 GB copies would not fit in 24 GiB beside the activations; checked by
           data_ptr); ldm's bf16 weights are made once and freed after their rows.
  e2e      txt2img at --e2e-size (default 1024), --steps Euler steps (default 2: the peak memory is the
           point), guidance 5, through ldm.Pipeline and diffusers' StableDiffusionXLPipeline, each in a fresh
           child process: peak resident memory of the whole generation, its time, the images' difference.
           Random weights: an SDXL-size diffusers folder written once under --cache-dir (float16 on disk).

    python scripts/benchmark.py                                  # all of it on CPU (~30 min on 2 cores)
    python scripts/benchmark.py --only unet --sizes 512 --dtypes fp32 --repeats 3
    python scripts/benchmark.py --device cuda --dtypes fp32 fp16 --json bench.json
    python scripts/benchmark.py --only soak --json soak.json     # 1000 demo-model generations, memory
    python scripts/benchmark.py --model sdxl --only unet --json sdxl-unet.json   # 1024px step, fp32 + bf16
    python scripts/benchmark.py --model sdxl --only e2e --dtypes fp32 --json sdxl-e2e.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ldm.cli import HelpFormatter, command_name
from ldm.compare import psnr, timed

PROMPT = "a photograph of an astronaut riding a horse"
DTYPE_NAMES = ("fp32", "bf16", "fp16")
MODELS = ("sd15", "sdxl")
SDXL_SECTIONS = ("unet", "e2e")  # what --model sdxl runs (the others are SD1.5-size measurements)

# SDXL base as published (stabilityai/stable-diffusion-xl-base-1.0: unet/, vae/, scheduler/ config.json, and
# model_index.json), every field, the defaults included
SDXL_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_VAE = {  # SD's VAE, trained further: another scaling factor, 1024px
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SDXL_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "add_watermarker": False,  # published: null (on where invisible-watermark is installed): no work off the clock
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SDXL_GUIDANCE = 5.0  # diffusers' SDXL default; both libraries are given it
SDXL_TIME_IDS = 6  # the base's size/crop ids: original (h, w), crop (top, left), target (h, w)

# --unet-config tiny (tests): SDXL's structure at toy widths, overrides of the configs above (text / text_2:
# CLIPTextConfig fields). Context 32 + 32 = 64 wide, pooled bigG projection 32: added vector 32 + 6 x 256.
TINY_SDXL: dict[str, dict] = {
    "unet": {
        "attention_head_dim": [4, 8, 8],
        "block_out_channels": [32, 64, 64],
        "cross_attention_dim": 64,
        "norm_num_groups": 8,
        "projection_class_embeddings_input_dim": 32 + 6 * 256,
        "sample_size": 8,
        "transformer_layers_per_block": [1, 1, 2],
    },
    "text": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "projection_dim": 32,
    },
    "text_2": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "projection_dim": 32,
    },
    "vae": {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64},
}


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# --------------------------------------------------------------------------- memory


def _reset_peak(device) -> None:
    """Start a new peak-memory window (Linux: VmHWM is reset by writing 5 to clear_refs)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_bytes(device) -> int:
    """Peak resident memory since the last reset (CPU), or peak allocated CUDA memory."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------- weights


def random_sd15_folder(cache_dir: Path, seed: int = 0) -> Path:
    """An SD1.5-size pipeline with random weights as a diffusers folder (written once, then reused)."""
    import torch
    from diffusers import AutoencoderKL

    from ldm.models.clip import load_tokenizer, text_encoder_config
    from ldm.models.unet import UNet, UNetConfig, random_weights_
    from ldm.models.vae import VAE
    from ldm.pipelines.pipeline import Pipeline
    from ldm.sampling.schedule import NoiseSchedule

    folder = cache_dir / f"random-sd15-seed{seed}"
    if (folder / "model_index.json").is_file():
        return folder
    print(f"writing random SD1.5-size weights to {folder} (once)", file=sys.stderr)
    with torch.device("meta"):
        unet = UNet(UNetConfig.sd15())
    random_weights_(unet, seed=seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
        scaling_factor=0.18215,
    )
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(text_encoder_config("sd1"))
    pipe = Pipeline(unet, VAE(vae), text_encoder, load_tokenizer(), NoiseSchedule())
    return pipe.save_diffusers(folder)


def random_sdxl_folder(
    cache_dir: Path,
    seed: int = 0,
    *,
    unet: dict | None = None,
    text: dict | None = None,
    text_2: dict | None = None,
    vae: dict | None = None,
) -> Path:
    """An SDXL-base-size pipeline with random weights as a diffusers folder (written once, then reused).

    The published configs, each with overrides: unet / vae are diffusers config entries, text / text_2
    CLIPTextConfig fields of CLIP ViT-L and OpenCLIP bigG (e.g. TINY_SDXL). Tensors are stored in float16
    (7 GB instead of 14; both libraries' loaders cast to the dtype they run in) and made in float16, so
    that no float32 copy of the 2.6B-parameter U-Net is ever held while writing.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ldm.formats.atomic import atomic_dir
    from ldm.formats.pipeline_files import write_tokenizer_folder
    from ldm.models.clip import load_tokenizer, text_encoder_2_config, text_encoder_config
    from ldm.models.unet import random_weights_
    from ldm.pipelines.pipeline import release_freed_memory

    overrides = {"unet": unet or {}, "text": text or {}, "text_2": text_2 or {}, "vae": vae or {}}
    folder = cache_dir / f"random-sdxl{_config_tag(overrides)}-seed{seed}"
    if (folder / "model_index.json").is_file():
        return folder
    print(f"writing random SDXL-size weights (float16) to {folder} (once; minutes at full size)", file=sys.stderr)
    half = torch.float16

    def write(tmp: Path) -> None:
        with torch.device("meta"):
            unet_model: Any = UNet2DConditionModel(**{**SDXL_UNET, **overrides["unet"]})
        torch.nn.Module.to(unet_model, half)  # not diffusers' .to(), which warns about keeping float32 modules
        random_weights_(unet_model, seed=seed)  # materialized here, in float16: 5.1 GB, never a float32 copy
        unet_model.save_pretrained(tmp / "unet")
        del unet_model
        release_freed_memory()
        torch.manual_seed(seed)  # transformers' and diffusers' own random init for the rest
        encoders = [
            ("text_encoder", CLIPTextModel, text_encoder_config("sd1"), overrides["text"]),
            ("text_encoder_2", CLIPTextModelWithProjection, text_encoder_2_config(), overrides["text_2"]),
        ]
        for name, cls, config, changes in encoders:
            config.update(changes)
            encoder: Any = cls(config)
            encoder.to(half)
            encoder.save_pretrained(tmp / name)
        vae_model: Any = AutoencoderKL(**{**SDXL_VAE, **overrides["vae"]})
        torch.nn.Module.to(vae_model, half)
        vae_model.save_pretrained(tmp / "vae")
        write_tokenizer_folder(load_tokenizer(), tmp / "tokenizer")
        write_tokenizer_folder(load_tokenizer(pad_token="!"), tmp / "tokenizer_2")  # bigG's pads with "!" (id 0)
        EulerDiscreteScheduler.from_config(SDXL_SCHEDULER).save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps(SDXL_MODEL_INDEX, indent=2) + "\n")

    atomic_dir(folder, write)  # never a half-written folder that a later run would take as written
    release_freed_memory()  # the children that load it want this machine's memory
    return folder


def _parts(parts: dict[str, dict]) -> dict[str, dict | None]:
    """TINY_SDXL-like overrides as random_sdxl_folder's keyword arguments."""
    return {k: parts.get(k) for k in ("unet", "text", "text_2", "vae")}


def _config_tag(overrides: dict) -> str:
    """The folder name's tag: none for the published configs, else a short hash of the overrides (a folder per
    config, so a tiny test folder is never taken for the full-size one)."""
    if not any(overrides.values()):
        return ""
    import hashlib

    return "-" + hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]


def sdxl_unet_config(overrides: dict | None = None):
    """ldm's UNetConfig of the diffusers SDXL config with these overrides (none: UNetConfig.sdxl())."""
    from ldm.formats.checkpoint import unet_config_from_diffusers

    return unet_config_from_diffusers({**SDXL_UNET, **(overrides or {})}, source="benchmark SDXL config")


def random_unet(config, seed: int = 0):
    """ldm's UNet with random weights (float32, CPU), never initialised twice (built on the meta device)."""
    import torch

    from ldm.models.unet import UNet, random_weights_

    with torch.device("meta"):
        unet = UNet(config)
    return random_weights_(unet, seed=seed).eval()


def shared_diffusers_unet(ours):
    """diffusers' UNet2DConditionModel of `ours`' config holding `ours`' own parameter tensors (the same storage:
    no copy; built on the meta device, so nothing is allocated for its own). (model, tensors shared, bytes)."""
    import torch
    from diffusers import UNet2DConditionModel

    from ldm.formats.checkpoint import unet_config_to_diffusers, unet_to_diffusers_state_dict

    config = ours.config
    with torch.device("meta"):
        theirs = UNet2DConditionModel(
            **{k: v for k, v in unet_config_to_diffusers(config).items() if not k.startswith("_")}
        )
    theirs.load_state_dict(unet_to_diffusers_state_dict(ours.state_dict(), config), assign=True, strict=True)
    mine, tensors = list(ours.state_dict().values()), list(theirs.state_dict().values())
    same = len(tensors) == len(mine) and {t.data_ptr() for t in tensors} == {t.data_ptr() for t in mine}
    if not same or any(t.is_meta for t in tensors):
        raise RuntimeError("diffusers' U-Net does not hold exactly ldm's parameter tensors (a copy was made)")
    return theirs.eval(), len(tensors), sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------- pieces


def matmul_peak(dtype, device, n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n matmul: the practical ceiling for the U-Net's convs and linears."""
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b), device)[1] for _ in range(repeats))
    return 2 * n**3 / best


def unet_flops(config, side: int, batch: int = 2) -> tuple[float, float]:
    """(total, attention) FLOPs of one U-Net forward at a latent side, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.models.unet import UNet

    with torch.device("meta"):
        unet = UNet(config)
        x = torch.empty(batch, config.in_channels, side, side)
        context = torch.empty(batch, 77, config.context_dim)
        y = None if config.adm_in_channels is None else torch.empty(batch, config.adm_in_channels)
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.full((batch,), 500), context, y)
    counts = counter.get_flop_counts().get("Global", {})
    # on the meta device attention runs as SDPA's plain kernel: its two batched matmuls (q k^T, p v)
    attention = sum(v for k, v in counts.items() if "scaled_dot_product" in str(k) or "bmm" in str(k))
    return float(counter.get_total_flops()), float(attention)


def _rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def bench_unet(models: dict, theirs, sizes, repeats, warmup, device, peaks) -> list[dict]:
    import torch

    rows = []
    c = models[next(iter(models))].config
    for side_px in sizes:
        inputs = _step_inputs(c, side_px, side_px // 8, device)
        flops = unet_flops(c, side_px // 8)
        ref = None
        for name, model in models.items():
            row, b = _unet_row(model, theirs, name, side_px, inputs, flops, repeats, warmup, device, peaks[name], ref)
            if _dtype(name) == torch.float32:
                ref = b
            rows.append(row)
    return rows


def bench_unet_sdxl(ours, theirs, sizes, dtypes, repeats, warmup, device, peaks) -> list[dict]:
    """bench_unet for a U-Net too large to hold in memory twice: `theirs` holds `ours`' own float32 tensors
    (shared_diffusers_unet), and each reduced precision's ldm copy is made once, run at every size, then freed
    before the next; float32 first (the reference of the others). Rows in bench_unet's order."""
    import gc

    import torch

    from ldm.formats.checkpoint import build_unet
    from ldm.pipelines.pipeline import prepare_for_inference, release_freed_memory

    c = ours.config
    inputs = {s: _step_inputs(c, s, s // 8, device) for s in sizes}
    flops = {s: unet_flops(c, s // 8) for s in sizes}
    refs: dict = {}
    rows = []
    for name in sorted(dtypes, key=lambda d: d != "fp32"):
        dtype = _dtype(name)
        model = ours
        if dtype != torch.float32:  # as the pipeline runs it: weights in this dtype, its memory layout
            print(f"  {name} copy of ldm's U-Net weights (once)", file=sys.stderr)
            model = prepare_for_inference(build_unet(c, ours.state_dict(), f"{name} copy", device, dtype), device)
        for s in sizes:
            row, b = _unet_row(
                model, theirs, name, s, inputs[s], flops[s], repeats, warmup, device, peaks[name], refs.get(s)
            )
            if dtype == torch.float32:
                refs[s] = b
            rows.append(row)
        del model
        gc.collect()
        release_freed_memory()
    return sorted(rows, key=lambda r: (sizes.index(r["size"]), dtypes.index(r["dtype"])))


def _unet_row(model, theirs, name: str, side_px: int, inputs, flops, repeats, warmup, device, peak, ref):
    """One size and precision of the U-Net step, ldm and diffusers interleaved: (row, diffusers' output).
    ref: diffusers' float32 output at this size (None: this is the float32 row, its own reference)."""
    import torch

    flops, attn_flops = flops
    ctx_d, run_ours, run_theirs, label = _step_runners(model, theirs, name, inputs, device)
    times_o, times_t = [], []
    with torch.no_grad(), model.cached_context(ctx_d):
        for i in range(warmup + repeats):  # interleaved
            a, dt_o = timed(run_ours, device)
            b, dt_t = timed(run_theirs, device)
            if i >= warmup:
                times_o.append(dt_o)
                times_t.append(dt_t)
    if ref is None and _dtype(name) == torch.float32:
        ref = b
    to, tt = statistics.median(times_o), statistics.median(times_t)
    row = {
        "size": side_px,
        "dtype": name,
        "baseline": label,
        "ldm_s": to,
        "diffusers_s": tt,
        "speedup": tt / to,
        "rel_diff_vs_diffusers": _rel(a, b),
        "rel_diff_vs_fp32": _rel(a, ref) if ref is not None else None,
        "tflop": flops / 1e12,
        "attention_tflop": attn_flops / 1e12,
        "ldm_tflops": flops / to / 1e12,
        "diffusers_tflops": flops / tt / 1e12,
        "ldm_pct_of_peak": 100 * flops / to / peak,
        "times_ldm": times_o,
        "times_diffusers": times_t,
    }
    print(
        f"  unet {side_px}px {name:4}  ldm {to:7.3f} s  {label} {tt:7.3f} s  speedup {tt / to:5.2f}x  "
        f"rel diff {row['rel_diff_vs_diffusers']:.1e}  {row['ldm_pct_of_peak']:.0f}% of matmul peak",
        file=sys.stderr,
    )
    return row, b


def unet_variants(ours, dtypes, device) -> dict:
    """ldm's U-Net per precision as its pipeline runs it: `ours` (float32) itself, or a converted copy."""
    import copy

    import torch

    from ldm.pipelines.pipeline import prepare_for_inference

    return {
        name: ours
        if _dtype(name) == torch.float32
        else prepare_for_inference(copy.deepcopy(ours).to(_dtype(name)), device)
        for name in dtypes
    }


def _step_runners(model, theirs, name: str, inputs, device):
    """(context in the model's dtype, run ldm, run diffusers, baseline label) for one U-Net step."""
    import torch

    x, t, ctx, y, added = inputs
    dtype = _dtype(name)
    ctx_d = ctx.to(dtype)
    reduced = dtype != torch.float32

    def run_ours():  # y (SDXL) in float32, as the pipeline gives it: the U-Net casts it
        return model(x.to(dtype), t, ctx_d, y)

    def run_theirs():  # diffusers' weights stay float32; reduced precision through autocast
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=reduced):
            return theirs(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample

    return ctx_d, run_ours, run_theirs, f"diffusers {name} autocast" if reduced else "diffusers fp32"


def _step_inputs(config, side_px: int, seed: int, device):
    """(x, t, context, y, added_cond_kwargs) of one CFG step; y and added_cond_kwargs None but for SDXL, where
    both carry the same pooled text and size/crop ids: ldm's added vector, and diffusers' inputs for it."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, config.in_channels, side_px // 8, side_px // 8, generator=g).to(device)
    ctx = torch.randn(2, 77, config.context_dim, generator=g).to(device)
    t = torch.full((2,), 500, device=device)
    if config.adm_in_channels is None:
        return x, t, ctx, None, None
    from ldm.conditioning.sdxl import TIME_ID_DIM, label_vector

    pooled = torch.randn(2, config.adm_in_channels - SDXL_TIME_IDS * TIME_ID_DIM, generator=g).to(device)
    ids = torch.tensor([[side_px, side_px, 0, 0, side_px, side_px]] * 2, dtype=torch.float32, device=device)
    return x, t, ctx, label_vector(pooled, ids), {"text_embeds": pooled, "time_ids": ids}


OP_GROUPS = (  # profiler op name -> what it is, for the time-per-op-type table
    ("convolution", ("convolution", "conv2d", "cudnn_conv")),
    ("attention (SDPA)", ("scaled_dot_product", "attention")),
    ("linear / matmul", ("addmm", "aten::mm", "bmm", "matmul", "linear")),
    ("group norm", ("group_norm",)),
    ("layer norm", ("layer_norm",)),
    ("SiLU / GELU", ("silu", "gelu")),
    ("copies / casts", ("copy_", "to_copy", "clone", "contiguous")),
    ("elementwise add / mul", ("aten::add", "aten::mul")),
    ("concat / resize", ("cat", "upsample")),
)


def _op_group(name: str) -> str:
    for group, keys in OP_GROUPS:
        if any(k in name for k in keys):
            return group
    return "other"


def profile_unet(models: dict, theirs, side_px: int, device) -> list[dict]:
    """Self time per op type of one U-Net step of each library (after a warm-up step)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    inputs = _step_inputs(models[next(iter(models))].config, side_px, 0, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    rows = []
    for name, model in models.items():
        ctx_d, run_ours, run_theirs, _ = _step_runners(model, theirs, name, inputs, device)
        runs = {"ldm": run_ours, "diffusers": run_theirs}
        for library, run in runs.items():
            with torch.no_grad(), model.cached_context(ctx_d):
                run()
                with profile(activities=activities) as prof:
                    _, seconds = timed(run, device)
            groups: dict[str, float] = {}
            for e in prof.key_averages():
                if e.key.startswith("aten::") or "conv" in e.key:
                    groups[_op_group(e.key)] = groups.get(_op_group(e.key), 0.0) + e.self_cpu_time_total / 1e6
            rows.append(
                {
                    "library": library,
                    "dtype": name,
                    "size": side_px,
                    "seconds": seconds,
                    "self_s_by_op": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
                }
            )
            print(
                f"  profile {library} {name} {side_px}px: {seconds:.2f} s  "
                + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1]["self_s_by_op"].items()),
                file=sys.stderr,
            )
    return rows


def bench_parts(folder: Path, repeats: int, device) -> list[dict]:
    """VAE decode (64x64 latents -> 512x512) and prompt encoding, ldm and diffusers interleaved."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from ldm.models.clip import TextEncoder, load_tokenizer
    from ldm.models.vae import load_vae

    rows = []
    ours_vae = load_vae(folder, device=device)
    their_vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True).to(device).eval()
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    tok = load_tokenizer(folder / "tokenizer")
    te = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).to(device).eval()
    encoder = TextEncoder(tok, te)

    def their_encode():
        ids = tok([PROMPT, ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return te(ids.to(device))[0]

    cases = [
        (
            f"vae decode {64 * ours_vae.downsample_factor}px",
            lambda: ours_vae.decode(z, tiled=False),
            lambda: their_vae.decode(z / their_vae.config.scaling_factor).sample,
        ),
        (
            "text encode (prompt + empty negative)",
            lambda: encoder.encode_with_negative([PROMPT], None, 1),
            their_encode,
        ),
    ]
    with torch.no_grad():
        for name, ours, theirs in cases:
            to, tt = [], []
            for i in range(repeats + 1):
                _, a = timed(ours, device)
                _, b = timed(theirs, device)
                if i:
                    to.append(a)
                    tt.append(b)
            row = {"part": name, "ldm_s": statistics.median(to), "diffusers_s": statistics.median(tt)}
            row["speedup"] = row["diffusers_s"] / row["ldm_s"]
            rows.append(row)
            print(
                f"  {name:40} ldm {row['ldm_s']:.3f} s  diffusers {row['diffusers_s']:.3f} s  "
                f"speedup {row['speedup']:.2f}x",
                file=sys.stderr,
            )
    return rows


# --------------------------------------------------------------------------- end to end (child processes)


def e2e_child(args) -> int:
    """One txt2img run in this (fresh) process; prints a JSON line, saves the image as .npy."""
    import numpy as np
    import torch

    device, dtype = args.device, _dtype(args.e2e_dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.model == "sdxl":
        run = _sdxl_runner(args, device, dtype)
    elif args.child == "ldm":
        from ldm.pipelines.pipeline import Pipeline

        pipe = Pipeline.from_pretrained(args.weights, device=device, dtype=dtype)

        def run():
            return pipe(
                PROMPT,
                steps=args.steps,
                guidance_scale=7.5,
                seed=0,
                height=args.e2e_size,
                width=args.e2e_size,
                output_type="np",
                progress=False,
            )
    else:
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            args.weights,
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
            torch_dtype=dtype if device != "cpu" else torch.float32,
        )
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)

        def run():
            with torch.autocast("cpu", dtype=dtype, enabled=device == "cpu" and dtype != torch.float32):
                return pipe(
                    PROMPT,
                    num_inference_steps=args.steps,
                    guidance_scale=7.5,
                    height=args.e2e_size,
                    width=args.e2e_size,
                    generator=[torch.Generator("cpu").manual_seed(0)],
                    output_type="np",
                ).images

    load_s = time.perf_counter() - t0
    load_peak = _peak_bytes(device)
    _reset_peak(device)
    image, run_s = timed(run, device)
    if isinstance(image, list):  # PIL images: (B, H, W, 3) in [0, 1] as output_type="np" gives
        image = np.stack([np.asarray(im) for im in image]) / 255.0
    image = np.asarray(image, dtype=np.float32)
    np.save(args.child_out, image)
    print(
        json.dumps(
            {
                "library": args.child,
                "dtype": args.e2e_dtype,
                "load_s": load_s,
                "run_s": run_s,
                "load_peak_gib": load_peak / 2**30,
                "run_peak_gib": _peak_bytes(device) / 2**30,
                "finite": bool(np.isfinite(image).all()),
            }
        )
    )
    return 0


def _sdxl_runner(args, device, dtype):
    """Load one library's SDXL pipeline from args.weights (this process's load peak); the call that makes one
    image as an application asks for it: PIL out, Euler, guidance SDXL_GUIDANCE, the empty negative prompt
    (zeros, force_zeros_for_empty_prompt, in both)."""
    import torch

    size, steps = args.e2e_size, args.steps
    if args.child == "ldm":
        from ldm.pipelines.pipeline import Pipeline

        pipe = Pipeline.from_pretrained(args.weights, device=device, dtype=dtype)
        return lambda: pipe(
            PROMPT,
            steps=steps,
            guidance_scale=SDXL_GUIDANCE,
            seed=0,
            height=size,
            width=size,
            sampler="euler",
            output_type="pil",
            progress=False,
        )
    from diffusers import StableDiffusionXLPipeline

    their = StableDiffusionXLPipeline.from_pretrained(  # dtype: diffusers >= 0.36's name of torch_dtype
        args.weights, local_files_only=True, dtype=dtype if device != "cpu" else torch.float32
    )
    their.set_progress_bar_config(disable=True)
    their.to(device)

    def run():  # the folder's scheduler: EulerDiscreteScheduler
        with torch.autocast("cpu", dtype=dtype, enabled=device == "cpu" and dtype != torch.float32):
            return their(
                PROMPT,
                num_inference_steps=steps,
                guidance_scale=SDXL_GUIDANCE,
                height=size,
                width=size,
                generator=[torch.Generator("cpu").manual_seed(0)],
                output_type="pil",
            ).images

    return run


def memory_child(args) -> int:
    """One large-image job in this (fresh) process: its peak memory and time, as a JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device, side = args.device, args.memory_size
    job = args.child
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if job.startswith("attn"):
            # one SD1 level-0 self-attention of a 512x512 image (batch 2, 4096 tokens, 8 heads of 40) on
            # the plain SDPA kernel, which holds the whole score matrix unless the queries are sliced
            from torch.nn.attention import SDPBackend, sdpa_kernel

            from ldm.models.unet import CrossAttention

            attn = CrossAttention(320, None, 8, 40).to(device).eval()
            attn.query_chunk = 1024 if job == "attn-sliced" else None
            side = 512
            x = torch.randn(2, (side // 8) ** 2, 320, generator=g).to(device)
            _reset_peak(device)
            with sdpa_kernel(SDPBackend.MATH):
                out, seconds = timed(lambda: attn(x), device)
        elif job.startswith("vae"):
            from ldm.models.vae import load_vae

            vae = load_vae(args.weights, device=device)
            z = torch.randn(1, 4, side // 8, side // 8, generator=g).to(device)
            _reset_peak(device)
            out, seconds = timed(lambda: vae.decode(z, tiled=job == "vae-tiled"), device)
        else:
            x = torch.randn(2, 4, side // 8, side // 8, generator=g).to(device)
            t = torch.full((2,), 500, device=device)
            if job == "unet-ldm":
                from ldm.formats.checkpoint import load_unet
                from ldm.pipelines.pipeline import prepare_for_inference

                unet = prepare_for_inference(load_unet(args.weights).to(device).eval(), device)
                context = torch.randn(2, 77, unet.config.context_dim, generator=g).to(device)  # type: ignore[union-attr,arg-type]
                run = lambda: unet(x, t, context)  # noqa: E731
            else:
                from diffusers import UNet2DConditionModel

                unet = UNet2DConditionModel.from_pretrained(Path(args.weights) / "unet", local_files_only=True)
                unet = unet.to(device).eval()
                context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(device)
                run = lambda: unet(x, t, encoder_hidden_states=context).sample  # noqa: E731
            _reset_peak(device)
            out, seconds = timed(run, device)
    print(
        json.dumps(
            {
                "job": job,
                "size": side,
                "seconds": seconds,
                "peak_gib": _peak_bytes(device) / 2**30,
                "finite": bool(torch.isfinite(out).all()),
            }
        )
    )
    return 0


def _run_child(args, folder: Path, job: str, *extra: str) -> dict:
    """Run one benchmark job in a fresh Python process; its JSON line."""
    cmd = [
        sys.executable,
        "-m",
        "ldm.cli.benchmark",
        "--child",
        job,
        "--weights",
        str(folder),
        "--device",
        args.device,
        "--model",
        args.model,
        *extra,
    ]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"benchmark child {job} {' '.join(extra)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_memory(args, folder: Path) -> list[dict]:
    """Peak memory of large images: VAE decode tiled or not, U-Net step ldm or diffusers; fresh process each."""
    rows = []
    for job in ("vae-full", "vae-tiled", "unet-ldm", "unet-diffusers", "attn-full", "attn-sliced"):
        print(f"  memory {job} {512 if job.startswith('attn') else args.memory_size}px ...", file=sys.stderr)
        r = _run_child(args, folder, job, "--memory-size", str(args.memory_size))
        rows.append(r)
        print(f"    {r['seconds']:.1f} s, peak {r['peak_gib']:.2f} GiB", file=sys.stderr)
    return rows


def bench_e2e(args, folder: Path) -> dict:
    import numpy as np

    runs = []
    images: dict = {}
    plan = [("ldm", "fp32"), ("diffusers", "fp32")] * args.e2e_repeats
    plan += [("ldm", d) for d in args.dtypes if d != "fp32"]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (library, dtype) in enumerate(plan):
            out = Path(tmp) / f"{i}.npy"
            print(f"  e2e {library} {dtype} ...", file=sys.stderr)
            r = _run_child(
                args,
                folder,
                library,
                "--e2e-dtype",
                dtype,
                "--e2e-size",
                str(args.e2e_size),
                "--steps",
                str(args.steps),
                "--child-out",
                str(out),
            )
            runs.append(r)
            images.setdefault((library, dtype), np.load(out))
            print(
                f"    run {r['run_s']:.1f} s, peak {r['run_peak_gib']:.2f} GiB (load peak {r['load_peak_gib']:.2f})",
                file=sys.stderr,
            )

    def summary(library, dtype):
        rs = [r for r in runs if r["library"] == library and r["dtype"] == dtype]
        return {
            "run_s": statistics.median(r["run_s"] for r in rs),
            "run_peak_gib": max(r["run_peak_gib"] for r in rs),
            "load_peak_gib": max(r["load_peak_gib"] for r in rs),
            "finite": all(r["finite"] for r in rs),
        }

    sdxl = args.model == "sdxl"
    result: dict = {
        "model": args.model,
        "size": args.e2e_size,
        "steps": args.steps,
        "sampler": "euler" if sdxl else "ddim",
        "guidance_scale": SDXL_GUIDANCE if sdxl else 7.5,
        "ldm_fp32": summary("ldm", "fp32"),
        "diffusers_fp32": summary("diffusers", "fp32"),
        "runs": runs,
    }
    result["speedup_fp32"] = result["diffusers_fp32"]["run_s"] / result["ldm_fp32"]["run_s"]
    result["peak_ratio_fp32"] = result["diffusers_fp32"]["run_peak_gib"] / result["ldm_fp32"]["run_peak_gib"]
    a, b = images[("ldm", "fp32")], images[("diffusers", "fp32")]
    result["image_max_abs_ldm_vs_diffusers"] = float(np.abs(a - b).max())
    db = psnr(a, b)
    result["psnr_ldm_vs_diffusers_fp32_db"] = None if db == float("inf") else db  # None: identical (JSON has no inf)
    for d in args.dtypes:
        if d != "fp32":
            result[f"ldm_{d}"] = summary("ldm", d)
            result[f"psnr_{d}_vs_fp32_db"] = psnr(images[("ldm", d)], a)
    return result


# --------------------------------------------------------------------------- soak (one long-lived process)


def rss_bytes() -> int:
    """Resident memory of this process now (not its peak): /proc/self/statm, else psutil."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil  # not on Linux: psutil, where installed

        return int(psutil.Process().memory_info().rss)


def bench_soak(args) -> dict:
    """args.soak_n generations in this process, each a new prompt and seed; RSS after the reference one
    and after the last (a garbage collection first, so only memory still held counts)."""
    import gc

    from ldm.demo.shapes import eval_prompts
    from ldm.pipelines.pipeline import Pipeline

    n, reference = args.soak_n, args.soak_reference
    pipe = Pipeline.from_pretrained(args.weights, device=args.device)
    prompts = [q.prompt for q in eval_prompts(240)]
    every = max(1, n // 20)
    samples: list[tuple[int, int]] = []
    rss_reference = rss_last = 0
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        images = pipe(prompts[(i - 1) % len(prompts)], steps=args.soak_steps, seed=i, output_type="pil", progress=False)
        del images
        if i in (reference, n) or i % every == 0:
            gc.collect()
            rss = rss_bytes()
            samples.append((i, rss))
            if i == reference:
                rss_reference = rss
            if i == n:
                rss_last = rss
            print(f"  soak {i}/{n}: RSS {rss / 2**20:.1f} MiB", file=sys.stderr)
    seconds = time.perf_counter() - t0
    ratio = rss_last / rss_reference
    return {
        "model": str(pipe.model_path),
        "generations": n,
        "steps": args.soak_steps,
        "reference_generation": reference,
        "rss_reference_mib": rss_reference / 2**20,
        "rss_last_mib": rss_last / 2**20,
        "ratio": ratio,
        "tolerance": args.soak_tolerance,
        "passed": ratio <= 1 + args.soak_tolerance,
        "seconds": seconds,
        "seconds_per_generation": seconds / n,
        "rss_samples_mib": [[i, rss / 2**20] for i, rss in samples],
    }


# --------------------------------------------------------------------------- main


def describe_machine(device) -> dict:
    import platform

    import torch

    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "python": platform.python_version(),
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    try:  # the ceiling of the peak-memory figures
        meminfo = Path("/proc/meminfo").read_text().split()
        info["memory_gib"] = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    else:
        try:
            cpu = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")]
            flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
            info["cpu"] = cpu[0].split(":", 1)[1].strip() if cpu else platform.processor()
            info["cpu_count"] = os.cpu_count()
            info["bf16_hardware"] = [f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()]
        except (OSError, StopIteration):
            info["cpu"] = platform.processor()
    return info


MODEL_DEFAULTS = {  # what --only, --sizes, --steps and --e2e-size mean when not given
    "sd15": {
        "only": ["unet", "profile", "parts", "e2e", "memory"],
        "sizes": [256, 512, 768],
        "steps": 20,
        "e2e_size": 512,
    },
    "sdxl": {"only": list(SDXL_SECTIONS), "sizes": [1024], "steps": 2, "e2e_size": 1024},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=command_name(), description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--model",
        choices=MODELS,
        default="sd15",
        help="sd15: every benchmark on an SD1.5-size model; sdxl: SDXL base, the U-Net step and end to end",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=["unet", "profile", "parts", "e2e", "memory", "soak"],
        default=None,
        help="which benchmarks to run (default: all but soak, which runs only when named; sdxl: unet e2e)",
    )
    p.add_argument("--weights", default=None, help="a diffusers folder (default: random weights of --model's size)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help="image sides for the U-Net step (default 256 512 768; sdxl 1024)",
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=DTYPE_NAMES,
        default=["fp32", "bf16"],
        help="U-Net precisions (fp32 is the reference; fp16 for GPUs)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed interleaved runs per case (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per case first")
    p.add_argument(
        "--steps", type=int, default=None, help="sampling steps of the end-to-end run (default 20 DDIM; sdxl 2 Euler)"
    )
    p.add_argument(
        "--e2e-size", type=int, default=None, help="image side of the end-to-end run (default 512; sdxl 1024)"
    )
    p.add_argument("--e2e-repeats", type=int, default=1, help="end-to-end runs of each library (fp32)")
    p.add_argument("--profile-size", type=int, default=512, help="image side of the per-op-type profile")
    p.add_argument(
        "--memory-size",
        type=int,
        default=1024,
        help="image side of the memory jobs (VAE decode tiled/untiled, one U-Net step)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--cache-dir",
        default=str(Path(tempfile.gettempdir()) / "ldm-bench"),
        help="where the random weights are written once",
    )
    p.add_argument("--json", default=None, help="write all figures here")
    p.add_argument("--soak-n", type=int, default=1000, help="soak: generations in one process")
    p.add_argument("--soak-steps", type=int, default=4, help="soak: DDIM steps per generation")
    p.add_argument(
        "--soak-reference", type=int, default=100, help="soak: the generation whose RSS the last one is held to"
    )
    p.add_argument(
        "--soak-tolerance", type=float, default=0.05, help="soak: allowed growth of RSS past the reference (0.05 = 5%%)"
    )
    p.add_argument(
        "--child",
        choices=["ldm", "diffusers", "vae-full", "vae-tiled", "unet-ldm", "unet-diffusers", "attn-full", "attn-sliced"],
        help=argparse.SUPPRESS,
    )
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--e2e-dtype", default="fp32", choices=DTYPE_NAMES, help=argparse.SUPPRESS)
    # tests: --model sdxl at toy widths (TINY_SDXL), for the U-Net step and the random folder alike
    p.add_argument("--unet-config", default="full", choices=["full", "tiny"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    other = sorted(set(args.only) - set(SDXL_SECTIONS))
    if args.model == "sdxl" and other:
        p.error(f"--model sdxl runs {' and '.join(SDXL_SECTIONS)}; not {' '.join(other)}")
    if args.unet_config != "full" and args.model != "sdxl":
        p.error("--unet-config is for --model sdxl")

    bad = [s for s in args.sizes + [args.e2e_size, args.memory_size, args.profile_size] if s % 64 or s < 64]
    if bad:
        p.error(f"sizes {bad} must be positive multiples of 64")
    if min(args.repeats, args.e2e_repeats, args.steps) < 1 or args.warmup < 0:
        p.error("--repeats, --e2e-repeats and --steps must be >= 1, --warmup >= 0")
    if "soak" in args.only:
        if args.soak_n < 1 or not 1 <= args.soak_steps <= 1000:
            p.error("--soak-n must be >= 1 and --soak-steps in 1 .. 1000")
        if not 1 <= args.soak_reference <= args.soak_n:
            p.error(f"--soak-reference {args.soak_reference} must be in 1 .. --soak-n ({args.soak_n})")
        if not 0 <= args.soak_tolerance < 1:
            p.error(f"--soak-tolerance {args.soak_tolerance} must be in 0 .. 1 (a fraction)")
    if args.weights is not None and not (Path(args.weights) / "model_index.json").is_file():
        print(
            f"error: --weights {args.weights}: not a diffusers folder (no model_index.json); pass one, or leave "
            f"--weights out for random {'SDXL' if args.model == 'sdxl' else 'SD1.5'}-size weights",
            file=sys.stderr,
        )
        return 2

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}: CUDA is not available here; use --device cpu", file=sys.stderr)
        return 2
    if args.child in ("ldm", "diffusers"):
        return e2e_child(args)
    if args.child:
        return memory_child(args)
    if args.threads:
        torch.set_num_threads(args.threads)

    report: dict = {"model": args.model, "machine": describe_machine(args.device), "settings": vars(args)}
    print(json.dumps(report["machine"]), file=sys.stderr)
    if "soak" in args.only:  # first: nothing else loaded in this process yet
        print(f"soak: {args.soak_n} generations of {args.soak_steps} DDIM steps in this process", file=sys.stderr)
        report["soak"] = bench_soak(args)
        if set(args.only) == {"soak"}:
            return _finish(args, report)
    if args.model == "sdxl":
        return _finish(args, bench_sdxl(args, report))
    folder = Path(args.weights) if args.weights else random_sd15_folder(Path(args.cache_dir))
    report["weights"] = str(folder)
    if "e2e" in args.only:
        print(f"end to end: {args.e2e_size}px, {args.steps} DDIM steps, one fresh process per run", file=sys.stderr)
        report["e2e"] = bench_e2e(args, folder)
    if "unet" in args.only or "profile" in args.only:
        peaks = {d: matmul_peak(_dtype(d), args.device) for d in args.dtypes}
        report["matmul_peak_tflops"] = {d: v / 1e12 for d, v in peaks.items()}
        print("  matmul peak: " + ", ".join(f"{d} {v / 1e9:.0f} GFLOP/s" for d, v in peaks.items()), file=sys.stderr)
        from diffusers import UNet2DConditionModel

        from ldm.formats.checkpoint import load_unet

        models = unet_variants(load_unet(folder).to(args.device).eval(), args.dtypes, args.device)
        theirs = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True).to(args.device).eval()
        if "unet" in args.only:
            report["unet"] = bench_unet(models, theirs, args.sizes, args.repeats, args.warmup, args.device, peaks)
        if "profile" in args.only:
            report["profile"] = profile_unet(models, theirs, args.profile_size, args.device)
        del models, theirs
    if "parts" in args.only:
        report["parts"] = bench_parts(folder, args.repeats, args.device)
    if "memory" in args.only:
        report["memory"] = bench_memory(args, folder)
    return _finish(args, report)


def bench_sdxl(args, report: dict) -> dict:
    """--model sdxl: the end-to-end children first (this process holds no model meanwhile: their memory is
    theirs, and the machine's is free for them), then the U-Net step."""
    import torch

    parts = TINY_SDXL if args.unet_config == "tiny" else {}
    report["unet_config"] = args.unet_config
    if "e2e" in args.only:
        folder = Path(args.weights) if args.weights else random_sdxl_folder(Path(args.cache_dir), 0, **_parts(parts))
        report["weights"] = str(folder)
        print(f"end to end: {args.e2e_size}px, {args.steps} Euler steps, one fresh process per run", file=sys.stderr)
        report["e2e"] = bench_e2e(args, folder)
    if "unet" in args.only:
        _reset_peak(args.device)  # this section's own peak (not the folder writing's)
        peaks = {d: matmul_peak(_dtype(d), args.device) for d in args.dtypes}
        report["matmul_peak_tflops"] = {d: v / 1e12 for d, v in peaks.items()}
        print("  matmul peak: " + ", ".join(f"{d} {v / 1e9:.0f} GFLOP/s" for d, v in peaks.items()), file=sys.stderr)
        if args.weights:
            from ldm.formats.checkpoint import load_unet

            report.setdefault("weights", args.weights)
            ours = load_unet(args.weights, dtype=torch.float32)
        else:
            report.setdefault("weights", f"random {args.unet_config} SDXL U-Net in memory (seed 0)")
            ours = random_unet(sdxl_unet_config(parts.get("unet")))
        ours = ours.to(args.device).eval()
        theirs, tensors, nbytes = shared_diffusers_unet(ours)
        report["unet_parameters"] = sum(p.numel() for p in ours.parameters())
        report["unet_weights_shared"] = {"tensors": tensors, "gib": nbytes / 2**30}
        print(f"  diffusers' U-Net holds ldm's {tensors} tensors ({nbytes / 2**30:.2f} GiB), no copy", file=sys.stderr)
        report["unet"] = bench_unet_sdxl(
            ours, theirs, args.sizes, args.dtypes, args.repeats, args.warmup, args.device, peaks
        )
        report["unet_process_peak_gib"] = _peak_bytes(args.device) / 2**30  # fp32 weights once + the bf16 copy
        del ours, theirs
    return report


def _finish(args, report: dict) -> int:
    """Print and write the report; exit 1 when a soak did not hold its memory."""
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if "soak" in report and not report["soak"]["passed"] else 0


def format_report(r: dict) -> str:
    lines = [f"model: {r.get('model', 'sd15')}", f"machine: {json.dumps(r['machine'])}"]
    lines += [f"weights: {r['weights']}"] if "weights" in r else []
    if "soak" in r:
        k = r["soak"]
        lines += [
            "",
            f"soak: {k['generations']} generations of {k['steps']} DDIM steps in one process ({k['model']}), "
            f"{k['seconds_per_generation']:.3f} s each",
            f"  RSS after generation {k['reference_generation']}: {k['rss_reference_mib']:.1f} MiB; "
            f"after the last: {k['rss_last_mib']:.1f} MiB; ratio {k['ratio']:.4f} "
            f"({'PASS' if k['passed'] else 'FAIL'}: limit {1 + k['tolerance']:.2f})",
        ]
    if "unet" in r:
        lines += [
            "",
            f"{r.get('model', 'sd15')} U-Net step, batch 2 (classifier-free guidance), median of interleaved runs:",
            "| size | dtype | ldm s | diffusers s (baseline) | speedup | rel. diff vs diffusers | TFLOP | "
            "ldm TFLOP/s | % of matmul peak |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for u in r["unet"]:
            lines.append(
                f"| {u['size']} | {u['dtype']} | {u['ldm_s']:.3f} | {u['diffusers_s']:.3f} ({u['baseline']}) "
                f"| {u['speedup']:.2f}x | {u['rel_diff_vs_diffusers']:.1e} | {u['tflop']:.3f} | "
                f"{u['ldm_tflops']:.3f} | {u['ldm_pct_of_peak']:.0f}% |"
            )
        lines.append(
            "matmul peak (TFLOP/s): " + json.dumps({k: round(v, 4) for k, v in r["matmul_peak_tflops"].items()})
        )
        if "unet_weights_shared" in r:
            w = r["unet_weights_shared"]
            lines.append(
                f"U-Net: {r['unet_parameters']:,} parameters ({r['unet_config']}); diffusers' model holds ldm's own "
                f"{w['tensors']} float32 tensors ({w['gib']:.2f} GiB, one copy); this process's peak memory "
                f"{r['unet_process_peak_gib']:.2f} GiB"
            )
    if "profile" in r:
        groups = [g for g, _ in OP_GROUPS] + ["other"]
        lines += [
            "",
            f"Self time per op type (s), one U-Net step at {r['profile'][0]['size']}px:",
            "| library | dtype | total | " + " | ".join(groups) + " |",
            "| --- " * (len(groups) + 3) + "|",
        ]
        for q in r["profile"]:
            lines.append(
                f"| {q['library']} | {q['dtype']} | {q['seconds']:.2f} | "
                + " | ".join(f"{q['self_s_by_op'].get(g, 0.0):.2f}" for g in groups)
                + " |"
            )
    if "parts" in r:
        lines += ["", "| part | ldm s | diffusers s | speedup |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {q['part']} | {q['ldm_s']:.3f} | {q['diffusers_s']:.3f} | {q['speedup']:.2f}x |" for q in r["parts"]
        ]
    if "memory" in r:
        lines += ["", "| job (fresh process) | size | s | peak memory GiB (job only) |", "| --- | --- | --- | --- |"]
        lines += [f"| {m['job']} | {m['size']} | {m['seconds']:.1f} | {m['peak_gib']:.2f} |" for m in r["memory"]]
    if "e2e" in r:
        e = r["e2e"]
        if "size" in e:
            lines += [
                "",
                f"end to end: txt2img {e['size']}x{e['size']}, {e['steps']} {e['sampler']} steps, guidance "
                f"{e['guidance_scale']:g}, each run in a fresh process (peak resident memory of the generation)",
            ]
        lines += [
            "",
            "| end to end | run s | peak memory GiB (generation) | peak GiB (loading) |",
            "| --- | --- | --- | --- |",
        ]
        for key in [k for k in e if k.startswith(("ldm_", "diffusers_")) and isinstance(e[k], dict)]:
            lines.append(
                f"| {key} | {e[key]['run_s']:.1f} | {e[key]['run_peak_gib']:.2f} | {e[key]['load_peak_gib']:.2f} |"
            )
        lines.append(
            f"speedup fp32: {e['speedup_fp32']:.2f}x; peak memory diffusers / ldm fp32: "
            f"{e.get('peak_ratio_fp32', float('nan')):.2f}x; image max |ldm - diffusers| fp32: "
            f"{e['image_max_abs_ldm_vs_diffusers']:.2e}; "
            + "; ".join(
                f"{k}: {'identical' if v is None else f'{v:.1f}'}" for k, v in e.items() if k.startswith("psnr")
            )
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
