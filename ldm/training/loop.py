"""The training loop: fine-tune (full or LoRA), train from scratch, or train the VAE.

One loop for every mode, run under HF `accelerate` (one process, or DDP across processes
and machines through `accelerate launch`; no home-made process groups). Everything random
in a step is drawn from a generator seeded by (seed, step, micro-step) for the *global*
batch, and each process takes its contiguous slice: a run is reproducible, resumable
exactly, and N processes follow the same trajectory as one process with the same global
batch (up to the order of float reductions).

The run's settings are `TrainConfig` (ldm.training.config, importable from here too); what each
mode trains and on which batches is built by ldm.training.setup; the losses are in ldm.training.losses.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import cast

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.formats.atomic import atomic_dir, atomic_write
from ldm.formats.checkpoint import save_safetensors
from ldm.training import setup
from ldm.training.checkpoints import (
    EMA as EMA_FILE,
)
from ldm.training.checkpoints import (
    OPTIMIZER,
    TRAINER,
    WEIGHTS,
    CheckpointError,
    apply_retention,
    find_resume,
    read_tensors,
    read_trainer_state,
    read_training_state,
    remove_leftovers,
    write_manifest,
)
from ldm.training.config import RESUME_MUST_MATCH, TrainConfig
from ldm.training.ema import EMA

# --------------------------------------------------------------------------- randomness


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """The generator of one micro-step: depends only on (seed, step, micro), not on processes or history."""
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + step) * 1_009 + micro)


def local_slice(batch_size: int, rank: int, world: int) -> slice:
    per = batch_size // world
    return slice(rank * per, (rank + 1) * per)


# --------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    """Global RNG states, in types torch.load(weights_only=True) accepts. The loop draws nothing
    from them (every draw is seeded by step), but user code and libraries might."""
    name, keys, pos, has_gauss, gauss = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    version, internal, gauss_next = random.getstate()
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }


def _set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Builds the models, data and optimizer for a TrainConfig and runs the loop."""

    def __init__(self, config: TrainConfig, accelerator=None):
        from accelerate import Accelerator

        self.cfg = c = config
        if accelerator is None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # accelerate keeps one process-wide state: a second run in the same process (a notebook,
            # the tests) with another precision would be refused. Single process: start afresh.
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
        self.acc = accelerator or Accelerator(mixed_precision=c.mixed_precision)
        self.out = Path(c.output_dir)
        world = self.acc.num_processes
        if c.batch_size % world:
            raise ValueError(f"batch_size {c.batch_size} must be divisible by the {world} processes")
        main = self.acc.is_main_process
        if main:  # what runs killed before their final rename left behind (ldm's own temporary names only)
            for path in remove_leftovers(self.out):
                self._say(f"removed {path}: a temporary that an interrupted run left behind")
        # the checkpoint to resume, checked (manifest, hashes, settings) before any model is loaded
        self.resume_from = find_resume(c.resume, self.out, self._check_config, self._say)
        if main and self.resume_from is not None:  # what a run killed while removing old checkpoints left
            apply_retention(self.out, self.resume_from, c.keep_checkpoints)
        dataset = setup.load_dataset(c, main=main)
        setup.check_dataset_size(dataset, c.batch_size)
        self.models = setup.build_models(c, dataset)
        setup.check_against_models(c, self.models)
        # the frozen modules (VAE, text encoder) sit where the batches go, as the prepared module will
        self.models.to(self.acc.device)
        self.data = setup.build_data(c, self.models, dataset, main=main)
        self.trainable = self.models.trainable_named_parameters()
        if not self.trainable:
            raise ValueError("nothing to train: no parameter requires a gradient")
        self.optimizer = self._optimizer(self._param_groups())
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            c.lr_scheduler, self.optimizer, num_warmup_steps=c.warmup_steps, num_training_steps=c.max_steps
        )
        self.ema = EMA(self.trainable, c.ema_decay) if c.ema_decay else None
        self.step = 0
        self.module = self.models.trained_module()
        self.wrapped, self.optimizer = self.acc.prepare(self.module, self.optimizer)

    def _say(self, message: str) -> None:
        if self.acc.is_main_process:
            print(message, file=sys.stderr, flush=True)

    def _param_groups(self) -> list[dict]:
        """One group, or two when the text encoder trains at its own --text-encoder-lr (the scheduler
        scales each group's peak alike)."""
        c = self.cfg
        te = {k: p for k, p in self.trainable.items() if k.startswith("text_encoder.")}
        if c.text_encoder_lr is None or not te:
            return [{"params": list(self.trainable.values())}]
        rest = [p for k, p in self.trainable.items() if k not in te]
        return [{"params": rest}, {"params": list(te.values()), "lr": c.text_encoder_lr}]

    def _optimizer(self, params):
        c = self.cfg
        kwargs = dict(lr=c.lr, betas=(c.adam_beta1, c.adam_beta2), weight_decay=c.weight_decay, eps=c.adam_eps)
        if c.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb

                return bnb.optim.AdamW8bit(params, **kwargs)
            except Exception as e:  # noqa: BLE001 - any import/runtime failure of bnb
                raise ValueError(
                    f"--optimizer adamw8bit needs a working bitsandbytes ({type(e).__name__}: {e}); "
                    "install it for your GPU or use --optimizer adamw"
                ) from None
        return torch.optim.AdamW(params, **kwargs)

    # ---------------------------------------------------------------- checkpointing

    def save_checkpoint(self) -> Path | None:
        """checkpoints/step-N/: written in a temporary folder, its manifest last, then renamed; then the
        oldest beyond --keep-checkpoints are removed (never the one just written)."""
        if not self.acc.is_main_process:
            return None
        final = self.out / "checkpoints" / f"step-{self.step:07d}"

        def write(tmp: Path):
            save_safetensors({k: p.detach() for k, p in self.trainable.items()}, tmp / WEIGHTS)
            if self.ema is not None:
                save_safetensors(self.ema.shadow, tmp / EMA_FILE)
            state = {
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "ema_num_updates": self.ema.num_updates if self.ema else 0,
                "rng": _rng_state(),
            }
            atomic_write(tmp / OPTIMIZER, lambda t: torch.save(state, t))
            epoch, batch = divmod(self.step * self.cfg.grad_accum, self.data.batches_per_epoch)
            trainer = {
                "step": self.step,
                "data_position": {"epoch": epoch, "batch_in_epoch": batch},
                "config": self.cfg.to_dict(),
            }
            atomic_write(tmp / TRAINER, lambda t: Path(t).write_text(json.dumps(trainer, indent=2) + "\n"))
            write_manifest(tmp, self.step)  # last: its presence marks the checkpoint complete

        atomic_dir(final, write, replace_existing=True)
        apply_retention(self.out, final, self.cfg.keep_checkpoints)
        return final

    def _check_config(self, folder: Path, meta: dict) -> None:
        """ValueError when the settings of the checkpoint's run differ from this one's where they must match."""
        saved = meta["config"]
        # a setting added after the checkpoint was written had its default then
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        for name in RESUME_MUST_MATCH:
            if saved.get(name, defaults[name]) != getattr(self.cfg, name):
                raise ValueError(
                    f"cannot resume from {folder}: {name} was {saved.get(name, defaults[name])!r}, now "
                    f"{getattr(self.cfg, name)!r}; use the same setting or a new --output-dir"
                )

    def load_checkpoint(self, folder: Path) -> None:
        """Continue from a checkpoint folder (checked first: see ldm.training.checkpoints)."""
        folder = Path(folder)
        meta = read_trainer_state(folder)
        self._check_config(folder, meta)
        weights = read_tensors(folder / WEIGHTS)
        self._check_tensors(folder / WEIGHTS, weights)
        ema = None
        if self.ema is not None:
            ema = read_tensors(folder / EMA_FILE)
            self._check_tensors(folder / EMA_FILE, ema)
        path = folder / OPTIMIZER
        state = read_training_state(path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            _set_rng_state(state["rng"])
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"{path}: does not fit this run ({type(e).__name__}: {e}): damaged") from None
        with torch.no_grad():
            for k, p in self.trainable.items():
                p.copy_(weights[k])
        if self.ema is not None and ema is not None:
            self.ema.shadow = {k: v.float().to(self.trainable[k].device) for k, v in ema.items()}
            self.ema.num_updates = int(state.get("ema_num_updates", 0))
        self.step = meta["step"]

    def _check_tensors(self, path: Path, tensors: dict) -> None:
        if tensors.keys() != self.trainable.keys():
            differs = sorted(set(self.trainable) ^ set(tensors))[0]
            raise ValueError(f"cannot resume from {path}: tensor '{differs}' differs from this run's model")
        for k, p in self.trainable.items():
            if tuple(tensors[k].shape) != tuple(p.shape):
                raise ValueError(
                    f"cannot resume from {path}: tensor '{k}' is {tuple(tensors[k].shape)}, this run's {tuple(p.shape)}"
                )

    # ---------------------------------------------------------------- the loop

    def train(self, on_step: Callable[[int], None] | None = None) -> dict:
        c, acc = self.cfg, self.acc
        resume = self.resume_from
        if resume is not None:
            self.load_checkpoint(resume)
            if acc.is_main_process:
                print(f"resumed from {resume} at step {self.step}")
        if acc.is_main_process:
            config_text = json.dumps(c.to_dict(), indent=2) + "\n"
            atomic_write(self.out / "config.json", lambda tmp: Path(tmp).write_text(config_text))
        log = LossLog(self.out / "loss.csv", resumed_step=self.step) if acc.is_main_process else None
        sl = local_slice(c.batch_size, acc.process_index, acc.num_processes)
        batches = self.data.batches(self.step * c.grad_accum, sl)
        bar = tqdm(
            total=c.max_steps,
            initial=self.step,
            disable=not acc.is_main_process,
            desc=f"train {c.mode}",
            unit="step",
            dynamic_ncols=True,
        )
        t_start, samples = time.perf_counter(), 0
        self.wrapped.train()
        end = min(c.max_steps, c.stop_at) if c.stop_at else c.max_steps
        while self.step < end:
            total = torch.zeros((), device=acc.device)  # the mean loss of this step
            for micro in range(c.grad_accum):
                batch = next(batches)
                g = step_generator(c.seed, self.step, micro)
                sync = micro == c.grad_accum - 1
                ctx = acc.no_sync(self.wrapped) if not sync and acc.num_processes > 1 else nullcontext()
                with ctx, acc.autocast():
                    loss = self.models.loss(self.wrapped, batch, g, sl, c)
                    acc.backward(loss / c.grad_accum)
                total += loss.detach().float() / c.grad_accum
            if c.max_grad_norm > 0:
                acc.clip_grad_norm_(list(self.trainable.values()), c.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.trainable)
            self.step += 1
            samples += c.batch_size * c.grad_accum
            step_loss = acc.gather(total.reshape(1)).mean().item()  # mean over the global batch
            if acc.is_main_process:
                rate = samples / (time.perf_counter() - t_start)
                bar.set_postfix(loss=f"{step_loss:.4f}", samples_s=f"{rate:.2f}")
                bar.update(1)
                if log is not None and (self.step % c.log_every == 0 or self.step == c.max_steps):
                    log.write(self.step, step_loss, float(self.lr_scheduler.get_last_lr()[0]), rate)
            if self.step % c.save_every == 0 or self.step == end:
                acc.wait_for_everyone()
                self.save_checkpoint()
            if c.validate_every and self.step % c.validate_every == 0 and self.step < c.max_steps:
                self.validate()
            if on_step is not None:
                on_step(self.step)
        bar.close()
        acc.wait_for_everyone()
        result = {"step": self.step, "processes": acc.num_processes}
        if log is not None:  # the main process
            log.close()
            result["loss_plot"] = str(plot_losses(self.out / "loss.csv", self.out / "loss.png"))
            result.update(self.export())
            result["validation"] = self.validate()
        return result

    # ---------------------------------------------------------------- outputs

    def _with_ema(self, fn):
        backup = self.ema.copy_to(self.trainable) if self.ema is not None else None
        try:
            return fn()
        finally:
            if backup is not None:
                self.ema.restore(self.trainable, backup)

    def export(self) -> dict:
        """The final model (EMA weights when EMA is on) in the formats users load."""
        return self._with_ema(lambda: self.models.export(self.out, self.cfg))

    def validate(self) -> str | None:
        if not self.acc.is_main_process:
            return None
        path = self.out / "validation" / f"step-{self.step:07d}.png"
        return self._with_ema(lambda: self.models.validate(path, self.cfg))


class LossLog:
    """CSV of step, loss, lr, samples/s, wall time (appended to on resume)."""

    HEADER = ["step", "loss", "lr", "samples_per_s", "time"]

    def __init__(self, path: Path, resumed_step: int = 0):
        kept = []
        if resumed_step and path.exists():  # rows past the checkpoint we resume from will be redone
            with open(path, newline="") as f:
                kept = [r for r in csv.reader(f) if (_logged_step(r) or 0) <= resumed_step and _logged_step(r)]

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(self.HEADER)
                w.writerows(kept)

        atomic_write(path, write)  # a kill now keeps the old log whole
        self.f = open(path, "a", newline="")
        self.w = csv.writer(self.f)
        self.t0 = time.time()

    def write(self, step: int, loss: float, lr: float, rate: float) -> None:
        self.w.writerow([step, f"{loss:.6f}", f"{lr:.3e}", f"{rate:.3f}", f"{time.time():.1f}"])
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _logged_step(row: list[str]) -> int | None:
    """The step of a loss.csv row; None for the header and for a row a killed run left unfinished."""
    if len(row) != len(LossLog.HEADER) or not row[0].isdigit():
        return None
    return int(row[0])


def read_losses(path: Path) -> tuple[list[int], list[float]]:
    by_step = {}
    with open(path, newline="") as f:
        for row in csv.reader(f):
            step = _logged_step(row)
            if step is not None:
                by_step[step] = float(row[1])  # a resumed run rewrites steps: keep the last
    steps = sorted(by_step)
    return steps, [by_step[k] for k in steps]


def plot_losses(csv_path: Path, png_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = read_losses(csv_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    if len(losses) >= 10:
        k = max(5, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return png_path


def train(config: TrainConfig, on_step: Callable[[int], None] | None = None) -> dict:
    """Run a whole training (or resume one); returns the final step and the written files."""
    return Trainer(config).train(on_step)
