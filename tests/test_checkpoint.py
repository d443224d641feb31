"""Reading U-Nets from single files and diffusers folders, export, and refusal of bad input."""

import json
import pickle
import random

import pytest
import torch
from conftest import tiny_sd1_config, tiny_sd2_config
from safetensors.torch import save_file

import ldm
from ldm.formats.checkpoint import (
    detect_unet_config,
    load_unet,
    read_state_dict,
    save_unet_diffusers,
    save_unet_single_file,
)
from ldm.models.unet import UNet, random_weights_


def _original_layout(unet, with_ema=False):
    """A state dict shaped like an SD single file: U-Net plus unrelated VAE / text-encoder tensors."""
    sd = {"model.diffusion_model." + k: v.clone() for k, v in unet.state_dict().items()}
    sd["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    if with_ema:
        for k, v in unet.state_dict().items():
            sd["model_ema." + ("diffusion_model." + k).replace(".", "")] = v + 1.0
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(100)
    return sd


def _assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("make_config", [tiny_sd1_config, tiny_sd2_config], ids=["sd1", "sd2"])
def test_single_file_round_trip_safetensors_and_ckpt(tmp_path, make_config):
    config = make_config()
    unet = random_weights_(UNet(config), seed=0).eval()
    sd = _original_layout(unet)
    save_file(sd, tmp_path / "model.safetensors")
    torch.save({"state_dict": sd, "global_step": 10}, tmp_path / "model.ckpt")  # Lightning-style nesting
    for name in ("model.safetensors", "model.ckpt"):
        loaded = load_unet(tmp_path / name, config)
        _assert_same_tensors(unet, loaded)
        assert not loaded.training


def test_config_detected_from_shapes(tmp_path):
    for config in (
        tiny_sd1_config(num_heads=8, norm_groups=32),
        tiny_sd2_config(head_dim=64, model_channels=64, context_dim=1024, norm_groups=32),
    ):
        unet = random_weights_(UNet(config), seed=1)
        save_file(_original_layout(unet), tmp_path / "m.safetensors")
        loaded = ldm.load_unet(tmp_path / "m.safetensors")  # no config: detected
        assert loaded.config == config
        _assert_same_tensors(unet, loaded)


def test_detects_full_size_sd15_sd21_and_inpainting():
    for preset in (ldm.UNetConfig.sd15(), ldm.UNetConfig.sd21(), ldm.UNetConfig(in_channels=9)):
        with torch.device("meta"):
            sd = UNet(preset).state_dict()
        assert detect_unet_config(sd) == preset


def test_ema_weights_preferred_when_present(tmp_path):
    config = tiny_sd1_config()
    unet = random_weights_(UNet(config), seed=2)
    save_file(_original_layout(unet, with_ema=True), tmp_path / "full.safetensors")
    ema = load_unet(tmp_path / "full.safetensors", config)
    raw = load_unet(tmp_path / "full.safetensors", config, ema=False)
    _assert_same_tensors(unet, raw)
    k = "out.2.weight"
    assert torch.equal(ema.state_dict()[k], unet.state_dict()[k] + 1.0)


def test_own_files_carry_their_config(tmp_path):
    config = tiny_sd2_config(extra={"prediction_type": "v_prediction"})
    unet = random_weights_(UNet(config), seed=3)
    save_unet_single_file(unet, tmp_path / "ours.safetensors")
    loaded = load_unet(tmp_path / "ours.safetensors")
    assert loaded.config == config
    _assert_same_tensors(unet, loaded)


def test_diffusers_folder_both_ways(tmp_path):
    """Export to a folder diffusers loads, and read diffusers' own save_pretrained back."""
    from diffusers import UNet2DConditionModel

    config = tiny_sd2_config()
    unet = random_weights_(UNet(config), seed=4).eval()
    save_unet_diffusers(unet, tmp_path / "pipe" / "unet")
    theirs = UNet2DConditionModel.from_pretrained(tmp_path / "pipe" / "unet").eval()
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 5, config.context_dim)
    with torch.no_grad():
        assert (unet(x, 42, ctx) - theirs(x, 42, encoder_hidden_states=ctx).sample).abs().max() <= 1e-5

    theirs.save_pretrained(tmp_path / "saved_by_diffusers" / "unet")
    for path in (tmp_path / "saved_by_diffusers", tmp_path / "saved_by_diffusers" / "unet", tmp_path / "pipe"):
        back = load_unet(path)
        assert back.config.head_dim == 8 and back.config.use_linear_projection
        _assert_same_tensors(unet, back)


# ------------------------------------------------------------------ bad input: clear, named errors


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors: not found"):
        load_unet(tmp_path / "nope.safetensors")


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "notes.safetensors"
    p.write_text("these are my holiday notes, not tensors\n" * 20)
    with pytest.raises(ValueError, match="notes.safetensors: not a readable safetensors file"):
        load_unet(p)
    q = tmp_path / "notes.ckpt"
    for seed in range(20):  # many kinds of garbage: each a clear one-line error
        q.write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(ValueError, match="notes.ckpt: not a readable PyTorch checkpoint"):
            load_unet(q)


def test_truncated_safetensors(tmp_path):
    unet = random_weights_(UNet(tiny_sd1_config()), seed=5)
    p = tmp_path / "cut.safetensors"
    save_file(_original_layout(unet), p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors: not a readable safetensors file.*truncated"):
        load_unet(p)


def test_no_unet_tensors(tmp_path):
    p = tmp_path / "vae_only.safetensors"
    save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(3, 3)}, p)
    with pytest.raises(ValueError, match="vae_only.safetensors: no U-Net tensors"):
        load_unet(p)


def test_missing_key_is_named(tmp_path):
    config = tiny_sd1_config()
    sd = _original_layout(random_weights_(UNet(config), seed=6))
    del sd["model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"]
    save_file(sd, tmp_path / "m.safetensors")
    with pytest.raises(
        ValueError, match=r"missing tensor 'middle_block\.1\.transformer_blocks\.0\.attn2\.to_v\.weight'"
    ):
        load_unet(tmp_path / "m.safetensors", config)
    with pytest.raises(
        ValueError, match=r"missing tensor 'middle_block\.1\.transformer_blocks\.0\.attn2\.to_v\.weight'"
    ):
        load_unet(tmp_path / "m.safetensors")  # detection does not hide it either


def test_misshaped_and_unexpected_keys_are_named(tmp_path):
    config = tiny_sd1_config()
    sd = _original_layout(random_weights_(UNet(config), seed=7))
    sd["model.diffusion_model.out.2.bias"] = torch.zeros(5)
    save_file(sd, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'out\.2\.bias' has shape \(5,\), the model expects \(4,\)"):
        load_unet(tmp_path / "m.safetensors", config)
    sd["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    sd["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(4, 4)
    save_file(sd, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensor 'label_emb\.0\.0\.weight'"):
        load_unet(tmp_path / "m.safetensors", config)


class _RunsCode:
    """A pickle payload that would create a file if it were ever unpickled with full pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_ckpt_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "x": _RunsCode(marker)}, p)
    # the same payload as a bare (non-zip) pickle, the legacy format
    q = tmp_path / "evil_legacy.ckpt"
    with open(q, "wb") as f:
        pickle.dump({"x": _RunsCode(marker)}, f, protocol=2)
    for path in (p, q):
        with pytest.raises(
            ValueError, match=r"refused to load — the pickle calls (io|builtins)\.open, which may run code"
        ):
            load_unet(path)
    r = tmp_path / "evil_protocol4.ckpt"  # an opcode the safe unpickler does not know: refused before any call
    with open(r, "wb") as f:
        pickle.dump({"x": _RunsCode(marker)}, f, protocol=4)
    with pytest.raises(ValueError, match="evil_protocol4.ckpt: not a readable PyTorch checkpoint"):
        load_unet(r)
    assert not marker.exists()
    # sanity: the payload really does run under an unsafe load
    with open(q, "rb") as f:
        pickle.load(f)  # noqa: S301 (on purpose)
    assert marker.exists()


def test_diffusers_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers model folder"):
        load_unet(tmp_path / "empty")
    unet = random_weights_(UNet(tiny_sd1_config()), seed=8)
    folder = save_unet_diffusers(unet, tmp_path / "u")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["class_embed_type"] = "timestep"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="class_embed_type='timestep' is not a Stable Diffusion"):
        load_unet(folder)


def test_read_state_dict_prefix(tmp_path):
    unet = random_weights_(UNet(tiny_sd1_config()), seed=9)
    save_file(_original_layout(unet), tmp_path / "m.safetensors")
    vae = read_state_dict(tmp_path / "m.safetensors", prefix="first_stage_model.")
    assert list(vae) == ["first_stage_model.decoder.conv_in.weight"]


def test_written_files_get_the_usual_mode(tmp_path):
    """Files and folders written through a temporary one (models, PNGs, checkpoints) get the mode of any new
    file (0o666 less the umask) or folder (0o777 less it), not mkstemp's 0o600 or mkdtemp's 0o700."""
    import os

    from PIL import Image

    from ldm.formats.atomic import atomic_dir
    from ldm.formats.checkpoint import save_safetensors
    from ldm.outputs import save_png

    old = os.umask(0o022)
    try:
        save_safetensors({"x": torch.zeros(2)}, tmp_path / "m.safetensors")
        save_png(Image.new("RGB", (4, 4)), tmp_path / "i.png", "a prompt")
        atomic_dir(tmp_path / "step-1", lambda tmp: None)  # training checkpoints, diffusers folders
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"m.safetensors": 0o644, "i.png": 0o644, "step-1": 0o755}
