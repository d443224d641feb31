"""Saving generated images: PNGs that carry their generation parameters, and never overwrite.

* `a1111_parameters` / `parse_parameters`: the `parameters` text that AUTOMATIC1111's web UI
  writes and that most Stable Diffusion tools (A1111 "PNG Info", Forge, ComfyUI loaders,
  Civitai, InvokeAI import) read back:

      a photo of a cat
      Negative prompt: blurry
      Steps: 25, Sampler: DDIM, CFG scale: 7.5, Seed: 1234, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, RNG: CPU

  "Model hash" is A1111's "AutoV2" hash: the first 10 hex digits of the sha256 of the weights file.
* `save_png`: an atomic write (temporary file in the same folder, then a hard link) that refuses
  to replace an existing file; `next_free_path` / `save_next_png` pick `00003-1234.png`-style names.

No torch here: reading metadata back needs only PIL.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

# Our sampler names (ldm.samplers.SAMPLERS keys) -> the names A1111 writes and reads.
A1111_SAMPLER_NAMES = {
    "ddim": "DDIM",
    "plms": "PLMS",
    "pndm": "PLMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
    "lms": "LMS",
    "dpm2": "DPM2",
    "dpm2_a": "DPM2 a",
    "dpmpp_2m": "DPM++ 2M",
    # A1111 < 1.6 name; >= 1.6 writes "Sampler: DPM++ 2M, Schedule type: Karras" and still reads this one
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_2s_a": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE",
    "unipc": "UniPC",
}
_SAMPLER_FROM_A1111 = {}
for _ours, _theirs in A1111_SAMPLER_NAMES.items():
    _SAMPLER_FROM_A1111.setdefault(_theirs, _ours)  # first name wins: "PLMS" -> "plms", "Euler a" -> "euler_a"

# A1111's infotext grammar (modules/infotext_utils.py): `Key: value` pairs separated by ", ";
# a value holding ',', ':' or a newline is written as a JSON string.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_KEY = re.compile(r"\w[\w \-/]*[\w\-/]")  # what _PARAM reads back: 2+ characters, no trailing space
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_INDEX = re.compile(r"^(\d+)(?=[-.]|$)")


# --------------------------------------------------------------------------- the `parameters` text


def _quote(value: Any) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text and not text.startswith('"'):
        return text
    return json.dumps(text, ensure_ascii=False)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def _number(x: float) -> str:
    """7.5 -> '7.5', 7.0 -> '7' (as A1111 shows whole CFG scales); repr keeps every digit."""
    r = repr(float(x))
    return r[:-2] if r.endswith(".0") else r


def a1111_parameters(
    prompt: str,
    negative_prompt: str | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    width: int | None = None,
    height: int | None = None,
    model_hash: str | None = None,
    model_name: str | None = None,
    eta: float | None = None,
    clip_skip: int | None = None,
    rng: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """The `parameters` text of one image, in AUTOMATIC1111's format.

    Fields that are None are left out, and so are those A1111 leaves out at their default:
    no "Negative prompt:" line for an empty negative prompt, no "Clip skip" when it is 1,
    no eta when it is 0. `sampler` is our name ("ddim") or any A1111 name ("DPM++ 2M");
    `model_hash` may be a full sha256 (it is cut to A1111's 10 digits). `rng="CPU"` tells A1111
    that the initial noise was drawn on the CPU, as ldm does (A1111's default is the GPU).
    `extra` adds `Key: value` pairs at the end.
    """
    params: dict[str, Any] = {
        "Steps": steps,
        "Sampler": A1111_SAMPLER_NAMES.get(sampler, sampler) if sampler is not None else None,
        "CFG scale": _number(guidance) if guidance is not None else None,
        "Seed": seed,
        "Size": f"{width}x{height}" if width is not None and height is not None else None,
        "Model hash": model_hash[:10] if model_hash else None,
        "Model": model_name or None,
        "Clip skip": clip_skip if clip_skip is not None and clip_skip != 1 else None,
        "RNG": rng,
    }
    if eta is not None and eta != 0:
        params["Eta DDIM" if sampler in ("ddim", "DDIM") else "Eta"] = _number(eta)
    for key, value in (extra or {}).items():
        if not _KEY.fullmatch(key) or key in ("Prompt", "Negative prompt"):
            raise ValueError(f"extra parameter name {key!r}: use letters, digits, spaces, '-' or '/', "
                             "and not 'Prompt' / 'Negative prompt'")
        if key in params:
            raise ValueError(f"extra parameter {key!r} is already written from its own argument")
        params[key] = value
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def parse_parameters(text: str) -> dict[str, Any]:
    """Read back a `parameters` text (ours or A1111's) into the arguments of `a1111_parameters`.

    Returns prompt, negative_prompt ("" when absent), steps, sampler (our name when we know it),
    guidance, seed, width, height, model_hash, model_name, eta, clip_skip, rng (None when absent)
    and `extra`: every other `Key: value` as strings, in order. For text written by
    `a1111_parameters`, `a1111_parameters(**parse_parameters(text)) == text`.
    Follows A1111's parser: the last line holds the settings when it has at least 3 pairs.
    """
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)

    out: dict[str, Any] = dict(prompt="\n".join(prompt), negative_prompt="\n".join(negative), steps=None,
                               sampler=None, guidance=None, seed=None, width=None, height=None, model_hash=None,
                               model_name=None, eta=None, clip_skip=None, rng=None, extra={})
    fields = {"Steps": ("steps", int), "CFG scale": ("guidance", float), "Seed": ("seed", int),
              "Model hash": ("model_hash", str), "Model": ("model_name", str), "Clip skip": ("clip_skip", int),
              "RNG": ("rng", str), "Eta DDIM": ("eta", float), "Eta": ("eta", float)}
    for key, raw in _PARAM.findall(last):
        value = _unquote(raw)
        try:
            if key == "Sampler":
                out["sampler"] = _SAMPLER_FROM_A1111.get(value, value)
            elif key == "Size" and (m := _SIZE.match(value)):
                out["width"], out["height"] = int(m.group(1)), int(m.group(2))
            elif key in fields and out[fields[key][0]] is None:
                name, kind = fields[key]
                out[name] = kind(value)
            else:
                out["extra"][key] = value
        except ValueError:
            out["extra"][key] = value  # a foreign file with e.g. "Seed: abc": keep it, untyped
    return out


# --------------------------------------------------------------------------- model hash


def weights_file(path: str | os.PathLike) -> Path:
    """The file whose hash names a model: the file itself, or a diffusers folder's U-Net weights."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found")
    if path.is_file():
        return path
    names = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    for folder in (path / "unet", path):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise ValueError(f"{path}: a folder without unet/{names[0]}; cannot hash it")


_HASH_CACHE: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a weights file (of the U-Net weights for a diffusers folder), read in chunks.

    Remembered for the process, keyed on path, size and modification time. Its first 10 digits
    are A1111's "Model hash" (AutoV2), as shown on Civitai.
    """
    file = weights_file(path).resolve()
    st = file.stat()
    key = (str(file), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(chunk_size):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def model_display_name(path: str | os.PathLike) -> str:
    """The name A1111 shows for a model: the file name without its extension, or the folder name."""
    path = Path(path)
    return path.stem if path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin") else path.name


# --------------------------------------------------------------------------- writing files


def check_output_folder(folder: str | os.PathLike) -> Path:
    """Refuse (ValueError) an output folder that cannot be written, without creating anything.

    A folder that does not exist yet is fine when its nearest existing parent is a writable
    folder (it is created by the first save). Writability is probed by creating and removing a
    temporary file, which also catches read-only mounts that `os.access` misses.
    """
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "output folder" if probe == folder else f"output folder {folder}: its parent"
        raise ValueError(f"{what} {probe} is an existing file, not a folder; pass a folder to --out")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".ldm-write-test-")
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        where = folder if probe == folder else f"{probe} (to create {folder})"
        raise ValueError(f"output folder {where} is not writable ({e.strerror or e}); pass another --out") from None
    return folder


def next_free_path(folder: str | os.PathLike, stem_pattern: str = "{index:05d}", suffix: str = ".png",
                   **fields: Any) -> Path:
    """`folder / (stem_pattern.format(index=..., **fields) + suffix)` with index one past the highest
    index among the names in `folder` that start with digits followed by '-', '.' or nothing
    (A1111's numbering: `00003-1234.png` has index 3). Skips ahead while that name exists.

    Another process may take the name before it is written: `save_png` then refuses, and
    `save_next_png` asks again.
    """
    folder = Path(folder)
    highest = -1
    if folder.is_dir():
        for entry in os.scandir(folder):
            if m := _INDEX.match(entry.name):
                highest = max(highest, int(m.group(1)))
    index = highest + 1
    while (path := folder / (stem_pattern.format(index=index, **fields) + suffix)).exists():
        index += 1
    return path


def png_info(parameters: str, extra: dict[str, Any] | None = None):
    """PIL PngInfo with the `parameters` text chunk first, then `extra` (non-strings as JSON)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)  # tEXt, or iTXt when it is not Latin-1 (PIL decides)
    for key, value in (extra or {}).items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    return info


def new_file_mode(directory: bool = False) -> int:
    """The mode a new file (0o666) or folder (0o777) gets, less the umask. mkstemp's temporary files are
    0o600 and mkdtemp's folders 0o700, which the final rename would keep: outputs only their owner reads."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def save_png(image, path: str | os.PathLike, parameters: str, extra: dict[str, Any] | None = None) -> Path:
    """Write `image` (PIL) as a PNG carrying `parameters` (and `extra`) as text chunks.

    Atomic and never overwriting: the PNG is written to a temporary file in the same folder,
    then hard-linked to `path`, which fails with FileExistsError if `path` exists (even when
    another process creates it meanwhile); a reader never sees a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise FileExistsError(f"{path}: already exists; not overwriting it")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=png_info(parameters, extra))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())
        try:
            os.link(tmp, path)  # atomic, and refuses an existing destination
        except FileExistsError:
            raise FileExistsError(f"{path}: already exists; not overwriting it") from None
        except OSError:
            # A file system without hard links (FAT, some network shares): claim the name
            # exclusively, then move the finished file over our own empty placeholder.
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_next_png(image, folder: str | os.PathLike, parameters: str, extra: dict[str, Any] | None = None,
                  stem_pattern: str = "{index:05d}", **fields: Any) -> Path:
    """`save_png` to `next_free_path(folder, stem_pattern, **fields)`, taking the next name when
    another writer got there first. Returns the path written."""
    for _ in range(1000):
        try:
            return save_png(image, next_free_path(folder, stem_pattern, **fields), parameters, extra)
        except FileExistsError:
            continue
    raise RuntimeError(f"{folder}: could not find a free file name after 1000 tries")


def save_generated(image, folder: str | os.PathLike, *, prompt: str, negative_prompt: str | None, steps: int,
                   sampler: str, guidance: float, seed: int, width: int, height: int, model_hash: str | None,
                   model_name: str | None, eta: float = 0.0, clip_skip: int = 1,
                   settings: dict[str, Any] | None = None, loras: dict[str, str] | None = None) -> Path:
    """Save one generated image as `folder/<index>-<seed>.png` with its generation parameters.

    Text chunks: `parameters` (A1111 format, read by most SD tools), `ldm` (JSON: every setting,
    `settings` included, and the full sha256 of the weights) and `Software`.
    `seed` is this image's own seed (seed + i for image i of a run). `loras`: name -> short hash of
    each LoRA applied, written as A1111's "Lora hashes".
    """
    from ldm import __version__

    extra_params = {"Lora hashes": ", ".join(f"{k}: {v}" for k, v in loras.items())} if loras else None
    parameters = a1111_parameters(prompt, negative_prompt, steps, sampler, guidance, seed, width, height,
                                  model_hash, model_name, eta=eta, clip_skip=clip_skip, rng="CPU",
                                  extra=extra_params)
    record = dict(prompt=prompt, negative_prompt=negative_prompt, steps=steps, sampler=sampler,
                  guidance_scale=guidance, eta=eta, seed=seed, width=width, height=height, clip_skip=clip_skip,
                  model_name=model_name, model_sha256=model_hash, **(settings or {}), ldm_version=__version__)
    extra = {"ldm": record, "Software": f"ldm {__version__}"}
    return save_next_png(image, folder, parameters, extra, stem_pattern="{index:05d}-{seed}", seed=seed)
