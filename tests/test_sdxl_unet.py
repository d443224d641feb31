"""The SDXL base and refiner U-Nets: our UNet with a transformer depth per level and the added vector y,
against diffusers' UNet2DConditionModel (addition_embed_type "text_time") on the same random weights.

Tolerance: max abs difference <= 1e-5 in float32 on outputs of magnitude ~1-3.
"""

import pytest
import torch
from conftest import TINY_XL_POOLED, diffusers_unet, tiny_refiner_config, tiny_sdxl_config
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from ldm.formats.checkpoint import (
    build_unet,
    detect_unet_config,
    diffusers_key_map,
    unet_config_from_diffusers,
    unet_config_from_record,
    unet_config_to_diffusers,
    unet_from_diffusers_state_dict,
    unet_to_diffusers_state_dict,
)
from ldm.models.unet import UNet, UNetConfig, random_weights_, timestep_embedding

TOL = 1e-5
CONFIGS = [tiny_sdxl_config, tiny_refiner_config]
IDS = ["sdxl", "refiner"]

# the published diffusers configs (stabilityai/stable-diffusion-xl-{base,refiner}-1.0, unet/config.json),
# the fields that describe the network
SDXL_BASE_DIFFUSERS = {
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "num_attention_heads": None,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_REFINER_DIFFUSERS = {
    **SDXL_BASE_DIFFUSERS,
    "attention_head_dim": [6, 12, 24, 24],
    "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "projection_class_embeddings_input_dim": 2560,
    "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}


def _inputs(config: UNetConfig, batch: int, size=(16, 16), seed=0):
    """x, context, and the added conditioning both ways: diffusers' (text_embeds, time_ids) and our y."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, *size, generator=g)
    context = torch.randn(batch, 7, config.context_dim, generator=g)
    assert config.adm_in_channels is not None
    n_ids = (config.adm_in_channels - TINY_XL_POOLED) // 256
    pooled = torch.randn(batch, TINY_XL_POOLED, generator=g)
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 768.0][:n_ids]] * batch) + torch.arange(batch)[:, None]
    # the added vector as sgm builds it: pooled text, then 256 sinusoidal features [cos | sin] per id
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), 256).reshape(batch, -1)], dim=1)
    return x, context, {"text_embeds": pooled, "time_ids": time_ids}, y


@pytest.mark.parametrize("make_config", CONFIGS, ids=IDS)
def test_ours_from_diffusers_state_dict_matches_diffusers(make_config):
    config = make_config()
    theirs = UNet2DConditionModel(
        **{k: v for k, v in unet_config_to_diffusers(config).items() if not k.startswith("_")}
    )
    random_weights_(theirs, seed=1)  # diffusers zero-inits some layers; randomize all of them
    theirs.eval()
    ours = build_unet(config, unet_from_diffusers_state_dict(theirs.state_dict(), config), "test")
    for batch, timesteps in [(1, [0]), (2, [10, 999])]:
        x, context, added, y = _inputs(config, batch, seed=batch)
        t = torch.tensor(timesteps)
        with torch.no_grad():
            a = ours(x, t, context, y)
            b = theirs(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
            no_y = ours(x, t, context, torch.zeros_like(y))
        assert a.shape == b.shape == x.shape
        assert a.abs().max() > 0.1
        assert (a - b).abs().max().item() <= TOL
        assert (a - no_y).abs().max() > 1e-3  # the added vector reaches the output


@pytest.mark.parametrize("make_config", CONFIGS, ids=IDS)
def test_diffusers_own_converter_accepts_our_names(make_config):
    config = make_config()
    ours = random_weights_(UNet(config), seed=2).eval()
    original_layout = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(original_layout, unet_config_to_diffusers(config))
    theirs = diffusers_unet(config)
    theirs.load_state_dict(converted, strict=True)
    mine = unet_to_diffusers_state_dict(ours.state_dict(), config)
    assert mine.keys() == converted.keys()
    assert all(torch.equal(mine[k], converted[k]) for k in mine)
    x, context, added, y = _inputs(config, 2)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        diff = ours(x, t, context, y) - theirs(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
    assert diff.abs().max() <= TOL


@pytest.mark.parametrize("make_config", CONFIGS, ids=IDS)
def test_tiny_configs_survive_every_reader(make_config):
    config = make_config()
    # shapes cannot tell the head width: detection assumes SDXL's 64 (a config with 64-wide heads comes back)
    wide = make_config(model_channels=64, head_dim=64, norm_groups=32)
    assert detect_unet_config(_meta_state_dict(wide)) == wide
    assert unet_config_from_diffusers(unet_config_to_diffusers(config)) == config
    assert unet_config_from_record(config.to_dict(), "test") == config


@pytest.mark.parametrize(
    ("make", "published", "params"),
    [
        (UNetConfig.sdxl, SDXL_BASE_DIFFUSERS, 2_567_463_684),
        (UNetConfig.sdxl_refiner, SDXL_REFINER_DIFFUSERS, 2_259_526_660),
    ],
    ids=IDS,
)
def test_full_size_key_maps_exact_both_ways(make, published, params):
    """Every key and shape of the full-size SDXL base / refiner (meta device): ours, diffusers' model built from
    the published config, our key map between them, config detection and the config both ways."""
    config = make()
    assert unet_config_from_diffusers(published) == config
    assert detect_unet_config(_meta_state_dict(config)) == config
    with torch.device("meta"):
        ours = UNet(config)
        theirs = UNet2DConditionModel(**published)
    assert sum(p.numel() for p in ours.parameters()) == params
    assert sum(p.numel() for p in theirs.parameters()) == params
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    kmap = diffusers_key_map(config)
    assert set(kmap) == set(ours_sd)
    assert set(kmap.values()) == set(theirs_sd)
    assert all(ours_sd[k].shape == theirs_sd[v].shape for k, v in kmap.items())
    # the diffusers config we write builds the same network
    with torch.device("meta"):
        written = UNet2DConditionModel(
            **{k: v for k, v in unet_config_to_diffusers(config).items() if not k.startswith("_")}
        )
    assert {k: v.shape for k, v in written.state_dict().items()} == {k: v.shape for k, v in theirs_sd.items()}
    # the original layout: diffusers' own converter maps our names onto its model's, shapes included
    converted = convert_ldm_unet_checkpoint(
        {"model.diffusion_model." + k: v for k, v in ours_sd.items()}, unet_config_to_diffusers(config)
    )
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in theirs_sd.items()}


def _meta_state_dict(config):
    with torch.device("meta"):
        return UNet(config).state_dict()


def test_added_vector_is_checked():
    sdxl = random_weights_(UNet(tiny_sdxl_config()), seed=3).eval()
    x, context, _, y = _inputs(sdxl.config, 1)
    with pytest.raises(ValueError, match=r"added conditioning vector y of shape \(1, 1568\), got None"):
        sdxl(x, 1, context)
    with pytest.raises(ValueError, match=r"got \(1, 10\)"):
        sdxl(x, 1, context, y[:, :10])
    from conftest import tiny_sd1_config

    sd1 = UNet(tiny_sd1_config()).eval()
    with pytest.raises(ValueError, match="takes no added conditioning vector"):
        sd1(torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 7, 32), torch.zeros(1, 5))


def test_per_level_depth_is_validated():
    with pytest.raises(ValueError, match="one entry per level"):
        UNetConfig(transformer_depth=(1, 2))
    with pytest.raises(ValueError, match="depth must be >= 1 at every attention level"):
        UNetConfig(transformer_depth=(0, 1, 1, 1))  # SD1's attention at level 0 with no blocks
