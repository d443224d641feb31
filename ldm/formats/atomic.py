"""Writing files and folders so that no reader ever sees half of one.

Everything is written to a temporary sibling (same folder, so the same file system), flushed, then
renamed into place: a crash or an error leaves the old file (or nothing) and no temporary behind.
Models, configs, training checkpoints, diffusers folders and PNGs all go through here.

A temporary's name carries the writing process's id (`.NAME.ldm-tmp-PID-XXXX`): a run killed before its
final rename leaves one behind, and `remove_stale_temporaries` (called when a command starts writing into a
folder) removes those whose process is gone, never another live writer's, never a file ldm did not name.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

_TAG = "ldm-tmp"
_STALE = re.compile(rf"\.(?P<name>.+)\.{_TAG}-(?P<pid>\d+)-[^/]*")


def _prefix(name: str) -> str:
    return f".{name}.{_TAG}-{os.getpid()}-"


def new_file_mode(directory: bool = False) -> int:
    """The mode a new file (0o666) or folder (0o777) gets, less the umask. mkstemp's temporary files are
    0o600 and mkdtemp's folders 0o700, which the final rename would keep: outputs only their owner reads."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], *, overwrite: bool = True) -> Path:
    """`write(tmp)` writes a temporary file beside `path`, which is then flushed to disk and put at `path`.

    overwrite=True: renamed over whatever is at `path`. overwrite=False: FileExistsError if `path`
    exists, checked before writing and again, atomically, when the file is put there (a hard link,
    which refuses an existing name even when another process creates it meanwhile).
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path}: already exists; not overwriting it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_prefix(path.name), suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())
        if overwrite:
            os.replace(tmp, path)
        else:
            _claim(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _claim(tmp: str, path: Path) -> None:
    """Put the finished file `tmp` at `path`, which must not exist."""
    try:
        os.link(tmp, path)  # atomic, and refuses an existing destination
    except FileExistsError:
        raise FileExistsError(f"{path}: already exists; not overwriting it") from None
    except OSError:
        # A file system without hard links (FAT, some network shares): claim the name
        # exclusively, then move the finished file over our own empty placeholder.
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        os.replace(tmp, path)


def atomic_dir(final: str | os.PathLike, write: Callable[[Path], object], replace_existing: bool = False) -> Path:
    """Write a folder through a temporary sibling (`write(tmp)`), then rename: never a half-written folder.
    replace_existing: remove a folder already at `final` first (otherwise the rename fails on one)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=_prefix(final.name)))
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode(directory=True))
        if replace_existing and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed ldm runs left in `folder` (files and folders named by atomic_write /
    atomic_dir whose process no longer runs); returns what was removed. Anything else is left alone."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _STALE.fullmatch(entry.name)
        if m is None or _alive(int(m.group("pid"))):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:  # another process cleaned it meanwhile
            continue
        removed.append(entry)
    return removed
