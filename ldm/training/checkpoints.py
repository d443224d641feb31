"""Training checkpoints on disk: what makes one complete, which one to resume, what a killed run left behind.

A checkpoint is a folder `checkpoints/step-NNNNNNN/` written through a temporary sibling and renamed
(ldm.formats.atomic.atomic_dir). Inside it `manifest.json` is written last: the name, size and sha256 of
every other file. A folder whose manifest is present and whose files match it is complete; anything
else (truncated, corrupted, emptied, half removed) is not. Checkpoints written before manifests existed
are accepted when their files load.

Every problem is a `CheckpointError` of one line naming the file and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from ldm.formats.atomic import atomic_write, remove_stale_temporaries

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ldm-training-checkpoint"
TRAINER = "trainer.json"
WEIGHTS = "trainable.safetensors"
EMA = "ema.safetensors"
OPTIMIZER = "optimizer.pt"
_STEP = re.compile(r"step-(\d+)")


class CheckpointError(ValueError):
    """A checkpoint that is incomplete or damaged: the message names the file and what is wrong."""


# --------------------------------------------------------------------------- listing and retention


def step_of(folder: Path) -> int | None:
    m = _STEP.fullmatch(folder.name)
    return int(m.group(1)) if m else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The `checkpoints/step-N` folders of a run, oldest first (complete or not)."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(step_of(p), p) for p in folder.iterdir() if p.is_dir() and not p.is_symlink()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def apply_retention(output_dir: Path, newest: Path, keep: int) -> list[Path]:
    """Keep `newest` (the checkpoint just written) and the keep - 1 before it; keep 0: keep all.

    Checkpoints of later steps (left by a run resumed from an earlier one) are not counted or removed:
    this run replaces them when it reaches their step. Returns what was removed."""
    if keep < 1:
        return []
    step = step_of(newest)
    assert step is not None
    older = [p for p in list_checkpoints(output_dir) if p != newest and (step_of(p) or 0) < step]
    removed = older[: max(0, len(older) - (keep - 1))]
    for old in removed:
        shutil.rmtree(old, ignore_errors=True)  # a kill here leaves part of an old one: removed at the next save
    return removed


# --------------------------------------------------------------------------- manifest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, step: int) -> Path:
    """Written last into a checkpoint's (temporary) folder: the files it must hold, their sizes and hashes."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "step": step, "files": files}
    return atomic_write(folder / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n"))


def verify_manifest(folder: Path) -> bool:
    """Check the files of `folder` against its manifest. False: no manifest (a checkpoint of an older
    release, valid if its files load). Raises CheckpointError naming the first file that differs."""
    path = folder / MANIFEST
    if not path.is_file():
        return False
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({_one_line(e)}): the checkpoint is damaged") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint manifest (no file list): the checkpoint is damaged")
    for name, entry in files.items():
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"{path}: lists {name!r}, which is not a file name of the folder")
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or "sha256" not in entry:
            raise CheckpointError(f"{path}: the entry of {name} has no size and sha256")
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {MANIFEST}): the checkpoint is incomplete")
        size = file.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(
                f"{file}: {size:,} bytes, {MANIFEST} says {entry['size']:,}: "
                f"{'truncated' if size < entry['size'] else 'overwritten'}"
            )
        if sha256_file(file) != entry["sha256"]:
            raise CheckpointError(f"{file}: contents differ from its sha256 in {MANIFEST}: corrupted")
    return True


# --------------------------------------------------------------------------- reading


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def read_trainer_state(folder: Path) -> dict:
    """trainer.json: {"step", "config", "data_position"}; CheckpointError if missing or malformed."""
    path = folder / TRAINER
    if not path.is_file():
        raise CheckpointError(f"{path}: missing: not a complete checkpoint")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({_one_line(e)}): the trainer state is damaged") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: not a trainer state (a JSON object with step and config)")
    step, config = meta.get("step"), meta.get("config")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: 'step' is {step!r}, not a step number: the trainer state is damaged")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: no 'config' (the run's settings): the trainer state is damaged")
    return meta


def read_tensors(path: Path) -> dict:
    """The tensors of a checkpoint's safetensors file (CheckpointError when it does not load)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: missing: not a complete checkpoint")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ... : any failure is a damaged file
        raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(e)}): damaged") from None


def read_training_state(path: Path, mmap: bool = False) -> dict:
    """optimizer.pt: optimizer, LR scheduler, EMA count and RNG states, read without running code."""
    import pickle

    import torch

    if not path.is_file():
        raise CheckpointError(f"{path}: missing: not a complete checkpoint")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        asked = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"asks for {asked.group(1)}" if asked else "holds more than tensors and plain containers"
        raise CheckpointError(f"{path}: refused: the file {what}; ldm never runs code from a checkpoint") from None
    except Exception as e:  # noqa: BLE001 - RuntimeError (zip), EOFError, ...: any failure is a damaged file
        raise CheckpointError(f"{path}: not a readable torch file ({_one_line(e)}): damaged") from None
    missing = [k for k in ("optimizer", "lr_scheduler", "rng") if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: no '{missing[0]}' state: not a training state of ldm")
    return state


def check_checkpoint(folder: Path) -> dict:
    """A checkpoint folder that is complete and valid: its trainer state. CheckpointError otherwise.

    With a manifest, the sizes and hashes prove every file is as written; without one (older releases)
    every file is loaded once to see that it can be."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if not any(folder.iterdir()):
        raise CheckpointError(f"{folder}: empty folder: a checkpoint that was never written")
    has_manifest = verify_manifest(folder)
    meta = read_trainer_state(folder)
    if not has_manifest:
        from safetensors import safe_open

        names = [WEIGHTS] + ([EMA] if meta["config"].get("ema_decay") else [])
        for name in names:
            path = folder / name
            if not path.is_file():
                raise CheckpointError(f"{path}: missing: not a complete checkpoint")
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for key in f.keys():
                        f.get_tensor(key)
            except Exception as e:  # noqa: BLE001 - any failure is a damaged file
                raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(e)}): damaged") from None
        read_training_state(folder / OPTIMIZER, mmap=True)
    return meta


def find_resume(
    resume: str | None, output_dir: Path, check_config: Callable[[Path, dict], None], warn: Callable[[str], None]
) -> Path | None:
    """The checkpoint to resume from. "latest": the newest complete, valid one (each newer one skipped is
    named through `warn`), None when there is none; a path: that checkpoint, or CheckpointError.
    `check_config(folder, trainer_state)` raises ValueError when the run's settings forbid resuming it."""
    if not resume:
        return None
    if resume != "latest":
        folder = Path(resume)
        check_config(folder, check_checkpoint(folder))
        return folder
    found = list_checkpoints(output_dir)
    for folder in reversed(found):
        try:
            meta = check_checkpoint(folder)
        except CheckpointError as e:
            warn(f"skipping checkpoint {folder.name}: {e}")
            continue
        check_config(folder, meta)
        return folder
    if found:
        warn(f"no complete checkpoint in {Path(output_dir) / 'checkpoints'}: starting at step 0")
    return None


# --------------------------------------------------------------------------- what killed runs leave


# Temporaries of the release before process ids were part of temporary names (mkdtemp/mkstemp: 8 characters)
_LEGACY = {
    "checkpoints": re.compile(r"\.step-\d+\.[a-z0-9_]{8}"),  # atomic_dir of a checkpoint
    "": re.compile(r"\.(model|lora|vae)\.safetensors\.[a-z0-9_]{8}\.tmp|\.diffusers\.[a-z0-9_]{8}|loss\.tmp\.png"),
    "validation": re.compile(r"\.step-\d+\.png\.tmp"),
}


def remove_leftovers(output_dir: Path) -> list[Path]:
    """Remove the temporary files and folders that killed runs left in a run's folders (ldm's own
    temporary names only, never another file); returns what was removed."""
    output_dir = Path(output_dir)
    removed: list[Path] = []
    for sub, legacy in _LEGACY.items():
        folder = output_dir / sub if sub else output_dir
        if not folder.is_dir():
            continue
        removed += remove_stale_temporaries(folder)
        for entry in folder.iterdir():
            if legacy.fullmatch(entry.name) is None:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
