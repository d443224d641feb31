"""Our U-Net against diffusers' UNet2DConditionModel on the same random weights.

Tolerance: max abs difference <= 1e-5 in float32 on outputs of magnitude ~1-3.
"""

import pytest
import torch
from conftest import diffusers_unet, tiny_sd1_config, tiny_sd2_config
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from ldm.formats.checkpoint import (
    build_unet,
    diffusers_key_map,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_from_diffusers_state_dict,
    unet_to_diffusers_state_dict,
)
from ldm.models.unet import UNet, UNetConfig, random_weights_, timestep_embedding

TOL = 1e-5


def _inputs(config, batch, size=(16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, *size, generator=g)
    context = torch.randn(batch, 7, config.context_dim, generator=g)
    return x, context


@pytest.mark.parametrize("make_config", [tiny_sd1_config, tiny_sd2_config], ids=["sd1", "sd2"])
def test_ours_from_diffusers_state_dict_matches_diffusers(make_config):
    config = make_config()
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(
        **{k: v for k, v in unet_config_to_diffusers(config).items() if not k.startswith("_")}
    )
    random_weights_(theirs, seed=1)  # diffusers zero-inits some layers; randomize all of them
    theirs.eval()
    ours = build_unet(config, unet_from_diffusers_state_dict(theirs.state_dict(), config), "test")
    for batch, timesteps in [(1, [0]), (2, [10, 999]), (3, [1, 500, 981])]:
        x, context = _inputs(config, batch, seed=batch)
        t = torch.tensor(timesteps)
        with torch.no_grad():
            a = ours(x, t, context)
            b = theirs(x, t, encoder_hidden_states=context).sample
        assert a.shape == b.shape == x.shape
        assert a.abs().max() > 0.1  # a real signal, not a dead network
        assert (a - b).abs().max().item() <= TOL


@pytest.mark.parametrize("make_config", [tiny_sd1_config, tiny_sd2_config], ids=["sd1", "sd2"])
def test_diffusers_own_converter_accepts_our_names(make_config):
    """Independent check of the names: diffusers' convert_ldm_unet_checkpoint on our state_dict."""
    config = make_config()
    ours = random_weights_(UNet(config), seed=2).eval()
    original_layout = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(original_layout, unet_config_to_diffusers(config))
    theirs = diffusers_unet(config)
    theirs.load_state_dict(converted, strict=True)
    # our key map agrees with diffusers' converter, tensor for tensor
    mine = unet_to_diffusers_state_dict(ours.state_dict(), config)
    assert mine.keys() == converted.keys()
    assert all(mine[k] is converted[k] or torch.equal(mine[k], converted[k]) for k in mine)
    x, context = _inputs(config, 2)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        assert (ours(x, t, context) - theirs(x, t, encoder_hidden_states=context).sample).abs().max() <= TOL


def test_latent_sizes_not_multiple_of_downsampling():
    """13x11 latents: the upsampler meets each skip at its size, as in diffusers."""
    config = tiny_sd1_config()
    ours = random_weights_(UNet(config), seed=3).eval()
    theirs = diffusers_unet(config, ours.state_dict())
    x, context = _inputs(config, 1, size=(13, 11))
    with torch.no_grad():
        a = ours(x, 250, context)
        b = theirs(x, 250, encoder_hidden_states=context).sample
    assert a.shape == x.shape
    assert (a - b).abs().max() <= TOL


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17, 500, 999])
    ours = timestep_embedding(t, 320)
    theirs = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert (ours - theirs).abs().max() <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("preset,context_dim,linear", [("sd15", 768, False), ("sd21", 1024, True)])
def test_full_size_key_maps_and_forward(preset, context_dim, linear):
    """Full SD1.5 / SD2.1 configs: 686 CompVis keys, maps both ways exact, one forward equal."""
    config = getattr(UNetConfig, preset)()
    with torch.device("meta"):
        ours = UNet(config)
    sd = ours.state_dict()
    assert len(sd) == 686
    assert sum(v.numel() for v in sd.values()) == {"sd15": 859_520_964, "sd21": 865_910_724}[preset]
    assert sd["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, context_dim)
    assert sd["input_blocks.1.1.proj_in.weight"].ndim == (2 if linear else 4)
    assert sd["output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)  # upsampler after a no-attention level
    assert sd["output_blocks.5.2.conv.weight"].shape == (1280, 1280, 3, 3)  # upsampler after attention

    theirs = diffusers_unet(config, meta=True)
    their_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    kmap = diffusers_key_map(config)
    assert sorted(kmap.values()) == sorted(their_shapes)  # every key, both ways (a bijection)
    assert all(tuple(sd[k].shape) == their_shapes[v] for k, v in kmap.items())  # every shape
    # diffusers' own converter agrees on every name
    converted = convert_ldm_unet_checkpoint(
        {"model.diffusion_model." + k: v for k, v in sd.items()}, unet_config_to_diffusers(config)
    )
    assert converted.keys() == set(their_shapes)
    assert all(converted[kmap[k]] is v for k, v in sd.items())
    # the diffusers config we write reads back to the same UNetConfig
    assert unet_config_from_diffusers(unet_config_to_diffusers(config)) == config

    random_weights_(ours, seed=4).eval()
    theirs.load_state_dict(unet_to_diffusers_state_dict(ours.state_dict(), config), strict=True, assign=True)
    x, context = _inputs(config, 1, size=(8, 8))
    context = torch.randn(1, 77, config.context_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = ours(x, torch.tensor([601]), context)
        b = theirs(x, 601, encoder_hidden_states=context).sample
    assert a.abs().max() > 0.1
    assert (a - b).abs().max().item() <= 2e-5  # 860M parameters, 25 blocks deep


def test_gradient_checkpointing_same_gradients():
    config = tiny_sd2_config()
    model = random_weights_(UNet(config), seed=6).train()
    x, context = _inputs(config, 2)
    t = torch.tensor([5, 600])

    def grads(checkpointing):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        model(x, t, context).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_config_validation_errors():
    with pytest.raises(ValueError, match="exactly one of num_heads"):
        UNetConfig(num_heads=8, head_dim=64)
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(attention_levels=(0, 7))
    with pytest.raises(ValueError, match="norm_groups"):
        UNetConfig(model_channels=20, norm_groups=32)
    with pytest.raises(ValueError, match="unknown fields"):
        UNetConfig.from_dict({"model_channel": 3})
    assert UNetConfig.from_dict(UNetConfig.sd21().to_dict()) == UNetConfig.sd21()
