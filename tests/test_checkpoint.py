"""Reading U-Nets from single files and diffusers folders, export, and refusal of bad input."""

import json
import os
import pickle
import random
from pathlib import Path

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
        with pytest.raises(ValueError, match=r"refused to load: the pickle asks to call (io\.|builtins\.)?open ") as e:
            load_unet(path)
        _assert_refusal_gives_no_unsafe_advice(str(e.value))
    r = tmp_path / "evil_protocol4.ckpt"  # an opcode the safe unpickler does not know: refused before any call
    with open(r, "wb") as f:
        pickle.dump({"x": _RunsCode(marker)}, f, protocol=4)
    with pytest.raises(ValueError, match="evil_protocol4.ckpt: not a readable PyTorch checkpoint") as e:
        load_unet(r)
    assert "weights_only" not in str(e.value) and len(str(e.value).splitlines()) == 1
    assert not marker.exists()
    # sanity: the payload really does run under an unsafe load
    with open(q, "rb") as f:
        pickle.load(f)  # noqa: S301 (on purpose)
    assert marker.exists()


def _assert_refusal_gives_no_unsafe_advice(message: str) -> None:
    assert len(message.splitlines()) == 1, message
    assert "ldm does not run code from checkpoints" in message
    for advice in ("weights_only", "safe_globals", "truncated", "download it again", "trust"):
        assert advice not in message, message


class _CallsSystem:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_refused_pickle_names_the_callable_and_never_suggests_weights_only_false(tmp_path, legacy):
    """torch's refusal says to re-run with weights_only=False (which would run the payload): ldm reports
    the callable the pickle asked for instead, in one line."""
    p = tmp_path / "evil.ckpt"
    if legacy:
        with open(p, "wb") as f:
            pickle.dump({"x": _CallsSystem()}, f, protocol=2)
    else:
        torch.save({"x": _CallsSystem()}, p)
    with pytest.raises(
        ValueError, match=r"evil\.ckpt: refused to load: the pickle asks to call os\.system \(GLOBAL "
    ) as e:
        read_state_dict(p)
    _assert_refusal_gives_no_unsafe_advice(str(e.value))
    torch.save({"model": torch.nn.Linear(2, 2)}, p)  # a whole pickled module: a class, refused the same way
    with pytest.raises(ValueError, match=r"asks to call torch\.nn\.modules\.linear\.Linear") as e:
        read_state_dict(p)
    _assert_refusal_gives_no_unsafe_advice(str(e.value))


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


# ------------------------------------------------------------------ hostile files: claims bounded by the file


def _safetensors_with_header(path, header: dict, data: bytes = b"\0" * 16, length: int | None = None):
    text = json.dumps(header).encode()
    path.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + data)
    return path


@pytest.mark.parametrize(
    "header, length, problem",
    [
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 10**12, "header claims 1000000000000 bytes"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 2**64 - 1, "more than the 100000000"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 5000, "the file has"),
        ({"a": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}}, None, "needs 4000000000000 bytes"),
        ({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, None, "needs"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 10**12]}}, None, "beyond the 16 bytes of data"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, None, "beyond the 16 bytes"),
        ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, None, "is not a list of sizes"),
        ({"a": {"dtype": "F4", "shape": [32], "data_offsets": [0, 16]}}, None, "dtype 'F4' is not one torch reads"),
        ({"a": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}, None, "dtype \\['F32'\\]"),
        ({"a": [1, 2]}, None, "its entry is \\[1, 2\\], not an object"),
        ({"__metadata__": {"k": 5}}, None, "__metadata__ is not a map of strings"),
    ],
)
def test_safetensors_claims_are_bounded_by_the_file(tmp_path, header, length, problem):
    """Header length, shapes and offsets are checked against the file's size before anything is read: a
    one-line ValueError naming the file and the problem, not an allocation of what the header claims."""
    import tracemalloc

    p = _safetensors_with_header(tmp_path / "crafted.safetensors", header, length=length)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=problem) as e:
            read_state_dict(p)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    assert peak < 1 << 20


def test_zip_entries_must_be_stored_and_inside_the_file(tmp_path):
    """torch inflates a compressed entry into memory whatever it claims (a 30 KB file -> 30 MB here, a
    zip bomb), and with mmap reads a compressed tensor's bytes as its values: torch.save never compresses,
    so ldm refuses compressed entries."""
    import zipfile

    torch.save({"a": torch.ones(4)}, tmp_path / "ok.ckpt")
    with zipfile.ZipFile(tmp_path / "ok.ckpt") as zi, zipfile.ZipFile(tmp_path / "bomb.ckpt", "w") as zo:
        for info in zi.infolist():
            data = zi.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data += b"\0" * 30_000_000  # ignored after the pickle's STOP
            zo.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
    assert (tmp_path / "bomb.ckpt").stat().st_size < 100_000
    with pytest.raises(ValueError, match=r"bomb\.ckpt: zip entry '.*data\.pkl' is compressed"):
        read_state_dict(tmp_path / "bomb.ckpt")
    with zipfile.ZipFile(tmp_path / "ok.ckpt") as zi, zipfile.ZipFile(tmp_path / "deflated.ckpt", "w") as zo:
        for info in zi.infolist():  # the tensor's bytes deflated: torch's mmap would read them as floats
            zo.writestr(info.filename, zi.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(ValueError, match="is compressed"):
        read_state_dict(tmp_path / "deflated.ckpt")
    assert torch.equal(read_state_dict(tmp_path / "ok.ckpt")["a"], torch.ones(4))


def test_legacy_pickle_claims_are_bounded_by_the_file(tmp_path):
    """The legacy (non-zip) format: a storage declaring 400 MB in a 400-byte file is refused before torch
    allocates it, and a string length of 2 GB costs no 2 GB read buffer."""
    import struct
    import tracemalloc

    torch.save({"a": torch.zeros(4)}, tmp_path / "ok.ckpt", _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_dict(tmp_path / "ok.ckpt")["a"], torch.zeros(4))
    data = (tmp_path / "ok.ckpt").read_bytes()
    i = data.index(b"cpu") + 5  # after 'cpu' and its BINPUT: the storage's element count, BININT1 4
    assert data[i : i + 2] == b"K\x04"
    big = data[:i] + b"J" + struct.pack("<i", 10**8) + data[i + 2 :]
    (tmp_path / "big.ckpt").write_bytes(big)
    with pytest.raises(ValueError, match=r"big\.ckpt: its pickle declares 400000000 bytes of tensors, the file has"):
        read_state_dict(tmp_path / "big.ckpt")
    j = data.index(b"little_endian") - 5  # BINUNICODE and its 4-byte length
    assert data[j : j + 1] == b"X"
    long = data[: j + 1] + struct.pack("<I", 2**31 - 1) + data[j + 5 :]
    (tmp_path / "long.ckpt").write_bytes(long)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"long\.ckpt: not a readable PyTorch checkpoint"):
            read_state_dict(tmp_path / "long.ckpt")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 8 << 20


# ------------------------------------------------------------------ crafted model metadata: checked like flags

DEMO = Path(ldm.__file__).parent / "assets" / "demo" / "ldm-shapes-demo.safetensors"


def _demo_records():
    from ldm.formats.metadata import safetensors_header

    return {k: json.loads(v) for k, v in safetensors_header(DEMO)[1].items() if k.startswith("ldm_") and v[:1] == "{"}


@pytest.mark.parametrize(
    "record, path, value, problem",
    [
        ("ldm_pipeline", ["sample_size"], "abc", "sample_size='abc' is invalid: expected an integer in 64..8192"),
        ("ldm_pipeline", ["sample_size"], 10**9, "sample_size=1000000000 is invalid"),
        ("ldm_pipeline", ["sample_size"], True, "sample_size=True is invalid"),
        ("ldm_pipeline", ["sample_size"], 100, "expected a multiple of 8"),
        ("ldm_pipeline", ["guidance_scale"], float("nan"), "guidance_scale=nan is invalid: expected a finite"),
        ("ldm_pipeline", ["guidance_scale"], -1, "guidance_scale=-1 is invalid"),
        ("ldm_pipeline", ["guidance_scale"], 1e30, "guidance_scale=1e\\+30 is invalid"),
        ("ldm_pipeline", ["prediction_type"], "sample_x", "prediction_type='sample_x' is invalid: expected one of"),
        ("ldm_pipeline", ["text_kind"], "sd3", "text_kind='sd3' is invalid"),
        ("ldm_pipeline", ["pad_token"], 5, "pad_token=5 is invalid"),
        ("ldm_pipeline", ["text_encoder_config", "vocab_size"], 10**12, "vocab_size=1000000000000 is invalid"),
        ("ldm_pipeline", ["text_encoder_config", "vocab_size"], "big", "vocab_size='big' is invalid"),
        ("ldm_pipeline", ["text_encoder_config", "max_position_embeddings"], 10**9, "max_position_embeddings="),
        ("ldm_pipeline", ["text_encoder_config", "num_attention_heads"], 3, "expected a divisor of hidden_size=128"),
        ("ldm_pipeline", ["text_encoder_config", "hidden_act"], "os.system", "hidden_act='os.system' is invalid"),
        ("ldm_pipeline", ["scheduler", "num_train_timesteps"], 10**12, "num_train_timesteps=1000000000000"),
        ("ldm_pipeline", ["scheduler", "beta_end"], float("inf"), "beta_end=inf is invalid"),
        ("ldm_pipeline", ["scheduler", "trained_betas"], [0.5], "expected null or a list of 1000 numbers"),
        ("ldm_pipeline", [], [1, 2], "stored ldm_pipeline is \\[1, 2\\], not a JSON object"),
        ("ldm_unet_config", ["num_res_blocks"], 10**6, "num_res_blocks=1000000 is invalid"),
        ("ldm_unet_config", ["norm_groups"], 0, "norm_groups=0 is invalid"),
        ("ldm_unet_config", ["channel_mult"], "abc", "channel_mult='abc' is invalid"),
        ("ldm_unet_config", ["model_channels"], 64.5, "model_channels=64.5 is invalid"),
        ("ldm_unet_config", ["attention_levels"], [0, 9], "attention_levels=\\[0, 9\\] is invalid"),
        ("ldm_unet_config", ["num_heads"], 8, "set exactly one of num_heads"),
        ("ldm_vae_config", ["block_out_channels"], [10**9], "block_out_channels=\\[1000000000\\] is invalid"),
        ("ldm_vae_config", ["scaling_factor"], float("nan"), "scaling_factor=nan is invalid"),
        ("ldm_vae_config", ["down_block_types"], ["DownEncoderBlock2D"], "expected a list of 3"),
    ],
)
def test_crafted_model_metadata_is_refused_naming_the_key_and_value(tmp_path, record, path, value, problem):
    """Every value ldm stores in a model file's metadata is checked as a flag is (type, finite, range) before
    any tensor is read: a one-line ValueError naming the file, the key and the value — never a TypeError,
    a NaN used silently or an allocation sized by the file's claims."""
    from ldm.formats.pipeline_files import read_single_file_metadata

    records = _demo_records()
    target = records[record]
    if path:
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    else:
        records[record] = value
    p = tmp_path / "crafted.safetensors"
    save_file({"x": torch.zeros(2)}, p, metadata={k: json.dumps(v) for k, v in records.items()})
    with pytest.raises(ValueError, match=problem) as e:
        read_single_file_metadata(p)
    assert str(e.value).startswith(f"{p}: ") and "\n" not in str(e.value)


def test_demo_metadata_passes_the_checks(tmp_path):
    from ldm.formats.pipeline_files import read_single_file_metadata

    stored = read_single_file_metadata(DEMO)
    assert stored["pipeline"]["sample_size"] == 64 and stored["pipeline"]["guidance_scale"] == 2.5
    assert stored["unet"].head_dim == 32 and stored["vae"]["norm_num_groups"] == 8


def test_nan_guidance_in_a_model_file_is_refused_before_loading(tmp_path):
    """The issue's case: a NaN guidance scale stored in a model file was used and written into PNGs as
    `CFG scale: nan`. Now from_pretrained refuses the file, before reading its tensors."""
    from ldm.formats.metadata import safetensors_header

    header, meta = safetensors_header(DEMO)
    record = json.loads(meta["ldm_pipeline"])
    record["guidance_scale"] = float("nan")
    text = json.dumps({"__metadata__": {**meta, "ldm_pipeline": json.dumps(record)}, **header}).encode()
    data = DEMO.read_bytes()
    p = tmp_path / "nan_guidance.safetensors"
    p.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + int.from_bytes(data[:8], "little") :])
    with pytest.raises(ValueError, match=r"nan_guidance\.safetensors: stored ldm_pipeline guidance_scale=nan"):
        ldm.Pipeline.from_pretrained(p)
