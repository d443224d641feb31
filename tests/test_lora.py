"""LoRA adapters: identity at init, only adapters train, kohya-layout files read back by us and by
diffusers' own converter, the other common layouts, merge / scale, and refusal of bad files."""

import copy
import json
import re

import pytest
import torch
from conftest import diffusers_unet, tiny_sd1_config, tiny_sd2_config
from safetensors import safe_open
from safetensors.torch import save_file

from ldm.formats.checkpoint import diffusers_key_map, read_state_dict
from ldm.models.lora import (
    add_lora,
    base_state_dict,
    load_lora,
    lora_modules,
    merge_lora,
    remove_lora,
    save_lora,
    set_lora_scale,
)
from ldm.models.unet import UNet, UNetConfig, random_weights_

CONFIGS = pytest.mark.parametrize("make_config", [tiny_sd1_config, tiny_sd2_config], ids=["sd1", "sd2"])
ALL_LINEAR = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a loaded 2-core machine two OpenMP threads make a
    20 ms forward take seconds; restored for the other test files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _unet(config, seed=0):
    return random_weights_(UNet(config), seed=seed).eval()


def _inputs(config, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 7, config.context_dim, generator=g)
    return x, torch.tensor([10.0, 500.0]), ctx


def _run(unet, inputs):
    with torch.no_grad():
        return unet(*inputs)


def _trained(config, seed=3, **kw):
    """A U-Net with adapters holding random (nonzero up) weights, as after some training."""
    unet = _unet(config)
    kw = {"rank": 4, "alpha": 2.0, **kw}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in add_lora(unet, **kw):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return unet


def _max_diff(a, b):
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- adapters


@CONFIGS
def test_fresh_adapter_changes_nothing_and_keeps_base_names(make_config):
    config = make_config()
    unet = _unet(config)
    inputs = _inputs(config)
    before, base = _run(unet, inputs), {k: v.clone() for k, v in unet.state_dict().items()}
    params = add_lora(unet, rank=4, include_proj=True)
    assert torch.equal(_run(unet, inputs), before)  # bit-exact: B = 0
    kept = base_state_dict(unet)
    assert list(kept) == list(base) and all(torch.equal(kept[k], base[k]) for k in base)
    extra = set(unet.state_dict()) - set(base)
    assert extra and all(re.search(r"\.lora_(down|up)\.weight$", k) for k in extra)
    assert len(params) == len(extra) == 2 * len(lora_modules(unet))
    # 4 attention Linears + proj_in/out per transformer block set; SD1's proj are 1x1 convs
    assert any(m.is_conv for m in lora_modules(unet).values()) == (not config.use_linear_projection)


def test_only_adapters_train_and_base_stays_bit_identical():
    config = tiny_sd1_config()
    unet = _unet(config).train()
    params = add_lora(unet, rank=4, dropout=0.1, include_proj=True)
    base = {k: v.clone() for k, v in base_state_dict(unet).items()}
    adapters0 = [p.detach().clone() for p in params]
    assert {id(p) for p in unet.parameters() if p.requires_grad} == {id(p) for p in params}
    inputs = _inputs(config)
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(unet(*inputs), target).backward()
        assert all(p.grad is None for n, p in unet.named_parameters() if ".lora_" not in n)
        assert all(p.grad is not None for p in params)
        opt.step()
    after = base_state_dict(unet)
    assert all(torch.equal(after[k], base[k]) for k in base)
    assert all(not torch.equal(p, p0) for p, p0 in zip(params, adapters0))  # both A and B moved


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    config = tiny_sd2_config()
    inputs = _inputs(config)
    grads = []
    for ckpt in (False, True):
        unet = _trained(config).train()
        unet.gradient_checkpointing = ckpt
        unet(*inputs).square().mean().backward()
        grads.append([p.grad for p in unet.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_deepcopy_copies_the_adapters():
    config = tiny_sd1_config()
    unet, inputs = _trained(config), _inputs(config)
    twin = copy.deepcopy(unet)  # as an EMA copy would be made
    assert torch.equal(_run(twin, inputs), _run(unet, inputs))
    with torch.no_grad():
        next(iter(lora_modules(twin).values())).lora_up.weight.add_(1.0)
    assert not torch.equal(_run(twin, inputs), _run(unet, inputs))


@CONFIGS
def test_scale_merge_and_remove(make_config):
    config = make_config()
    unet, inputs = _trained(config, include_proj=True), _inputs(config)
    base_out = _run(_unet(config), inputs)
    full = _run(unet, inputs)
    assert _max_diff(full, base_out) > 1e-2  # the adapters do something

    set_lora_scale(unet, 0.0)
    assert torch.equal(_run(unet, inputs), base_out)
    set_lora_scale(unet, 0.5)
    half = _run(unet, inputs)
    assert 0 < _max_diff(half, base_out) < _max_diff(full, base_out)

    merged = copy.deepcopy(unet)
    set_lora_scale(merged, 1.0)
    merge_lora(merged)
    assert not lora_modules(merged) and list(merged.state_dict()) == list(UNet(config).state_dict())
    assert _max_diff(_run(merged, inputs), full) <= 1e-5

    remove_lora(unet)
    assert not lora_modules(unet) and list(unet.state_dict()) == list(UNet(config).state_dict())
    assert torch.equal(_run(unet, inputs), base_out)


def test_add_lora_refuses_bad_requests():
    unet = _unet(tiny_sd1_config())
    with pytest.raises(ValueError, match="no layer of the U-Net is named 'to_x'"):
        add_lora(unet, targets=("to_q", "to_x"))
    with pytest.raises(ValueError, match="LoCon"):
        add_lora(unet, targets=("in_layers.2",))  # 3x3 convs
    assert not lora_modules(unet) and all(p.requires_grad for p in unet.parameters())  # nothing changed
    add_lora(unet)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(unet)


# --------------------------------------------------------------------------- files


def test_saved_file_is_small_kohya_layout(tmp_path):
    config = tiny_sd1_config()
    unet = _trained(config, include_proj=True)
    path = save_lora(
        unet, tmp_path / "lora.safetensors", metadata={"ss_output_name": "test", "epochs": 3}, base_model_hash="ab" * 32
    )
    sd = read_state_dict(path)
    n = len(lora_modules(unet))
    assert len(sd) == 3 * n
    assert all(re.fullmatch(r"lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in sd)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert sd[q + ".lora_down.weight"].shape == (4, 32) and sd[q + ".lora_up.weight"].shape == (32, 4)
    assert sd[q + ".alpha"].ndim == 0 and sd[q + ".alpha"].item() == 2.0
    # SD1 proj_in is a 1x1 conv: 4-D factors, as kohya writes them
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_new_sd_model_hash"] == "ab" * 32 and meta["ss_output_name"] == "test" and meta["epochs"] == "3"
    record = json.loads(meta["ldm_lora"])
    assert record["targets"] == ["proj_in", "proj_out", "to_k", "to_out.0", "to_q", "to_v"]
    assert UNetConfig.from_dict(json.loads(meta["ldm_unet_config"])) == config
    # size: adapter bytes vs U-Net bytes (tiny model here; SD1.5 figures in the next test)
    unet_bytes = sum(v.numel() * v.element_size() for v in base_state_dict(unet).values())
    ratio = path.stat().st_size / unet_bytes
    assert ratio < 0.03, ratio  # 215 KB file for an 8.7 MB tiny U-Net (2.5%)


def test_sd15_adapter_size():
    """SD1.5, rank 4 on the attention projections (kohya's usual setting): 797,184 parameters,
    0.093% of the 859.5M U-Net, a 3.2 MB float32 file."""
    with torch.device("meta"):
        unet = UNet(UNetConfig.sd15())
    n_unet = sum(p.numel() for p in unet.parameters())
    params = add_lora(unet, rank=4)
    n = sum(p.numel() for p in params)
    assert len(params) == 2 * 128 and n == 797_184 and n / n_unet < 0.001


@CONFIGS
def test_file_round_trip_reproduces_adapted_output(tmp_path, make_config):
    config = make_config()
    unet, inputs = _trained(config, include_proj=True, targets=ALL_LINEAR), _inputs(config)
    path = save_lora(unet, tmp_path / "lora.safetensors")
    fresh = _unet(config)
    names = load_lora(fresh, path)
    assert names == sorted(lora_modules(unet))
    assert {(m.rank, m.alpha) for m in lora_modules(fresh).values()} == {(4, 2.0)}
    assert _max_diff(_run(fresh, inputs), _run(unet, inputs)) <= 1e-6
    assert _max_diff(_run(fresh, inputs), _run(_unet(config), inputs)) > 1e-2
    assert {id(p) for p in fresh.parameters() if p.requires_grad} == {
        id(p) for m in lora_modules(fresh).values() for p in m.parameters() if p is not m.weight and p is not m.bias
    }

    merged = _unet(config)
    load_lora(merged, path, scale=0.7, merge=True)
    set_lora_scale(unet, 0.7)
    assert not lora_modules(merged)
    assert _max_diff(_run(merged, inputs), _run(unet, inputs)) <= 1e-5


def _layouts(unet):
    """The adapters of `unet` written in each of the layouts load_lora reads: (name, tensors, metadata)."""
    kmap = diffusers_key_map(unet.config)
    rows = []
    for ours, m in lora_modules(unet).items():
        theirs = kmap[ours + ".weight"][: -len(".weight")]
        rows.append((ours, theirs, m))
    layouts = {}
    # kohya with CompVis module names (kohya's SDXL spelling)
    sd = {}
    for ours, _theirs, m in rows:
        k = "lora_unet_" + ours.replace(".", "_")
        sd |= {
            k + ".lora_down.weight": m.lora_down.weight,
            k + ".lora_up.weight": m.lora_up.weight,
            k + ".alpha": torch.tensor(m.alpha),
        }
    layouts["kohya_compvis"] = (sd, None)
    # diffusers / PEFT with the alpha in diffusers' metadata record
    sd = {}
    for _ours, theirs, m in rows:
        sd |= {f"unet.{theirs}.lora_A.weight": m.lora_down.weight, f"unet.{theirs}.lora_B.weight": m.lora_up.weight}
    layouts["peft_metadata"] = (sd, {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 2.0})})
    # the same without any alpha: alpha = rank, so the update scaling alpha/rank goes into B
    baked = [(ours, theirs, m.lora_down.weight, m.lora_up.weight * (m.alpha / m.rank)) for ours, theirs, m in rows]
    layouts["peft_no_alpha"] = (
        {f"{t}.lora_{ab}.weight": w for _, t, a, b in baked for ab, w in (("A", a), ("B", b))},
        None,
    )
    # old diffusers: attention processors (to_q_lora) and LoRACompatibleLinear (.lora.down)
    sd = {}
    for _, theirs, down, up in baked:
        if m := re.fullmatch(r"(.+)\.(to_q|to_k|to_v|to_out)(\.0)?", theirs):
            k = f"{m[1]}.processor.{m[2]}_lora"
        else:
            k = f"{theirs}.lora"
        sd |= {k + ".down.weight": down, k + ".up.weight": up}
    layouts["diffusers_old"] = (sd, None)
    return layouts


@pytest.mark.parametrize("layout", ["kohya_compvis", "peft_metadata", "peft_no_alpha", "diffusers_old"])
def test_other_layouts_give_the_same_output(tmp_path, layout):
    config = tiny_sd1_config()
    unet, inputs = _trained(config, include_proj=True), _inputs(config)
    sd, meta = _layouts(unet)[layout]
    path = tmp_path / "lora.safetensors"
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    fresh = _unet(config)
    assert load_lora(fresh, path) == sorted(lora_modules(unet))
    assert _max_diff(_run(fresh, inputs), _run(unet, inputs)) <= 1e-6


def test_text_encoder_tensors_are_skipped_with_a_warning(tmp_path):
    config = tiny_sd1_config()
    unet, inputs = _trained(config), _inputs(config)
    sd = read_state_dict(save_lora(unet, tmp_path / "lora.safetensors"))
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    sd |= {
        te + ".lora_down.weight": torch.zeros(4, 768),
        te + ".lora_up.weight": torch.zeros(768, 4),
        te + ".alpha": torch.tensor(4.0),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(4, 8),
    }
    save_file(sd, str(tmp_path / "with_te.safetensors"))
    fresh = _unet(config)
    with pytest.warns(UserWarning, match="skipped 4 text-encoder LoRA tensors.*not supported"):
        load_lora(fresh, tmp_path / "with_te.safetensors")
    assert _max_diff(_run(fresh, inputs), _run(unet, inputs)) <= 1e-6
    only_te = {k: v for k, v in sd.items() if k.startswith("lora_te_")}
    save_file(only_te, str(tmp_path / "te_only.safetensors"))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no U-Net LoRA tensors"):
        load_lora(_unet(config), tmp_path / "te_only.safetensors")


def _bad(tmp_path, edit):
    """Our file for a tiny SD1 U-Net with one edit, and the error load_lora gives for it."""
    sd = read_state_dict(save_lora(_trained(tiny_sd1_config()), tmp_path / "lora.safetensors"))
    edit(sd)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError) as e:
        load_lora(_unet(tiny_sd1_config()), tmp_path / "bad.safetensors")
    return str(e.value)


Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def test_bad_files_are_refused_naming_the_tensor(tmp_path):
    unknown = "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    msg = _bad(tmp_path, lambda sd: sd.update({unknown: torch.zeros(4, 32)}))
    assert unknown in msg and "names no layer" in msg

    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    msg = _bad(
        tmp_path,
        lambda sd: sd.update(
            {conv + ".lora_down.weight": torch.zeros(4, 32, 3, 3), conv + ".lora_up.weight": torch.zeros(32, 4, 1, 1)}
        ),
    )
    assert conv + ".lora_down.weight" in msg and "LoCon" in msg and "not supported" in msg

    msg = _bad(tmp_path, lambda sd: sd.update({Q + ".hada_w1_a": torch.zeros(32, 4)}))
    assert "LoHa" in msg and "not supported" in msg

    msg = _bad(tmp_path, lambda sd: sd.update({Q + ".lora_down.weight": torch.zeros(4, 48)}))
    assert f"'{Q}.lora_down.weight' has shape (4, 48)" in msg and "needs (4, 32)" in msg

    msg = _bad(tmp_path, lambda sd: sd.update({Q + ".lora_up.weight": torch.zeros(32, 8)}))
    assert f"'{Q}.lora_up.weight' has shape (32, 8)" in msg and "needs (32, 4)" in msg

    msg = _bad(tmp_path, lambda sd: sd.pop(Q + ".lora_up.weight"))
    assert "no matching up tensor" in msg

    msg = _bad(tmp_path, lambda sd: sd.update({"something_else.weight": torch.zeros(1)}))
    assert "unknown tensor 'something_else.weight'" in msg


@pytest.mark.parametrize(
    "key, value, problem",
    [
        (Q + ".alpha", torch.tensor(float("nan")), "is not one finite number >= 0"),
        (Q + ".alpha", torch.tensor(float("inf")), "is not one finite number >= 0"),
        (Q + ".alpha", torch.tensor(-1.0), "is not one finite number >= 0"),
        (Q + ".alpha", torch.tensor([4.0, 4.0]), r"\(shape \(2,\)\) is not one finite number"),
        (Q + ".lora_down.weight", torch.full((4, 32), float("nan")), "holds NaN or infinite values"),
        (Q + ".lora_up.weight", torch.zeros(32, 4, dtype=torch.int32), "is torch.int32; LoRA weights are floating"),
        (Q + ".lora_down.weight", torch.zeros(0, 32), "a LoRA needs rank >= 1"),
    ],
)
@pytest.mark.parametrize("merge", [False, True], ids=["adapters", "merged"])
def test_crafted_lora_values_are_refused_in_one_line(tmp_path, key, value, problem, merge):
    """Values a file may hold that would give NaN images, a ZeroDivisionError or an error naming no file:
    each a ValueError naming the file and the tensor, before the model is changed."""
    sd = read_state_dict(save_lora(_trained(tiny_sd1_config()), tmp_path / "lora.safetensors"))
    sd[key] = value
    if key.endswith("lora_down.weight") and value.shape[0] == 0:
        sd[Q + ".lora_up.weight"] = torch.zeros(32, 0)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    unet = _unet(tiny_sd1_config())
    before = copy.deepcopy(unet.state_dict())
    with pytest.raises(ValueError, match=problem) as e:
        load_lora(unet, tmp_path / "bad.safetensors", merge=merge)
    message = str(e.value)
    assert "bad.safetensors" in message and key in message and "\n" not in message
    after = unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize(
    "metadata, problem",
    [
        ("{not json", "lora_adapter_metadata: not valid JSON"),
        ("[" * 100_000, "nested too deeply"),
        (json.dumps({"unet.lora_alpha": "big"}), "lora_alpha='big' is not a finite number"),
        (json.dumps({"lora_alpha": float("nan")}), "lora_alpha=nan is not a finite number"),
        (json.dumps({"alpha_pattern": [1, 2]}), "alpha_pattern=.* is not a map of names to numbers"),
    ],
)
def test_crafted_peft_metadata_is_refused(tmp_path, metadata, problem):
    sd = read_state_dict(save_lora(_trained(tiny_sd1_config()), tmp_path / "lora.safetensors"))
    sd = {k: v for k, v in sd.items() if not k.endswith(".alpha")}  # alpha from the PEFT metadata, then
    save_file(sd, str(tmp_path / "peft.safetensors"), metadata={"lora_adapter_metadata": metadata})
    with pytest.raises(ValueError, match=problem) as e:
        load_lora(_unet(tiny_sd1_config()), tmp_path / "peft.safetensors")
    assert "peft.safetensors" in str(e.value) and "\n" not in str(e.value)


def test_load_refuses_a_second_unmerged_lora_and_another_model(tmp_path):
    path = save_lora(_trained(tiny_sd1_config()), tmp_path / "sd1.safetensors")
    unet = _unet(tiny_sd1_config())
    load_lora(unet, path)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        load_lora(unet, path)
    load_lora(unet, path, merge=True)  # stacking by merging is fine
    with pytest.raises(ValueError, match="names no layer of this U-Net"):
        load_lora(_unet(tiny_sd2_config()), path)  # no attention at level 0


# --------------------------------------------------------------------------- diffusers reads our files


@CONFIGS
def test_diffusers_reads_our_file_to_the_same_model(tmp_path, make_config):
    """Our kohya-layout file through diffusers' own LoRA reader (StableDiffusionLoraLoaderMixin.lora_state_dict
    -> kohya conversion, then the PEFT renaming load_lora_adapter applies), merged by hand into diffusers'
    UNet2DConditionModel: every key must name a real diffusers layer of the right shape and the output
    must match ours. (load_lora_weights itself needs the peft package, which is not installed here.)"""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    config = make_config()
    unet, inputs = _trained(config, include_proj=True, targets=ALL_LINEAR), _inputs(config)
    path = save_lora(unet, tmp_path / "lora.safetensors")

    sd, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path))
    assert all(k.startswith("unet.") for k in sd) and set(alphas.values()) == {2.0}
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in sd.items()})
    theirs = diffusers_unet(config, _unet(config).state_dict())
    lora_alpha = 2.0  # one alpha for all layers: diffusers' LoraConfig(lora_alpha=2.0)
    layers = sorted({k.rsplit(".lora_", 1)[0] for k in peft})
    assert len(layers) == len(lora_modules(unet)) and len(peft) == 2 * len(layers)
    with torch.no_grad():
        for name in layers:
            layer = theirs.get_submodule(name)
            A, B = peft[name + ".lora_A.weight"], peft[name + ".lora_B.weight"]
            assert layer.weight.shape[:2] == (B.shape[0], A.shape[1]), name
            layer.weight += (lora_alpha / A.shape[0] * (B.flatten(1) @ A.flatten(1))).view(layer.weight.shape)
        out = theirs(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    assert _max_diff(out, _run(unet, inputs)) <= 1e-5
