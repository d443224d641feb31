"""LoRA files for SDXL U-Nets: kohya's sgm names (`lora_unet_input_blocks_4_1_...`, what its SDXL trainer
writes), its diffusers-style names and diffusers / PEFT names give the same adapters, and the same model as
diffusers' own LoRA reader on UNet2DConditionModel; transformer block indices >= 10 resolve; text-encoder
parts (lora_te1_ / lora_te2_, text_encoder_2.) are skipped with a note; a LoRA for the other family (SDXL on
SD1, SD1 on SDXL) is refused in one line saying so.

Tolerance against diffusers: max abs difference <= 1e-5 in float32 on outputs of magnitude ~1-3 (measured
3e-6 to 8e-6 with a LoRA on every layer, the 11-block U-Net the largest; 2e-6 for the base U-Nets alone).
"""

import json
import re

import pytest
import torch
from conftest import TINY_XL_POOLED, diffusers_unet, tiny_refiner_config, tiny_sd1_config, tiny_sdxl_config
from safetensors.torch import save_file
from torch import nn

from ldm.formats.checkpoint import diffusers_key_map, read_state_dict
from ldm.models.lora import (
    _diffusers_module_names,
    _layer_aliases,
    add_lora,
    load_lora,
    lora_modules,
    save_lora,
)
from ldm.models.unet import UNet, UNetConfig, random_weights_, timestep_embedding

TOL = 1e-5


def tiny_deep_config() -> UNetConfig:
    """tiny SDXL with 11 transformer blocks at the last level and in the middle: indices 10 and 1_0 side by side."""
    return tiny_sdxl_config(transformer_depth=(0, 1, 11))


CONFIGS = pytest.mark.parametrize(
    "make_config", [tiny_sdxl_config, tiny_refiner_config, tiny_deep_config], ids=["sdxl", "refiner", "deep"]
)


def _unet(config, seed=0):
    return random_weights_(UNet(config), seed=seed).eval()


def _inputs(config, seed=1):
    """x, t, context, our added vector y, and diffusers' added_cond_kwargs for the same y."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 7, config.context_dim, generator=g)
    pooled = torch.randn(2, TINY_XL_POOLED, generator=g)
    n_ids = (config.adm_in_channels - TINY_XL_POOLED) // 256
    ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 768.0][:n_ids]] * 2)
    y = torch.cat([pooled, timestep_embedding(ids.flatten(), 256).reshape(2, -1)], dim=1)
    return x, torch.tensor([10.0, 500.0]), context, y, {"text_embeds": pooled, "time_ids": ids}


def _ours(unet, inputs):
    x, t, context, y, _ = inputs
    with torch.no_grad():
        return unet(x, t, context, y)


def _theirs(model, inputs):
    x, t, context, _, added = inputs
    with torch.no_grad():
        return model(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample


def _adaptable(unet):
    """Every layer a plain LoRA can adapt: Linears (attention, ff, proj, time / label embeddings, the resnets'
    emb_layers) and 1x1 convs (the resnets' skip connections)."""
    return [
        n
        for n, m in unet.named_modules()
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))
    ]


def _random_lora(unet, names="sgm", alpha=2.0, layers=None, seed=3):
    """A random kohya LoRA on `layers` (default all adaptable ones): ranks 2-4 by layer, one alpha; keys in
    sgm names (`lora_unet_input_blocks_4_1_...`), kohya's diffusers-style names, diffusers / PEFT names or
    older diffusers' `.lora.down` names (these two without alpha tensors: give it in the metadata, see _file)."""
    kmap = diffusers_key_map(unet.config)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, name in enumerate(layers or _adaptable(unet)):
        weight = unet.get_submodule(name).weight
        out_f, in_f, *kernel = weight.shape
        rank = 2 + i % 3
        down = torch.randn(rank, in_f, *kernel, generator=g) / in_f**0.5
        up = torch.randn(out_f, rank, *kernel, generator=g) * 0.3
        theirs = kmap[name + ".weight"].removesuffix(".weight")
        if names == "peft":
            sd |= {f"unet.{theirs}.lora_A.weight": down, f"unet.{theirs}.lora_B.weight": up}
            continue
        if names == "old_diffusers":  # LoRACompatibleLinear's
            sd |= {f"unet.{theirs}.lora.down.weight": down, f"unet.{theirs}.lora.up.weight": up}
            continue
        key = "lora_unet_" + (name if names == "sgm" else theirs).replace(".", "_")
        sd |= {key + ".lora_down.weight": down, key + ".lora_up.weight": up, key + ".alpha": torch.tensor(alpha)}
    return sd


def _file(tmp_path, sd, name="lora.safetensors", peft_alpha=None):
    """sd saved as a safetensors file; peft_alpha: diffusers' lora_adapter_metadata record with that alpha."""
    path = tmp_path / name
    meta = None if peft_alpha is None else {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": peft_alpha})}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    return path


def _max_diff(a, b):
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "config", [UNetConfig.sdxl(), UNetConfig.sdxl_refiner(), UNetConfig.sd15()], ids=["sdxl", "refiner", "sd15"]
)
def test_every_spelling_of_a_full_size_layer_names_one_layer(config):
    """The alias table of the full-size U-Nets: four spellings per layer, none shared (no '_10' / '_1_0'
    ambiguity), holding the names kohya's SDXL trainer writes."""
    with torch.device("meta"):
        unet = UNet(config)
    names = _diffusers_module_names(unet)
    aliases = _layer_aliases(names)
    assert len(aliases) == 4 * len(names)
    if config == UNetConfig.sdxl():
        assert aliases["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == (
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
        )
        assert aliases["lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj"] == (
            "middle_block.1.transformer_blocks.9.ff.net.0.proj"
        )
        assert aliases["lora_unet_output_blocks_2_1_proj_in"] == "output_blocks.2.1.proj_in"
        assert aliases["lora_unet_label_emb_0_0"] == "label_emb.0.0"
        assert aliases["lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k"] == (
            "input_blocks.4.1.transformer_blocks.1.attn2.to_k"
        )
        assert aliases["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == (
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
        )
        assert not any(a.startswith("lora_unet_input_blocks_1_1") for a in aliases)  # no attention at level 0


def test_block_index_10_resolves_and_is_not_1_0():
    config = tiny_deep_config()
    unet = _unet(config)
    layers = _layer_aliases(_diffusers_module_names(unet))
    assert layers["lora_unet_middle_block_1_transformer_blocks_10_attn1_to_q"] == (
        "middle_block.1.transformer_blocks.10.attn1.to_q"
    )
    assert layers["lora_unet_middle_block_1_transformer_blocks_1_attn1_to_q"] == (
        "middle_block.1.transformer_blocks.1.attn1.to_q"
    )
    assert not any("transformer_blocks_1_0" in a for a in layers)


# --------------------------------------------------------------------------- against diffusers


@CONFIGS
def test_kohya_sgm_lora_matches_diffusers(tmp_path, make_config):
    """A kohya SDXL LoRA (sgm names, a rank and an alpha per layer) on every adaptable layer: ours against
    diffusers' own kohya reader (StableDiffusionXLLoraLoaderMixin.lora_state_dict with the U-Net config: sgm
    blocks -> diffusers names, then the PEFT renaming load_lora_adapter applies), merged by hand into
    UNet2DConditionModel holding the same base weights (load_lora_weights itself needs the peft package;
    see the next test)."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    config = make_config()
    unet, inputs = _unet(config), _inputs(config)
    theirs = diffusers_unet(config, unet.state_dict())
    base = _ours(unet, inputs)
    layers = _adaptable(unet)
    if config == tiny_refiner_config():
        # diffusers' sgm remapping finds block 1's keys by substring ("input_blocks_1" in "input_blocks_10_..."),
        # so it fails (KeyError) on a four-level U-Net's blocks 10 / 11; leave those out for diffusers' sake
        layers = [n for n in layers if not re.match(r"(input|output)_blocks\.1[01]\.", n)]
    sd = _random_lora(unet, layers=layers)
    for i, key in enumerate(k for k in sd if k.endswith(".alpha")):
        sd[key] = torch.tensor(1.0 + i % 5)
    path = _file(tmp_path, sd)
    if make_config is tiny_deep_config:
        assert "lora_unet_middle_block_1_transformer_blocks_10_attn2_to_k.lora_down.weight" in read_state_dict(path)

    assert load_lora(unet, path) == sorted(layers)
    ours = _ours(unet, inputs)
    assert _max_diff(ours, base) > 0.1  # the LoRA does something

    sd, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(str(path), unet_config=theirs.config)
    assert all(k.startswith("unet.") for k in sd)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in sd.items()})
    names = sorted({k.rsplit(".lora_", 1)[0] for k in peft})
    assert len(names) == len(layers) and len(peft) == 2 * len(names)
    alpha_of = {_alpha_layer(k): v for k, v in alphas.items()}
    assert alpha_of.keys() == set(names) and set(alpha_of.values()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    with torch.no_grad():
        for name in names:
            layer = theirs.get_submodule(name)
            A, B = peft[name + ".lora_A.weight"], peft[name + ".lora_B.weight"]
            assert layer.weight.shape[:2] == (B.shape[0], A.shape[1]), name
            delta = alpha_of[name] / A.shape[0] * (B.flatten(1) @ A.flatten(1))
            layer.weight += delta.view(layer.weight.shape)
    diff = _max_diff(_theirs(theirs, inputs), ours)
    assert diff <= TOL, diff

    merged = _unet(config)
    load_lora(merged, path, merge=True)
    assert not lora_modules(merged) and _max_diff(_ours(merged, inputs), ours) <= TOL


def _alpha_layer(key):
    """diffusers' network-alpha key -> the PEFT layer name: its attention layers' alpha keys keep the old
    processor spelling (`attn1.processor.to_q_lora.down.weight.alpha`)."""
    name = key.removeprefix("unet.").removesuffix(".alpha")
    name = re.sub(r"\.processor\.(to_[qkv])_lora\.down\.weight$", r".\1", name)
    return re.sub(r"\.processor\.to_out_lora\.down\.weight$", ".to_out.0", name)


@pytest.mark.parametrize("make_config", [tiny_sdxl_config, tiny_deep_config], ids=["sdxl", "deep"])
def test_kohya_sgm_lora_matches_diffusers_peft_adapter(tmp_path, make_config):
    """The same through diffusers' real loading path (load_lora_into_unet -> PEFT adapters with a rank
    pattern). Needs the peft package. One alpha for all layers: diffusers builds PEFT's alpha_pattern from
    the alpha keys above, so per-layer alphas of attention layers would not reach PEFT (it warns and uses
    the default alpha) — the previous test checks per-layer alphas."""
    pytest.importorskip("peft")
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    config = make_config()
    unet, inputs = _unet(config), _inputs(config)
    theirs = diffusers_unet(config, unet.state_dict())
    path = _file(tmp_path, _random_lora(unet, alpha=3.0))
    load_lora(unet, path)
    state_dict, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(str(path), unet_config=theirs.config)
    StableDiffusionXLLoraLoaderMixin.load_lora_into_unet(state_dict, alphas, theirs)
    diff = _max_diff(_theirs(theirs, inputs), _ours(unet, inputs))
    assert diff <= TOL, diff


@pytest.mark.parametrize("make_config", [tiny_sdxl_config, tiny_deep_config], ids=["sdxl", "deep"])
def test_every_naming_gives_the_same_model(tmp_path, make_config):
    """kohya sgm names, kohya diffusers-style names (what save_lora writes), diffusers / PEFT and older
    diffusers names (alpha in the metadata): the same adapters, bit for bit the same output."""
    config = make_config()
    template, inputs = _unet(config), _inputs(config)
    layers = sorted(_adaptable(template))
    outs = {}
    for names in ("sgm", "diffusers", "peft", "old_diffusers"):
        unet = _unet(config)
        alpha = 2.0 if names in ("peft", "old_diffusers") else None
        assert load_lora(unet, _file(tmp_path, _random_lora(template, names), f"{names}.safetensors", alpha)) == layers
        outs[names] = _ours(unet, inputs)
    assert all(torch.equal(out, outs["sgm"]) for out in outs.values())


def test_our_sdxl_file_round_trips(tmp_path):
    config = tiny_sdxl_config()
    unet, inputs = _unet(config), _inputs(config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in add_lora(unet, rank=4, alpha=2.0, targets=("to_q", "to_k", "to_v", "to_out.0"), include_proj=True):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    fresh = _unet(config)
    assert load_lora(fresh, save_lora(unet, tmp_path / "ours.safetensors")) == sorted(lora_modules(unet))
    assert _max_diff(_ours(fresh, inputs), _ours(unet, inputs)) <= 1e-6


# --------------------------------------------------------------------------- text encoders


def _te_parts(prefix, width=32, n=2):
    """A kohya or diffusers text-encoder LoRA part (`n` layers' tensors) under `prefix`."""
    sd = {}
    for i in range(n):
        if prefix.startswith("lora_te"):
            k = f"{prefix}text_model_encoder_layers_{i}_self_attn_q_proj"
            sd |= {k + ".lora_down.weight": torch.zeros(4, width), k + ".lora_up.weight": torch.zeros(width, 4)}
        else:
            k = f"{prefix}text_model.encoder.layers.{i}.mlp.fc1"
            sd |= {k + ".lora_A.weight": torch.zeros(4, width), k + ".lora_B.weight": torch.zeros(2 * width, 4)}
    return sd


def test_sdxl_text_encoder_parts_are_skipped_with_a_note(tmp_path):
    config = tiny_sdxl_config()
    template, inputs = _unet(config), _inputs(config)
    unet_part = _random_lora(template)
    expected = _unet(config)
    load_lora(expected, _file(tmp_path, unet_part, "unet_only.safetensors"))

    for name, te in [
        ("kohya", _te_parts("lora_te1_") | _te_parts("lora_te2_", n=3)),
        ("diffusers", _te_parts("text_encoder.") | _te_parts("text_encoder_2.", n=3)),
    ]:
        unet = _unet(config)
        with pytest.warns(UserWarning) as record:
            load_lora(unet, _file(tmp_path, unet_part | te, f"{name}.safetensors"))
        (message,) = [str(w.message) for w in record]
        first, second = ("lora_te1_", "lora_te2_") if name == "kohya" else ("text_encoder.", "text_encoder_2.")
        assert f"skipped 10 text-encoder LoRA tensors: 4 {first}* (" in message
        assert f", 6 {second}* (SDXL's OpenCLIP ViT-bigG)" in message and "not supported" in message
        assert torch.equal(_ours(unet, inputs), _ours(expected, inputs))

    te_only = _file(tmp_path, _te_parts("lora_te1_") | _te_parts("lora_te2_"), "te_only.safetensors")
    with pytest.warns(UserWarning, match="lora_te1_"), pytest.raises(ValueError, match="no U-Net LoRA tensors"):
        load_lora(_unet(config), te_only)


# --------------------------------------------------------------------------- the other family


def _refused(unet, path):
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ValueError) as e:
        load_lora(unet, path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    after = unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    return message.removeprefix(f"{path}: ")


@pytest.mark.parametrize("with_te", [True, False], ids=["with_te", "unet_only"])
def test_sdxl_lora_on_sd1_is_refused(tmp_path, with_te):
    xl, sd1 = tiny_sdxl_config(), tiny_sd1_config()
    sd = _random_lora(_unet(xl))
    if with_te:
        sd |= _te_parts("lora_te1_") | _te_parts("lora_te2_")
    assert xl.context_dim != sd1.context_dim and xl.middle_depth > 1  # the tiny configs differ as the real ones
    message = _refused(_unet(sd1), _file(tmp_path, sd))
    found = "lora_te1_/lora_te2_ text-encoder parts, " if with_te else ""
    assert message == (
        f"an SDXL LoRA ({found}{xl.context_dim}-wide cross-attention, added-vector (label_emb) layers, transformer "
        f"blocks up to index {xl.middle_depth - 1}) for an SD1/SD2 model ({sd1.context_dim}-wide context); use a "
        "LoRA made for this model"
    )


@pytest.mark.parametrize("with_te", [True, False], ids=["with_te", "unet_only"])
def test_sd1_lora_on_sdxl_is_refused(tmp_path, with_te):
    xl, sd1 = tiny_sdxl_config(), tiny_sd1_config()
    template = _unet(sd1)
    sd = _random_lora(template, "diffusers", layers=[n for n in _adaptable(template) if ".transformer_blocks." in n])
    if with_te:
        sd |= _te_parts("lora_te_")
    assert xl.context_dim != sd1.context_dim and 0 in sd1.attention_levels and 0 not in xl.attention_levels
    message = _refused(_unet(xl), _file(tmp_path, sd))
    found = "lora_te_ text-encoder parts, " if with_te else ""
    assert message == (
        f"an SD1/SD2 LoRA ({found}{sd1.context_dim}-wide cross-attention, attention at full resolution) for an SDXL "
        f"model ({xl.context_dim}-wide context); use a LoRA made for this model"
    )


def _full_size_lora(layers):
    """A few tensors of a full-size LoRA: {module key: (in, out)} -> rank-4 kohya tensors."""
    sd = {}
    for key, (in_f, out_f) in layers.items():
        sd |= {key + ".lora_down.weight": torch.zeros(4, in_f), key + ".lora_up.weight": torch.zeros(out_f, 4)}
    return sd


@pytest.mark.parametrize(
    "config, layers, expected",
    [
        (
            UNetConfig.sd15(),
            {
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
                "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280),
                "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k": (2048, 1280),
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640),
            },
            "an SDXL LoRA (lora_te1_/lora_te2_ text-encoder parts, 2048-wide cross-attention, transformer blocks up "
            "to index 9) for an SD1 model (768-wide context)",
        ),
        (
            UNetConfig.sdxl(),
            {
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (768, 320),
            },
            "an SD1 LoRA (lora_te_ text-encoder parts, 768-wide cross-attention, attention at full resolution) for "
            "an SDXL model (2048-wide context)",
        ),
        (
            UNetConfig.sd21(),
            {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v": (2048, 640)},
            "an SDXL LoRA (2048-wide cross-attention) for an SD2 model (1024-wide context)",
        ),
        (
            UNetConfig.sdxl_refiner(),
            {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (2048, 768)},
            "an SDXL LoRA (2048-wide cross-attention) for an SDXL refiner model (1280-wide context)",
        ),
    ],
    ids=["sdxl_on_sd15", "sd1_on_sdxl", "sdxl_on_sd21", "sdxl_on_refiner"],
)
def test_full_size_family_messages(tmp_path, config, layers, expected):
    """The messages for the real models (meta-device U-Nets: refused before any weight is touched)."""
    with torch.device("meta"):
        unet = UNet(config)
    with pytest.raises(ValueError) as e:
        load_lora(unet, _file(tmp_path, _full_size_lora(layers)))
    assert str(e.value) == f"{tmp_path / 'lora.safetensors'}: {expected}; use a LoRA made for this model"


def test_a_fitting_lora_with_one_text_encoder_part_still_loads_on_sd1(tmp_path):
    """lora_te_ parts say SD1/SD2: no objection on an SD1 model (the family check only refuses the other)."""
    config = tiny_sd1_config()
    unet = _unet(config)
    layers = sorted(_adaptable(unet))
    sd = _random_lora(unet) | _te_parts("lora_te_")
    with pytest.warns(UserWarning, match=r"skipped 4 text-encoder LoRA tensors: 4 lora_te_\* \(the text encoder\)"):
        assert load_lora(unet, _file(tmp_path, sd)) == layers
