"""ldm.models.clip: shipped CLIP tokenizer, long-prompt chunking, parity with diffusers'
encode_prompt, and single-file text-encoder conversion (SD1 HF layout, SD2 OpenCLIP)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.models import clip as text
from ldm.models.clip import (
    CONTEXT_LENGTH,
    TextEncoder,
    count_chunks,
    load_tokenizer,
    text_encoder_config,
    text_encoder_from_single_file,
    tokenize,
)

BOS, EOS = 49406, 49407
TRANSFORMERS_4 = int(importlib.metadata.version("transformers").split(".")[0]) < 5
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def tokenizer_sd2():
    return load_tokenizer(pad_token="!")


# ----------------------------------------------------------------------------- (a) tokenizer ids

# Ground truth, independent of scripts/make_tokenizer_assets.py: computed once with the
# SimpleTokenizer of the open_clip_torch 3.3.0 wheel (open_clip/tokenizer.py, a copy of
# OpenAI CLIP's, run on the wheel's bpe_simple_vocab_16e6.txt.gz with ftfy 6.3.1) as
# [sot] + encode(prompt) + [eot]. Prompts are chosen where ftfy/html-unescape changes
# nothing (see KNOWN_DIVERGENCES). Cross-checks against ids quoted in public code:
# "a photo of a cat", "a photo of a dog", "the black dog", "a running dog", "a boy",
# "a... 're we're don't 10" and the 16-id prefix of the "cute magical flying ghost dog"
# prompt appear verbatim in public repositories (CLIP tokenizer ports and SD demos).
KNOWN_IDS = [
    ("a photo of a cat", [BOS, 320, 1125, 539, 320, 2368, EOS]),
    ("a photo of a dog", [BOS, 320, 1125, 539, 320, 1929, EOS]),
    ("the black dog", [BOS, 518, 1449, 1929, EOS]),
    ("a running dog", [BOS, 320, 2761, 1929, EOS]),
    ("a boy", [BOS, 320, 1876, EOS]),
    ("a... 're we're don't 10", [BOS, 320, 678, 982, 649, 982, 847, 713, 272, 271, EOS]),
    ("A Photo Of A CAT", [BOS, 320, 1125, 539, 320, 2368, EOS]),
    ("an astronaut riding a horse on mars", [BOS, 550, 18376, 6765, 320, 4558, 525, 7496, EOS]),
    ("a red circle at the top left", [BOS, 320, 736, 7117, 536, 518, 1253, 1823, EOS]),
    ("Hello, world!", [BOS, 3306, 267, 1002, 256, EOS]),
    (
        "What's up? It's 5 o'clock... we'll see; they're here, I'd say: you've won & I'm done",
        [
            BOS,
            768,
            568,
            705,
            286,
            585,
            568,
            276,
            334,
            262,
            6716,
            678,
            649,
            1342,
            862,
            282,
            889,
            982,
            763,
            267,
            328,
            1896,
            1451,
            281,
            592,
            1200,
            1749,
            261,
            328,
            880,
            1700,
            EOS,
        ],
    ),
    ("1234567890", [BOS, 272, 273, 274, 275, 276, 277, 278, 279, 280, 271, EOS]),
    (
        "3.14159 + 2^10 = 1026.14159",
        [
            BOS,
            274,
            269,
            272,
            275,
            272,
            276,
            280,
            266,
            273,
            317,
            272,
            271,
            284,
            272,
            271,
            273,
            277,
            269,
            272,
            275,
            272,
            276,
            280,
            EOS,
        ],
    ),
    (
        "(masterpiece:1.2), best quality, ((ultra-detailed)), [blurry], {extra}",
        [
            BOS,
            263,
            12066,
            281,
            272,
            269,
            273,
            2361,
            949,
            3027,
            267,
            13796,
            8118,
            268,
            12609,
            8,
            2361,
            314,
            21977,
            34067,
            346,
            4231,
            348,
            EOS,
        ],
    ),
    (
        (
            "a portrait of a woman, highly detailed, digital painting, artstation, concept art, smooth, "
            "sharp focus, illustration, art by greg rutkowski and alphonse mucha"
        ),
        [
            BOS,
            320,
            5352,
            539,
            320,
            2308,
            267,
            5302,
            12609,
            267,
            2794,
            3086,
            267,
            1486,
            2631,
            267,
            6353,
            794,
            267,
            8990,
            267,
            8157,
            4353,
            267,
            6052,
            267,
            794,
            638,
            7943,
            14973,
            17649,
            537,
            37865,
            611,
            42191,
            EOS,
        ],
    ),
    (
        "photorealistic 8k uhd, dslr, soft lighting, high quality, film grain, Fujifilm XT3",
        [
            BOS,
            1153,
            16157,
            279,
            330,
            84,
            4414,
            267,
            33740,
            267,
            3773,
            5799,
            267,
            1400,
            3027,
            267,
            1860,
            12109,
            267,
            24765,
            1052,
            274,
            EOS,
        ],
    ),
    (
        (
            "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
            "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, "
            "username, blurry"
        ),
        [
            BOS,
            1049,
            934,
            267,
            2103,
            15376,
            267,
            2103,
            3500,
            267,
            4160,
            267,
            12097,
            267,
            3423,
            9690,
            267,
            4231,
            27472,
            267,
            19128,
            31710,
            267,
            31139,
            267,
            5719,
            3027,
            267,
            1042,
            3027,
            267,
            5967,
            3027,
            267,
            73,
            11207,
            30249,
            267,
            9189,
            267,
            2505,
            2110,
            267,
            28162,
            267,
            21977,
            EOS,
        ],
    ),
    ("supercalifragilisticexpialidocious", [BOS, 1642, 2857, 13093, 2076, 5868, 26850, 835, 639, 38466, EOS]),
    (
        "pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
        [
            BOS,
            28714,
            749,
            20253,
            9800,
            535,
            532,
            1065,
            901,
            1556,
            13697,
            9916,
            78,
            39031,
            13903,
            3120,
            4262,
            7726,
            12658,
            1585,
            44351,
            EOS,
        ],
    ),
    ("café naïve résumé Zürich", [BOS, 15304, 1097, 35689, 563, 29106, 7054, 4166, 89, 6522, 4021, EOS]),
    ("東京タワー の 夜景", [BOS, 48338, 21078, 105, 34941, 2429, 107, 30391, 4813, 362, 23170, 250, 48132, 363, EOS]),
    ("Москва зимой", [BOS, 38018, 13506, 23669, 27152, 39813, 27080, 140, 115, 29503, 120, 20978, 373, EOS]),
    ("a cute 🐱 with a ❤️ and 🚀🚀🚀", [BOS, 320, 2242, 22979, 593, 320, 1752, 537, 49033, 13542, EOS]),
    ("emoji only: 😂😂", [BOS, 16327, 1033, 281, 4112, EOS]),
    ("tabs\tand\nnewlines   and   spaces", [BOS, 29163, 537, 1218, 3418, 537, 9006, EOS]),
    ("   leading and trailing   ", [BOS, 3833, 537, 37427, EOS]),
    ("", [BOS, EOS]),
    (
        "email@example.com https://example.org/path?q=1#frag",
        [
            BOS,
            4462,
            287,
            6228,
            269,
            2464,
            30901,
            12441,
            6228,
            269,
            5593,
            270,
            5035,
            286,
            336,
            284,
            272,
            258,
            3368,
            326,
            EOS,
        ],
    ),
    (
        "C++ vs. C# -- snake_case and camelCase and kebab-case",
        [BOS, 322, 19056, 1547, 269, 322, 258, 2432, 8798, 318, 2068, 537, 27005, 2068, 537, 36497, 268, 2068, EOS],
    ),
    ("!!!??? ... --- ***", [BOS, 11194, 3824, 678, 11079, 7829, EOS]),
    (
        "Ünïcödé ÀÉÎÕÜ ßŒæ",
        [
            BOS,
            6522,
            77,
            35689,
            66,
            7255,
            67,
            4166,
            36149,
            3459,
            48704,
            127,
            113,
            47177,
            127,
            253,
            129,
            241,
            127,
            355,
            EOS,
        ],
    ),
    (
        "1920s art deco poster, 4K, 16:9, f/1.8, 35mm",
        [
            BOS,
            272,
            280,
            273,
            271,
            338,
            794,
            16422,
            3574,
            267,
            275,
            330,
            267,
            272,
            277,
            281,
            280,
            267,
            325,
            270,
            272,
            269,
            279,
            267,
            274,
            276,
            2848,
            EOS,
        ],
    ),
    (
        "a painting in the style of Van Gogh's 'The Starry Night'",
        [BOS, 320, 3086, 530, 518, 1844, 539, 2451, 19697, 568, 713, 797, 30963, 930, 262, EOS],
    ),
    ("dog\u00a0with\u00a0nbsp", [BOS, 1929, 593, 6459, 4393, EOS]),
]

# Where transformers' CLIPTokenizer (hence diffusers, hence us) differs from OpenAI CLIP's
# SimpleTokenizer, which runs ftfy.fix_text and html.unescape first. The ids on the right
# are what we (and diffusers under transformers 5) produce; SimpleTokenizer gives e.g.
# "&amp; bread" -> [BOS, 261, 5066, EOS] and "“curly quotes”" -> [BOS, 257, 20795, 5808, 257, EOS].
KNOWN_DIVERGENCES = [
    ("&amp; bread", [BOS, 261, 6259, 282, 5066, EOS]),
    ("“curly quotes”", [BOS, 728, 506, 20795, 5808, 728, 507, EOS]),
]


@pytest.mark.parametrize("prompt,ids", KNOWN_IDS, ids=[p[:30] for p, _ in KNOWN_IDS])
def test_shipped_tokenizer_reproduces_clip_ids(tokenizer, prompt, ids):
    if TRANSFORMERS_4 and any("\u3040" <= c <= "\u9fff" for c in prompt):
        pytest.skip("transformers 4.x's slow CLIPTokenizer (no ftfy) splits CJK text into single characters")
    assert tokenizer(prompt).input_ids == ids
    # our chunked tokenize gives the same ids, padded with <|endoftext|>
    chunk = tokenize(tokenizer, [prompt])[0, 0].tolist()
    assert chunk == ids + [EOS] * (CONTEXT_LENGTH - len(ids))


@pytest.mark.parametrize("prompt,ids", KNOWN_DIVERGENCES)
def test_known_divergences_from_ftfy_tokenizer(tokenizer, prompt, ids):
    assert tokenizer(prompt).input_ids == ids


def test_shipped_tokenizer_is_clip_vit_large_patch14(tokenizer):
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|startoftext|>", BOS)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|endoftext|>", EOS)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", EOS)
    assert tokenizer.model_max_length == 77
    vocab = tokenizer.get_vocab()
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["a</w>"] == 320


def test_sd2_pad_token(tokenizer_sd2):
    assert (tokenizer_sd2.pad_token, tokenizer_sd2.pad_token_id) == ("!", 0)
    ids = tokenize(tokenizer_sd2, ["a photo of a cat"])[0, 0].tolist()
    # open_clip.tokenize: [sot] + tokens + [eot] + zeros
    assert ids == [BOS, 320, 1125, 539, 320, 2368, EOS] + [0] * 70


def test_asset_files_layout():
    folder = REPO / "ldm" / "assets" / "tokenizer"
    vocab_text = (folder / "vocab.json").read_text(encoding="utf-8")
    merges = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    vocab = json.loads(vocab_text)
    assert "\n" not in vocab_text and list(vocab) == sorted(vocab)  # HF layout: one sorted line
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    assert merges[1] == "i n" and merges[-1] == "jeky ll</w>"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77 and config["pad_token"] == "<|endoftext|>"


def test_script_rebuilds_the_same_vocab(tmp_path):
    """vocab.json is what the script derives from the merges (no wheel needed offline)."""
    spec = importlib.util.spec_from_file_location("make_assets", REPO / "ldm" / "cli" / "make_tokenizer_assets.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    folder = REPO / "ldm" / "assets" / "tokenizer"
    table = (folder / "merges.txt").read_text(encoding="utf-8").replace("#version: 0.2", "header", 1)
    vocab, merges = script.build(table + "\nextra merges past 48894 are ignored\n")
    assert vocab == json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    written = script.write_assets(vocab, merges, tmp_path)
    for path in written:
        assert path.read_bytes() == (folder / path.name).read_bytes(), path.name
    with pytest.raises(ValueError, match="not a CLIP BPE table"):
        script.build("header\na b\n")


# ----------------------------------------------------------------------------- (b) long prompts


def _words(n: int) -> str:
    # n words of one token each
    pool = ["cat", "dog", "red", "blue", "house", "tree", "car", "sky", "sun", "moon"]
    return " ".join(pool[i % len(pool)] for i in range(n))


def test_long_prompt_is_chunked_not_truncated(tokenizer):
    prompt = _words(200) + ", masterpiece, best quality"
    body = tokenizer(prompt, add_special_tokens=False).input_ids
    assert len(body) > 200
    ids = tokenize(tokenizer, [prompt])  # (1, k, 77)
    k = math.ceil(len(body) / 75)
    assert ids.shape == (1, k, 77) and count_chunks(tokenizer, [prompt]) == k
    recovered = []
    for c in range(k):
        chunk = ids[0, c].tolist()
        assert chunk[0] == BOS
        n = min(75, len(body) - 75 * c)
        assert chunk[n + 1] == EOS and all(t == EOS for t in chunk[n + 1 :])
        recovered += chunk[1 : n + 1]
    assert recovered == body  # every token, in order


def test_exactly_75_tokens_is_one_chunk_76_is_two(tokenizer):
    assert tokenize(tokenizer, [_words(75)]).shape == (1, 1, 77)
    ids = tokenize(tokenizer, [_words(76)])
    assert ids.shape == (1, 2, 77)
    assert ids[0, 1, :3].tolist() == [BOS, tokenizer.convert_tokens_to_ids("tree</w>"), EOS]  # word 76


def test_batch_and_negative_padded_to_same_chunks(tokenizer):
    prompts = [_words(160), "a cat"]
    ids = tokenize(tokenizer, prompts)
    assert ids.shape == (2, 3, 77)
    empty = [BOS, EOS] + [EOS] * 75
    assert ids[1, 1].tolist() == empty and ids[1, 2].tolist() == empty
    with pytest.raises(ValueError, match="needs 3 chunks"):
        tokenize(tokenizer, prompts, num_chunks=2)
    with pytest.raises(ValueError, match="list of strings"):
        tokenize(tokenizer, "a cat")

    encoder = TextEncoder(tokenizer, _tiny_clip(layers=2))
    cond, uncond = encoder.encode_with_negative(["a cat"], [_words(100)])
    assert cond.shape == uncond.shape == (1, 2 * 77, 32)
    # the padding chunk of the prompt is the encoding of an empty prompt
    assert torch.equal(cond[:, 77:], encoder.encode([""]))
    assert torch.equal(cond[:, :77], encoder.encode(["a cat"]))


# ----------------------------------------------------------------------------- (c) diffusers parity


def _tiny_clip(layers: int = 3, hidden: int = 32, heads: int = 4, act: str = "quick_gelu", seed: int = 0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


class _DiffusersView:
    """What diffusers' encode_prompt needs of `self.text_encoder`; `.text_model` is gone
    from CLIPTextModel since transformers 5.6 but diffusers 0.42 still reads it for clip_skip."""

    def __init__(self, model):
        self.model, self.config, self.dtype = model, model.config, model.dtype
        self.text_model = getattr(model, "text_model", model)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _diffusers_encode(tokenizer, model, prompts, negatives, clip_skip):
    from diffusers import StableDiffusionPipeline

    fake_pipe = SimpleNamespace(tokenizer=tokenizer, text_encoder=_DiffusersView(model))
    with torch.no_grad():
        return StableDiffusionPipeline.encode_prompt(
            fake_pipe, prompts, torch.device("cpu"), 1, True, negatives, clip_skip=clip_skip
        )


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_short_prompt_equals_diffusers_encode_prompt(tokenizer, clip_skip):
    model = _tiny_clip(layers=3)
    encoder = TextEncoder(tokenizer, model)
    prompts = ["a photo of a cat", "an astronaut riding a horse on mars, highly detailed, 8k"]
    negatives = ["blurry, lowres", ""]
    ref, ref_neg = _diffusers_encode(
        tokenizer, model, prompts, negatives, None if clip_skip == 1 else clip_skip - 1
    )  # ours = diffusers' + 1
    cond, uncond = encoder.encode_with_negative(prompts, negatives, clip_skip=clip_skip, negative_clip_skip=1)
    assert cond.shape == ref.shape == (2, 77, 32)
    assert torch.equal(cond, ref)
    assert torch.equal(uncond, ref_neg)  # diffusers never applies clip_skip to the negative


def test_clip_skip_semantics(tokenizer):
    model = _tiny_clip(layers=3)
    ids = tokenize(tokenizer, ["a red circle"])
    with torch.no_grad():
        out = model(ids[:, 0], output_hidden_states=True)
        last = text.encode_ids(model, ids, clip_skip=1)
        penultimate = text.encode_ids(model, ids, clip_skip=2)
    assert torch.equal(last, out.last_hidden_state)
    assert torch.allclose(penultimate, text.final_layer_norm(model)(out.hidden_states[-2]), atol=0, rtol=0)
    assert not torch.allclose(last, penultimate)
    for bad in (0, 4):
        with pytest.raises(ValueError, match="clip_skip"):
            text.encode_ids(model, ids, clip_skip=bad)


def test_grad_flag(tokenizer):
    encoder = TextEncoder(tokenizer, _tiny_clip(layers=2))
    assert not encoder.encode(["a cat"]).requires_grad
    assert encoder.encode(["a cat"], grad=True).requires_grad


# ----------------------------------------------------------------------------- (d) single files


def _flat(sd: dict) -> dict:
    """A CLIPTextModel state dict under transformers >= 5.6's names (no text_model. level), whatever the version."""
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def _clip_state_dict(model, nested: bool):
    prefix = "cond_stage_model.transformer." + ("text_model." if nested else "")
    sd = {prefix + k: v.clone() for k, v in _flat(model.state_dict()).items()}
    sd[prefix + "embeddings.position_ids"] = torch.arange(77).expand(1, -1).float()  # legacy, ignored
    sd["model.diffusion_model.out.2.weight"] = torch.zeros(1)  # other parts of the checkpoint
    sd["first_stage_model.decoder.conv_out.bias"] = torch.zeros(1)
    return sd


@pytest.mark.parametrize("nested", [True, False])
def test_sd1_single_file(tokenizer, nested):
    source = _tiny_clip(layers=2)
    checkpoint = _clip_state_dict(source, nested)
    model = text_encoder_from_single_file(checkpoint, config=source.config.to_dict(), dtype=torch.float64)
    assert model.dtype == torch.float64
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value.double()), key
    model.float()  # transformers 4.x cannot run CLIP in float64 (its causal mask overflows)
    # diffusers' converter gives the same tensors
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    if nested:
        ref = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(checkpoint).items()}
        ref.pop("embeddings.position_ids")
        assert ref.keys() == _flat(source.state_dict()).keys()
    ids = tokenize(tokenizer, ["a photo of a cat"])
    with torch.no_grad():
        assert torch.allclose(text.encode_ids(model, ids).float(), source(ids[:, 0]).last_hidden_state, atol=1e-6)


def _open_clip_state_dict(width=32, layers=3, vocab=49408, seed=0):
    """Random OpenCLIP text tower (cond_stage_model.model.*), SD2 layout, small."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.1, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    p = "cond_stage_model.model."
    sd = {
        p + "token_embedding.weight": rnd(vocab, width, scale=0.5),
        p + "positional_embedding": rnd(77, width, scale=0.2),
    }
    for i in range(layers):
        b = f"{p}transformer.resblocks.{i}."
        sd.update(
            {
                b + "ln_1.weight": rnd(width, offset=1.0),
                b + "ln_1.bias": rnd(width),
                b + "attn.in_proj_weight": rnd(3 * width, width, scale=0.3),
                b + "attn.in_proj_bias": rnd(3 * width),
                b + "attn.out_proj.weight": rnd(width, width, scale=0.3),
                b + "attn.out_proj.bias": rnd(width),
                b + "ln_2.weight": rnd(width, offset=1.0),
                b + "ln_2.bias": rnd(width),
                b + "mlp.c_fc.weight": rnd(4 * width, width, scale=0.3),
                b + "mlp.c_fc.bias": rnd(4 * width),
                b + "mlp.c_proj.weight": rnd(width, 4 * width, scale=0.3),
                b + "mlp.c_proj.bias": rnd(width),
            }
        )
    sd.update(
        {
            p + "ln_final.weight": rnd(width, offset=1.0),
            p + "ln_final.bias": rnd(width),
            p + "text_projection": rnd(width, width),
            p + "logit_scale": torch.tensor(4.6052),
            "model.diffusion_model.out.2.weight": torch.zeros(1),
        }
    )
    return sd


def _open_clip_penultimate(sd, ids, width=32, heads=4, layers=3):
    """Hand-written OpenCLIP text tower as SD2's FrozenOpenCLIPEmbedder(layer="penultimate")
    runs it: token + positional embedding, resblocks 0..layers-2 (pre-LN, nn.MultiheadAttention
    with a causal mask, exact GELU), then ln_final."""
    p = "cond_stage_model.model."
    x = sd[p + "token_embedding.weight"][ids] + sd[p + "positional_embedding"]  # (B, 77, W)
    mask = torch.full((77, 77), float("-inf")).triu(1)  # OpenCLIP build_attention_mask
    for i in range(layers - 1):  # penultimate: the last resblock is not run
        b = f"{p}transformer.resblocks.{i}."
        attn = nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict(
            {
                "in_proj_weight": sd[b + "attn.in_proj_weight"],
                "in_proj_bias": sd[b + "attn.in_proj_bias"],
                "out_proj.weight": sd[b + "attn.out_proj.weight"],
                "out_proj.bias": sd[b + "attn.out_proj.bias"],
            }
        )
        h = nn.functional.layer_norm(x, (width,), sd[b + "ln_1.weight"], sd[b + "ln_1.bias"])
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = nn.functional.layer_norm(x, (width,), sd[b + "ln_2.weight"], sd[b + "ln_2.bias"])
        h = nn.functional.gelu(nn.functional.linear(h, sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"]))
        x = x + nn.functional.linear(h, sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
    return nn.functional.layer_norm(x, (width,), sd[p + "ln_final.weight"], sd[p + "ln_final.bias"])


def _sd2_tiny_config(width=32, heads=4, layers=3):
    config = text_encoder_config("sd2").to_dict()
    config.update(
        hidden_size=width, intermediate_size=4 * width, num_attention_heads=heads, num_hidden_layers=layers - 1
    )  # the checkpoint's resblocks minus the last
    return config


def test_sd2_single_file_matches_open_clip_penultimate(tokenizer_sd2):
    sd = _open_clip_state_dict()
    model = text_encoder_from_single_file(sd, config=_sd2_tiny_config())  # kind detected: sd2
    assert model.config.num_hidden_layers == 2
    encoder = TextEncoder(tokenizer_sd2, model)
    prompts = ["a photo of a cat", "an astronaut riding a horse, 4k", ""]
    ids = tokenize(tokenizer_sd2, prompts)[:, 0]  # open_clip.tokenize ids (0-padded)
    with torch.no_grad():
        ref = _open_clip_penultimate(sd, ids)
    ours = encoder.encode(prompts)
    assert ours.shape == ref.shape == (3, 77, 32)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_sd2_single_file_equals_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    sd = _open_clip_state_dict()
    ours = _flat(text_encoder_from_single_file(sd, "sd2", config=_sd2_tiny_config()).state_dict())
    # diffusers only knows to drop resblock 23 (ViT-H's last); here the last is resblock 2
    ref = convert_open_clip_checkpoint(SimpleNamespace(config=None), sd)
    ref = {
        k.removeprefix("text_model."): v
        for k, v in ref.items()
        if ".layers.2." not in k and k != "text_projection.weight"
    }
    assert ref.keys() == ours.keys()
    for key in ours:
        assert torch.equal(ours[key], ref[key]), key


@pytest.mark.parametrize("kind,params", [("sd1", 123_060_480), ("sd2", 340_387_840)])
def test_shipped_configs_take_full_size_checkpoints(kind, params):
    """Full-size shapes, on the meta device (no memory): the shipped configs accept
    the tensors of a real SD1 (CLIP ViT-L/14) / SD2 (OpenCLIP ViT-H/14, 24 resblocks) checkpoint."""
    width, layers, vocab = (768, 12, 49408) if kind == "sd1" else (1024, 24, 49408)

    def meta(*shape):
        return torch.empty(*shape, device="meta")

    sd = {}
    if kind == "sd1":
        p = "cond_stage_model.transformer.text_model."
        sd[p + "embeddings.token_embedding.weight"] = meta(vocab, width)
        sd[p + "embeddings.position_embedding.weight"] = meta(77, width)
        for i in range(layers):
            b = f"{p}encoder.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                sd[f"{b}self_attn.{proj}.weight"], sd[f"{b}self_attn.{proj}.bias"] = meta(width, width), meta(width)
            for ln in ("layer_norm1", "layer_norm2"):
                sd[f"{b}{ln}.weight"], sd[f"{b}{ln}.bias"] = meta(width), meta(width)
            sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = meta(4 * width, width), meta(4 * width)
            sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = meta(width, 4 * width), meta(width)
        sd[p + "final_layer_norm.weight"], sd[p + "final_layer_norm.bias"] = meta(width), meta(width)
    else:
        p = "cond_stage_model.model."
        sd[p + "token_embedding.weight"], sd[p + "positional_embedding"] = meta(vocab, width), meta(77, width)
        for i in range(layers):
            b = f"{p}transformer.resblocks.{i}."
            sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"] = meta(3 * width, width), meta(3 * width)
            sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"] = meta(width, width), meta(width)
            for ln in ("ln_1", "ln_2"):
                sd[f"{b}{ln}.weight"], sd[f"{b}{ln}.bias"] = meta(width), meta(width)
            sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"] = meta(4 * width, width), meta(4 * width)
            sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"] = meta(width, 4 * width), meta(width)
        sd[p + "ln_final.weight"], sd[p + "ln_final.bias"] = meta(width), meta(width)
        sd[p + "text_projection"], sd[p + "logit_scale"] = meta(width, width), meta(())
    model = text_encoder_from_single_file(sd, kind, device="meta")
    assert sum(t.numel() for t in model.parameters()) == params


def test_diffusers_folders(tmp_path, tokenizer):
    """A diffusers model folder: tokenizer/ (SD2 style: special_tokens_map.json says pad "!")
    and text_encoder/ load offline through the same functions."""
    source = _tiny_clip(layers=2)
    source.save_pretrained(tmp_path / "text_encoder")
    model = text.load_text_encoder(tmp_path, dtype=torch.float64)
    assert model.dtype == torch.float64
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value.double()), key

    folder = tmp_path / "tokenizer"
    folder.mkdir()
    shipped = REPO / "ldm" / "assets" / "tokenizer"
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (folder / name).write_bytes((shipped / name).read_bytes())
    special = json.loads((shipped / "special_tokens_map.json").read_text())
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": "!"}))
    sd2 = load_tokenizer(tmp_path)
    assert sd2.pad_token_id == 0
    assert load_tokenizer(tmp_path, pad_token="<|endoftext|>").pad_token_id == EOS


# ----------------------------------------------------------------------------- (e) bad input


def test_missing_key_is_named():
    sd = _open_clip_state_dict()
    del sd["cond_stage_model.model.transformer.resblocks.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"missing tensor 'encoder\.layers\.1\.mlp\.fc1\.bias'"):
        text_encoder_from_single_file(sd, "sd2", config=_sd2_tiny_config())

    source = _tiny_clip(layers=2)
    sd1 = _clip_state_dict(source, nested=True)
    del sd1["cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    with pytest.raises(ValueError, match=r"missing tensor 'final_layer_norm\.weight'"):
        text_encoder_from_single_file(sd1, "sd1", config=source.config.to_dict())


def test_unexpected_and_misshaped_keys_are_named():
    sd = _open_clip_state_dict()
    sd["cond_stage_model.model.transformer.resblocks.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"resblocks\.0\.attn\.extra"):
        text_encoder_from_single_file(sd, "sd2", config=_sd2_tiny_config())

    sd = _open_clip_state_dict(layers=4)  # one resblock more than the config allows
    with pytest.raises(ValueError, match=r"resblocks\.3\."):
        text_encoder_from_single_file(sd, "sd2", config=_sd2_tiny_config())

    source = _tiny_clip(layers=2)
    sd1 = _clip_state_dict(source, nested=False)
    sd1["cond_stage_model.transformer.encoder.layers.5.mlp.fc1.bias"] = torch.zeros(37)
    with pytest.raises(ValueError, match=r"unexpected tensor 'encoder\.layers\.5\.mlp\.fc1\.bias'"):
        text_encoder_from_single_file(sd1, "sd1", config=source.config.to_dict())

    sd1 = _clip_state_dict(source, nested=False)
    sd1["cond_stage_model.transformer.final_layer_norm.bias"] = torch.zeros(31)
    with pytest.raises(ValueError, match=r"tensor 'final_layer_norm\.bias' has shape \(31,\)"):
        text_encoder_from_single_file(sd1, "sd1", config=source.config.to_dict())


def test_bad_kind_and_empty_checkpoint():
    with pytest.raises(ValueError, match="no text encoder"):
        text_encoder_from_single_file({"model.diffusion_model.x": torch.zeros(1)})
    with pytest.raises(ValueError, match="kind must be one of"):
        text_encoder_from_single_file(_open_clip_state_dict(), "sdxl")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(REPO / "tests")
