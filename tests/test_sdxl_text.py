"""SDXL text conditioning (ldm.conditioning.sdxl) and its single-file text encoders (ldm.models.clip): parity with
diffusers' StableDiffusionXL(Img2Img)Pipeline.encode_prompt and _get_add_time_ids, the U-Net's "text_time" added
vector, and sgm single-file conversion (CLIP ViT-L + OpenCLIP ViT-bigG) against diffusers' converters."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_XL_POOLED, diffusers_unet, tiny_refiner_config, tiny_sdxl_config
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldm.conditioning import Conditioning
from ldm.conditioning.sdxl import (
    AESTHETIC_SCORE,
    NEGATIVE_AESTHETIC_SCORE,
    TIME_ID_DIM,
    SDXLConditioner,
    add_time_ids,
    label_vector,
)
from ldm.models import clip
from ldm.models.unet import random_weights_

CPU = torch.device("cpu")
ATOL = 1e-6
# tiny towers: CLIP-L 32 wide (4 layers, QuickGELU), bigG 48 wide (5 layers, GELU) with a non-square 48 -> 40
# projection, so a swapped width or an untransposed text_projection cannot pass
L_WIDTH, G_WIDTH, G_PROJ, L_LAYERS, G_LAYERS, HEADS = 32, 48, 40, 4, 5, 4


def _config(width, layers, act, projection):
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection,
        bos_token_id=0,  # the legacy ids of SDXL's configs (argmax pooling)
        eos_token_id=2,
        pad_token_id=1,
    )


def _l_config():
    return _config(L_WIDTH, L_LAYERS, "quick_gelu", L_WIDTH)


def _g_config(layers=G_LAYERS):
    return _config(G_WIDTH, layers, "gelu", G_PROJ)


@pytest.fixture(scope="module")
def tokenizers():
    return clip.load_tokenizer(), clip.load_tokenizer(pad_token="!")


@pytest.fixture(scope="module")
def encoders():
    clip_l = random_weights_(CLIPTextModel(_l_config()), seed=1).eval()
    clip_g = random_weights_(CLIPTextModelWithProjection(_g_config()), seed=2).eval()
    return clip_l, clip_g


@pytest.fixture(scope="module")
def ours(tokenizers, encoders):
    return SDXLConditioner(tokenizers[0], encoders[0], tokenizers[1], encoders[1])


@pytest.fixture(scope="module")
def ours_refiner(tokenizers, encoders):
    return SDXLConditioner(None, None, tokenizers[1], encoders[1])


@pytest.fixture(scope="module")
def base_pipe(tokenizers, encoders):
    """diffusers' SDXL base pipeline around the same text encoders (encode_prompt needs no U-Net or VAE)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=None,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=None,
        scheduler=None,
        add_watermarker=False,
    )


@pytest.fixture(scope="module")
def refiner_pipe(tokenizers, encoders):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline(
        vae=None,
        text_encoder=None,
        text_encoder_2=encoders[1],
        tokenizer=None,
        tokenizer_2=tokenizers[1],
        unet=None,
        scheduler=None,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )


def _theirs(pipe, prompts, negatives=None, clip_skip=None):
    """(cond, uncond) Conditionings from diffusers' encode_prompt; clip_skip is diffusers' (ours - 1)."""
    with torch.no_grad():
        context, neg_context, pooled, neg_pooled = pipe.encode_prompt(
            prompts, device=CPU, negative_prompt=negatives, clip_skip=clip_skip
        )
    return Conditioning(context, pooled), Conditioning(neg_context, neg_pooled)


def _assert_close(got: Conditioning, want: Conditioning, tokens: int | None = None):
    context = got.context if tokens is None else got.context[:, :tokens]
    assert context.shape == want.context.shape and got.pooled.shape == want.pooled.shape
    assert (context - want.context).abs().max().item() <= ATOL
    assert (got.pooled - want.pooled).abs().max().item() <= ATOL


def _words(n: int) -> str:
    pool = ["cat", "dog", "red", "blue", "house", "tree", "car", "sky", "sun", "moon"]  # one token each
    return " ".join(pool[i % len(pool)] for i in range(n))


PROMPT = ["an astronaut riding a horse on mars, highly detailed"]


# ----------------------------------------------------------------------------- encode_prompt parity


def test_default_has_zero_uncond_as_diffusers(ours, base_pipe):
    cond, uncond = ours.encode(PROMPT)
    ref, ref_uncond = _theirs(base_pipe, PROMPT)  # negative_prompt None, force_zeros_for_empty_prompt
    assert cond.context.shape == (1, 77, L_WIDTH + G_WIDTH) and cond.pooled.shape == (1, G_PROJ)
    _assert_close(cond, ref)
    _assert_close(uncond, ref_uncond)
    assert not uncond.context.any() and not uncond.pooled.any()
    zeroed = ours.encode(PROMPT, [""])[1]  # "" is an empty negative too (diffusers zeroes None only)
    assert not zeroed.context.any() and not zeroed.pooled.any()


def test_explicit_and_encoded_empty_negative(ours, base_pipe):
    cond, uncond = ours.encode(PROMPT, ["blurry, lowres"])
    ref, ref_uncond = _theirs(base_pipe, PROMPT, ["blurry, lowres"])
    _assert_close(cond, ref)
    _assert_close(uncond, ref_uncond)
    _, uncond = ours.encode(PROMPT, [""], zero_empty_negative=False)
    _, ref_uncond = _theirs(base_pipe, PROMPT, "")  # a given "" is encoded by diffusers
    _assert_close(uncond, ref_uncond)
    assert uncond.context.abs().mean() > 0.1


@pytest.mark.parametrize("clip_skip", [2, 3])
def test_clip_skip(ours, base_pipe, clip_skip):
    cond, uncond = ours.encode(PROMPT, ["blurry"], clip_skip=clip_skip, negative_clip_skip=1)
    ref, ref_uncond = _theirs(base_pipe, PROMPT, ["blurry"], clip_skip=clip_skip - 1)  # ours = diffusers' + 1
    _assert_close(cond, ref)
    _assert_close(uncond, ref_uncond)  # diffusers never applies clip_skip to the negative
    assert not torch.allclose(cond.context, ours.encode(PROMPT)[0].context)
    # the pooled vector is always the last layer's; by default the negative follows clip_skip
    assert torch.equal(cond.pooled, ours.encode(PROMPT)[0].pooled)
    assert torch.equal(
        ours.encode(PROMPT, ["blurry"], clip_skip=clip_skip)[1].context,
        ours.encode(["blurry"], clip_skip=clip_skip)[0].context,
    )
    for bad in (0, L_LAYERS):  # CLIP-L's 4 layers: 1..3
        with pytest.raises(ValueError, match="clip_skip must be in 1..3"):
            ours.encode(PROMPT, clip_skip=bad)


def test_long_prompt_first_chunk_and_pooled_equal_diffusers(ours, base_pipe):
    prompt = [_words(100)]  # 100 tokens: two chunks
    cond, uncond = ours.encode(prompt, ["blurry"])
    assert cond.context.shape == uncond.context.shape == (1, 2 * 77, L_WIDTH + G_WIDTH)
    ref, ref_uncond = _theirs(base_pipe, prompt, ["blurry"])  # diffusers truncates to 77 tokens
    _assert_close(cond, ref, tokens=77)  # first chunk, and the pooled vector of the first chunk
    _assert_close(uncond, ref_uncond, tokens=77)
    tail, _ = _theirs(base_pipe, [" ".join(_words(100).split()[75:])])  # the second chunk on its own
    assert (cond.context[:, 77:] - tail.context).abs().max().item() <= ATOL
    _, empty = _theirs(base_pipe, ["blurry"], "")
    assert (uncond.context[:, 77:] - empty.context).abs().max().item() <= ATOL  # padding chunk: ""
    _, zeros = ours.encode(prompt)
    assert zeros.context.shape == cond.context.shape and not zeros.context.any()


def test_batch_of_two(ours, base_pipe):
    prompts, negatives = ["a photo of a cat", "a red circle at the top left, 4k"], ["blurry", "ugly, lowres"]
    cond, uncond = ours.encode(prompts, negatives)
    ref, ref_uncond = _theirs(base_pipe, prompts, negatives)
    assert cond.batch == 2
    _assert_close(cond, ref)
    _assert_close(uncond, ref_uncond)
    assert not torch.allclose(cond.pooled[0], cond.pooled[1])
    with pytest.raises(ValueError, match="1 negative prompts for 2 prompts"):
        ours.encode(prompts, ["blurry"])
    with pytest.raises(ValueError, match="list of strings"):
        ours.encode("a cat")


def test_refiner(ours_refiner, refiner_pipe):
    assert ours_refiner.context_dim == G_WIDTH and ours_refiner.pooled_dim == G_PROJ
    for negatives in (None, ["blurry"]):
        cond, uncond = ours_refiner.encode(PROMPT, negatives, zero_empty_negative=False)
        ref, ref_uncond = _theirs(refiner_pipe, PROMPT, negatives)  # force_zeros_for_empty_prompt=False
        assert cond.context.shape == (1, 77, G_WIDTH)
        _assert_close(cond, ref)
        _assert_close(uncond, ref_uncond)


def test_conditioner_checks(tokenizers, encoders):
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        SDXLConditioner(tokenizers[0], encoders[0], tokenizers[1], encoders[0])
    with pytest.raises(ValueError, match="without its tokenizer"):
        SDXLConditioner(None, encoders[0], tokenizers[1], encoders[1])


def test_output_dtype_follows_text_encoder_2(tokenizers, encoders):
    clip_l = CLIPTextModel(_l_config()).eval()
    clip_g = CLIPTextModelWithProjection(_g_config()).eval().to(torch.float64)
    cond, uncond = SDXLConditioner(tokenizers[0], clip_l, tokenizers[1], clip_g).encode(PROMPT)
    assert cond.context.dtype == cond.pooled.dtype == uncond.context.dtype == torch.float64


# ----------------------------------------------------------------------------- size/crop ids, added vector


def _fake_pipe(pooled_dim, n_ids, aesthetics):
    """What diffusers' _get_add_time_ids reads of a pipeline: the U-Net's added-vector width and the config."""
    unet = SimpleNamespace(
        config=SimpleNamespace(addition_time_embed_dim=TIME_ID_DIM),
        add_embedding=SimpleNamespace(linear_1=SimpleNamespace(in_features=pooled_dim + n_ids * TIME_ID_DIM)),
    )
    return SimpleNamespace(unet=unet, config=SimpleNamespace(requires_aesthetics_score=aesthetics))


def test_add_time_ids_equal_diffusers():
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    original, crop, target = (1024, 768), (16, 32), (896, 1152)
    ref = StableDiffusionXLPipeline._get_add_time_ids(
        _fake_pipe(1280, 6, False), original, crop, target, torch.float32, text_encoder_projection_dim=1280
    )
    ours = add_time_ids(original, crop, target)
    assert ours.shape == (6,) and ours.dtype == torch.float32
    assert torch.equal(ours[None], ref)

    ref, ref_neg = StableDiffusionXLImg2ImgPipeline._get_add_time_ids(
        _fake_pipe(1280, 5, True),
        original,
        crop,
        target,
        AESTHETIC_SCORE,
        NEGATIVE_AESTHETIC_SCORE,
        original,
        crop,
        target,
        torch.float32,
        text_encoder_projection_dim=1280,
    )
    assert (AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE) == (6.0, 2.5)
    assert torch.equal(add_time_ids(original, crop, target, AESTHETIC_SCORE)[None], ref)
    assert torch.equal(add_time_ids(original, crop, target, NEGATIVE_AESTHETIC_SCORE)[None], ref_neg)
    with pytest.raises(ValueError, match="crop_top_left must be two numbers"):
        add_time_ids(original, (0,), target)


def test_label_vector_equals_diffusers_timesteps():
    from diffusers.models.embeddings import Timesteps

    pooled = torch.randn(2, 1280, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1024.0, 768.0, 16.0, 32.0, 896.0, 1152.0], [512.0, 512.0, 0.0, 0.0, 1024.0, 1024.0]])
    proj = Timesteps(TIME_ID_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)
    ref = torch.cat([pooled, proj(ids.flatten()).reshape(2, -1)], dim=-1)  # UNet2DConditionModel, "text_time"
    y = label_vector(pooled, ids)
    assert y.shape == (2, 2816)
    assert (y - ref).abs().max().item() <= ATOL
    one = label_vector(pooled, ids[0])  # (n,) ids: the same for every row
    assert torch.equal(one[0], y[0]) and torch.equal(one[1, 1280:], y[0, 1280:])
    with pytest.raises(ValueError, match="time_ids"):
        label_vector(pooled, ids[:1].expand(3, -1))


@pytest.mark.parametrize("config", [tiny_sdxl_config, tiny_refiner_config])
def test_label_vector_is_the_diffusers_unet_added_vector(config):
    """What a diffusers U-Net with addition_embed_type "text_time" feeds its add_embedding."""
    cfg = config()
    unet = diffusers_unet(cfg)
    n_ids = (cfg.adm_in_channels - TINY_XL_POOLED) // TIME_ID_DIM
    g = torch.Generator().manual_seed(1)
    pooled = torch.randn(2, TINY_XL_POOLED, generator=g)
    ids = torch.tensor([[1024.0, 768.0, 16.0, 32.0, 896.0, 1152.0], [512.0, 640.0, 0.0, 8.0, 1024.0, 1024.0]])[
        :, :n_ids
    ]
    seen = []
    unet.add_embedding.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        unet(
            torch.randn(2, 4, 8, 8, generator=g),
            torch.tensor([10, 500]),
            torch.randn(2, 77, cfg.context_dim, generator=g),
            added_cond_kwargs={"text_embeds": pooled, "time_ids": ids},
        )
    y = label_vector(pooled, ids)
    assert y.shape == seen[0].shape == (2, cfg.adm_in_channels)
    assert (y - seen[0]).abs().max().item() <= ATOL


# ----------------------------------------------------------------------------- single files


def _open_clip_tower(width=G_WIDTH, proj=G_PROJ, layers=G_LAYERS, prefix=clip.SDXL_G_PREFIX, seed=0):
    """Random OpenCLIP text tower tensors under `prefix` (sgm's FrozenOpenCLIPEmbedder2), with logit_scale."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.1, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    sd = {
        prefix + "token_embedding.weight": rnd(49408, width, scale=0.5),
        prefix + "positional_embedding": rnd(77, width),
    }
    for i in range(layers):
        b = f"{prefix}transformer.resblocks.{i}."
        for ln in ("ln_1", "ln_2"):
            sd[f"{b}{ln}.weight"], sd[f"{b}{ln}.bias"] = rnd(width, offset=1.0), rnd(width)
        sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"] = rnd(3 * width, width, scale=0.3), rnd(3 * width)
        sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"] = rnd(width, width, scale=0.3), rnd(width)
        sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"] = rnd(4 * width, width, scale=0.3), rnd(4 * width)
        sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"] = rnd(width, 4 * width, scale=0.3), rnd(width)
    sd[prefix + "ln_final.weight"], sd[prefix + "ln_final.bias"] = rnd(width, offset=1.0), rnd(width)
    sd[prefix + "text_projection"] = rnd(width, proj, scale=0.3)  # applied as x @ P
    sd[prefix + "logit_scale"] = torch.tensor(4.6052)
    return sd


def _open_clip_reference(sd, ids, prefix=clip.SDXL_G_PREFIX, width=G_WIDTH, layers=G_LAYERS):
    """Hand-written sgm FrozenOpenCLIPEmbedder2(layer="penultimate", legacy=False): the penultimate resblock's
    output (no ln_final) and the pooled vector ln_final(last)[EOS] @ text_projection."""
    x = sd[prefix + "token_embedding.weight"][ids] + sd[prefix + "positional_embedding"]
    mask = torch.full((77, 77), float("-inf")).triu(1)
    outputs = []
    for i in range(layers):
        b = f"{prefix}transformer.resblocks.{i}."
        attn = nn.MultiheadAttention(width, HEADS, batch_first=True)
        attn.load_state_dict({k: sd[b + "attn." + k] for k in attn.state_dict()})
        h = nn.functional.layer_norm(x, (width,), sd[b + "ln_1.weight"], sd[b + "ln_1.bias"])
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = nn.functional.layer_norm(x, (width,), sd[b + "ln_2.weight"], sd[b + "ln_2.bias"])
        h = nn.functional.gelu(nn.functional.linear(h, sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"]))
        x = x + nn.functional.linear(h, sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
        outputs.append(x)
    last = nn.functional.layer_norm(x, (width,), sd[prefix + "ln_final.weight"], sd[prefix + "ln_final.bias"])
    pooled = last[torch.arange(ids.shape[0]), ids.argmax(-1)] @ sd[prefix + "text_projection"]
    return outputs[-2], pooled


def _sdxl_file(clip_l, nested=True):
    """An sgm SDXL base single file: CLIP ViT-L (HF layout) + random OpenCLIP bigG + other parts."""
    p = clip.SDXL_L_PREFIX + ("text_model." if nested else "")
    sd = {p + k: v.clone() for k, v in clip._flat_weights(clip_l).items()}
    sd[p + "embeddings.position_ids"] = torch.arange(77).expand(1, -1)  # legacy, ignored
    sd.update(_open_clip_tower())
    sd["model.diffusion_model.out.2.weight"] = torch.zeros(1)
    sd["first_stage_model.decoder.conv_out.bias"] = torch.zeros(1)
    return sd


def _load(sd, layers=G_LAYERS):
    return clip.sdxl_text_encoders_from_single_file(sd, config_l=_l_config(), config_g=_g_config(layers))


@pytest.mark.parametrize("nested", [True, False])
def test_sdxl_single_file_equals_diffusers_converters(encoders, nested):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    sd = _sdxl_file(encoders[0], nested)
    assert clip.detect_text_layout(sd) == "sdxl"
    clip_l, clip_g = _load(sd)
    assert isinstance(clip_l, CLIPTextModel) and isinstance(clip_g, CLIPTextModelWithProjection)
    ref_l = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(sd).items()}
    ref_l.pop("embeddings.position_ids")
    ref_g = convert_open_clip_checkpoint(SimpleNamespace(config=None), sd, prefix=clip.SDXL_G_PREFIX)
    for model, ref in ((clip_l, ref_l), (clip_g, ref_g)):
        own = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
        ref = {k.removeprefix("text_model."): v for k, v in ref.items()}
        assert own.keys() == ref.keys()
        for key in own:
            assert torch.equal(own[key], ref[key]), key
    assert clip_g.text_projection.weight.shape == (G_PROJ, G_WIDTH)
    assert clip_g.config.num_hidden_layers == G_LAYERS  # all resblocks kept, unlike SD2


def test_sdxl_single_file_matches_open_clip(tokenizers, encoders):
    """The loaded bigG through SDXLConditioner gives sgm's context and pooled vector (hand-written OpenCLIP)."""
    sd = _sdxl_file(encoders[0])
    clip_l, clip_g = _load(sd)
    conditioner = SDXLConditioner(tokenizers[0], clip_l, tokenizers[1], clip_g)
    prompts = ["a photo of a cat", "an astronaut riding a horse, 4k"]
    cond, _ = conditioner.encode(prompts)
    ids = clip.tokenize(tokenizers[1], prompts)[:, 0]  # open_clip.tokenize ids (0-padded)
    with torch.no_grad():
        context, pooled = _open_clip_reference(sd, ids)
        l_context = encoders[0](clip.tokenize(tokenizers[0], prompts)[:, 0], output_hidden_states=True).hidden_states[
            -2
        ]
    assert (cond.context[..., L_WIDTH:] - context).abs().max().item() <= 1e-5
    assert (cond.pooled - pooled).abs().max().item() <= 1e-5
    assert torch.equal(cond.context[..., :L_WIDTH], l_context)  # CLIP-L first


def test_sdxl_single_file_round_trips(encoders):
    clip_l, clip_g = encoders
    # model -> file -> model: every tensor back
    back_l, back_g = _load(clip.sdxl_text_encoders_to_single_file(clip_l, clip_g))
    for model, back in ((clip_l, back_l), (clip_g, back_g)):
        assert model.state_dict().keys() == back.state_dict().keys()
        for key, value in model.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key
    # file -> model -> file: every text-encoder tensor back (but logit_scale and the position ids, read by none)
    sd = _sdxl_file(clip_l)
    text = {
        k: v for k, v in sd.items() if k.startswith("conditioner.") and not k.endswith(("logit_scale", "position_ids"))
    }
    again = clip.sdxl_text_encoders_to_single_file(*_load(sd))
    assert again.keys() == text.keys()
    for key, value in text.items():
        assert torch.equal(again[key], value), key


def test_refiner_single_file(encoders):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    sd = _open_clip_tower(prefix=clip.SDXL_REFINER_G_PREFIX)
    sd["model.diffusion_model.out.2.weight"] = torch.zeros(1)
    assert clip.detect_text_layout(sd) == "sdxl_refiner"
    clip_l, clip_g = _load(sd)
    assert clip_l is None
    ref = convert_open_clip_checkpoint(SimpleNamespace(config=None), sd, prefix=clip.SDXL_REFINER_G_PREFIX)
    assert ref.keys() == clip_g.state_dict().keys()
    for key, value in ref.items():
        assert torch.equal(clip_g.state_dict()[key], value), key
    again = clip.sdxl_text_encoders_to_single_file(None, clip_g)
    assert again.keys() == {k for k in sd if k.startswith("conditioner.") and not k.endswith("logit_scale")}
    for key, value in again.items():
        assert torch.equal(sd[key], value), key


def test_detect_layout_and_missing_encoder(encoders):
    l_only = {k: v for k, v in _sdxl_file(encoders[0]).items() if not k.startswith(clip.SDXL_G_PREFIX)}
    g_only = _open_clip_tower()
    assert clip.detect_text_layout(l_only) == clip.detect_text_layout(g_only) == "sdxl"
    with pytest.raises(ValueError, match=r"has conditioner\.embedders\.1\.model\.\* \(OpenCLIP ViT-bigG\) but no "):
        _load(g_only)
    with pytest.raises(ValueError, match=r"but no conditioner\.embedders\.1\.model\.\* \(OpenCLIP ViT-bigG\)"):
        _load(l_only)
    sd2 = {"cond_stage_model.model.token_embedding.weight": torch.zeros(1)}
    sd1 = {"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(1)}
    assert (clip.detect_text_layout(sd1), clip.detect_text_layout(sd2)) == ("sd1", "sd2")
    with pytest.raises(ValueError, match="not SDXL.*text_encoder_from_single_file"):
        _load(sd2)
    with pytest.raises(ValueError, match="no text encoder"):
        clip.detect_text_layout({"model.diffusion_model.x": torch.zeros(1)})
    with pytest.raises(ValueError, match="sdxl_text_encoders_from_single_file"):
        clip.text_encoder_from_single_file(g_only)


def test_bad_sdxl_tensors_are_named(encoders):
    sd = _sdxl_file(encoders[0])
    del sd[clip.SDXL_G_PREFIX + "text_projection"]
    with pytest.raises(ValueError, match=r"missing tensor 'text_projection\.weight'"):
        _load(sd)
    sd = _sdxl_file(encoders[0])
    del sd[clip.SDXL_L_PREFIX + "text_model.encoder.layers.1.mlp.fc1.bias"]
    with pytest.raises(ValueError, match=r"CLIP ViT-L .*missing tensor 'encoder\.layers\.1\.mlp\.fc1\.bias'"):
        _load(sd)
    with pytest.raises(ValueError, match=r"resblocks\.4\..*has 4 resblocks"):  # a config of fewer layers
        _load(_sdxl_file(encoders[0]), layers=4)
    with pytest.raises(ValueError, match=r"tensor 'text_model\.encoder\.layers\.0\.mlp\.fc1\.weight' has shape"):
        wrong = {**_g_config().to_dict(), "intermediate_size": 7}  # a dict config, as config_g also takes
        clip.sdxl_text_encoders_from_single_file(_sdxl_file(encoders[0]), config_l=_l_config(), config_g=wrong)
    sd = _sdxl_file(encoders[0])
    sd[clip.SDXL_G_PREFIX + "transformer.resblocks.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected key .*resblocks\.0\.attn\.extra"):
        _load(sd)
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        clip.sdxl_text_encoders_to_single_file(encoders[0], encoders[0])


def test_shipped_config_takes_full_size_checkpoints():
    """Full-size shapes on the meta device (no memory): CLIP ViT-L is SD1's config, bigG the shipped one."""
    config = clip.text_encoder_2_config()
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (1280, 5120, 32)
    assert (config.num_attention_heads, config.projection_dim, config.hidden_act) == (20, 1280, "gelu")
    assert (config.vocab_size, config.max_position_embeddings, config.layer_norm_eps) == (49408, 77, 1e-5)
    with torch.device("meta"):
        full_l, full_g = CLIPTextModel(clip.text_encoder_config("sd1")), CLIPTextModelWithProjection(config)
    sd = clip.sdxl_text_encoders_to_single_file(full_l, full_g)
    assert sd[clip.SDXL_G_PREFIX + "text_projection"].shape == (1280, 1280)
    assert len([k for k in sd if k.startswith(clip.SDXL_G_PREFIX)]) == 32 * 12 + 5
    clip_l, clip_g = clip.sdxl_text_encoders_from_single_file(sd, device="meta")
    assert sum(p.numel() for p in clip_l.parameters()) == 123_060_480
    assert sum(p.numel() for p in clip_g.parameters()) == 694_659_840


def test_load_text_encoder_2_folder(tmp_path, encoders):
    encoders[1].save_pretrained(tmp_path / "text_encoder_2")
    model = clip.load_text_encoder_2(tmp_path, dtype=torch.float64)
    assert isinstance(model, CLIPTextModelWithProjection) and model.dtype == torch.float64
    for key, value in encoders[1].state_dict().items():
        assert torch.equal(model.state_dict()[key], value.double()), key
    encoders[0].save_pretrained(tmp_path / "plain")  # a CLIPTextModel: no text_projection
    with pytest.raises(ValueError, match="text_projection"):
        clip.load_text_encoder_2(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="text_encoder_2/"):
        clip.load_text_encoder_2(tmp_path / "nothing")
