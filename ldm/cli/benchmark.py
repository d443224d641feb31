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

    python scripts/benchmark.py                                  # all of it on CPU (~30 min on 2 cores)
    python scripts/benchmark.py --only unet --sizes 512 --dtypes fp32 --repeats 3
    python scripts/benchmark.py --device cuda --dtypes fp32 fp16 --json bench.json
    python scripts/benchmark.py --only soak --json soak.json     # 1000 demo-model generations, memory
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

from ldm.cli import HelpFormatter, command_name
from ldm.compare import psnr, timed

PROMPT = "a photograph of an astronaut riding a horse"
DTYPE_NAMES = ("fp32", "bf16", "fp16")


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
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.full((batch,), 500), context)
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
        x, t, ctx = _step_inputs(c, side_px, side_px // 8, device)
        flops, attn_flops = unet_flops(c, side_px // 8)
        ref = None
        for name, model in models.items():
            dtype = _dtype(name)
            ctx_d, run_ours, run_theirs, label = _step_runners(model, theirs, name, x, t, ctx, device)
            times_o, times_t = [], []
            with torch.no_grad(), model.cached_context(ctx_d):
                for i in range(warmup + repeats):  # interleaved
                    a, dt_o = timed(run_ours, device)
                    b, dt_t = timed(run_theirs, device)
                    if i >= warmup:
                        times_o.append(dt_o)
                        times_t.append(dt_t)
            if dtype == torch.float32:
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
                "ldm_pct_of_peak": 100 * flops / to / peaks[name],
                "times_ldm": times_o,
                "times_diffusers": times_t,
            }
            rows.append(row)
            print(
                f"  unet {side_px}px {name:4}  ldm {to:7.3f} s  {label} {tt:7.3f} s  speedup {tt / to:5.2f}x  "
                f"rel diff {row['rel_diff_vs_diffusers']:.1e}  {row['ldm_pct_of_peak']:.0f}% of matmul peak",
                file=sys.stderr,
            )
    return rows


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


def _step_runners(model, theirs, name: str, x, t, ctx, device):
    """(context in the model's dtype, run ldm, run diffusers, baseline label) for one U-Net step."""
    import torch

    dtype = _dtype(name)
    ctx_d = ctx.to(dtype)
    reduced = dtype != torch.float32

    def run_ours():
        return model(x.to(dtype), t, ctx_d)

    def run_theirs():  # diffusers' weights stay float32; reduced precision through autocast
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=reduced):
            return theirs(x, t, encoder_hidden_states=ctx).sample

    return ctx_d, run_ours, run_theirs, f"diffusers {name} autocast" if reduced else "diffusers fp32"


def _step_inputs(config, side_px: int, seed: int, device):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, config.in_channels, side_px // 8, side_px // 8, generator=g).to(device)
    ctx = torch.randn(2, 77, config.context_dim, generator=g).to(device)
    return x, torch.full((2,), 500, device=device), ctx


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

    x, t, ctx = _step_inputs(models[next(iter(models))].config, side_px, 0, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    rows = []
    for name, model in models.items():
        ctx_d, run_ours, run_theirs, _ = _step_runners(model, theirs, name, x, t, ctx, device)
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
    if args.child == "ldm":
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

    result = {"ldm_fp32": summary("ldm", "fp32"), "diffusers_fp32": summary("diffusers", "fp32"), "runs": runs}
    result["speedup_fp32"] = result["diffusers_fp32"]["run_s"] / result["ldm_fp32"]["run_s"]
    a, b = images[("ldm", "fp32")], images[("diffusers", "fp32")]
    result["image_max_abs_ldm_vs_diffusers"] = float(np.abs(a - b).max())
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=command_name(), description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--only",
        nargs="+",
        choices=["unet", "profile", "parts", "e2e", "memory", "soak"],
        default=["unet", "profile", "parts", "e2e", "memory"],
        help="which benchmarks to run (soak only when named)",
    )
    p.add_argument("--weights", default=None, help="a diffusers folder (default: random SD1.5-size weights)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 768], help="image sides for the U-Net step")
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=DTYPE_NAMES,
        default=["fp32", "bf16"],
        help="U-Net precisions (fp32 is the reference; fp16 for GPUs)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed interleaved runs per case (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per case first")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of the end-to-end run")
    p.add_argument("--e2e-size", type=int, default=512, help="image side of the end-to-end run")
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
    args = p.parse_args(argv)

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
            "--weights out for random SD1.5-size weights",
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

    report: dict = {"machine": describe_machine(args.device), "settings": vars(args)}
    print(json.dumps(report["machine"]), file=sys.stderr)
    if "soak" in args.only:  # first: nothing else loaded in this process yet
        print(f"soak: {args.soak_n} generations of {args.soak_steps} DDIM steps in this process", file=sys.stderr)
        report["soak"] = bench_soak(args)
        if set(args.only) == {"soak"}:
            return _finish(args, report)
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


def _finish(args, report: dict) -> int:
    """Print and write the report; exit 1 when a soak did not hold its memory."""
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if "soak" in report and not report["soak"]["passed"] else 0


def format_report(r: dict) -> str:
    lines = [f"machine: {json.dumps(r['machine'])}"] + ([f"weights: {r['weights']}"] if "weights" in r else [])
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
            "U-Net step, batch 2 (classifier-free guidance), median of interleaved runs:",
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
            f"speedup fp32: {e['speedup_fp32']:.2f}x; image max |ldm - diffusers| fp32: "
            f"{e['image_max_abs_ldm_vs_diffusers']:.2e}; "
            + "; ".join(f"{k}: {v:.1f}" for k, v in e.items() if k.startswith("psnr"))
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
