"""Saving generated images: PNGs that carry their generation parameters, and never overwrite.

* `a1111_parameters` / `parse_parameters`: the `parameters` text that AUTOMATIC1111's web UI
  writes and that most Stable Diffusion tools (A1111 "PNG Info", Forge, ComfyUI loaders,
  Civitai, InvokeAI import) read back:

      a photo of a cat
      Negative prompt: blurry
      Steps: 25, Sampler: DDIM, CFG scale: 7.5, Seed: 1234, Size: 512x512, Model hash: 6ce0161689, \
      Model: v1-5-pruned-emaonly, RNG: CPU

  "Model hash" is A1111's "AutoV2" hash: the first 10 hex digits of the sha256 of the weights file.
* `save_png`: an atomic write (temporary file in the same folder, then a hard link) that refuses
  to replace an existing file; `next_free_path` / `save_next_png` pick `00003-1234.png`-style names.

`read_generation` gives the GenerationRequest of a PNG back (ldm's own record, or A1111's text).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from ldm.formats.atomic import atomic_write
from ldm.pipelines.request import HIRES_UPSCALERS, INPAINT_AREAS, MASKED_CONTENT, RESIZE_MODES, GenerationRequest
from ldm.sampling.names import A1111_SCHEDULES, ALIASES, CATALOG, SCHEDULE_LABELS, SIGMA_SCHEDULES, resolve_name


def a1111_sampler_name(sampler: str) -> str:
    """The name A1111 writes for one of ours ("euler_a" -> "Euler a"; the kept alias "dpmpp_2m_karras" ->
    A1111 < 1.6's "DPM++ 2M Karras"); a name the registry does not know is written as given."""
    if sampler in ALIASES:
        name, schedule = ALIASES[sampler]
        return f"{CATALOG[name].a1111} {SCHEDULE_LABELS[schedule]}"
    return CATALOG[sampler].a1111 if sampler in CATALOG else sampler


def sampler_from_a1111(label: str) -> tuple[str, str | None]:
    """(our sampler name, implied schedule or None) for an A1111 name; unknown labels come back as given."""
    for alias in ALIASES:  # "DPM++ 2M Karras" reads back as the kept alias
        if label == a1111_sampler_name(alias):
            return alias, None
    if label in CATALOG or label in ALIASES:
        return label, None
    try:
        entry, schedule = resolve_name(label)
    except ValueError:
        return label, None
    return entry.name, None if schedule == "default" else schedule


def schedule_label(schedule: str) -> str:
    """A1111's "Schedule type" value for one of our sigma schedules ("karras" -> "Karras")."""
    return SCHEDULE_LABELS.get(schedule, schedule)


def schedule_from_a1111(label: str) -> str:
    return A1111_SCHEDULES.get(label, label)


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
    schedule: str | None = None,
) -> str:
    """The `parameters` text of one image, in AUTOMATIC1111's format.

    Fields that are None are left out, and so are those A1111 leaves out at their default:
    no "Negative prompt:" line for an empty negative prompt, no "Clip skip" when it is 1,
    no eta when it is 0. `sampler` is our name ("ddim") or any A1111 name ("DPM++ 2M");
    `model_hash` may be a full sha256 (it is cut to A1111's 10 digits). `rng="CPU"` tells A1111
    that the initial noise was drawn on the CPU, as ldm does (A1111's default is the GPU).
    `extra` adds `Key: value` pairs at the end. `schedule` (ours: "karras") is written as A1111 >= 1.9's
    "Schedule type: Karras" after the sampler; None and "default" are left out.
    """
    params: dict[str, Any] = {
        "Steps": steps,
        "Sampler": a1111_sampler_name(sampler) if sampler is not None else None,
        "Schedule type": schedule_label(schedule) if schedule not in (None, "default") else None,
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
            raise ValueError(
                f"extra parameter name {key!r}: use letters, digits, spaces, '-' or '/', "
                "and not 'Prompt' / 'Negative prompt'"
            )
        if key in params:
            raise ValueError(f"extra parameter {key!r} is already written from its own argument")
        params[key] = value
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def parse_parameters(text: str) -> dict[str, Any]:
    """Read back a `parameters` text (ours or A1111's) into the arguments of `a1111_parameters`.

    Returns prompt, negative_prompt ("" when absent), steps, sampler (our name when we know it),
    schedule (ours, from "Schedule type" or implied by an older sampler name such as
    "DPM++ 2M SDE Karras"), guidance, seed, width, height, model_hash, model_name, eta, clip_skip,
    rng (None when absent) and `extra`: every other `Key: value` as strings, in order. For text written by
    `a1111_parameters`, `a1111_parameters(**parse_parameters(text)) == text`.
    Follows A1111's parser: the last line holds the settings when it has at least 3 pairs.
    """
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)

    out: dict[str, Any] = dict(
        prompt="\n".join(prompt),
        negative_prompt="\n".join(negative),
        steps=None,
        sampler=None,
        guidance=None,
        seed=None,
        width=None,
        height=None,
        model_hash=None,
        model_name=None,
        eta=None,
        clip_skip=None,
        rng=None,
        extra={},
        schedule=None,
    )
    fields = {
        "Steps": ("steps", int),
        "CFG scale": ("guidance", float),
        "Seed": ("seed", int),
        "Model hash": ("model_hash", str),
        "Model": ("model_name", str),
        "Clip skip": ("clip_skip", int),
        "RNG": ("rng", str),
        "Eta DDIM": ("eta", float),
        "Eta": ("eta", float),
    }
    for key, raw in _PARAM.findall(last):
        value = _unquote(raw)
        try:
            if key == "Sampler":
                out["sampler"], implied = sampler_from_a1111(value)
                out["schedule"] = out["schedule"] or implied
            elif key == "Schedule type":
                out["schedule"] = schedule_from_a1111(value)
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


def next_free_path(
    folder: str | os.PathLike, stem_pattern: str = "{index:05d}", suffix: str = ".png", **fields: Any
) -> Path:
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


def save_png(image, path: str | os.PathLike, parameters: str, extra: dict[str, Any] | None = None) -> Path:
    """Write `image` (PIL) as a PNG carrying `parameters` (and `extra`) as text chunks.

    Atomic and never overwriting (ldm.formats.atomic.atomic_write with overwrite=False): a reader never
    sees a half-written file, and FileExistsError if `path` exists, even when another process creates it
    meanwhile.
    """

    def write(tmp: str) -> None:
        image.save(tmp, format="PNG", pnginfo=png_info(parameters, extra))

    return atomic_write(path, write, overwrite=False)


def save_next_png(
    image,
    folder: str | os.PathLike,
    parameters: str,
    extra: dict[str, Any] | None = None,
    stem_pattern: str = "{index:05d}",
    **fields: Any,
) -> Path:
    """`save_png` to `next_free_path(folder, stem_pattern, **fields)`, taking the next name when
    another writer got there first. Returns the path written."""
    for _ in range(1000):
        try:
            return save_png(image, next_free_path(folder, stem_pattern, **fields), parameters, extra)
        except FileExistsError:
            continue
    raise RuntimeError(f"{folder}: could not find a free file name after 1000 tries")


def save_generated(
    image,
    folder: str | os.PathLike,
    request: GenerationRequest,
    *,
    model_hash: str | None,
    model_name: str | None,
    settings: dict[str, Any] | None = None,
    loras: dict[str, str] | None = None,
    batch: tuple[int, int] = (0, 1),
) -> Path:
    """Save one generated image of `request` (resolved: size and guidance filled in; `request.seed` is this
    image's own seed) as `folder/<index>-<seed>.png` with its generation parameters.

    Text chunks: `parameters` (A1111 format, read by most SD tools), `ldm` (JSON: the request's fields,
    `settings` (device, dtype, prediction type), the full sha256 of the weights, `loras` and `batch`:
    (this image's index in the batch it was generated in, the batch's size), so that `read_generation`
    can regenerate it bit for bit) and `Software`. `loras`: name -> short hash of each LoRA applied,
    written as A1111's "Lora hashes".
    """
    from ldm import __version__

    if request.num_images != 1 or not isinstance(request.prompt, str):
        raise ValueError("save_generated takes the request of one image: one prompt, num_images=1, its own seed")
    extra_params = {"Lora hashes": ", ".join(f"{k}: {v}" for k, v in loras.items())} if loras else {}
    if request.guidance_rescale:
        extra_params["CFG Rescale phi"] = _number(request.guidance_rescale)  # the sd-webui-cfg-rescale key
    extra_params.update(image_parameters(request, masked=bool(settings and "mask_sha256" in settings)))
    if settings and settings.get("refiner_name"):  # A1111's fields of a base + refiner run
        digest = str(settings.get("refiner_sha256") or "")[:10]
        extra_params["Refiner"] = f"{settings['refiner_name']} [{digest}]" if digest else str(settings["refiner_name"])
        extra_params["Refiner switch at"] = _number(request.refiner_switch)
    parameters = a1111_parameters(
        request.prompt,
        request.negative_prompt if isinstance(request.negative_prompt, str) else None,
        request.steps,
        request.sampler,
        request.guidance_scale,
        request.seed,
        request.width,
        request.height,
        model_hash,
        model_name,
        eta=request.eta,
        clip_skip=request.clip_skip,
        rng="CPU",
        extra=extra_params or None,
        schedule=request.schedule,
    )
    fields = request.to_dict()
    del fields["num_images"]
    record = dict(
        **fields,
        model_name=model_name,
        model_sha256=model_hash,
        **(settings or {}),
        loras=loras or {},
        batch=list(batch),
        ldm_version=__version__,
    )
    extra = {"ldm": record, "Software": f"ldm {__version__}"}
    return save_next_png(image, folder, parameters, extra, stem_pattern="{index:05d}-{seed}", seed=request.seed)


def image_parameters(request: GenerationRequest, masked: bool = False) -> dict[str, str]:
    """A1111's infotext fields of the image-to-image modes and the hires fix a request uses (img2img: strength
    set by Pipeline.resolve; inpainting: `masked`, a mask or outpainting)."""
    out: dict[str, str] = {}
    if request.hires_scale is not None:
        out["Denoising strength"] = _number(request.hires_strength)
        out["Hires upscale"] = _number(request.hires_scale)
        out["Hires steps"] = str(request.hires_steps)
        out["Hires upscaler"] = HIRES_UPSCALERS[request.hires_upscaler]
        return out
    if request.strength is None:
        return out
    out["Denoising strength"] = _number(request.strength)
    if request.resize_mode != "resize":
        out["Resize mode"] = RESIZE_MODES[request.resize_mode]
    if masked or request.outpaint is not None:
        out["Mask blur"] = str(request.mask_blur)
        out["Masked content"] = MASKED_CONTENT[request.masked_content]
        out["Inpaint area"] = INPAINT_AREAS[request.inpaint_area]
        if request.inpaint_area == "masked":
            out["Masked area padding"] = str(request.inpaint_padding)
        if request.invert_mask:
            out["Mask mode"] = "Inpaint not masked"
    if request.outpaint is not None:
        out["Outpaint"] = ",".join(
            f"{k}={v}" for k, v in zip(("left", "top", "right", "bottom"), request.outpaint) if v
        )
    return out


# --------------------------------------------------------------------------- reading a request back

# What ldm's `ldm` record holds beside the request's fields.
SETTINGS_KEYS = (
    "model_name",
    "model_sha256",
    "prediction_type",
    "device",
    "dtype",
    "loras",
    "batch",
    "image",
    "image_sha256",
    "mask",
    "mask_sha256",
    "refiner_name",
    "refiner_sha256",
)
# A1111 fields that describe the model or the run, not the image's parameters: read without a note.
_A1111_INFO_FIELDS = {"Model hash", "Model", "Version", "Lora hashes", "TI hashes", "RNG"}


@dataclasses.dataclass
class Generation:
    """What a PNG says about how it was made: the request, the settings around it, and what was not read."""

    request: GenerationRequest
    settings: dict[str, Any]  # model_name, model_sha256, prediction_type, device, dtype, loras, batch (when known)
    ignored: list[str]  # fields of the file that ldm does not use ("Hires upscale: 2", ...), in order
    source: str  # "ldm" (ldm's own record) or "parameters" (an A1111-style text)


def read_generation(path: str | os.PathLike) -> Generation:
    """The generation request a PNG carries: ldm's own `ldm` record when it has one (every value exact),
    else its A1111-style `parameters` text. ValueError (naming the file, the field and the value) for a
    file without either, or a value ldm cannot reproduce (a sampler or schedule it does not have).

    Only the PNG's text chunks are read (never its pixels, whatever size its header claims), from a regular
    file only (a FIFO or device is a ValueError, never a hang), each chunk bounded by the file's size and
    a compressed one by _MAX_TEXT_BYTES once inflated."""
    from ldm.formats.metadata import load_json

    path = Path(path)
    chunks = _png_text(path)
    if "ldm" in chunks:
        record = load_json(chunks["ldm"], f"{path}: its 'ldm' metadata")
        return _from_record(path, record)
    if "parameters" in chunks:
        return _from_parameters(path, chunks["parameters"])
    raise ValueError(
        f"{path}: no generation parameters in this PNG (no 'ldm' or 'parameters' text chunk); "
        "pass --prompt and the other settings yourself"
    )


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_TEXT_BYTES = 1 << 20  # one text chunk, inflated (PIL's MAX_TEXT_CHUNK); ldm's record is a few KB
_OUR_KEYS = ("ldm", "parameters")


def _png_text(path: Path) -> dict[str, str]:
    """The tEXt / zTXt / iTXt chunks of a PNG file (the first of each key), read without decoding the image.

    A chunk that is damaged, oversized or undecodable is skipped, unless it is one of ldm's keys (`ldm`,
    `parameters`): then a ValueError naming the file and the chunk. A truncated file gives the chunks before
    the cut."""
    import zlib

    from ldm.formats.metadata import open_regular

    texts: dict[str, str] = {}

    def bad(key: str, problem: str) -> None:
        if key in _OUR_KEYS:
            raise ValueError(f"{path}: its {key!r} text chunk {problem}")

    def inflate(key: str, data: bytes) -> bytes | None:
        d = zlib.decompressobj()
        try:
            out = d.decompress(data, _MAX_TEXT_BYTES)
        except zlib.error:
            bad(key, "is corrupt (its compressed text does not inflate)")
            return None
        if d.unconsumed_tail:
            bad(key, f"inflates to more than {_MAX_TEXT_BYTES} bytes")
            return None
        return out

    with open_regular(path) as (f, size, _):
        if f.read(8) != _PNG_SIGNATURE:
            raise ValueError(f"{path}: not a PNG image (ldm reads generation parameters from a PNG's text chunks)")
        while True:
            head = f.read(8)
            if len(head) < 8:
                break
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if f.tell() + length + 4 > size:
                break  # truncated or a crafted length: nothing past here can be read
            if kind not in (b"tEXt", b"zTXt", b"iTXt"):
                if kind == b"IEND":
                    break
                f.seek(length + 4, os.SEEK_CUR)
                continue
            data = f.read(min(length, _MAX_TEXT_BYTES + 80))
            f.seek(length - len(data) + 4, os.SEEK_CUR)
            raw_key, sep, rest = data.partition(b"\0")
            key = raw_key.decode("latin-1")
            if not sep or key in texts:
                continue
            if length > len(data):
                bad(key, f"is larger than {_MAX_TEXT_BYTES} bytes")
                continue
            value: bytes | None
            encoding = "latin-1"
            if kind == b"tEXt":
                value = rest
            elif kind == b"zTXt":
                value = inflate(key, rest[1:]) if rest[:1] == b"\0" else None
            else:  # iTXt: compression flag, method, language tag, translated keyword, text (UTF-8)
                encoding = "utf-8"
                flag, method = rest[:1], rest[1:2]
                parts = rest[2:].split(b"\0", 2)
                if len(parts) < 3 or flag not in (b"\0", b"\1") or (flag == b"\1" and method != b"\0"):
                    bad(key, "is malformed")
                    continue
                value = inflate(key, parts[2]) if flag == b"\1" else parts[2]
            if value is None:
                continue
            try:
                texts[key] = value.decode(encoding)
            except UnicodeDecodeError:
                bad(key, f"is not valid {encoding} text")
    return texts


def _request(path: Path, fields: dict[str, Any]) -> GenerationRequest:
    try:
        return GenerationRequest(**fields)
    except (ValueError, TypeError, OverflowError) as e:
        raise ValueError(f"{path}: {e}") from None


_RECORD_NUMBERS = (
    "steps",
    "guidance_scale",
    "guidance_rescale",
    "eta",
    "seed",
    "height",
    "width",
    "num_images",
    "clip_skip",
    "lora_scale",
    "strength",
    "mask_blur",
    "inpaint_padding",
    "hires_scale",
    "hires_strength",
    "hires_steps",
    "refiner_switch",
    "aesthetic_score",
    "negative_aesthetic_score",
)


def _record_value_ok(key: str, value: Any) -> bool:
    """Whether a field of an `ldm` record has a JSON type the request takes (GenerationRequest checks ranges)."""
    if value is None:
        return key not in ("prompt",)
    if key in ("prompt", "negative_prompt"):
        return isinstance(value, str) or (
            isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
        )
    if key in ("sampler", "schedule", "output_type", "masked_content", "inpaint_area", "resize_mode", "hires_upscaler"):
        return isinstance(value, str)
    if key == "invert_mask":
        return isinstance(value, bool)
    if key == "outpaint":
        return isinstance(value, list) and len(value) == 4 and all(type(v) is int for v in value)
    if key in ("original_size", "crop_top_left", "target_size"):
        return isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)
    if key in _RECORD_NUMBERS:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, (str, int, float, bool))


def _check_settings(path: Path, settings: dict[str, Any]) -> None:
    """The record's settings (model, device, LoRAs, batch) have the types their readers expect."""
    for key, value in settings.items():
        if key == "loras":
            ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
        elif key == "batch":
            ok = (
                isinstance(value, list)
                and len(value) == 2
                and all(type(v) is int for v in value)
                and 0 <= value[0] < value[1] <= 100_000
            )
        elif key == "prediction_type":
            ok = value in ("epsilon", "v_prediction")
        else:
            ok = value is None or (isinstance(value, str) and len(value) <= 1000)
        if not ok:
            shown = repr(value)
            raise ValueError(
                f"{path}: its 'ldm' metadata {key}={shown[:80] + '...' if len(shown) > 80 else shown} is invalid"
            )


def _from_record(path: Path, record: Any) -> Generation:
    if not isinstance(record, dict):
        raise ValueError(f"{path}: its 'ldm' metadata is a JSON {type(record).__name__}, not an object")
    names = {f.name for f in dataclasses.fields(GenerationRequest)}
    fields = {k: v for k, v in record.items() if k in names}
    if "prompt" not in fields:
        raise ValueError(f"{path}: its 'ldm' metadata has no prompt")
    settings = {k: record[k] for k in SETTINGS_KEYS if k in record}
    if "lora_scale" not in fields and "lora_scale" in record:  # ldm < 0.2 kept it among the settings
        fields["lora_scale"] = record["lora_scale"]
    for key, value in fields.items():
        if not _record_value_ok(key, value):
            shown = repr(value)
            raise ValueError(
                f"{path}: its 'ldm' metadata {key}={shown[:80] + '...' if len(shown) > 80 else shown} "
                "has the wrong type"
            )
    _check_settings(path, settings)
    ignored = [k for k in record if k not in names and k not in SETTINGS_KEYS and k != "ldm_version"]
    return Generation(_request(path, fields), settings, ignored, "ldm")


def _from_parameters(path: Path, text: str) -> Generation:
    d = parse_parameters(text)
    fields: dict[str, Any] = {"prompt": d["prompt"], "negative_prompt": d["negative_prompt"] or None}
    for ours, theirs in (
        ("steps", "steps"),
        ("guidance_scale", "guidance"),
        ("seed", "seed"),
        ("width", "width"),
        ("height", "height"),
        ("eta", "eta"),
        ("clip_skip", "clip_skip"),
    ):
        if d[theirs] is not None:
            fields[ours] = d[theirs]
    extra = dict(d["extra"])
    if "CFG Rescale phi" in extra:
        fields["guidance_rescale"] = _float(path, "CFG Rescale phi", extra.pop("CFG Rescale phi"))
    fields.update(_image_fields(path, extra))
    for label, value in (("Sampler", d["sampler"]), ("Schedule type", d["schedule"])):
        if value is None:
            continue
        key = "sampler" if label == "Sampler" else "schedule"
        fields[key] = value
    if "sampler" in fields:
        try:
            resolve_name(fields["sampler"], fields.get("schedule"))
        except ValueError as e:
            raise ValueError(f"{path}: Sampler: {fields['sampler']!r}: {e}") from None
    elif "schedule" in fields:
        if fields["schedule"] not in SIGMA_SCHEDULES:
            raise ValueError(
                f"{path}: Schedule type: {fields['schedule']!r} is not one ldm has; it has {', '.join(SIGMA_SCHEDULES)}"
            )
    settings: dict[str, Any] = {}
    if d["model_hash"] is not None:
        settings["model_sha256"] = d["model_hash"]  # A1111's 10 digits
    if d["model_name"] is not None:
        settings["model_name"] = d["model_name"]
    if "Lora hashes" in extra:
        loras = {}
        for item in _unquote(extra["Lora hashes"]).split(","):
            name, _, digest = item.partition(":")
            if name.strip():
                loras[name.strip()] = digest.strip()
        settings["loras"] = loras
    if d["rng"] is not None:
        settings["rng"] = d["rng"]
    if "Refiner" in extra:  # "name [hash]", A1111's 10 digits
        m = re.fullmatch(r"(.*?)\s*(?:\[([0-9a-fA-F]+)\])?", _unquote(extra.pop("Refiner")).strip())
        assert m is not None  # the pattern matches any text
        settings["refiner_name"] = m.group(1)
        if m.group(2):
            settings["refiner_sha256"] = m.group(2).lower()
        if "Refiner switch at" in extra:
            fields["refiner_switch"] = _float(path, "Refiner switch at", extra.pop("Refiner switch at"))
    ignored = [f"{k}: {v}" for k, v in extra.items() if k not in _A1111_INFO_FIELDS]
    return Generation(_request(path, fields), settings, ignored, "parameters")


def _image_fields(path: Path, extra: dict[str, str]) -> dict[str, Any]:
    """The request fields of A1111's image-to-image and hires-fix infotext keys (taken out of `extra`)."""
    from ldm.pipelines.images import parse_outpaint

    out: dict[str, Any] = {}
    hires = "Hires upscale" in extra
    if "Denoising strength" in extra:
        value = _float(path, "Denoising strength", extra.pop("Denoising strength"))
        out["hires_strength" if hires else "strength"] = value
    if hires:
        out["hires_scale"] = _float(path, "Hires upscale", extra.pop("Hires upscale"))
    for key, field, kind in (
        ("Hires steps", "hires_steps", int),
        ("Mask blur", "mask_blur", int),
        ("Masked area padding", "inpaint_padding", int),
        ("Hires upscaler", "hires_upscaler", str),
        ("Masked content", "masked_content", str),
        ("Inpaint area", "inpaint_area", str),
        ("Resize mode", "resize_mode", str),
    ):
        if key in extra:
            raw = extra.pop(key)
            out[field] = int(_float(path, key, raw)) if kind is int else raw
    if extra.get("Mask mode") == "Inpaint not masked":
        extra.pop("Mask mode")
        out["invert_mask"] = True
    elif extra.get("Mask mode") == "Inpaint masked":
        extra.pop("Mask mode")
    if "Outpaint" in extra:
        try:
            out["outpaint"] = parse_outpaint(_unquote(extra.pop("Outpaint")))
        except ValueError as e:
            raise ValueError(f"{path}: Outpaint: {e}") from None
    return out


def _float(path: Path, key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{path}: {key}: {value!r} is not a number") from None
