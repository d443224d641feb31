"""Training data: captioned image folders -> reproducible (pixels, caption) items, cached latents, seeded loaders.

Two folder layouts are read by `scan_image_folder` (recursively, hidden files and folders ignored):

* Hugging Face `imagefolder` style: a `metadata.jsonl` with one object per line,
  `{"file_name": "cat1.png", "text": "a photo of a cat"}` (`"caption"` is accepted for `"text"`);
  `file_name` is relative to the folder holding that metadata.jsonl.
* Same-name caption files: `cat1.png` + `cat1.txt` (UTF-8, stripped). Where both name a caption for
  one image, metadata.jsonl wins.

Every image is decoded once at scan time (truncated files detected), so a run never crashes on a
bad file hours in. Images that cannot be used are skipped and counted by reason (`SKIP_REASONS`);
an image with no caption in a folder that otherwise has captions is skipped as "no caption", not an
error, so one stray file does not block a run (`ScanResult.summary()` says how many). Mistakes that
would silently train on the wrong data are errors naming the file: a caption .txt without its image,
a metadata.jsonl line that is malformed or names a missing file.

Randomness: an item's crop window, flip and caption dropout come from a generator seeded with
(seed, epoch, index) alone (`augmentation`), and a loader's order from (seed, epoch) alone
(`EpochSampler`); the global RNG is never touched. A run is therefore reproducible, and resumable
exactly with `make_dataloader(..., epoch=e, skip_batches=b)`.

Placement: every item also says where its pixels come from (`Placement`): "original_size" (h, w) of
the picture before any resizing and "crop_top_left" (top, left) of its window in the resized picture
(mirrored with the flip), the size/crop conditioning SDXL was trained with.

Caching (`cache_latents_and_text`): the VAE latent distribution (mean, std) and the text context
(SDXL: and pooled vector) of every item computed once (both flips when random_flip), with the
placements when asked, optionally stored as safetensors under `cache_dir`; training then samples
z = mean + std * eps (`sample_latents`) exactly as without caching.

Shape notation: R resolution, B batch, C latent channels, h/w latent side (R/8), T context tokens (77*k), D width.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_NAME = "metadata.jsonl"
CAPTION_KEYS = ("text", "caption")  # metadata.jsonl keys holding the caption, first found wins
SKIP_REASONS = ("no caption", "unreadable", "truncated", "too small", "too large", "unsupported format")
CROPS = ("center", "random")
CACHE_FORMAT = "ldm-training-cache-1"  # bump when the cache layout or the item pipeline changes


# --------------------------------------------------------------------------- small helpers


def check_resolution(resolution: int) -> int:
    """`resolution` if it is a positive multiple of 8 (the VAE's downsampling), else ValueError."""
    if (
        isinstance(resolution, bool)
        or not isinstance(resolution, (int, np.integer))
        or resolution <= 0
        or resolution % 8
    ):
        raise ValueError(
            f"resolution {resolution!r}: must be a positive multiple of 8 (the VAE downsamples by 8), "
            "e.g. 512 for SD 1.x, 768 for SD 2.x-v"
        )
    return int(resolution)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (stable across runs, platforms and Python hash seeds)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@contextlib.contextmanager
def _strict_truncation():
    """Decode with PIL's truncated-file check on, whatever the process set globally."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _walk(root: Path) -> list[Path]:
    """All files under root, sorted, skipping hidden files and folders (.git, .ipynb_checkpoints...)."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [Path(os.path.normpath(os.path.join(folder, f))) for f in files if not f.startswith(".")]
    return sorted(out)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


# --------------------------------------------------------------------------- scanning a folder


@dataclass
class ScanResult:
    """The usable (image, caption) pairs of a folder, sorted by path, and what was skipped and why."""

    root: Path
    items: list[tuple[Path, str]]
    skipped: dict[str, list[Path]] = field(default_factory=dict)  # reason (one of SKIP_REASONS) -> paths

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> str:
        """One line, e.g. '98 images with captions in data/cats; skipped 3: 2 truncated, 1 too small'."""
        line = f"{len(self.items)} images with captions in {self.root}"
        total = sum(len(v) for v in self.skipped.values())
        if total:
            reasons = ", ".join(f"{len(v)} {k}" for k, v in self.skipped.items() if v)
            line += f"; skipped {total}: {reasons}"
        return line


def check_image(path: Path, min_size: int = 0) -> str | None:
    """None if `path` decodes completely and its short side is >= min_size, else the skip reason."""
    try:
        with _strict_truncation(), Image.open(path) as image:
            image.load()
            size = image.size
    except Image.DecompressionBombError:
        return "too large"
    except UnidentifiedImageError:
        return "unreadable"
    except OSError as e:
        return "truncated" if "truncated" in str(e) else "unreadable"
    except Exception:  # PIL raises SyntaxError, ValueError, EOFError, struct.error... on corrupt data
        return "unreadable"
    return "too small" if min(size) < min_size else None


def _read_metadata(meta: Path, captions: dict[Path, str], origin: dict[Path, str]) -> None:
    """Add the captions of one metadata.jsonl to `captions` (path -> caption)."""
    here: dict[Path, int] = {}
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{meta}, line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{where}: not valid JSON ({e.msg}); each line must be one object like "
                '{"file_name": "cat1.png", "text": "a photo of a cat"}'
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            raise ValueError(
                f'{where}: needs a "file_name" string, e.g. {{"file_name": "cat1.png", "text": "a photo of a cat"}}'
            )
        key = next((k for k in CAPTION_KEYS if k in record), None)
        if key is None:
            raise ValueError(f'{where}: no caption: add a "text" (or "caption") entry; keys found: {sorted(record)}')
        if not isinstance(record[key], str):
            raise ValueError(f'{where}: "{key}" must be a string, got {type(record[key]).__name__}')
        path = Path(os.path.normpath(meta.parent / record["file_name"]))
        if not path.is_file():
            raise ValueError(
                f"{where}: file_name {record['file_name']!r} not found ({path}); "
                "fix the name (relative to the metadata.jsonl's folder) or remove the line"
            )
        if path in here:
            raise ValueError(
                f"{where}: {record['file_name']!r} already captioned on line {here[path]}; keep one line per image"
            )
        here[path] = n
        captions[path] = record[key].strip()
        origin[path] = where


def scan_image_folder(root: str | os.PathLike, resolution: int = 512, min_size: int | None = None) -> ScanResult:
    """The captioned images under `root` (see the module docstring for the layouts), each decoded
    once to check it; unusable ones are skipped and counted by reason.

    min_size: images whose short side is below it are skipped as "too small"; default resolution // 2
    (more upscaling than 2x trains the model on blur).
    """
    root = Path(root)
    resolution = check_resolution(resolution)
    min_size = resolution // 2 if min_size is None else int(min_size)
    if not root.exists():
        raise ValueError(
            f"{root}: folder not found; pass a folder of images with captions "
            f"({METADATA_NAME} or a same-name .txt file per image)"
        )
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder; pass the folder holding the images and captions")
    files = _walk(root)
    images = [f for f in files if _is_image(f)]
    if not images:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found in it or its subfolders")

    captions: dict[Path, str] = {}
    origin: dict[Path, str] = {}
    for meta in (f for f in files if f.name == METADATA_NAME):
        _read_metadata(meta, captions, origin)

    by_stem: dict[tuple[Path, str], list[Path]] = {}
    for f in files:
        by_stem.setdefault((f.parent, f.stem), []).append(f)
    for txt in (f for f in files if f.suffix.lower() == ".txt"):
        partners = [f for f in by_stem[(txt.parent, txt.stem)] if _is_image(f)]
        if not partners:
            others = [f.name for f in by_stem[(txt.parent, txt.stem)] if f != txt]
            found = f" (found {', '.join(others)}: not a supported image type)" if others else ""
            raise ValueError(
                f"{txt}: caption file without its image{found}; expected {txt.stem}"
                f"{'/'.join(IMAGE_SUFFIXES)} next to it: add the image or remove the .txt"
            )
        try:
            text = txt.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"{txt}: not UTF-8 text; save the caption as UTF-8") from None
        for image in partners:
            captions.setdefault(image, text)  # metadata.jsonl wins

    if not captions:
        raise ValueError(
            f"{root}: {len(images)} images but no captions; add a {METADATA_NAME} "
            '(lines like {"file_name": "cat1.png", "text": "a photo of a cat"}) or a same-name '
            ".txt caption next to each image (cat1.png + cat1.txt)"
        )

    items: list[tuple[Path, str]] = []
    skipped: dict[str, list[Path]] = {}
    for path in sorted(set(images) | set(captions)):
        reason: str | None
        if path not in captions:
            reason = "no caption"
        elif not _is_image(path):
            reason = "unsupported format"  # named by metadata.jsonl, e.g. a .gif
        else:
            reason = check_image(path, min_size)
        if reason:
            skipped.setdefault(reason, []).append(path)
        else:
            items.append((path, captions[path]))
    skipped = {r: skipped[r] for r in SKIP_REASONS if r in skipped}
    if not items:
        reasons = ", ".join(f"{len(v)} {k}" for k, v in skipped.items())
        raise ValueError(f"{root}: no usable image ({reasons}); min_size is {min_size} px")
    return ScanResult(root, items, skipped)


# --------------------------------------------------------------------------- images -> tensors


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any PIL mode: transparency composited on white, 16-bit grayscale scaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        gray = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        image = Image.fromarray(gray)  # (H, W) uint8 -> "L"
    if image.mode in ("P", "PA") or (image.mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def open_image(source: Any, draft_size: int | None = None) -> Image.Image:
    """An RGB PIL image, upright (EXIF orientation applied), from a path, a PIL image or a
    Hugging Face datasets image value ({"bytes": ..., "path": ...}).

    draft_size: let JPEG decode at 1/2, 1/4 or 1/8 scale while both sides stay >= draft_size (fast).
    """
    return open_image_and_size(source, draft_size)[0]


ORIENTATION = 0x0112  # the EXIF orientation tag
QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations that exif_transpose turns by 90 degrees (width <-> height)


def open_image_and_size(source: Any, draft_size: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """`open_image`'s image and the upright (height, width) of the stored picture, before any resizing:
    a JPEG decoded at reduced scale (draft_size) still reports its full size (SDXL's original_size)."""
    if isinstance(source, Image.Image):
        image = to_rgb(ImageOps.exif_transpose(source))
        return image, (image.height, image.width)
    if isinstance(source, dict):
        source = io.BytesIO(source["bytes"]) if source.get("bytes") is not None else source["path"]
    with _strict_truncation(), Image.open(source) as image:
        w, h = image.size  # before draft() shrinks it
        if draft_size:
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        if image.getexif().get(ORIENTATION, 1) in QUARTER_TURNS:  # read after load: PNG keeps EXIF after the pixels
            w, h = h, w
        return to_rgb(ImageOps.exif_transpose(image)), (h, w)


def crop_box(
    size: tuple[int, int], resolution: int, crop_at: tuple[float, float] | None = None
) -> tuple[tuple[int, int], int, int]:
    """Where `resize_and_crop` cuts an image of `size` (w, h): (resized (w, h), left, top) of its square window,
    the shorter side resized to `resolution`; centered (crop_at None) or at fractions (u, v) in [0, 1) of the
    free width and height."""
    w, h = size
    scale = resolution / min(w, h)
    resized = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    free_w, free_h = resized[0] - resolution, resized[1] - resolution
    if crop_at is None:
        left, top = free_w // 2, free_h // 2
    else:
        left, top = min(int(crop_at[0] * (free_w + 1)), free_w), min(int(crop_at[1] * (free_h + 1)), free_h)
    return resized, left, top


def resize_and_crop(image: Image.Image, resolution: int, crop_at: tuple[float, float] | None = None) -> Image.Image:
    """Shorter side resized to `resolution` (antialiased: Lanczos down, bicubic up), then a square
    crop: centered (crop_at None) or at fractions (u, v) in [0, 1) of the free width and height."""
    size, left, top = crop_box(image.size, resolution, crop_at)
    if size != image.size:
        down = resolution < min(image.size)
        image = image.resize(size, Image.Resampling.LANCZOS if down else Image.Resampling.BICUBIC)
    return image.crop((left, top, left + resolution, top + resolution))


@dataclass(frozen=True)
class Placement:
    """Where an item's R x R training pixels come from: what SDXL is conditioned on (sgm's original_size_as_tuple
    and crop_coords_top_left, recorded alike by kohya's sd-scripts and diffusers' train_text_to_image_sdxl.py).

    original_size (h, w): the picture before any resizing; crop_top_left (top, left): the window's corner in the
    resized picture (resized_size (h, w)) as the model sees it, i.e. in the mirrored picture for a flipped item;
    target_size (h, w): the window, the training resolution."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    resized_size: tuple[int, int]
    target_size: tuple[int, int]

    def mirrored(self) -> Placement:
        """The same window after a horizontal flip: as far from the right edge as it was from the left."""
        top, left = self.crop_top_left
        return dataclasses.replace(self, crop_top_left=(top, self.resized_size[1] - self.target_size[1] - left))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The item entries: "original_size" and "crop_top_left", int64 (2,) each (a batch: (B, 2))."""
        return {
            "original_size": torch.tensor(self.original_size, dtype=torch.long),
            "crop_top_left": torch.tensor(self.crop_top_left, dtype=torch.long),
        }


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [-1, 1]."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())  # (H, W, 3)
    return (array / 127.5 - 1.0).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class Augmentation:
    """The random choices of one item in one epoch."""

    flip: bool
    drop_caption: bool
    crop_at: tuple[float, float]  # fractions of the free width / height (used by random crop only)


def augmentation(seed: int, epoch: int, index: int, random_flip: bool, caption_dropout: float) -> Augmentation:
    """Item `index`'s choices in `epoch`: four uniforms from a generator seeded by (seed, epoch, index),
    always drawn in the same order, so turning one option on or off never changes the others."""
    g = torch.Generator().manual_seed(derive_seed("item", seed, epoch, index))
    u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
    return Augmentation(flip=random_flip and u[0] < 0.5, drop_caption=u[1] < caption_dropout, crop_at=(u[2], u[3]))


# --------------------------------------------------------------------------- the dataset


class CaptionedImageDataset(Dataset):
    """(pixels, caption) items for training: {"pixels": float32 (3, R, R) in [-1, 1], "caption": str, "index": int}.

    items: a ScanResult, a sequence of (image, caption) pairs (image: path, PIL image or datasets
    image value), or `load_hf_dataset`'s result. crop: "center" or "random" (a new window each
    epoch). random_flip: horizontal flip with p = 0.5. caption_dropout: probability that the caption
    is replaced by "" (trains the unconditional branch that classifier-free guidance needs).
    All choices depend on (seed, epoch, index) only; call `set_epoch` at each epoch.
    """

    def __init__(
        self,
        items: ScanResult | HFImageCaptions | Sequence,
        resolution: int = 512,
        *,
        crop: str = "center",
        random_flip: bool = False,
        caption_dropout: float = 0.0,
        seed: int = 0,
        epoch: int = 0,
    ):
        self.resolution = check_resolution(resolution)
        if crop not in CROPS:
            raise ValueError(f"crop {crop!r}: use one of {CROPS}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout {caption_dropout}: must be a probability in [0, 1] (0.1 is usual)")
        self.scan = items if isinstance(items, ScanResult) else None
        pairs: Any = items.items if isinstance(items, ScanResult) else items
        self.images: Sequence[Any]
        if hasattr(pairs, "images") and hasattr(pairs, "captions"):  # lazy sources (HFImageCaptions)
            self.images, self.captions = pairs.images, list(pairs.captions)
            self._fingerprint = getattr(pairs, "fingerprint", None)
        else:
            self.images = [image for image, _ in pairs]
            self.captions = [caption for _, caption in pairs]
            self._fingerprint = None
        if not self.captions:
            raise ValueError("CaptionedImageDataset: no items")
        self.crop, self.random_flip, self.caption_dropout = crop, bool(random_flip), float(caption_dropout)
        self.seed, self.epoch = int(seed), int(epoch)

    @classmethod
    def from_folder(
        cls, root: str | os.PathLike, resolution: int = 512, *, min_size: int | None = None, **kwargs
    ) -> CaptionedImageDataset:
        return cls(scan_image_folder(root, resolution, min_size), resolution, **kwargs)

    def __len__(self) -> int:
        return len(self.captions)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def augmentation(self, index: int) -> Augmentation:
        return augmentation(self.seed, self.epoch, index, self.random_flip, self.caption_dropout)

    def pixels(self, index: int, flip: bool = False, crop_at: tuple[float, float] | None = None) -> torch.Tensor:
        """Image `index` resized and cropped (centered unless crop_at), (3, R, R) in [-1, 1]."""
        return self.load(index, flip, crop_at)[0]

    def load(
        self, index: int, flip: bool = False, crop_at: tuple[float, float] | None = None
    ) -> tuple[torch.Tensor, Placement]:
        """`pixels(index, flip, crop_at)` and where they come from in the picture (`Placement`)."""
        image, original = open_image_and_size(self.images[index], draft_size=self.resolution)
        # the window is placed on the decoded image (a JPEG draft may be smaller than the stored picture)
        resized, left, top = crop_box(image.size, self.resolution, crop_at)
        R = self.resolution
        placement = Placement(original, (top, left), (resized[1], resized[0]), (R, R))
        pixels = to_tensor(resize_and_crop(image, R, crop_at))
        return (pixels.flip(-1), placement.mirrored()) if flip else (pixels, placement)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """{"pixels", "caption", "index", "original_size", "crop_top_left"} (`Placement.tensors`)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        aug = self.augmentation(index)
        pixels, placement = self.load(index, aug.flip, aug.crop_at if self.crop == "random" else None)
        caption = "" if aug.drop_caption else self.captions[index]
        return {"pixels": pixels, "caption": caption, "index": index, **placement.tensors()}

    def fingerprint(self) -> str:
        """A hash of what the items are made of: files (path, size, mtime), captions, resolution, crop."""
        h = hashlib.sha256(json.dumps([CACHE_FORMAT, self.resolution, self.crop]).encode())
        if self._fingerprint is not None:
            h.update(str(self._fingerprint).encode())
        else:
            for image in self.images:
                if isinstance(image, Image.Image):
                    h.update(f"{image.mode}{image.size}".encode() + image.tobytes())
                else:
                    path = Path(image).resolve()
                    stat = path.stat()
                    h.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        h.update(json.dumps(self.captions).encode())
        return h.hexdigest()


# --------------------------------------------------------------------------- Hugging Face datasets


class HFImageCaptions:
    """(image, caption) pairs of a Hugging Face `datasets` split; images decoded lazily."""

    def __init__(self, dataset, image_column: str, caption_column: str, name: str = "", split: str = ""):
        self.dataset, self.image_column = dataset, image_column
        self.captions = [_hf_caption(c, name, caption_column, i) for i, c in enumerate(dataset[caption_column])]
        self.images = _LazyColumn(dataset, image_column)
        self.fingerprint = (
            f"hf|{name}|{split}|{image_column}|{caption_column}|"
            f"{getattr(dataset, '_fingerprint', None)}|{len(self.captions)}"
        )

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[Any, str]:
        return self.images[index], self.captions[index]


class _LazyColumn:
    def __init__(self, dataset, column: str):
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[int(index)][self.column]


def _hf_caption(value, name: str, column: str, row: int) -> str:
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        value = value[0]  # several captions per image (COCO style): the first
    if not isinstance(value, str):
        raise ValueError(
            f"dataset {name!r}, row {row}: caption column {column!r} holds "
            f"{type(value).__name__}, not text; pick the text column with caption_column="
        )
    return value.strip()


def load_hf_dataset(
    name: str, split: str = "train", image_column: str = "image", caption_column: str = "text"
) -> HFImageCaptions:
    """A split of a Hugging Face dataset (hub name or local script) as (image, caption) pairs.
    Needs the optional `datasets` package; images are not verified up front."""
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{name!r} is not a local folder, and loading it as a Hugging Face dataset needs the "
            "`datasets` package: pip install datasets (or pass a folder of captioned images)"
        ) from None
    ds = datasets.load_dataset(name, split=split)
    for role, column in (("image_column", image_column), ("caption_column", caption_column)):
        if column not in ds.column_names:
            raise ValueError(
                f"dataset {name!r} ({split}) has no column {column!r}; columns: {ds.column_names}; pass {role}="
            )
    return HFImageCaptions(ds, image_column, caption_column, name, split)


def _looks_like_path(name: str) -> bool:
    """Hub names are 'name' or 'owner/name'; anything else is meant as a local path."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith("/")
        or os.path.exists(name)
    )


def load_training_dataset(
    source: str | os.PathLike,
    resolution: int = 512,
    *,
    min_size: int | None = None,
    split: str = "train",
    image_column: str = "image",
    caption_column: str = "text",
    **kwargs,
) -> CaptionedImageDataset:
    """A CaptionedImageDataset from a local folder (scanned) or, when `source` is not one, a Hugging
    Face dataset name. kwargs: CaptionedImageDataset's (crop, random_flip, caption_dropout, seed)."""
    check_resolution(resolution)
    text = str(source)
    if isinstance(source, os.PathLike) or _looks_like_path(text):
        return CaptionedImageDataset.from_folder(source, resolution, min_size=min_size, **kwargs)
    return CaptionedImageDataset(load_hf_dataset(text, split, image_column, caption_column), resolution, **kwargs)


# --------------------------------------------------------------------------- caching latents and text


def vae_latent_distribution(vae) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """An `encode_images` for caching: images (B, 3, R, R) -> (mean, std) of the scaled latent
    distribution, each (B, C, h, w), so that mean + std * eps equals `vae.encode(images)` sampled
    with the same eps (diffusers' DiagonalGaussianDistribution: std = exp(logvar / 2))."""

    @torch.no_grad()
    def encode(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = vae.model.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return (dist.mean - vae.shift_factor) * vae.scaling_factor, dist.std * vae.scaling_factor

    return encode


def sample_gaussian(
    mean: torch.Tensor,
    std: torch.Tensor,
    generator: torch.Generator | None = None,
    global_batch: int | None = None,
    sl: slice = slice(None),
) -> torch.Tensor:
    """z = mean + std * eps, eps ~ N(0, I) drawn on the CPU from `generator` in float32 (float64
    for float64 means) for a batch of `global_batch` rows (default: mean's), then sliced with `sl`:
    each process of a data-parallel run draws the whole global batch and keeps its own rows."""
    shape = (global_batch or mean.shape[0], *mean.shape[1:])
    eps = torch.randn(shape, generator=generator, dtype=torch.promote_types(mean.dtype, torch.float32))
    return mean + std * eps[sl].to(mean.device)


def sample_latents(
    batch: dict[str, torch.Tensor],
    generator: torch.Generator | None = None,
    global_batch: int | None = None,
    sl: slice = slice(None),
) -> torch.Tensor:
    """Latents (B, C, h, w) of a cached batch: z = mean + std * eps (`sample_gaussian`), or the stored latents."""
    if "latents" in batch:
        return batch["latents"]
    return sample_gaussian(batch["latent_mean"], batch["latent_std"], generator, global_batch, sl)


class CachedDataset(Dataset):
    """Precomputed items: {"latent_mean", "latent_std": (C, h, w)} (or {"latents"}),
    "context": (T, D), "caption": str, "index": int; with an SDXL text encoding also "pooled" (P,), and
    with sizes (`cache_latents_and_text(..., with_sizes=True)`) "original_size" and "crop_top_left" (2,)
    as the live items have them. Flip and caption dropout are chosen per (seed, epoch, index) exactly as
    in the CaptionedImageDataset it was made from."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        captions: list[str],
        *,
        random_flip: bool,
        caption_dropout: float,
        seed: int = 0,
        epoch: int = 0,
        path: Path | None = None,
        from_disk: bool = False,
    ):
        self.tensors, self.captions = tensors, captions
        self.latent_keys = ("latents",) if "latents" in tensors else ("latent_mean", "latent_std")
        self.random_flip, self.caption_dropout = random_flip, caption_dropout
        self.seed, self.epoch = int(seed), int(epoch)
        self.path, self.from_disk = path, from_disk

    @classmethod
    def of(
        cls, dataset: CaptionedImageDataset, tensors: dict[str, torch.Tensor], *, path: Path | None, from_disk: bool
    ) -> CachedDataset:
        """The cache of `dataset`: its captions, flips, caption dropout, seed and current epoch."""
        return cls(
            tensors,
            dataset.captions,
            random_flip=dataset.random_flip,
            caption_dropout=dataset.caption_dropout,
            seed=dataset.seed,
            epoch=dataset.epoch,
            path=path,
            from_disk=from_disk,
        )

    def __len__(self) -> int:
        return len(self.captions)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        aug = augmentation(self.seed, self.epoch, index, self.random_flip, self.caption_dropout)
        t = self.tensors
        item: dict[str, Any] = {k: t[k][index, int(aug.flip)] for k in self.latent_keys}
        if aug.drop_caption:
            item["context"], item["caption"] = t["empty_context"], ""
            if "pooled" in t:
                item["pooled"] = t["empty_pooled"]
        else:
            item["context"] = t["contexts"][t["caption_ids"][index]]
            item["caption"] = self.captions[index]
            if "pooled" in t:
                item["pooled"] = t["pooled"][t["caption_ids"][index]]
        if "original_sizes" in t:
            item["original_size"] = t["original_sizes"][index]
            item["crop_top_left"] = t["crop_top_lefts"][index, int(aug.flip)]
        item["index"] = index
        return item


SIZE_KEYS = ("original_sizes", "crop_top_lefts")  # a cache's per-item placements (with_sizes)


def _cache_key(dataset: CaptionedImageDataset, model_id: str, flips: int, with_sizes: bool = False) -> str:
    parts: list[Any] = [CACHE_FORMAT, dataset.fingerprint(), str(model_id), flips]
    if with_sizes:  # appended only then: the caches written before sizes existed keep their names and load
        parts.append("sizes")
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def _load_cache(path: Path, dataset: CaptionedImageDataset, with_sizes: bool = False) -> dict[str, torch.Tensor] | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CACHE_FORMAT or json.loads(meta.get("captions", "null")) != dataset.captions:
                return None
            if with_sizes and not set(SIZE_KEYS) <= set(f.keys()):
                return None  # made without the items' sizes and crops (SDXL needs them): compute again
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError):
        return None  # unreadable or half-written: compute again


def _save_cache(path: Path, tensors: dict[str, torch.Tensor], captions: list[str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(tmp),
        metadata={"format": CACHE_FORMAT, "captions": json.dumps(captions)},
    )
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache under the real name


TextEncoding = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # context (B, T, D), or SDXL's (context, pooled)


def _text_parts(encoded: TextEncoding) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context, pooled or None) of an encode_text result, on the CPU."""
    context, pooled = encoded if isinstance(encoded, tuple) else (encoded, None)
    return context.detach().cpu(), None if pooled is None else pooled.detach().cpu()


@torch.no_grad()
def cache_latents_and_text(
    dataset: CaptionedImageDataset,
    encode_images: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    encode_text: Callable[[list[str]], TextEncoding],
    batch_size: int = 8,
    progress: bool = True,
    *,
    cache_dir: str | os.PathLike | None = None,
    model_id: str | None = None,
    with_sizes: bool = False,
) -> CachedDataset:
    """Every item's latents and text context computed once; the returned CachedDataset replaces
    `dataset` in training (same flips, same caption dropout, same (seed, epoch, index) choices).

    encode_images: (B, 3, R, R) in [-1, 1] -> (mean, std) each (B, C, h, w) (`vae_latent_distribution`),
    or -> latents (B, C, h, w) stored as such. encode_text: B captions -> context (B, T, D), or SDXL's
    (context, pooled (B, P)); every caption must give the same T (encode with a fixed number of 77-token
    chunks). with_sizes: keep each item's original size and crop (`Placement`, per flip), SDXL's size/crop
    conditioning. With random_flip both the image and its mirror are encoded (a flip of the latent is not
    the latent of the flip). Random crops cannot be cached.
    cache_dir: store / reuse a safetensors file named by a hash of the files, captions, resolution,
    crop and `model_id` (required with cache_dir: something that changes with the VAE / text encoder,
    e.g. the weights file's hash). A stored cache without the sizes asked for is computed again.
    """
    from tqdm.auto import tqdm

    if dataset.crop == "random":
        raise ValueError(
            "random crops can't be cached (each epoch cuts a different window); "
            "use crop='center' or train without caching"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be >= 1")
    flips = 2 if dataset.random_flip else 1
    path = None
    if cache_dir is not None:
        if not model_id:
            raise ValueError(
                "cache_dir needs model_id: a string that changes with the VAE and text encoder "
                "(e.g. the weights file's sha256), so a cache made by another model is never reused"
            )
        path = Path(cache_dir) / f"latents-{_cache_key(dataset, model_id, flips, with_sizes)}.safetensors"
        tensors = _load_cache(path, dataset, with_sizes) if path.is_file() else None
        if tensors is not None:
            return CachedDataset.of(dataset, tensors, path=path, from_disk=True)

    n = len(dataset)
    parts: dict[str, list[torch.Tensor]] = {}
    with tqdm(total=n, desc="caching latents", unit="img", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            loaded = [dataset.load(i) for i in range(start, min(start + batch_size, n))]
            pixels = torch.stack([x for x, _ in loaded])
            per_flip = [encode_images(pixels.flip(-1) if f else pixels) for f in range(flips)]
            outputs: dict[str, list[torch.Tensor]] = {}
            for o in per_flip:
                if isinstance(o, tuple):
                    outputs.setdefault("latent_mean", []).append(o[0])
                    outputs.setdefault("latent_std", []).append(o[1])
                else:
                    outputs.setdefault("latents", []).append(o)
            if with_sizes:  # the window of each flip: in a mirrored picture the crop sits elsewhere
                places = [p for _, p in loaded]
                outputs["crop_top_lefts"] = [
                    torch.tensor([(p.mirrored() if f else p).crop_top_left for p in places]) for f in range(flips)
                ]
                parts.setdefault("original_sizes", []).append(torch.tensor([p.original_size for p in places]))
            for key, values in outputs.items():
                stacked = torch.stack([v.detach().cpu() for v in values], 1)  # (B, F, ...)
                parts.setdefault(key, []).append(stacked)
            bar.update(len(pixels))

    unique = list(dict.fromkeys(dataset.captions))
    ids = {c: i for i, c in enumerate(unique)}
    texts = [_text_parts(encode_text(unique[s : s + batch_size])) for s in range(0, len(unique), batch_size)]
    empty, empty_pooled = _text_parts(encode_text([""]))
    lengths = sorted({c.shape[1] for c, _ in texts} | {empty.shape[1]})
    if len(lengths) > 1:
        raise ValueError(
            f"encode_text gave contexts of {lengths} tokens for different captions; cached contexts "
            "must stack: encode every caption with the same number of 77-token chunks"
        )
    tensors = {k: torch.cat(v) for k, v in parts.items()}
    tensors.update(
        contexts=torch.cat([c for c, _ in texts]),
        empty_context=empty[0],
        caption_ids=torch.tensor([ids[c] for c in dataset.captions], dtype=torch.long),
    )
    if empty_pooled is not None:  # SDXL: the pooled text vector of each caption too
        tensors.update(pooled=torch.cat([p for _, p in texts if p is not None]), empty_pooled=empty_pooled[0])
    if path is not None:
        _save_cache(path, tensors, dataset.captions)
    return CachedDataset.of(dataset, tensors, path=path, from_disk=False)


# --------------------------------------------------------------------------- loaders


def epoch_permutation(num_items: int, seed: int, epoch: int) -> list[int]:
    """The item order of one epoch: a permutation of 0..num_items-1 that depends on (seed, epoch) only."""
    g = torch.Generator().manual_seed(derive_seed("order", seed, epoch))
    return torch.randperm(num_items, generator=g).tolist()


class EpochSampler(Sampler[int]):
    """The indices of one epoch: a permutation that depends on (seed, epoch) only (or 0..N-1 when
    not shuffling), without its first `skip` indices (to resume mid-epoch).

    set_epoch(e) moves to epoch e, clears `skip` when e is a new epoch, and sets the epoch of
    `dataset` too when given (accelerate's prepared loaders call the sampler's set_epoch only).
    """

    def __init__(
        self,
        num_items: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        skip: int = 0,
        dataset: Dataset | None = None,
    ):
        self.num_items, self.shuffle, self.seed = int(num_items), bool(shuffle), int(seed)
        self.epoch, self.skip, self.dataset = int(epoch), int(skip), dataset

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.skip = 0
        self.epoch = int(epoch)
        if self.dataset is not None and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)

    def order(self) -> list[int]:
        """The whole epoch's order, skipped indices included."""
        return epoch_permutation(self.num_items, self.seed, self.epoch) if self.shuffle else list(range(self.num_items))

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.skip :])

    def __len__(self) -> int:
        return max(0, self.num_items - self.skip)


def make_dataloader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    skip_batches: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over one epoch whose order depends on (seed, epoch) only, starting after its
    first `skip_batches` batches (exact resume). Sets the dataset's epoch; build one loader per
    epoch (cheap), or call `loader.sampler.set_epoch(e)` between epochs. The global RNG is not
    touched (the loader's worker seeds come from (seed, epoch) too).

    Under accelerate: `accelerator.prepare(loader)` counts epochs itself from 0 — call the prepared
    loader's `set_epoch(epoch)` before iterating; skip_batches counts batches before sharding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be >= 1")
    n = len(cast(Sized, dataset))  # a map-style dataset
    batches = n // batch_size if drop_last else math.ceil(n / batch_size)
    if not 0 <= skip_batches <= batches:
        raise ValueError(
            f"skip_batches {skip_batches}: an epoch has {batches} batches of {batch_size} "
            f"({n} items{', drop_last' if drop_last else ''})"
        )
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    sampler = EpochSampler(n, shuffle=shuffle, seed=seed, epoch=epoch, skip=skip_batches * batch_size, dataset=dataset)
    generator = torch.Generator().manual_seed(derive_seed("loader", seed, epoch))  # worker seeds; not the global RNG
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        generator=generator,
    )
