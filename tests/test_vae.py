"""VAE loading (single file, standalone file, diffusers folder), scaling, tiling and image output,
on tiny random AutoencoderKLs compared with diffusers itself."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from ldm.formats.checkpoint import save_safetensors
from ldm.models.vae import (
    AUTO_TILE_LATENT,
    VAE,
    detect_vae_config,
    load_vae,
    save_vae_diffusers,
    sd_vae_config,
    to_image,
    to_numpy,
    to_pil,
    vae_metadata,
    vae_to_original_state_dict,
)


def tiny_vae_config(**kw) -> dict:
    """Two levels (latent = image / 2), one ResBlock per level; tiles of 64 px (32 latent) when tiled."""
    return sd_vae_config(
        **{
            **dict(
                block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, latent_channels=4, sample_size=64
            ),
            **kw,
        }
    )


def tiny_autoencoder(seed: int = 0, **kw) -> AutoencoderKL:
    torch.manual_seed(seed)
    model = AutoencoderKL.from_config(tiny_vae_config(**kw)).eval()
    with torch.no_grad():  # GroupNorm affines and biases away from their init so a mix-up shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape) * 0.1)
    return model


@pytest.fixture(scope="module")
def autoencoder():
    return tiny_autoencoder()


def other_components() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.randn(8, generator=g),
    }


def assert_same_tensors(model: AutoencoderKL, vae: VAE):
    ours = vae.model.state_dict()
    ref = model.state_dict()
    assert set(ours) == set(ref)
    for k, v in ref.items():
        assert torch.equal(ours[k], v), k


def latents(h=16, w=12, seed=0):
    return torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- key map


@pytest.mark.parametrize("config", [tiny_vae_config(), sd_vae_config()], ids=["tiny", "sd"])
def test_original_layout_inverts_diffusers_converter(config):
    with torch.device("meta"):
        model = AutoencoderKL.from_config(config)
    original = vae_to_original_state_dict(model)
    assert all(k.startswith("first_stage_model.") for k in original)
    if config["block_out_channels"] == [128, 256, 512, 512]:  # the real SD kl-f8 layout
        assert len(original) == 248
        assert original["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
        assert "first_stage_model.decoder.up.3.upsample.conv.weight" in original
        assert "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight" in original
    back = convert_ldm_vae_checkpoint(original, config)
    assert set(back) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert back[k].shape == v.shape, k
    detected = detect_vae_config({k.removeprefix("first_stage_model."): v for k, v in original.items()})
    assert {k: detected[k] for k in config} == {**config, "sample_size": 512}


# --------------------------------------------------------------------------- loading


def test_single_file_round_trip(tmp_path, autoencoder):
    path = tmp_path / "sd.safetensors"
    save_safetensors({**vae_to_original_state_dict(autoencoder), **other_components()}, path)
    vae = load_vae(path)
    assert_same_tensors(autoencoder, vae)
    assert vae.scaling_factor == 0.18215 and vae.shift_factor == 0.0 and vae.downsample_factor == 2
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    z = latents()
    with torch.no_grad():
        assert torch.equal(vae.decode(z), autoencoder.decode(z / 0.18215).sample)


def test_single_file_ckpt_fp16_loads_as_float32(tmp_path, autoencoder):
    sd = {k: v.half() for k, v in vae_to_original_state_dict(autoencoder).items()}
    torch.save({"state_dict": {**sd, **other_components()}}, tmp_path / "sd.ckpt")
    vae = load_vae(tmp_path / "sd.ckpt")
    assert vae.dtype == torch.float32
    assert load_vae(tmp_path / "sd.ckpt", dtype=torch.float16).dtype == torch.float16
    w = vae.model.decoder.mid_block.attentions[0].to_q.weight
    assert torch.equal(w, autoencoder.decoder.mid_block.attentions[0].to_q.weight.half().float())


def test_stored_config_keeps_norm_groups(tmp_path):
    """Norm groups cannot be read from shapes: vae_metadata stores them (else config= overrides)."""
    model = tiny_autoencoder(norm_num_groups=8, scaling_factor=0.5)
    path = tmp_path / "vae8.safetensors"
    save_safetensors(vae_to_original_state_dict(model), path, metadata=vae_metadata(model))
    vae = load_vae(path)
    assert vae.model.config.norm_num_groups == 8 and vae.scaling_factor == 0.5
    z = latents()
    with torch.no_grad():
        assert torch.equal(vae.decode(z), model.decode(z / 0.5).sample)
    bare = tmp_path / "bare.safetensors"
    save_safetensors(vae_to_original_state_dict(model), bare)
    assert load_vae(bare, config={"norm_num_groups": 8}).model.config.norm_num_groups == 8


def test_diffusers_folder(tmp_path, autoencoder):
    save_vae_diffusers(VAE(autoencoder), tmp_path / "vae")
    for path in (tmp_path, tmp_path / "vae"):
        assert_same_tensors(autoencoder, load_vae(path))
    # what we write is what diffusers reads
    assert_same_tensors(autoencoder, VAE(AutoencoderKL.from_pretrained(tmp_path / "vae", local_files_only=True)))


def test_standalone_vae_file_both_layouts(tmp_path, autoencoder):
    original = vae_to_original_state_dict(autoencoder, prefix="")  # as vae-ft-mse-840000-ema-pruned
    save_safetensors({**original, "model_ema.decay": torch.tensor(0.999)}, tmp_path / "orig.safetensors")
    assert_same_tensors(autoencoder, load_vae(tmp_path / "orig.safetensors"))
    save_safetensors(autoencoder.state_dict(), tmp_path / "diffusers.safetensors")
    assert_same_tensors(autoencoder, load_vae(tmp_path / "diffusers.safetensors"))
    old_names = {
        k.replace("to_q.", "query.").replace("to_out.0.", "proj_attn."): v for k, v in autoencoder.state_dict().items()
    }
    save_safetensors(old_names, tmp_path / "old.safetensors")
    assert_same_tensors(autoencoder, load_vae(tmp_path / "old.safetensors"))


# --------------------------------------------------------------------------- encode / decode


def test_encode_matches_diffusers_and_is_seeded(autoencoder):
    vae = VAE(autoencoder)
    images = torch.rand(2, 3, 24, 20, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        a = vae.encode(images, generator=torch.Generator().manual_seed(7))
        b = vae.encode(images, generator=torch.Generator().manual_seed(7))
        c = vae.encode(images, generator=torch.Generator().manual_seed(8))
        dist = autoencoder.encode(images).latent_dist
        ref = dist.sample(generator=torch.Generator().manual_seed(7)) * 0.18215
        mode = vae.encode(images, sample=False)
    assert a.shape == (2, 4, 12, 10)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(a, ref)
    assert torch.equal(mode, dist.mode() * 0.18215)


def test_shift_factor():
    model = tiny_autoencoder(scaling_factor=1.5, shift_factor=0.25)
    vae = VAE(model)
    images = torch.rand(1, 3, 8, 8) * 2 - 1
    z = latents()
    with torch.no_grad():
        assert torch.equal(vae.encode(images, sample=False), (model.encode(images).latent_dist.mode() - 0.25) * 1.5)
        assert torch.equal(vae.decode(z), model.decode(z / 1.5 + 0.25).sample)


def test_tiled_decode(autoencoder, monkeypatch):
    import ldm.models.vae

    assert AUTO_TILE_LATENT == 96  # SD: tile images above 768 px; lowered here to keep the test fast
    monkeypatch.setattr(ldm.models.vae, "AUTO_TILE_LATENT", 40)
    vae = VAE(autoencoder)
    big = latents(48, 44)  # tiles of 32 latent, stride 24: 2 x 2 tiles
    with torch.no_grad():
        full = vae.decode(big, tiled=False)
        tiled = vae.decode(big, tiled=True)
        auto = vae.decode(big)
        small = latents(40, 8)
        assert torch.equal(vae.decode(small), vae.decode(small, tiled=False))
    assert tiled.shape == full.shape == (1, 3, 96, 88)
    assert torch.equal(auto, tiled)
    diff = (tiled - full).abs()
    # Measured with this seed: max |tiled - untiled| ~0.2 at the seams, mean ~0.02 (outputs span about
    # ±1.7). Tiles see a cropped context (GroupNorm statistics and mid-block attention over the tile
    # only), so the difference is real, not float noise; diffusers blends 25% overlaps linearly.
    assert 0 < diff.mean() < 0.05 and diff.max() < 0.5


def test_decode_rejects_bad_shapes(autoencoder):
    vae = VAE(autoencoder)
    with pytest.raises(ValueError, match=r"expected latents \(B, 4, h, w\)"):
        vae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="not a multiple of 2"):
        vae.encode(torch.zeros(1, 3, 9, 8))


# --------------------------------------------------------------------------- images out


def test_image_helpers_match_vae_image_processor():
    g = torch.Generator().manual_seed(0)
    decoded = torch.randn(2, 3, 16, 12, generator=g) * 0.8
    decoded[0, 0, 0, :4] = torch.tensor([-1.0, 1.0, 1 / 255 - 1, 0.5 / 255 * 2 - 1])  # edge and half-way values
    proc = VaeImageProcessor()
    assert np.array_equal(to_numpy(decoded), proc.postprocess(decoded, output_type="np"))
    ref = [np.asarray(im) for im in proc.postprocess(decoded, output_type="pil")]
    ours = to_image(decoded)
    assert ours.dtype == np.uint8 and ours.shape == (2, 16, 12, 3)
    assert all(np.array_equal(a, b) for a, b in zip(ours, ref))
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(to_pil(decoded), ref))


# --------------------------------------------------------------------------- errors


def test_errors_name_the_problem(tmp_path, autoencoder):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_vae(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="not a diffusers model folder"):
        load_vae(tmp_path)

    save_safetensors(other_components(), tmp_path / "unet_only.safetensors")
    with pytest.raises(ValueError, match="unet_only.safetensors: no VAE tensors .*first_stage_model"):
        load_vae(tmp_path / "unet_only.safetensors")

    sd = vae_to_original_state_dict(autoencoder)
    missing = dict(sd)
    del missing["first_stage_model.decoder.up.0.block.1.conv2.weight"]
    save_safetensors(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="missing tensor 'first_stage_model.decoder.up.0.block.1.conv2.weight'"):
        load_vae(tmp_path / "missing.safetensors")

    save_safetensors({**sd, "first_stage_model.encoder.extra.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match="unexpected tensor 'first_stage_model.encoder.extra.weight'"):
        load_vae(tmp_path / "extra.safetensors")

    bad = {**sd, "first_stage_model.decoder.up.1.block.0.norm1.bias": torch.zeros(5)}
    save_safetensors(bad, tmp_path / "shape.safetensors")
    with pytest.raises(ValueError, match=r"'first_stage_model.decoder.up.1.block.0.norm1.bias' has shape \(5,\)"):
        load_vae(tmp_path / "shape.safetensors")

    save_safetensors(
        {k: v for k, v in autoencoder.state_dict().items() if "decoder.conv_out.bias" not in k},
        tmp_path / "vae" / "diffusion_pytorch_model.safetensors",
    )
    (tmp_path / "vae" / "config.json").write_text(json.dumps(dict(autoencoder.config)))
    with pytest.raises(ValueError, match="missing tensor 'decoder.conv_out.bias'"):
        load_vae(tmp_path)

    with pytest.raises(ValueError, match="not divisible by norm_num_groups=32"):
        load_vae(tmp_path / "extra.safetensors", config={"block_out_channels": [48, 64]})
