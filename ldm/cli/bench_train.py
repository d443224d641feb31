#!/usr/bin/env python
"""Training speed on this machine: samples/s of a small model, with and without latent caching.

Builds a small random SD-like pipeline (U-Net 64 wide, VAE f=8, 2-layer text encoder) and a
folder of generated captioned images, then times fine-tuning steps (first steps excluded).

    python scripts/bench_train.py --steps 20 --resolution 128
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path


def small_pipeline(folder: Path, resolution: int):
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.models.clip import load_tokenizer
    from ldm.models.unet import UNet, UNetConfig
    from ldm.models.vae import VAE
    from ldm.pipelines.pipeline import Pipeline
    from ldm.sampling.schedule import NoiseSchedule
    from ldm.training.setup import DEFAULT_SCRATCH_TEXT

    torch.manual_seed(0)
    unet = UNet(
        UNetConfig(model_channels=64, channel_mult=(1, 2, 2), attention_levels=(1, 2), num_heads=4, context_dim=128)
    )
    vae = VAE(
        AutoencoderKL(
            block_out_channels=(32, 64, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            sample_size=resolution,
        )
    )
    te = CLIPTextModel(CLIPTextConfig(**DEFAULT_SCRATCH_TEXT))  # 128 wide, 2 layers
    pipe = Pipeline(unet, vae, te, load_tokenizer(), NoiseSchedule(), (resolution, resolution))
    return pipe.save_diffusers(folder)


def image_folder(folder: Path, n: int, resolution: int):
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        a = np.full((resolution, resolution, 3), 240, np.uint8)
        x, y = rng.integers(0, resolution // 2, 2)
        a[y : y + resolution // 3, x : x + resolution // 3] = rng.integers(0, 255, 3)
        Image.fromarray(a).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a block of color {i}")


def main(argv=None) -> int:
    from ldm.cli import HelpFormatter, command_name

    p = argparse.ArgumentParser(prog=command_name(), description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per setting")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    p.add_argument("--batch-size", type=int, default=8, help="batch size")
    p.add_argument("--resolution", type=int, default=128, help="image side")
    p.add_argument("--images", type=int, default=32, help="images in the generated dataset")
    args = p.parse_args(argv)
    if args.resolution % 8 or args.steps < 1 or args.batch_size < 1:
        p.error("--resolution must be a multiple of 8, --steps and --batch-size >= 1")

    import torch

    from ldm.training.loop import TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        base = small_pipeline(tmp / "base", args.resolution)
        image_folder(tmp / "data", args.images, args.resolution)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch_size}, "
            f"{args.resolution}px"
        )
        for cache in (False, True):
            times: list[float] = []
            cfg = TrainConfig(
                data=str(tmp / "data"),
                output_dir=str(tmp / f"run{cache}"),
                mode="full",
                base=str(base),
                resolution=args.resolution,
                batch_size=args.batch_size,
                max_steps=args.steps + args.warmup,
                cache=cache,
                save_every=10**9,
                lr=1e-4,
            )
            trainer = Trainer(cfg)
            if not cache:
                print(f"  U-Net {sum(p.numel() for p in trainer.models.unet.parameters()) / 1e6:.1f}M parameters")
            last = [time.perf_counter()]

            def on_step(step, times=times, last=last, max_steps=cfg.max_steps):
                now = time.perf_counter()
                if args.warmup < step < max_steps:  # the last step also writes a checkpoint
                    times.append(now - last[0])
                last[0] = now

            trainer.train(on_step=on_step)
            rate = args.batch_size * len(times) / sum(times)
            print(f"  cache={'on ' if cache else 'off'}  {rate:7.2f} samples/s  ({sum(times) / len(times):.3f} s/step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
