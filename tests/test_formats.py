"""Files other tools read (ldm.formats.pipeline_files): single files named as the original checkpoints of
their family, so that ComfyUI and AUTOMATIC1111 recognise them, and diffusers folders that every
diffusers/transformers pair pyproject admits loads (transformers 4.45's names, checked here without it;
scripts/check_diffusers_export.py runs the real thing in a second environment, docs/parity.md).

The family checks below are written from the loaders' source (cited at each); the tiny pipelines are
checked at their own widths, full-size SD1.5/SD2.1 pipelines (built on the meta device) at the real ones.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from ldm.formats.metadata import HF_FORMAT, PIPELINE_KEY, TEXT_KIND
from ldm.formats.pipeline_files import single_file_tensors
from ldm.models.clip import TOKENIZER_DIR, text_encoder_config
from ldm.pipelines.pipeline import Pipeline

PROMPTS = ["a red circle at the top left", "a small blue square on a white background"]
KINDS = {"sd1": "tiny_sd_folder", "sd2": "tiny_sd2_folder"}

# --------------------------------------------------------------------------- names of original checkpoints

_W = r"\.(weight|bias)"
UNET_NAME = re.compile(r"model\.diffusion_model\.(time_embed|input_blocks|middle_block|output_blocks|out)\..+")
_VAE_PART = (
    r"(conv_in|conv_out|norm_out|(down|up)\.\d+\.(block\.\d+\.(norm1|norm2|conv1|conv2|nin_shortcut)"
    r"|downsample\.conv|upsample\.conv)|mid\.(block_[12]\.(norm1|norm2|conv1|conv2)|attn_1\.(norm|q|k|v|proj_out)))"
)
VAE_NAME = re.compile(rf"first_stage_model\.((quant_conv|post_quant_conv)|(encoder|decoder)\.{_VAE_PART}){_W}")
TEXT_NAME = {  # CompVis FrozenCLIPEmbedder (HF CLIP under .transformer) / FrozenOpenCLIPEmbedder (OpenCLIP .model)
    "sd1": re.compile(
        r"cond_stage_model\.transformer\.text_model\.(embeddings\.(token_embedding|position_embedding)\.weight"
        rf"|encoder\.layers\.\d+\.(self_attn\.[qkv]_proj|self_attn\.out_proj|layer_norm[12]|mlp\.fc[12]){_W}"
        rf"|final_layer_norm{_W})"
    ),
    "sd2": re.compile(
        r"cond_stage_model\.model\.(token_embedding\.weight|positional_embedding|text_projection|logit_scale"
        rf"|transformer\.resblocks\.\d+\.(ln_[12]|attn\.out_proj|mlp\.c_fc|mlp\.c_proj){_W}"
        rf"|transformer\.resblocks\.\d+\.attn\.in_proj_(weight|bias)|ln_final{_W})"
    ),
}


def original_name_errors(names, kind: str) -> list[str]:
    """The names that no original checkpoint of family `kind` has."""
    return [n for n in names if not (UNET_NAME.fullmatch(n) or VAE_NAME.fullmatch(n) or TEXT_NAME[kind].fullmatch(n))]


# --------------------------------------------------------------------------- how other tools tell the family


def comfyui_unet_config(sd: dict) -> dict:
    """The keys that ComfyUI's comfy/model_detection.py detect_unet_config reads to choose a model class
    (comfy/supported_models.py: SD15 = context_dim 768, model_channels 320, no linear projection; SD20 =
    1024, 320, linear): model/in channels from input_blocks.0.0.weight; context_dim and
    use_linear_in_transformer from the first input block holding a transformer (attn2.to_k's input width;
    proj_in a matrix, not a 1x1 conv); adm_in_channels from label_emb (absent for SD1/SD2)."""
    p = "model.diffusion_model."
    conv_in = sd[p + "input_blocks.0.0.weight"]
    blocks = sorted({int(k.split(".")[3]) for k in sd if k.startswith(p + "input_blocks.")})
    first = next(b for b in blocks if f"{p}input_blocks.{b}.1.transformer_blocks.0.attn2.to_k.weight" in sd)
    block = f"{p}input_blocks.{first}.1."
    return {
        "model_channels": conv_in.shape[0],
        "in_channels": conv_in.shape[1],
        "context_dim": sd[block + "transformer_blocks.0.attn2.to_k.weight"].shape[1],
        "use_linear_in_transformer": sd[block + "proj_in.weight"].ndim == 2,
        "adm_in_channels": sd[p + "label_emb.0.0.weight"].shape[1] if p + "label_emb.0.0.weight" in sd else None,
    }


def comfyui_family(sd: dict, widths: dict[str, tuple[int, int]]) -> str | None:
    """SD15 / SD20 as comfy/supported_models.py matches them; widths: kind -> (context_dim, model_channels),
    the real ones (768, 320) / (1024, 320), or a tiny model's."""
    cfg = comfyui_unet_config(sd)
    for kind, linear in (("sd1", False), ("sd2", True)):
        context, channels = widths[kind]
        wanted = {"context_dim": context, "model_channels": channels, "use_linear_in_transformer": linear}
        if all(cfg[k] == v for k, v in wanted.items()) and cfg["adm_in_channels"] is None:
            return kind
    return None


def comfyui_text_encoder(sd: dict, kind: str) -> dict:
    """The text-encoder tensors under HF CLIP names as ComfyUI loads them from a checkpoint:
    SD15.process_clip_state_dict keeps cond_stage_model.transformer.text_model.* (adding text_model. where
    missing); SD20.process_clip_state_dict takes cond_stage_model.model.* through comfy/utils.py
    clip_text_transformers_convert (OpenCLIP -> HF: in_proj split in three row blocks q, k, v)."""
    if kind == "sd1":
        p = "cond_stage_model.transformer."
        return {"text_model." + k[len(p) :].removeprefix("text_model."): v for k, v in sd.items() if k.startswith(p)}
    p = "cond_stage_model.model."
    top = {
        "positional_embedding": "embeddings.position_embedding.weight",
        "token_embedding.weight": "embeddings.token_embedding.weight",
        "ln_final.weight": "final_layer_norm.weight",
        "ln_final.bias": "final_layer_norm.bias",
    }
    leaves = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    leaves["attn.out_proj"] = "self_attn.out_proj"
    out = {}
    for key, value in sd.items():
        if not key.startswith(p):
            continue
        name = key[len(p) :]
        if name in top:
            out["text_model." + top[name]] = value
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", name):
            third = value.shape[0] // 3
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"text_model.encoder.layers.{m[1]}.self_attn.{proj}.{m[2]}"] = value[third * i : third * (i + 1)]
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", name):
            out[f"text_model.encoder.layers.{m[1]}.{leaves[m[2]]}.{m[3]}"] = value
        else:
            out[name] = value  # text_projection / logit_scale: not text_model.*
    return out


def comfyui_vae_is_sd(sd: dict) -> bool:
    """comfy/sd.py VAE.__init__: an original-layout (not diffusers: no decoder.up_blocks.*) kl-f8 VAE, i.e.
    with encoder.down.2.downsample (without it ComfyUI takes the x4 upscaler's 3-level VAE)."""
    vae = {k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")}
    return "decoder.up_blocks.0.resnets.0.norm1.weight" not in vae and "encoder.down.2.downsample.conv.weight" in vae


def a1111_config(sd: dict, sd2_width: int = 1024) -> str:
    """AUTOMATIC1111 modules/sd_models_config.py guess_model_config_from_state_dict, SD1/SD2 branches:
    SD2 when cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight has shape[1] == 1024
    (the OpenCLIP width; sd2_width for a tiny model), then the U-Net's input channels tell inpainting
    (9) and instruct-pix2pix (8); anything else is the default v1 config."""
    te = sd.get("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")
    unet_in = sd.get("model.diffusion_model.input_blocks.0.0.weight")
    if te is not None and te.shape[1] == sd2_width:
        return "v2-inpainting" if unet_in is not None and unet_in.shape[1] == 9 else "v2"
    if unet_in is not None and unet_in.shape[1] in (8, 9):
        return {9: "v1-inpainting", 8: "instruct-pix2pix"}[unet_in.shape[1]]
    return "v1"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def pipes(request):
    return {kind: Pipeline.from_pretrained(request.getfixturevalue(name)) for kind, name in KINDS.items()}


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _latents(pipe) -> torch.Tensor:
    return pipe(PROMPTS, steps=3, seed=7, output_type="latent", progress=False)


def _text_model_state(model) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's tensors under transformers 4.x names (text_model.*), without position_ids."""
    sd = {"text_model." + k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    sd.pop("text_model.embeddings.position_ids", None)
    return sd


# --------------------------------------------------------------------------- (a) single files


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_single_file_has_the_original_names_of_its_family(pipes, kind, tmp_path):
    pipe = pipes[kind]
    sd, meta = _read(pipe.save_single_file(tmp_path / "m.safetensors"))
    assert original_name_errors(sd, kind) == []
    assert json.loads(meta[PIPELINE_KEY])[TEXT_KIND] == kind
    other = "cond_stage_model.model." if kind == "sd1" else "cond_stage_model.transformer."
    assert not [k for k in sd if k.startswith(other)]
    if kind == "sd2":  # OpenCLIP's text tower: every resblock the model holds, OpenCLIP's shapes
        c = pipe.text_encoder.config
        W, inner, n = c.hidden_size, c.intermediate_size, c.num_hidden_layers
        p = "cond_stage_model.model."
        shapes = {p + "token_embedding.weight": (c.vocab_size, W), p + "positional_embedding": (77, W)}
        shapes |= {p + "ln_final.weight": (W,), p + "ln_final.bias": (W,)}
        for i in range(n):
            b = f"{p}transformer.resblocks.{i}."
            shapes |= {b + "attn.in_proj_weight": (3 * W, W), b + "attn.in_proj_bias": (3 * W,)}
            shapes |= {b + "attn.out_proj.weight": (W, W), b + "attn.out_proj.bias": (W,)}
            shapes |= {b + "mlp.c_fc.weight": (inner, W), b + "mlp.c_fc.bias": (inner,)}
            shapes |= {b + "mlp.c_proj.weight": (W, inner), b + "mlp.c_proj.bias": (W,)}
            shapes |= {f"{b}{ln}.{x}": (W,) for ln in ("ln_1", "ln_2") for x in ("weight", "bias")}
        assert {k: tuple(v.shape) for k, v in sd.items() if k.startswith(p)} == shapes


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_comfyui_and_a1111_recognise_the_family(pipes, kind, tmp_path):
    pipe = pipes[kind]
    sd, _ = _read(pipe.save_single_file(tmp_path / "m.safetensors"))
    tiny = {k: (pipes[k].unet.config.context_dim, pipes[k].unet.config.model_channels) for k in pipes}
    assert comfyui_family(sd, tiny) == kind
    assert comfyui_vae_is_sd(sd)
    clip = comfyui_text_encoder(sd, kind)  # every tensor lands on the model's own, unchanged
    ours = _text_model_state(pipe.text_encoder)
    assert clip.keys() == ours.keys()
    assert all(torch.equal(clip[k], ours[k]) for k in ours)
    expected = "v2" if kind == "sd2" else "v1"
    assert a1111_config(sd, sd2_width=pipes["sd2"].text_encoder.config.hidden_size) == expected


def _full_size(kind: str):
    """A full-size SD1.5 / SD2.1 pipeline on the meta device (no memory): what single_file_tensors reads."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from ldm.models.unet import UNet, UNetConfig
    from ldm.models.vae import VAE, sd_vae_config

    with torch.device("meta"):
        unet = UNet(UNetConfig.sd21() if kind == "sd2" else UNetConfig.sd15())
        vae = VAE(AutoencoderKL.from_config(sd_vae_config()))
        text_encoder = CLIPTextModel(text_encoder_config(kind))
    return SimpleNamespace(unet=unet, vae=vae, text_encoder=text_encoder)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_full_size_files_pass_the_real_checks(kind):
    sd = single_file_tensors(_full_size(kind))
    assert original_name_errors(sd, kind) == []
    assert comfyui_family(sd, {"sd1": (768, 320), "sd2": (1024, 320)}) == kind
    assert comfyui_vae_is_sd(sd)
    assert a1111_config(sd) == ("v2" if kind == "sd2" else "v1")
    if kind == "sd2":
        # comfy/supported_models.py SD20.model_type reads this tensor (v-prediction test) without a default
        assert "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias" in sd
        p = "cond_stage_model.model."
        assert sd[p + "token_embedding.weight"].shape == (49408, 1024)  # OpenCLIP ViT-H/14's text tower
        assert sd[p + "positional_embedding"].shape == (77, 1024)
        assert sd[p + "transformer.resblocks.22.attn.in_proj_weight"].shape == (3072, 1024)
        assert sd[p + "transformer.resblocks.22.mlp.c_fc.weight"].shape == (4096, 1024)
        assert sd[p + "transformer.resblocks.22.mlp.c_proj.weight"].shape == (1024, 4096)
        assert p + "transformer.resblocks.23.ln_1.weight" not in sd  # the 24th: never run by SD2, not held
    else:
        assert sd["cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight"].shape == (3072, 768)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_single_file_reads_back_to_the_same_latents(pipes, kind, tmp_path):
    pipe = pipes[kind]
    loaded = Pipeline.from_pretrained(pipe.save_single_file(tmp_path / "m.safetensors"))
    assert loaded.text_encoder.config.hidden_act == pipe.text_encoder.config.hidden_act
    assert loaded.tokenizer.pad_token == pipe.tokenizer.pad_token
    assert torch.equal(_latents(loaded), _latents(pipe))


def test_sd2_files_of_older_ldm_still_load(pipes, tmp_path):
    """ldm before this change wrote an SD2 text encoder in the SD1 layout, with text_kind "sd1" and its
    (gelu) config in the metadata: such files load as before."""
    from ldm.formats.checkpoint import save_safetensors

    pipe = pipes["sd2"]
    sd, meta = _read(pipe.save_single_file(tmp_path / "new.safetensors"))
    old = {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}
    old |= {"cond_stage_model.transformer." + k: v for k, v in _text_model_state(pipe.text_encoder).items()}
    record = json.loads(meta[PIPELINE_KEY])
    assert record["text_encoder_config"]["hidden_act"] == "gelu"
    meta[PIPELINE_KEY] = json.dumps({**record, TEXT_KIND: "sd1"})
    save_safetensors(old, tmp_path / "old.safetensors", metadata=meta)
    loaded = Pipeline.from_pretrained(tmp_path / "old.safetensors")
    assert torch.equal(_latents(loaded), _latents(pipe))


# --------------------------------------------------------------------------- (b) diffusers folders


def transformers_4_45_names(num_layers: int) -> set[str]:
    """The tensors transformers 4.45's CLIPTextModel loads from model.safetensors (position_ids is a
    non-persistent buffer there): anything else is ignored, anything missing is newly initialized."""
    names = {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"}
    names |= {"text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"}
    leaves = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"]
    leaves += ["layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"]
    for i in range(num_layers):
        names |= {f"text_model.encoder.layers.{i}.{leaf}.{x}" for leaf in leaves for x in ("weight", "bias")}
    return names


# CLIPTextConfig.__init__'s own arguments in transformers 4.45
CLIP_TEXT_CONFIG_4_45 = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "projection_dim",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
    "initializer_range",
    "initializer_factor",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
]


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_diffusers_folder_has_what_transformers_4_45_reads(pipes, kind, tmp_path):
    pipe = pipes[kind]
    out = pipe.save_diffusers(tmp_path / "export")
    te = out / "text_encoder"
    assert sorted(p.name for p in te.iterdir()) == ["config.json", "model.safetensors"]
    sd, meta = _read(te / "model.safetensors")
    assert meta == HF_FORMAT  # 4.x refuses a file whose "format" names no framework
    assert sd.keys() == transformers_4_45_names(pipe.text_encoder.config.num_hidden_layers)
    ours = _text_model_state(pipe.text_encoder)
    assert all(torch.equal(sd[k], ours[k]) for k in sd)
    cfg = json.loads((te / "config.json").read_text())
    assert cfg["model_type"] == "clip_text_model" and cfg["architectures"] == ["CLIPTextModel"]
    assert cfg["torch_dtype"] == "float32"
    for k in CLIP_TEXT_CONFIG_4_45:
        assert cfg[k] == getattr(pipe.text_encoder.config, k), k
    assert json.loads((out / "model_index.json").read_text())["text_encoder"] == ["transformers", "CLIPTextModel"]

    tok = out / "tokenizer"  # the slow CLIPTokenizer of 4.x reads vocab.json + merges.txt, not tokenizer.json
    names = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    assert sorted(p.name for p in tok.iterdir()) == names
    assert json.loads((tok / "vocab.json").read_text()) == json.loads((TOKENIZER_DIR / "vocab.json").read_text())
    merges = (tok / "merges.txt").read_text().splitlines()
    assert merges[0].startswith("#version")  # 4.x's CLIPTokenizer skips the first line
    assert merges[1:] == (TOKENIZER_DIR / "merges.txt").read_text().splitlines()[1:]
    special = json.loads((tok / "special_tokens_map.json").read_text())
    assert special["pad_token"] == pipe.tokenizer.pad_token == ("!" if kind == "sd2" else "<|endoftext|>")
    config = json.loads((tok / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "CLIPTokenizer" and config["model_max_length"] == 77
    assert config["pad_token"] == pipe.tokenizer.pad_token


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_diffusers_loads_the_folder_with_the_same_text_encoder(pipes, kind, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = pipes[kind]
    out = pipe.save_diffusers(tmp_path / "export")
    records = _Records()
    loggers = [logging.getLogger(name) for name in ("transformers", "diffusers")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        theirs = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    words = ("initialized", "missing", "unexpected")
    assert not [m for m in records.messages if any(w in m.lower() for w in words)]
    assert theirs.tokenizer.pad_token_id == pipe.tokenizer.pad_token_id
    with torch.no_grad():
        context = theirs.encode_prompt(PROMPTS, "cpu", 1, False)[0]
    assert torch.equal(context, pipe.encode_prompt(PROMPTS)[0])
    assert torch.equal(_latents(Pipeline.from_pretrained(out)), _latents(pipe))
