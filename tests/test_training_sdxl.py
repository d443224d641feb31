"""SDXL training on the tiny SDXL models: LoRA and full fine-tuning, the size/crop ids each example is trained with
(original size before resizing, crop after it, target size; the refiner's aesthetic score), the latent cache
with those ids, and the trained model / LoRA loading back and generating."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder, run_main
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import default_collate

from ldm.conditioning.sdxl import label_vector
from ldm.pipelines.pipeline import Pipeline
from ldm.training import setup
from ldm.training.data import CaptionedImageDataset, cache_latents_and_text
from ldm.training.loop import TrainConfig, Trainer, step_generator

R = 64
# (file, stored (width, height), expected (original h, w, crop top, left, target h, w)) at R = 64, center crop:
# the shorter side is resized to 64, then a 64 x 64 window is cut from the middle of the longer one
PICTURES = [
    ("wide.png", (101, 80), (80, 101, 0, 8, R, R)),  # 81 x 64 after resizing: 17 px free, left 8
    ("tall.png", (48, 96), (96, 48, 32, 0, R, R)),  # upscaled to 64 x 128: top 32
    # a JPEG decodes at half scale (150 x 100, draft mode); its original size is still the stored one
    ("photo.jpg", (300, 200), (200, 300, 0, 16, R, R)),
    ("square.png", (64, 64), (64, 64, 0, 0, R, R)),
]


def _picture_folder(root: Path) -> Path:
    """The PICTURES, each a colored block on a gradient, with distinct captions."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, (w, h), _) in enumerate(PICTURES):
        a = np.zeros((h, w, 3), np.uint8)
        a[..., 1] = np.linspace(0, 255, w)[None, :].astype(np.uint8)
        a[h // 4 : h // 2, w // 4 : w // 2] = (220, 40 * i, 30)
        Image.fromarray(a).save(root / name, quality=95)
        (root / name).with_suffix(".txt").write_text(f"picture {i}, a {name.split('.')[0]} one")
    return root


def _cfg(tmp_path, base, data, **kw) -> TrainConfig:
    base_kw = dict(
        data=str(data),
        output_dir=str(tmp_path / "run"),
        mode="lora",
        base=str(base),
        resolution=R,
        batch_size=4,
        max_steps=2,
        lr=1e-3,
        save_every=100,
        validation_steps=2,
    )
    return TrainConfig(**{**base_kw, **kw})


def _losses(run: Path) -> list[float]:
    with open(run / "loss.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _unet_inputs(trainer: Trainer, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The context and added vector y the U-Net gets in one loss evaluation of `batch`."""
    seen = []
    hook = trainer.models.unet.register_forward_pre_hook(lambda module, args: seen.append(args[2:4]))
    try:
        with torch.no_grad():
            trainer.models.loss(trainer.wrapped, batch, step_generator(0, 0), slice(None), trainer.cfg)
    finally:
        hook.remove()
    return seen[0]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    return _picture_folder(tmp_path_factory.mktemp("sdxl_pictures"))


# --------------------------------------------------------------------------- the ids of each example


def test_time_ids_are_each_pictures_size_and_crop(tmp_path, tiny_sdxl_folder, pictures):
    """Every example's ids given to the U-Net: (original h, w, crop top, left, target h, w), exactly; its text
    conditioning the caption's context and pooled vector (zeros for a dropped caption)."""
    trainer = Trainer(_cfg(tmp_path, tiny_sdxl_folder, pictures, caption_dropout=0.5, seed=1))
    models, dataset = trainer.models, trainer.data.dataset
    assert models.family == "sdxl"
    batch = default_collate([dataset[i] for i in range(len(dataset))])
    expected = {name: ids for name, _, ids in PICTURES}
    names = [Path(p).name for p in dataset.images]
    want = torch.tensor([expected[n] for n in names], dtype=torch.float32)
    assert torch.equal(models.time_ids(batch, len(names)), want)

    context, y = _unet_inputs(trainer, batch)
    dropped = [c == "" for c in batch["caption"]]
    assert any(dropped) and not all(dropped)  # seed 1: both kinds in the batch
    text, pooled = models.encode_text([dataset.captions[i] for i in range(len(names))])
    keep = torch.tensor([not x for x in dropped])
    pooled = pooled * keep[:, None]  # a dropped caption: SDXL's zero conditioning
    assert torch.equal(context, text * keep[:, None, None])
    assert torch.equal(y, label_vector(pooled, want))


def test_random_crop_and_flip_record_the_window_trained_on(pictures):
    """A random crop's (top, left) is where the pixels were cut from the resized picture; a flipped example's is
    that window's place in the mirrored picture."""
    ds = CaptionedImageDataset.from_folder(pictures, R, crop="random", random_flip=True, seed=4)
    wide = [Path(p).name for p in ds.images].index("wide.png")
    resized = Image.open(pictures / "wide.png").convert("RGB").resize((81, 64), Image.Resampling.LANCZOS)
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        item, flip = ds[wide], ds.augmentation(wide).flip
        top, left = item["crop_top_left"].tolist()
        assert item["original_size"].tolist() == [80, 101] and top == 0 and 0 <= left <= 17
        picture = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else resized
        window = np.asarray(picture.crop((left, 0, left + R, R)), dtype=np.float32) / 127.5 - 1
        assert torch.equal(item["pixels"], torch.from_numpy(window).permute(2, 0, 1))
        seen.add((flip, left))
    assert {f for f, _ in seen} == {False, True} and len({left for _, left in seen}) > 3


def test_cache_keeps_sizes_crops_and_pooled_text(tmp_path, tiny_sdxl_folder, pictures):
    """--cache on an SDXL model: every cached item (both flips, dropped captions) has the live item's ids and
    text conditioning; the U-Net gets the same inputs from the cache as from the pictures."""
    cfg = _cfg(tmp_path, tiny_sdxl_folder, pictures, cache=True, random_flip=True, caption_dropout=0.3)
    trainer = Trainer(cfg)
    cached, live = trainer.data.dataset, setup.load_dataset(cfg, main=False)
    flips = set()
    for epoch in range(3):
        cached.set_epoch(epoch)
        live.set_epoch(epoch)
        a = default_collate([cached[i] for i in range(len(live))])
        b = default_collate([live[i] for i in range(len(live))])
        for key in ("original_size", "crop_top_left"):
            assert torch.equal(a[key], b[key]), key
        assert a["caption"] == b["caption"]
        ctx_a, y_a = _unet_inputs(trainer, a)
        ctx_b, y_b = _unet_inputs(trainer, b)
        assert torch.allclose(ctx_a, ctx_b, atol=1e-6) and torch.allclose(y_a, y_b, atol=1e-6)
        flips |= {live.augmentation(i).flip for i in range(len(live))}
    assert flips == {False, True}
    wide = [Path(p).name for p in live.images].index("wide.png")
    assert cached.tensors["crop_top_lefts"][wide].tolist() == [[0, 8], [0, 9]]  # 17 px free: mirrored at 9


def test_cache_without_sizes_is_not_used_for_sdxl(tmp_path, pictures):
    """A cache written without the sizes (SD1/SD2, or before they existed) still loads as such, and is never
    taken for an SDXL cache: that one is computed again."""
    ds = CaptionedImageDataset.from_folder(pictures, R)

    def encode_images(x):
        return x[:, :, ::8, ::8], torch.ones_like(x[:, :, ::8, ::8])

    def encode_text(captions):
        return torch.zeros(len(captions), 77, 4), torch.ones(len(captions), 2)

    def cache(with_sizes):
        kw = dict(cache_dir=tmp_path, model_id="m", with_sizes=with_sizes)
        return cache_latents_and_text(ds, encode_images, encode_text, 2, False, **kw)

    old = cache(False)
    assert "original_sizes" not in old.tensors and "original_size" not in old[0]
    assert cache(False).from_disk
    new = cache(True)
    photo = [Path(p).name for p in ds.images].index("photo.jpg")
    assert not new.from_disk and new.path != old.path and new[photo]["original_size"].tolist() == [200, 300]
    new.path.write_bytes(old.path.read_bytes())  # an old cache under the new name: not trusted to have sizes
    again = cache(True)
    assert not again.from_disk and "original_sizes" in again.tensors


# --------------------------------------------------------------------------- training and its outputs


def test_lora_trains_and_loads_back(tmp_path, tiny_sdxl_folder, pictures):
    """SDXL LoRA: only adapters train, the base stays bit-identical, the file loads into a fresh SDXL pipeline
    through the LoRA loader and gives what the trained model gives."""
    from ldm.models.lora import base_state_dict, load_lora

    before = Pipeline.from_pretrained(tiny_sdxl_folder).unet.state_dict()
    trainer = Trainer(_cfg(tmp_path, tiny_sdxl_folder, pictures, max_steps=4, lr=1e-2))
    assert trainer.trainable and all(".lora_" in k for k in trainer.trainable)
    result = trainer.train()
    assert all(math.isfinite(x) for x in _losses(tmp_path / "run"))
    after = base_state_dict(trainer.models.unet)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    lora_file = Path(result["lora"])
    assert all(k.startswith("lora_unet_") for k in load_file(lora_file))
    assert Path(result["validation"]).is_file()

    fresh = Pipeline.from_pretrained(tiny_sdxl_folder)
    run = dict(steps=3, seed=1, output_type="latent", progress=False)
    base_out = fresh("picture 0", **run)
    load_lora(fresh.unet, lora_file)
    lora_out = fresh("picture 0", **run)
    trained_out = trainer.models.pipeline()("picture 0", **run)
    assert (lora_out - base_out).abs().max() > 1e-3
    assert (lora_out - trained_out).abs().max() <= 1e-5 * trained_out.abs().max()


def test_full_fine_tune_overfits_and_exports(tmp_path, tiny_sdxl_folder, pictures):
    """Full SDXL fine-tune on 4 pictures (cached): the loss of fixed draws on the data falls; the single file and
    the diffusers folder load back as SDXL and generate what the trained model does."""
    cfg = _cfg(
        tmp_path, tiny_sdxl_folder, pictures, mode="full", cache=True, max_steps=20, lr=5e-4, export_diffusers=True
    )
    trainer = Trainer(cfg)
    batch = default_collate([trainer.data.dataset[i] for i in range(4)])

    @torch.no_grad()
    def fixed_loss() -> float:  # the same latents, noise and timesteps each time
        draws = [trainer.models.loss(trainer.wrapped, batch, step_generator(99, k), slice(None), cfg) for k in range(8)]
        return float(torch.stack(draws).mean())

    start = fixed_loss()
    result = trainer.train()
    end = fixed_loss()
    losses = _losses(tmp_path / "run")
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert end < 0.7 * start, (start, end)  # measured 1.22 -> 0.67

    run = dict(steps=3, seed=2, output_type="latent", progress=False)
    trained_out = trainer.models.pipeline()("picture 1", **run)
    for path in (result["model"], result["diffusers"]):
        pipe = Pipeline.from_pretrained(path)
        assert pipe.family == "sdxl" and pipe.text_encoder_2 is not None
        out = pipe("picture 1", **run)
        assert (out - trained_out).abs().max() <= 1e-5 * trained_out.abs().max(), path
    images = Pipeline.from_pretrained(result["model"])("picture 1", steps=2, seed=0, progress=False)
    assert images[0].size == (R, R)


def test_refiner_trains_on_the_aesthetic_score(tmp_path, tiny_refiner_folder, pictures):
    """The SDXL refiner as --base: ids (original h, w, crop top, left, --aesthetic-score); its LoRA loads back."""
    from ldm.models.lora import load_lora

    trainer = Trainer(_cfg(tmp_path, tiny_refiner_folder, pictures, aesthetic_score=7.5, max_steps=1))
    models, dataset = trainer.models, trainer.data.dataset
    assert models.family == "sdxl_refiner"
    batch = default_collate([dataset[i] for i in range(len(dataset))])
    expected = {name: ids[:4] + (7.5,) for name, _, ids in PICTURES}
    want = torch.tensor([expected[Path(p).name] for p in dataset.images], dtype=torch.float32)
    assert torch.equal(models.time_ids(batch, len(want)), want)
    result = trainer.train()
    fresh = Pipeline.from_pretrained(tiny_refiner_folder)
    load_lora(fresh.unet, result["lora"])
    assert torch.isfinite(fresh("picture 0", steps=2, seed=0, output_type="latent", progress=False)).all()


def test_text_encoder_training_refused_for_sdxl(tmp_path, tiny_sdxl_folder, pictures, capsys):
    """One line and exit 2, for an SDXL base given as an sgm single file too (told apart from SD1 by its tensors)."""
    from ldm.cli.train import main

    single = Pipeline.from_pretrained(tiny_sdxl_folder).save_single_file(tmp_path / "xl.safetensors")
    argv = ["--data", str(pictures), "--base", str(single), "--mode", "full", "--train-text-encoder"]
    code, _, err = run_main(main, [*argv, "--resolution", "64", "--output-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and "--train-text-encoder" in err and "SDXL" in err and len(err.strip().splitlines()) <= 2


def test_sd1_items_and_cache_keep_their_layout(tmp_path):
    """SD1/SD2 caches hold what they held (no sizes, no pooled vector); live items add the two placement entries."""
    data = make_image_folder(tmp_path / "data", n=2)
    ds = CaptionedImageDataset.from_folder(data, R)
    assert set(ds[0]) == {"pixels", "caption", "index", "original_size", "crop_top_left"}
    cached = cache_latents_and_text(
        ds, lambda x: x[:, :, ::8, ::8], lambda c: torch.zeros(len(c), 77, 4), progress=False
    )
    assert set(cached[0]) == {"latents", "context", "caption", "index"}


def test_original_size_is_the_upright_stored_size(tmp_path):
    """A JPEG decoded in draft mode (at half scale) and turned upright by its EXIF orientation: the original size
    is the stored picture's, upright (h, w)."""
    from ldm.training.data import open_image_and_size

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (300, 200), (0, 0, 255)).save(tmp_path / "rotated.jpg", exif=exif)
    image, original = open_image_and_size(tmp_path / "rotated.jpg", draft_size=R)
    assert image.size == (100, 150) and original == (300, 200)
