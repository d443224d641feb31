#!/usr/bin/env python
"""Generate images from a text prompt; each PNG carries its generation parameters.

    python scripts/txt2img.py --prompt "a red circle at the top left"          # embedded demo model
    python scripts/txt2img.py --weights weights/v1-5-pruned-emaonly.safetensors \\
        --prompt "a photo of a cat" --negative-prompt "blurry" --seed 1234 --n 4

Images go to --out as 00000-1234.png, 00001-1235.png, ... (index, then the image's own seed:
image i of a run uses seed+i and can be regenerated alone with that seed); an existing file is
never overwritten. The `parameters` text chunk is in AUTOMATIC1111's format.
"""

import argparse
import math
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli import HelpFormatter  # noqa: E402
from ldm.images import check_output_folder  # noqa: E402  (light: no torch)

DEVICES = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DTYPES = ("auto", "float32", "float16", "bfloat16")


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _sampler_names() -> list[str]:
    from ldm.samplers import SAMPLERS

    return sorted(SAMPLERS)


def _device_problem(name: str) -> str | None:
    import torch

    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            return f"--device {name}: CUDA is not available on this machine; use --device auto or cpu"
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            return f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here"
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return "--device mps: Apple MPS is not available on this machine; use --device auto or cpu"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from")
    p.add_argument("--weights", default=None,
                   help="single-file checkpoint (.safetensors/.ckpt) or diffusers folder (default: embedded demo model)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (<= 1: none) "
                   "(default: the model's recommended value: 7.5, unless its file stores one, as the demo model does)")
    p.add_argument("--seed", type=int, default=None, help="seed of image 0; image i uses seed+i (default: random, printed)")
    p.add_argument("--height", type=int, default=None, help="image height, a multiple of 8 (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width, a multiple of 8 (default: the model's)")
    p.add_argument("--n", type=int, default=1, help="number of images")
    p.add_argument("--batch-size", type=int, default=1, help="images generated together (same seeds either way)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like noise")
    p.add_argument("--sampler", choices=_sampler_names(), default="ddim", help="sampling algorithm")
    p.add_argument("--clip-skip", type=int, default=1, help="text encoder layer from the end (2 = web UIs' 'clip skip 2')")
    p.add_argument("--prediction-type", choices=["auto", "epsilon", "v_prediction"], default="auto",
                   help="what the U-Net predicts (auto: folder config / file metadata; SD2 single files: v_prediction)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE",
                   help="LoRA file to apply to the U-Net (kohya/diffusers layouts; repeatable)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of the LoRA(s)")
    p.add_argument("--attention-chunk", type=int, default=0, metavar="N",
                   help="attention on at most N queries at a time: bounded memory for large images where "
                   "attention has no memory-efficient kernel (e.g. Apple MPS); same images; 0 = off")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the U-Net: the first image pays the compilation (about a minute for the "
                   "demo model on 2 CPU cores, minutes for SD1.5), later steps run faster; needs a C++ compiler")
    p.add_argument("--out", default="outputs", help="output folder (created if needed; files are never overwritten)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="U-Net/text encoder dtype (auto: float16 on CUDA, "
                   "else float32; the VAE always runs in float32)")
    args = p.parse_args(argv)

    # Validate everything before loading or generating anything.
    seed_random = args.seed is None or args.seed == -1
    problems = [
        (args.height is not None and (args.height < 8 or args.height % 8),
         f"--height {args.height} must be a positive multiple of 8"),
        (args.width is not None and (args.width < 8 or args.width % 8),
         f"--width {args.width} must be a positive multiple of 8"),
        (args.steps < 1, f"--steps {args.steps} must be >= 1"),
        (args.guidance is not None and (not args.guidance >= 0 or math.isinf(args.guidance)),
         f"--guidance {args.guidance} must be >= 0"),
        (not args.eta >= 0 or math.isinf(args.eta), f"--eta {args.eta} must be >= 0"),
        (args.n < 1, f"--n {args.n} must be >= 1"),
        (args.eta != 0 and args.sampler != "ddim",
         f"--eta {args.eta} applies to --sampler ddim only; drop --eta or use --sampler ddim"),
        (args.batch_size < 1, f"--batch-size {args.batch_size} must be >= 1"),
        (args.attention_chunk < 0, f"--attention-chunk {args.attention_chunk} must be >= 0 (0 = off)"),
        (args.clip_skip < 1, f"--clip-skip {args.clip_skip} must be >= 1 (1 = the text encoder's last layer)"),
        (not seed_random and not 0 <= args.seed <= 2**64 - args.n,
         f"--seed {args.seed} must be in 0 .. 2**64-1 for every image (seed + i), or -1 for random"),
        (not DEVICES.fullmatch(args.device), f"--device {args.device}: use auto, cpu, cuda, cuda:N or mps"),
        (args.weights is not None and not Path(args.weights).exists(),
         f"--weights {args.weights}: not found; pass a local .safetensors/.ckpt checkpoint or diffusers folder "
         "(ldm never downloads: a model hub id must be fetched first)"),
        *[(not Path(f).is_file(), f"--lora {f}: not found; pass a LoRA .safetensors file") for f in args.lora],
    ]
    for bad, message in problems:
        if bad:
            return _error(message)
    try:
        out = check_output_folder(args.out)
    except ValueError as e:
        return _error(f"--out: {e}")
    if message := _device_problem(args.device):
        return _error(message)

    from ldm.images import file_sha256, model_display_name, save_generated
    from ldm.pipeline import Pipeline

    try:
        pipe = Pipeline.from_pretrained(args.weights, device=args.device, dtype=args.dtype,
                                        prediction_type=None if args.prediction_type == "auto" else args.prediction_type)
    except (ValueError, FileNotFoundError) as e:
        return _error(str(e))
    if args.attention_chunk:
        pipe.unet.set_attention_slicing(args.attention_chunk)
    if args.compile:
        try:
            pipe.compile()
        except RuntimeError as e:
            return _error(str(e))
    loras = {}
    if args.lora:
        from ldm.training.lora import load_lora

        for f in args.lora:
            try:
                load_lora(pipe.unet, f, scale=args.lora_scale, merge=True)  # merged: no per-step cost
            except (ValueError, FileNotFoundError) as e:
                return _error(str(e))
            loras[model_display_name(f)] = file_sha256(f)[:12]
    height, width = args.height or pipe.default_size[0], args.width or pipe.default_size[1]
    guidance = pipe.default_guidance if args.guidance is None else args.guidance
    seed = random.SystemRandom().randrange(2**32) if seed_random else args.seed
    if seed_random:
        print(f"seed: {seed}", file=sys.stderr)
    model_path = pipe.model_path
    model_hash = file_sha256(model_path) if model_path is not None else None
    model_name = model_display_name(model_path) if model_path is not None else pipe.model_name

    for start in range(0, args.n, args.batch_size):
        count = min(args.batch_size, args.n - start)
        try:
            images = pipe(args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                          guidance_scale=guidance, eta=args.eta, seed=seed + start, height=height, width=width,
                          num_images=count, output_type="pil", sampler=args.sampler, clip_skip=args.clip_skip,
                          progress=True)
        except ValueError as e:
            return _error(str(e))
        for i, image in enumerate(images):
            path = save_generated(
                image, out, prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                sampler=args.sampler, guidance=guidance, seed=seed + start + i, width=width, height=height,
                model_hash=model_hash, model_name=model_name, eta=args.eta, clip_skip=args.clip_skip,
                settings={"prediction_type": pipe.schedule.prediction_type, "device": str(pipe.device),
                          "dtype": str(pipe.dtype).removeprefix("torch."), "lora_scale": args.lora_scale},
                loras=loras,
            )
            print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
