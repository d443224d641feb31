"""Training data layer: folder scanning, items, caching, seeded loaders. Small images built in tmp_path."""

import io
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.training.data import (
    CachedDataset,
    CaptionedImageDataset,
    EpochSampler,
    cache_latents_and_text,
    load_hf_dataset,
    load_training_dataset,
    make_dataloader,
    open_image,
    sample_gaussian,
    sample_latents,
    scan_image_folder,
)

R = 16  # resolution used throughout: min_size defaults to 8


def make_image(path, size=(24, 20), mode="RGB", seed=0, fmt=None, **save):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(array[..., 0] if channels == 1 else array)  # mode from the shape
    if not isinstance(path, io.BytesIO):
        path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **save)
    return path


def txt_folder(root, n=4):
    """n images with .txt captions, half of them in a subfolder, mixed formats and sizes."""
    suffixes = [".png", ".jpg", ".webp", ".bmp"]
    for i in range(n):
        sub = root / "sub" if i % 2 else root
        make_image(sub / f"img{i}{suffixes[i % 4]}", size=(20 + 4 * i, 16 + 2 * i), seed=i)
        (sub / f"img{i}.txt").write_text(f"  caption {i}\n")
    return root


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")


def fake_encoders():
    calls = {"images": 0, "text": 0}

    def encode_images(x):  # (B, 3, R, R) -> (mean, std) (B, 3, R/8, R/8)
        calls["images"] += 1
        mean = F.avg_pool2d(x, 8)
        return mean, mean.abs() + 0.1

    def encode_text(captions):  # deterministic per caption, (B, 77, 4)
        calls["text"] += 1
        seeds = [sum(map(ord, c)) * 31 + len(c) for c in captions]
        return torch.stack([torch.randn(77, 4, generator=torch.Generator().manual_seed(s)) for s in seeds])

    return encode_images, encode_text, calls


# --------------------------------------------------------------------------- scanning


def test_txt_layout_recursive_sorted(tmp_path):
    txt_folder(tmp_path, 4)
    scan = scan_image_folder(tmp_path, resolution=R)
    names = [p.relative_to(tmp_path).as_posix() for p, _ in scan.items]
    assert names == sorted(names) == ["img0.png", "img2.webp", "sub/img1.jpg", "sub/img3.bmp"]
    assert dict((p.name, c) for p, c in scan.items)["img2.webp"] == "caption 2"
    assert scan.skipped == {} and len(scan) == 4


def test_metadata_jsonl_text_and_caption_keys(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "images" / "b.jpg")
    make_image(tmp_path / "nested" / "c.png")
    write_jsonl(
        tmp_path / "metadata.jsonl",
        [{"file_name": "a.png", "text": "first"}, "", {"file_name": "images/b.jpg", "caption": "second", "extra": 1}],
    )
    write_jsonl(tmp_path / "nested" / "metadata.jsonl", [{"file_name": "c.png", "text": "third"}])
    scan = scan_image_folder(tmp_path, resolution=R)
    assert [(p.relative_to(tmp_path).as_posix(), c) for p, c in scan.items] == [
        ("a.png", "first"),
        ("images/b.jpg", "second"),
        ("nested/c.png", "third"),
    ]


def test_bad_images_skipped_and_counted(tmp_path):
    txt_folder(tmp_path, 2)
    (tmp_path / "random.png").write_bytes(np.random.default_rng(0).bytes(300))
    for fmt, suffix in (("PNG", ".png"), ("JPEG", ".jpg")):
        buf = io.BytesIO()
        make_image(buf, size=(40, 40), fmt=fmt)
        (tmp_path / f"cut{suffix}").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    make_image(tmp_path / "tiny.png", size=(40, 7))
    make_image(tmp_path / "uncaptioned.png")
    for name in ("random", "cut", "tiny"):
        (tmp_path / f"{name}.txt").write_text(name)
    scan = scan_image_folder(tmp_path, resolution=R)
    assert len(scan.items) == 2
    got = {reason: sorted(p.name for p in paths) for reason, paths in scan.skipped.items()}
    assert got == {
        "no caption": ["uncaptioned.png"],
        "unreadable": ["random.png"],
        "truncated": ["cut.jpg", "cut.png"],
        "too small": ["tiny.png"],
    }
    assert "skipped 5: 1 no caption, 1 unreadable, 2 truncated, 1 too small" in scan.summary()
    assert len(scan_image_folder(tmp_path, resolution=R, min_size=1).items) == 3  # tiny accepted now


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "folder not found"),
        ("empty", "no images"),
        ("no_captions", "no captions"),
        ("orphan_txt", r"lonely\.txt: caption file without its image"),
        ("missing_file", r"metadata\.jsonl, line 2: file_name 'gone\.png' not found"),
        ("bad_json", r"metadata\.jsonl, line 1: not valid JSON"),
        ("no_text", r"metadata\.jsonl, line 1: no caption"),
        ("all_bad", r"no usable image \(1 unreadable\)"),
    ],
)
def test_errors_name_the_problem(tmp_path, case, match):
    root = tmp_path / "data"
    if case != "missing":
        root.mkdir()
    if case in ("no_captions", "orphan_txt", "missing_file", "bad_json", "no_text"):
        make_image(root / "a.png")
    if case == "empty":
        (root / "notes.md").write_text("x")
    if case == "orphan_txt":
        (root / "a.txt").write_text("fine")
        (root / "lonely.txt").write_text("where is my image")
    if case == "missing_file":
        write_jsonl(
            root / "metadata.jsonl", [{"file_name": "a.png", "text": "ok"}, {"file_name": "gone.png", "text": "x"}]
        )
    if case == "bad_json":
        write_jsonl(root / "metadata.jsonl", ['{"file_name": "a.png", "text": "oops"'])
    if case == "no_text":
        write_jsonl(root / "metadata.jsonl", [{"file_name": "a.png", "prompt": "x"}])
    if case == "all_bad":
        (root / "a.png").write_bytes(b"not a png")
        (root / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=match) as e:
        scan_image_folder(root, resolution=R)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("resolution", [12, 0, -8, 8.0, True])
def test_resolution_must_be_multiple_of_8(tmp_path, resolution):
    txt_folder(tmp_path, 1)
    with pytest.raises(ValueError, match="multiple of 8"):
        CaptionedImageDataset.from_folder(tmp_path, resolution)
    with pytest.raises(ValueError, match="multiple of 8"):
        scan_image_folder(tmp_path, resolution)


# --------------------------------------------------------------------------- items


def test_pixels_shape_range_and_modes(tmp_path):
    make_image(tmp_path / "rgba.png", size=(30, 18), mode="RGBA")
    make_image(tmp_path / "gray.jpg", size=(18, 30), mode="L")
    Image.new("P", (20, 20), 3).save(tmp_path / "pal.png")
    Image.new("RGB", (32, 16), (255, 0, 0)).save(tmp_path / "red.bmp")
    for name in ("rgba", "gray", "pal", "red"):
        (tmp_path / f"{name}.txt").write_text(name)
    ds = CaptionedImageDataset.from_folder(tmp_path, R)
    for i in range(len(ds)):
        item = ds[i]
        assert item["pixels"].shape == (3, R, R) and item["pixels"].dtype == torch.float32
        assert item["pixels"].min() >= -1 and item["pixels"].max() <= 1 and item["index"] == i
    red = ds[[c for c in ds.captions].index("red")]["pixels"]
    assert torch.equal(red[0], torch.ones(R, R)) and torch.equal(red[1], -torch.ones(R, R))


def test_transparency_on_white_and_exif_orientation(tmp_path):
    clear = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    assert open_image(clear).getpixel((0, 0)) == (255, 255, 255)
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert open_image(tmp_path / "rotated.jpg").size == (20, 40)


def test_augmentation_deterministic_and_varies_by_epoch(tmp_path):
    make_image(tmp_path / "wide.png", size=(64, 16))
    (tmp_path / "wide.txt").write_text("wide")
    scan = scan_image_folder(tmp_path, resolution=R)
    items = scan.items * 32  # same image, 32 indices
    kw = dict(crop="random", random_flip=True, caption_dropout=0.5, seed=3)
    a, b = CaptionedImageDataset(items, R, **kw), CaptionedImageDataset(items, R, **kw)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    for i in (0, 5, 31):
        x, y = a[i], b[i]
        assert torch.equal(x["pixels"], y["pixels"]) and x["caption"] == y["caption"]
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched

    def epoch_view(epoch):
        a.set_epoch(epoch)
        return [a.augmentation(i) for i in range(len(a))]

    e0, e1 = epoch_view(0), epoch_view(1)
    assert e0 == epoch_view(0) and e0 != e1
    assert 0 < sum(x.flip for x in e0) < 32 and 0 < sum(x.drop_caption for x in e0) < 32
    a.set_epoch(0)
    views = {tuple(a[i]["pixels"][0, 0, :4].tolist()) for i in range(8)}
    assert len(views) > 2  # different crops / flips of the same image
    captions = [a[i]["caption"] for i in range(32)]
    assert set(captions) == {"", "wide"} and captions == ["" if x.drop_caption else "wide" for x in e0]
    center = CaptionedImageDataset(items, R, seed=3)
    assert all(torch.equal(center[0]["pixels"], center[i]["pixels"]) for i in (1, 2))


# --------------------------------------------------------------------------- caching


def test_cache_equals_on_the_fly(tmp_path):
    txt_folder(tmp_path, 5)
    ds = CaptionedImageDataset.from_folder(tmp_path, R, random_flip=True, caption_dropout=0.4, seed=1)
    encode_images, encode_text, _ = fake_encoders()
    cached = cache_latents_and_text(ds, encode_images, encode_text, batch_size=2, progress=False)
    assert isinstance(cached, CachedDataset) and len(cached) == len(ds)
    flips = set()
    for epoch in (0, 1, 2):
        ds.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(len(ds)):
            live, item = ds[i], cached[i]
            mean, std = encode_images(live["pixels"][None])
            assert torch.equal(item["latent_mean"], mean[0]) and torch.equal(item["latent_std"], std[0])
            assert torch.equal(item["context"], encode_text([live["caption"]])[0])
            assert item["caption"] == live["caption"] and item["index"] == i
            flips.add(ds.augmentation(i).flip)
    assert flips == {False, True}
    batch = next(iter(make_dataloader(cached, 3, seed=0)))
    z = sample_latents(batch, torch.Generator().manual_seed(0))
    assert z.shape == (3, 3, R // 8, R // 8) and batch["context"].shape == (3, 77, 4)


def test_sample_gaussian_slices_the_global_draw():
    """Each process draws the noise of the whole global batch and keeps its rows: two halves are the
    whole; a cached batch samples the same (`sample_latents`)."""
    g = torch.Generator().manual_seed(3)
    mean, std = torch.randn(4, 2, 3, 3, generator=g), torch.rand(4, 2, 3, 3, generator=g)
    whole = sample_gaussian(mean, std, torch.Generator().manual_seed(1))
    halves = [
        sample_gaussian(mean[sl], std[sl], torch.Generator().manual_seed(1), 4, sl) for sl in (slice(0, 2), slice(2, 4))
    ]
    assert torch.equal(torch.cat(halves), whole)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(whole, mean + std * eps)
    batch = {"latent_mean": mean, "latent_std": std}
    assert torch.equal(sample_latents(batch, torch.Generator().manual_seed(1)), whole)
    assert sample_latents({"latents": mean}) is mean


def test_cache_plain_latents_and_random_crop_refused(tmp_path):
    txt_folder(tmp_path, 3)
    ds = CaptionedImageDataset.from_folder(tmp_path, R)
    _, encode_text, _ = fake_encoders()
    cached = cache_latents_and_text(ds, lambda x: F.avg_pool2d(x, 8), encode_text, progress=False)
    assert torch.equal(cached[1]["latents"], F.avg_pool2d(ds[1]["pixels"][None], 8)[0])
    assert set(cached[1]) == {"latents", "context", "caption", "index"}
    random_crop = CaptionedImageDataset.from_folder(tmp_path, R, crop="random")
    with pytest.raises(ValueError, match="random crops can't be cached"):
        cache_latents_and_text(random_crop, lambda x: x, encode_text, progress=False)


def test_cache_reused_from_disk(tmp_path):
    data, cache = txt_folder(tmp_path / "data", 3), tmp_path / "cache"
    encode_images, encode_text, calls = fake_encoders()

    def run(model_id="vae-A", **kw):
        ds = CaptionedImageDataset.from_folder(data, R, random_flip=True, **kw)
        return cache_latents_and_text(ds, encode_images, encode_text, 2, False, cache_dir=cache, model_id=model_id)

    with pytest.raises(ValueError, match="model_id"):
        run(model_id=None)
    first = run()
    n_calls = dict(calls)
    second = run(caption_dropout=0.3)  # dropout and seed are applied at read time: same cache
    assert calls == n_calls and second.from_disk and not first.from_disk and second.path == first.path
    for key in ("latent_mean", "latent_std", "contexts", "empty_context", "caption_ids"):
        assert torch.equal(first.tensors[key], second.tensors[key])
    assert not run(model_id="vae-B").from_disk  # another model: recomputed
    (data / "img0.txt").write_text("a new caption")
    assert not run().from_disk  # captions changed: recomputed
    assert len(list(cache.glob("*.safetensors"))) == 3


def test_cache_rejects_ragged_contexts(tmp_path):
    txt_folder(tmp_path, 2)
    ds = CaptionedImageDataset.from_folder(tmp_path, R)
    ragged = lambda captions: torch.zeros(len(captions), 154 if "1" in captions[0] else 77, 4)  # noqa: E731
    with pytest.raises(ValueError, match="same number of 77-token chunks"):
        cache_latents_and_text(ds, lambda x: x, ragged, batch_size=1, progress=False)


# --------------------------------------------------------------------------- loaders


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n, self.epoch = n, None

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i

    def set_epoch(self, epoch):
        self.epoch = epoch


def _order(loader):
    return [int(i) for batch in loader for i in batch]


def test_dataloader_order_depends_on_seed_and_epoch_only():
    ds = _Indices(23)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    base = _order(make_dataloader(ds, 4, seed=7, epoch=2))
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(999)
    assert _order(make_dataloader(ds, 4, seed=7, epoch=2)) == base and ds.epoch == 2
    assert sorted(base) == list(range(23)) and base != list(range(23))
    assert _order(make_dataloader(ds, 4, seed=7, epoch=3)) != base
    assert _order(make_dataloader(ds, 4, seed=8, epoch=2)) != base
    assert _order(make_dataloader(ds, 5, seed=7, epoch=2)) == base  # batch size does not change the order
    assert _order(make_dataloader(ds, 4, shuffle=False)) == list(range(23))


def test_skip_batches_resumes_exactly():
    ds = _Indices(23)
    full = [b.tolist() for b in make_dataloader(ds, 4, seed=1, epoch=5, drop_last=True)]
    assert len(full) == 5
    resumed = [b.tolist() for b in make_dataloader(ds, 4, seed=1, epoch=5, drop_last=True, skip_batches=2)]
    assert resumed == full[2:]
    assert list(make_dataloader(ds, 4, seed=1, epoch=5, drop_last=True, skip_batches=5)) == []
    with pytest.raises(ValueError, match="skip_batches 6"):
        make_dataloader(ds, 4, drop_last=True, skip_batches=6)
    sampler = EpochSampler(23, seed=1, epoch=5, skip=8, dataset=ds)
    sampler.set_epoch(6)  # a new epoch starts from its beginning
    assert len(list(sampler)) == 23 and ds.epoch == 6


def test_dataloader_with_workers_matches(tmp_path):
    txt_folder(tmp_path, 4)
    ds = CaptionedImageDataset.from_folder(tmp_path, R, random_flip=True, caption_dropout=0.5, seed=2)
    one = [b for b in make_dataloader(ds, 2, seed=0, epoch=1)]
    two = [b for b in make_dataloader(ds, 2, seed=0, epoch=1, num_workers=2)]
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a["pixels"], b["pixels"]) and a["caption"] == b["caption"]
        assert torch.equal(a["index"], b["index"])


# --------------------------------------------------------------------------- Hugging Face source


def test_hf_name_needs_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ValueError, match="pip install datasets"):
        load_hf_dataset("someone/pokemon-captions")
    with pytest.raises(ValueError, match="pip install datasets"):
        load_training_dataset("someone/pokemon-captions", R)
    with pytest.raises(ValueError, match="folder not found"):
        load_training_dataset(str(tmp_path / "no" / "such"), R)
    ds = load_training_dataset(txt_folder(tmp_path / "local", 2), R)
    assert len(ds) == 2 and ds.scan is not None


def test_vae_latent_distribution_matches_vae_sampling():
    from diffusers import AutoencoderKL

    from ldm.models.unet import random_weights_
    from ldm.models.vae import VAE
    from ldm.training.data import vae_latent_distribution

    model = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.18215,
    )
    vae = VAE(random_weights_(model, seed=0, scale=0.8).eval())
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = vae_latent_distribution(vae)(images)
    assert torch.allclose(mean, vae.encode(images, sample=False), atol=1e-6)
    z = sample_latents({"latent_mean": mean, "latent_std": std}, torch.Generator().manual_seed(5))
    assert torch.allclose(z, vae.encode(images, generator=torch.Generator().manual_seed(5)), atol=1e-6)


def test_metadata_wins_unsupported_and_duplicates(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("from txt")
    make_image(tmp_path / "anim.gif", fmt="GIF")
    write_jsonl(
        tmp_path / "metadata.jsonl",
        [{"file_name": "a.png", "text": "from jsonl"}, {"file_name": "anim.gif", "text": "a gif"}],
    )
    scan = scan_image_folder(tmp_path, resolution=R)
    assert [c for _, c in scan.items] == ["from jsonl"]
    assert [p.name for p in scan.skipped["unsupported format"]] == ["anim.gif"]
    write_jsonl(
        tmp_path / "metadata.jsonl", [{"file_name": "a.png", "text": "x"}, {"file_name": "./a.png", "text": "y"}]
    )
    with pytest.raises(ValueError, match="line 2: './a.png' already captioned on line 1"):
        scan_image_folder(tmp_path, resolution=R)
