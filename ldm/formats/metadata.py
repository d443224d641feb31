"""What ldm stores in the metadata of the safetensors files it writes, by name, and how it reads it back;
and the checks every reader of a downloaded file goes through first.

safetensors metadata is a str -> str map. ldm's entries hold JSON; a file without them (any file
ldm did not write) still loads, from its tensor shapes and the Stable Diffusion defaults.

Downloaded files are hostile until checked (checkpoints, LoRAs, PNGs):
* `open_regular` opens regular files only: a FIFO, a device (`/dev/zero`), a folder or a socket is a
  one-line ValueError, never a hang or a read until memory runs out (the check is made on the opened
  descriptor, so a file swapped for a FIFO meanwhile cannot hang it either);
* `safetensors_header` reads and checks a safetensors header against the file's size before any tensor
  is read: its length, every dtype, shape and offset (a claim the file cannot back is refused);
* `Fields` checks the JSON records ldm stores (configs, the pipeline record) as flags are checked:
  types, finite numbers and ranges, with errors naming the file, the key and the value.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

# --------------------------------------------------------------------------- keys of a file's metadata

UNET_CONFIG_KEY = "ldm_unet_config"  # UNetConfig.to_dict()
VAE_CONFIG_KEY = "ldm_vae_config"  # the AutoencoderKL config (norm groups, scaling factor: not in shapes)
PIPELINE_KEY = "ldm_pipeline"  # a whole pipeline's settings: the fields below
LORA_KEY = "ldm_lora"  # a LoRA file's own record (ldm.models.lora)
DEMO_SOURCE_KEY = "ldm_demo_source"  # what the packaged demo model was made from (ldm.cli.package_demo)

# Metadata transformers and diffusers write into their own safetensors files; transformers 4.x refuses
# a file without it ("format" must name a framework).
HF_FORMAT = {"format": "pt"}

# --------------------------------------------------------------------------- fields of PIPELINE_KEY's record

PREDICTION_TYPE = "prediction_type"  # "epsilon" | "v_prediction"
SCHEDULER = "scheduler"  # the DDIMScheduler config (NoiseSchedule.to_diffusers_config())
SAMPLE_SIZE = "sample_size"  # default image side in pixels
GUIDANCE_SCALE = "guidance_scale"  # the model's recommended guidance scale
# layout of the text-encoder tensors: "sd1" (CLIP) | "sd2" (OpenCLIP) | "sdxl" (CLIP-L + bigG) | "sdxl_refiner"
TEXT_KIND = "text_kind"
TEXT_ENCODER_CONFIG = "text_encoder_config"  # CLIPTextConfig.to_dict()
TEXT_ENCODER_2_CONFIG = "text_encoder_2_config"  # SDXL's second (bigG) text encoder's CLIPTextConfig
PAD_TOKEN = "pad_token"  # the tokenizer's padding token ("!" for SD2)
ZERO_EMPTY_NEGATIVE = "zero_empty_negative"  # SDXL: an empty negative prompt is a zero conditioning

# --------------------------------------------------------------------------- opening downloaded files

# safetensors' own cap on a header (its N_MAX): SD checkpoints have ~100 KB headers
MAX_HEADER_BYTES = 100_000_000
# bits per element of each safetensors dtype that torch reads
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2": 8,
    "F8_E5M2FNUZ": 8,
    "U16": 16,
    "I16": 16,
    "F16": 16,
    "BF16": 16,
    "U32": 32,
    "I32": 32,
    "F32": 32,
    "U64": 64,
    "I64": 64,
    "F64": 64,
    "C64": 64,
}


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "something else"


def _refuse(path: str | os.PathLike, mode: int) -> ValueError:
    return ValueError(f"{path}: not a regular file but {_kind(mode)}; pass the path of a model or image file")


def check_regular(path: str | os.PathLike) -> int:
    """The size of `path` if it is a regular file (links followed); FileNotFoundError if it does not exist,
    ValueError (one line, naming it) for a folder, FIFO, device or socket, or a file that cannot be read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, st.st_mode)
    return st.st_size


@contextlib.contextmanager
def open_regular(path: str | os.PathLike) -> Iterator[tuple[IO[bytes], int, str]]:
    """(binary file, its size, a path naming this very file) of a regular file, for reading.

    Checked with os.stat before opening, opened with O_NONBLOCK (opening a FIFO never waits for a writer)
    and checked again on the open descriptor: a file replaced by a FIFO or device in between is refused
    too. The path returned is /proc/self/fd/N on Linux (it reopens the checked file, not whatever the name
    points to now) for libraries that take a path (safetensors, torch.load); elsewhere, `path` itself.
    """
    check_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, st.st_mode)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        proc = f"/proc/self/fd/{fd}"
        yield f, st.st_size, proc if sys.platform.startswith("linux") and os.path.exists(proc) else str(path)


def load_json(text: str | bytes, source: str) -> Any:
    """json.loads whose every failure (bad syntax, nesting deep enough to overflow the parser, a number of
    thousands of digits) is a one-line ValueError naming `source`."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{source}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int past Python's digit limit
        raise ValueError(f"{source}: not valid JSON ({one_line(str(e))})") from None


def one_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _short(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensor entries by name, metadata) of a safetensors file, after checking every claim of its header
    against the file: the header's length, and each tensor's dtype, shape and byte range (within the data,
    and as long as its shape and dtype make it). ValueError naming the file and the problem otherwise.

    Nothing is read beyond the header: a file that claims terabytes costs its header's size.
    """
    bad = f"{path}: not a readable safetensors file"
    with open_regular(path) as (f, size, _):
        if size < 8:
            raise ValueError(f"{bad} ({size} bytes, shorter than a header); the file may be truncated")
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"{bad} (its header claims {n} bytes, more than the {MAX_HEADER_BYTES} any model needs)")
        if 8 + n > size:
            raise ValueError(
                f"{bad} (its header claims {n} bytes, the file has {size - 8} after the length); "
                "the file may be truncated"
            )
        raw = f.read(n)
    header = load_json(raw, f"{bad}: header")
    if not isinstance(header, dict):
        raise ValueError(f"{bad} (its header is a JSON {type(header).__name__}, not an object)")
    data_size = size - 8 - n
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError(f"{bad} (its __metadata__ is not a map of strings to strings)")
    for name, entry in header.items():
        where = f"{bad} (tensor {_short(name)}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: its entry is {_short(entry)}, not an object)")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
            raise ValueError(f"{where}: dtype {_short(dtype)} is not one torch reads)")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape) or len(shape) > 64:
            raise ValueError(f"{where}: shape {_short(shape)} is not a list of sizes)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
            raise ValueError(f"{where}: data_offsets {_short(offsets)} is not [begin, end])")
        begin, end = offsets
        if not begin <= end <= data_size:
            raise ValueError(
                f"{where}: bytes {begin}..{end} lie beyond the {data_size} bytes of data); the file may be truncated"
            )
        nbytes = math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype] // 8
        if nbytes != end - begin:
            raise ValueError(f"{where}: shape {shape} of {dtype} needs {nbytes} bytes, its offsets hold {end - begin})")
    return header, meta


def stored_json(path: str | os.PathLike, key: str) -> Any:
    """The JSON value that ldm stored under `key` in a safetensors file's metadata, or None
    (not a .safetensors file, or no such key). ValueError for a file whose header does not check
    (safetensors_header) or a value that is not JSON."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return None
    _, meta = safetensors_header(path)
    if key not in meta:
        return None
    return load_json(meta[key], f"{path}: stored {key} metadata")


# --------------------------------------------------------------------------- checking stored records

_MISSING = object()


class Fields:
    """Typed access to one JSON record read from a file, checked as flags are: each getter returns the value
    of a key (or `default` when the key is absent or null) or raises a one-line ValueError naming the file,
    the record, the key and the value."""

    def __init__(self, source: str | os.PathLike, record: str, d: Any):
        self.source, self.record = str(source), record
        if not isinstance(d, dict):
            raise ValueError(f"{self.source}: stored {record} is {_short(d)}, not a JSON object")
        self.d = d

    def error(self, key: str, value: Any, expected: str) -> ValueError:
        return ValueError(
            f"{self.source}: stored {self.record} {key}={_short(value)} is invalid: expected {expected} "
            "(the file's metadata is corrupt or was crafted)"
        )

    def _get(self, key: str) -> Any:
        return self.d.get(key)

    def integer(self, key: str, lo: int, hi: int, default: Any = _MISSING) -> Any:
        value = self._get(key)
        if value is None and default is not _MISSING:
            return default
        if type(value) is not int or not lo <= value <= hi:
            raise self.error(key, value, f"an integer in {lo}..{hi}")
        return value

    def integers(self, key: str, lo: int, hi: int, length: tuple[int, int], default: Any = _MISSING) -> Any:
        value = self._get(key)
        if value is None and default is not _MISSING:
            return default
        ok = isinstance(value, (list, tuple)) and length[0] <= len(value) <= length[1]
        if not ok or not all(type(v) is int and lo <= v <= hi for v in value):
            raise self.error(key, value, f"a list of {length[0]}..{length[1]} integers in {lo}..{hi}")
        return list(value)

    def number(self, key: str, lo: float, hi: float, default: Any = _MISSING, *, open_low: bool = False) -> Any:
        value = self._get(key)
        if value is None and default is not _MISSING:
            return default
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not (lo < value if open_low else lo <= value) or value > hi:
            raise self.error(key, value, f"a finite number in {'(' if open_low else '['}{lo:g}, {hi:g}]")
        return float(value)

    def flag(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key)
        if value is None and default is not _MISSING:
            return default
        if not isinstance(value, bool):
            raise self.error(key, value, "true or false")
        return value

    def choice(self, key: str, options: Sequence[Any], default: Any = _MISSING) -> Any:
        value = self._get(key)
        if value is None and default is not _MISSING:
            return default
        if not isinstance(value, (str, int, float, bool)) or value not in options:
            raise self.error(key, value, "one of " + ", ".join(map(repr, options)))
        return value

    def text(self, key: str, max_len: int = 1000, default: Any = _MISSING) -> Any:
        value = self._get(key)
        if value is None and default is not _MISSING:
            return default
        if not isinstance(value, str) or not value or len(value) > max_len:
            raise self.error(key, value, f"a string of 1..{max_len} characters")
        return value

    def mapping(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key)
        if value is None and default is not _MISSING:
            return default
        if not isinstance(value, dict):
            raise self.error(key, value, "a JSON object")
        return value
