"""SDXL files both ways: a single file in the original (sgm) layout, `model.diffusion_model.*`,
`conditioner.embedders.{0,1}.*` and `first_stage_model.*`, written by ldm, loads in ldm and in diffusers'
from_single_file (given the local config folder) and gives the same image as the folder it came from; a
diffusers folder written by ldm loads in both. Bad files are refused with one line naming what was found."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldm.formats.checkpoint import read_state_dict
from ldm.formats.metadata import PIPELINE_KEY, UNET_CONFIG_KEY, VAE_CONFIG_KEY
from ldm.pipelines.pipeline import Pipeline

TOL = 2e-3
PROMPT = "a red circle at the top left"


def _image(pipe, **kw):
    return pipe(PROMPT, steps=4, seed=2, sampler="euler", output_type="np", progress=False, **kw)


def _theirs_image(theirs):
    from diffusers import EulerDiscreteScheduler

    theirs.scheduler = EulerDiscreteScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    return theirs(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(2), output_type="np").images


def _original_layout(src, dst):
    """The tensors of an ldm single file with only what shapes cannot tell about the tiny models (the U-Net's head
    width, the VAE's norm groups, the text encoders' sizes) in its metadata; the VAE's scaling factor, the default
    size and guidance left out: an original SDXL file, read with those sizes known."""
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    vae = json.loads(meta[VAE_CONFIG_KEY])
    del vae["scaling_factor"]
    record = {k: v for k, v in json.loads(meta[PIPELINE_KEY]).items() if k.startswith("text_encoder")}
    kept = {UNET_CONFIG_KEY: meta[UNET_CONFIG_KEY], VAE_CONFIG_KEY: json.dumps(vae), PIPELINE_KEY: json.dumps(record)}
    save_file(read_state_dict(src), str(dst), metadata=kept)
    return dst


@pytest.mark.parametrize("kind", ["sdxl", "refiner"])
def test_single_file_round_trip_in_ours_and_diffusers(tmp_path, kind, request):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    folder = request.getfixturevalue("tiny_sdxl_folder" if kind == "sdxl" else "tiny_refiner_folder")
    ours = Pipeline.from_pretrained(folder)
    path = ours.save_single_file(tmp_path / "model.safetensors")
    keys = list(read_state_dict(path))
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"model", "first_stage_model", "conditioner"}
    if kind == "sdxl":
        assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in keys)
        assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in keys)
        assert "conditioner.embedders.1.model.text_projection" in keys
    else:
        assert {k.split(".")[2] for k in keys if k.startswith("conditioner.")} == {"0"}
        assert any(k.startswith("conditioner.embedders.0.model.") for k in keys)
    again = Pipeline.from_pretrained(path)
    assert again.family == ours.family and again.zero_empty_negative == ours.zero_empty_negative
    bare = Pipeline.from_pretrained(_original_layout(path, tmp_path / "bare.safetensors"))
    assert bare.vae.scaling_factor == pytest.approx(0.13025)  # SDXL's, not read from the file
    assert bare.default_size == (1024, 1024) and bare.default_guidance == 5.0
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionXLImg2ImgPipeline
    theirs = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    if kind == "sdxl":
        a, b, c = _image(ours), _image(again), _image(bare, height=64, width=64)
        d = _theirs_image(theirs)
        assert np.abs(a - b).max() == 0 and np.abs(a - c).max() == 0
        assert float(np.abs(a - d).max()) <= TOL
    else:  # the refiner's weights, tensor for tensor, in diffusers' model
        ref = cls.from_pretrained(folder)
        for name in ("unet", "text_encoder_2", "vae"):
            mine, base = getattr(theirs, name).state_dict(), getattr(ref, name).state_dict()
            assert mine.keys() == base.keys()
            assert all(torch.equal(mine[k], base[k]) for k in mine), name


@pytest.mark.parametrize("kind", ["sdxl", "refiner"])
def test_diffusers_folder_written_by_ldm_loads_in_diffusers(tmp_path, kind, request):
    from diffusers import DiffusionPipeline

    folder = request.getfixturevalue("tiny_sdxl_folder" if kind == "sdxl" else "tiny_refiner_folder")
    ours = Pipeline.from_pretrained(folder)
    written = ours.save_diffusers(tmp_path / "pipe")
    theirs = DiffusionPipeline.from_pretrained(written)
    expected = "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionXLImg2ImgPipeline"
    assert type(theirs).__name__ == expected
    again = Pipeline.from_pretrained(written)
    assert again.family == ours.family
    if kind == "sdxl":
        assert np.abs(_image(ours) - _image(again)).max() == 0
        assert float(np.abs(_image(ours) - _theirs_image(theirs)).max()) <= TOL


def test_sdxl_file_with_a_text_encoder_missing_is_refused(tmp_path, tiny_sdxl_folder):
    ours = Pipeline.from_pretrained(tiny_sdxl_folder)
    path = ours.save_single_file(tmp_path / "model.safetensors")
    tensors = read_state_dict(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    for dropped, named in (("conditioner.embedders.0.", "CLIP ViT-L"), ("conditioner.embedders.1.", "ViT-bigG")):
        bad = tmp_path / f"bad{dropped[-2]}.safetensors"
        save_file({k: v for k, v in tensors.items() if not k.startswith(dropped)}, str(bad), metadata=meta)
        with pytest.raises(ValueError, match=rf"{bad.name}.*but no .*{named}.*needs both") as e:
            Pipeline.from_pretrained(bad)
        assert "\n" not in str(e.value)


def test_mixed_families_are_refused(tmp_path, tiny_sdxl_folder, tiny_sd_folder):
    xl = read_state_dict(Pipeline.from_pretrained(tiny_sdxl_folder).save_single_file(tmp_path / "xl.safetensors"))
    sd_path = Pipeline.from_pretrained(tiny_sd_folder).save_single_file(tmp_path / "sd.safetensors")
    sd = read_state_dict(sd_path)
    with safe_open(str(sd_path), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != PIPELINE_KEY}
    mixed = {
        **{k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")},
        **{k: v for k, v in xl.items() if k.startswith("conditioner.")},
    }
    save_file(mixed, str(tmp_path / "mixed.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="SDXL text encoders .* beside an SD1/SD2 U-Net"):
        Pipeline.from_pretrained(tmp_path / "mixed.safetensors")
