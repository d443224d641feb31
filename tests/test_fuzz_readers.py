"""Fuzzing the readers of downloaded files (issue 14): from valid seed files, mutated bytes (flips, truncation,
insertion, deletion, header numbers and JSON values spliced in) must give a return or a one-line ValueError /
FileNotFoundError — no other exception, no hang (hypothesis deadline, SIGALRM for special files), and no
allocation the file's size does not justify (tracemalloc peak per call; tensors returned; resident memory).

Covered: read_state_dict (.safetensors, zip and legacy .ckpt), load_lora, the Pipeline's single-file
metadata reader (read_single_file_metadata) and read_generation (ldm's PNG record and A1111's parameters).
Bounded: derandomized, a fixed number of examples per reader, well under a minute on 2 busy cores.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import resource
import signal
import socket
import struct
import tracemalloc
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from ldm.formats.checkpoint import read_state_dict, save_unet_single_file, stored_unet_config
from ldm.formats.metadata import PIPELINE_KEY, UNET_CONFIG_KEY, VAE_CONFIG_KEY, safetensors_header
from ldm.formats.pipeline_files import read_single_file_metadata
from ldm.models.lora import add_lora, load_lora, remove_lora, save_lora
from ldm.models.unet import UNet, UNetConfig, random_weights_
from ldm.outputs import a1111_parameters, read_generation, save_png
from ldm.pipelines.request import GenerationRequest

EXAMPLES = 120
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=5),  # a loaded 2-core machine; a hang would take far longer
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
ALLOWED = (ValueError, FileNotFoundError)


def _micro_config() -> UNetConfig:
    """Smaller than conftest's tiny configs: the files stay a few tens of KB, so most mutations hit headers."""
    return UNetConfig(
        model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2, context_dim=8,
        norm_groups=4,
    )  # fmt: skip


# --------------------------------------------------------------------------- seed files


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("seeds")
    unet = random_weights_(UNet(_micro_config()), seed=0).eval()
    out: dict[str, bytes] = {}

    save_unet_single_file(unet, folder / "unet.safetensors")
    out["safetensors"] = (folder / "unet.safetensors").read_bytes()
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    torch.save({"state_dict": sd, "global_step": 3}, folder / "unet.ckpt")
    out["ckpt"] = (folder / "unet.ckpt").read_bytes()
    small = dict(list(sd.items())[:6])
    torch.save(small, folder / "legacy.ckpt", _use_new_zipfile_serialization=False)
    out["legacy"] = (folder / "legacy.ckpt").read_bytes()

    adapted = copy.deepcopy(unet)
    add_lora(adapted, rank=2)
    for p in adapted.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    save_lora(adapted, folder / "lora.safetensors", metadata={"lora_adapter_metadata": {"unet.lora_alpha": 2.0}})
    out["lora"] = (folder / "lora.safetensors").read_bytes()

    # the records ldm writes into a whole pipeline's single file (the demo model's, realistic and complete)
    demo = Path(__file__).resolve().parents[1] / "ldm" / "assets" / "demo" / "ldm-shapes-demo.safetensors"
    _, meta = safetensors_header(demo)
    records = {k: meta[k] for k in (PIPELINE_KEY, UNET_CONFIG_KEY, VAE_CONFIG_KEY)}
    save_file({"x": torch.zeros(2)}, folder / "pipe.safetensors", metadata=records)
    out["pipeline"] = (folder / "pipe.safetensors").read_bytes()

    request = GenerationRequest(prompt="a red circle, top left", negative_prompt="blue", steps=3, seed=7)
    fields = request.to_dict()
    del fields["num_images"]
    record = {**fields, "model_name": "demo", "model_sha256": "ab" * 32, "loras": {}, "batch": [0, 1]}
    image = Image.new("RGB", (8, 8), (200, 30, 30))
    text = a1111_parameters("a red circle", "blue", 3, "ddim", 7.5, 7, 64, 64, "0123456789", "demo", rng="CPU")
    save_png(image, folder / "ldm.png", text, {"ldm": record, "Software": "ldm"})
    out["png_ldm"] = (folder / "ldm.png").read_bytes()
    a1111 = (
        "a cat, (detailed:1.2)\nNegative prompt: blurry\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1234, "
        'Size: 64x64, Model hash: 45dee52b00, Lora hashes: "style: 0123abcd", Clip skip: 2, Eta DDIM: 0.3, '
        "CFG Rescale phi: 0.5, Hires upscale: 2"
    )
    save_png(image, folder / "a1111.png", a1111)
    out["png_a1111"] = (folder / "a1111.png").read_bytes()
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mutants")


# --------------------------------------------------------------------------- mutations

INTERESTING = [0, 1, 7, 8, 255, 2**16, 2**31 - 1, 2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, 10**12, 10**9]
NUMBER_TEXT = ["0", "-1", "1e999", "-1e999", "NaN", "Infinity", "1.5", "9" * 30, "2147483648", "1e-320", '"8"']


def _header_end(data: bytes) -> int:
    """Where a safetensors header would end (8 + its claimed length), clamped to the data."""
    if len(data) < 8:
        return len(data)
    return min(len(data), 8 + int.from_bytes(data[:8], "little"))


def _png_text_region(data: bytes) -> tuple[int, int]:
    """The bytes from a PNG's first text chunk to its image data: where ldm's and A1111's parameters are."""
    first = min(i for i in (data.find(b"tEXt"), data.find(b"iTXt"), data.find(b"zTXt")) if i >= 0) - 4
    return first, data.find(b"IDAT")


class Mutant(bytes):
    """A mutated file, shown in a failure report as the mutations that made it (not as its bytes)."""

    how: tuple = ()

    def __repr__(self) -> str:
        return f"<{len(self)} bytes: {', '.join(self.how)}>"

    def _repr_pretty_(self, p, cycle) -> None:  # hypothesis' printer
        p.text(repr(self))


def _mutant(data: bytes, *how: str) -> Mutant:
    m = Mutant(data)
    m.how = how
    return m


@st.composite
def mutated(draw, seed: bytes, region: tuple[int, int] | None = None, safetensors: bool = False):
    """`seed` with 1..4 byte-level mutations, half of them aimed at `region` (where the claims are: a header,
    the text chunks). safetensors: also rewrites its header length, and splices numbers into its JSON with
    the length kept right (the claims then reach the checks behind the JSON parser)."""
    data = bytearray(seed)
    how: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        n = len(data)
        if n == 0:
            data += draw(st.binary(min_size=1, max_size=16))
            continue
        lo, hi = region if region is not None else (0, n)
        lo, hi = min(lo, n - 1), max(min(hi, n), min(lo, n - 1) + 1)
        pos = draw(st.one_of(st.integers(lo, hi - 1), st.integers(0, n - 1)))
        ops = ["flip", "byte", "truncate", "insert", "delete", "int", "number"]
        op = draw(st.sampled_from(ops + (["length", "number", "number"] if safetensors else [])))
        before = bytes(data)
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, ord("{"), ord('"'), ord("9"), ord("\n")]))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "length" and n >= 8:  # the safetensors header length
            data[:8] = struct.pack("<Q", draw(st.sampled_from(INTERESTING + [n, n - 8, n - 7, _header_end(data) - 9])))
        elif op == "int" and n >= 8:  # 4 or 8 bytes: zip sizes and offsets, pickle ints, PNG chunk lengths
            width = draw(st.sampled_from([4, 8]))
            pos = min(pos, n - width)
            value = draw(st.sampled_from(INTERESTING)) % (1 << (8 * width))
            data[pos : pos + width] = value.to_bytes(width, draw(st.sampled_from(["little", "big"])))
        elif op == "number":  # a number of the text around `pos` replaced (JSON, A1111 text, pickle text)
            start, stop = (8, _header_end(data)) if safetensors else (max(0, pos - 256), min(n, pos + 256))
            numbers = [m.span() for m in re.finditer(rb"-?\d+(\.\d+)?", bytes(data[start:stop]))]
            if not numbers:
                continue
            a, b = draw(st.sampled_from(numbers))
            data[start + a : start + b] = draw(st.sampled_from(NUMBER_TEXT)).encode()
            if safetensors:
                data[:8] = struct.pack("<Q", _header_end(data) - 8 + len(data) - n)
        if bytes(data) != before:
            how.append(f"{op}@{pos}")
    return _mutant(bytes(data), *how)


@st.composite
def header_json_mutated(draw, seed: bytes):
    """A safetensors file whose header JSON has one value (anywhere: a dtype, shape, offset, metadata string)
    replaced by another JSON value, re-serialized with its length field right."""
    n = int.from_bytes(seed[:8], "little")
    header = json.loads(seed[8 : 8 + n])
    new = draw(json_mutated(header))
    if draw(st.booleans()) and isinstance(new, dict):  # the metadata values are JSON text themselves
        meta = new.get("__metadata__")
        if isinstance(meta, dict) and meta:
            key = draw(st.sampled_from(sorted(meta)))
            try:
                inner = json.loads(meta[key])
            except (TypeError, ValueError):
                inner = meta[key]
            meta[key] = json.dumps(draw(json_mutated(inner)))
    text = json.dumps(new).encode()
    changed = [
        k
        for k in set(header) | set(new if isinstance(new, dict) else {})
        if header.get(k) != (new.get(k) if isinstance(new, dict) else None)
    ]
    return _mutant(struct.pack("<Q", len(text)) + text + seed[8 + n :], f"header JSON changed at {changed[:2]}")


JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from([0, -1, 1, 8, 64, 2**31, 2**63, 10**30, 10**400]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(["", "abc", "64", "epsilon", "sample", "sd3", "<|endoftext|>", "x" * 2000]),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


def _paths(value, prefix=()):
    """Every (path, value) inside a JSON value, the root included."""
    yield prefix, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _replace(value, path, new):
    if not path:
        return {} if new is _DELETE else new
    value = copy.deepcopy(value)
    target = value
    for key in path[:-1]:
        target = target[key]
    if new is _DELETE and isinstance(target, dict):
        del target[path[-1]]
    elif new is not _DELETE:
        target[path[-1]] = new
    return value


_DELETE = object()


@st.composite
def json_mutated(draw, record: dict):
    """A JSON record with one value (anywhere in it) replaced by another JSON value, or a key removed."""
    paths = list(_paths(record))
    path, _ = draw(st.sampled_from(paths))
    new = draw(st.one_of(JSON_VALUES, st.just(_DELETE)))
    return _replace(record, path, new)


# JSON texts that are not what a record should be: nested past the parser's depth, a number of thousands of
# digits, a non-finite number where a count goes, the right record with a value of the wrong kind
HOSTILE_JSON = [
    "[" * 100_000,
    '{"a": ' * 50_000,
    "1" * 5000,
    "NaN",
    "-Infinity",
    '{"prompt": "x", "steps": 1e999}',
    "",
    "{",
    '"a string"',
    "[1, 2, 3]",
    "null",
]


def record_text(record: dict):
    """The JSON text of a stored record, mutated: one value replaced (json_mutated), the whole record
    replaced by another JSON value, or a hostile text."""
    return st.one_of(
        json_mutated(record).map(json.dumps),
        JSON_VALUES.map(json.dumps),
        st.sampled_from(HOSTILE_JSON),
    )


# --------------------------------------------------------------------------- the oracle


_RSS_BUDGET_KB = 200 * 1024  # resident growth over a whole fuzz run; a 300 MB zip bomb would show


def _peak_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@contextlib.contextmanager
def _no_hang(seconds: float = 10.0):
    def alarm(*_):
        raise TimeoutError(f"still reading after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _outcome(read, path: Path, size: int, trace: bool = True):
    """Run `read(path)`: its result, or the one-line error it raised (any other exception fails the test).
    Python-side allocations peak under max(8 MB, 16x the file)."""
    if trace:
        tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol warnings, LoRA's skipped text encoder
            return read(path)
    except ALLOWED as e:
        message = str(e)
        assert message and "\n" not in message, f"not a one-line error: {message!r}"
        assert str(path.name) in message, f"the error does not name the file: {message!r}"
        assert "weights_only=False" not in message and "weights_only` set to `False" not in message
        return e
    finally:
        if trace:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak <= max(8 << 20, 16 * size), f"{peak} bytes allocated reading a {size}-byte file"


def _check_tensors(result, size: int) -> None:
    if isinstance(result, dict):
        total = sum(v.nbytes for v in result.values() if isinstance(v, torch.Tensor))
        assert total <= size, f"{total} bytes of tensors from a {size}-byte file"


def _fuzz(work: Path, name: str, data: bytes, read, trace: bool = True) -> None:
    path = work / name
    path.write_bytes(data)
    result = _outcome(read, path, len(data), trace)
    _check_tensors(result, len(data))


# --------------------------------------------------------------------------- the fuzz tests


def _read_checkpoint(path: Path):
    sd = read_state_dict(path)
    stored_unet_config(path)
    return sd


def test_fuzz_read_state_dict_safetensors(seeds, work):
    seed = seeds["safetensors"]
    rss = _peak_rss_kb()

    @FUZZ
    @given(st.one_of(mutated(seed, (0, _header_end(seed)), safetensors=True), header_json_mutated(seed)))
    def run(data):
        _fuzz(work, "unet.safetensors", data, _read_checkpoint)

    run()
    assert _peak_rss_kb() - rss < _RSS_BUDGET_KB


@pytest.mark.parametrize("kind", ["ckpt", "legacy"])
def test_fuzz_read_state_dict_ckpt(seeds, work, kind):
    seed = seeds[kind]
    rss = _peak_rss_kb()

    @FUZZ
    @given(mutated(seed))
    def run(data):
        _fuzz(work, f"{kind}.ckpt", data, read_state_dict)

    run()
    assert _peak_rss_kb() - rss < _RSS_BUDGET_KB


def test_fuzz_load_lora(seeds, work):
    seed = seeds["lora"]
    unet = random_weights_(UNet(_micro_config()), seed=1).eval()  # one model: adapters removed after each load

    def read(path: Path, merge: bool):
        names = load_lora(unet, path, merge=merge)
        remove_lora(unet)
        return names

    @FUZZ
    @given(st.one_of(mutated(seed, (0, _header_end(seed)), safetensors=True), header_json_mutated(seed)), st.booleans())
    def run(data, merge):
        # torch holds the tensors (checked by size below); the header's Python parsing is traced in the
        # safetensors test, and tracing the U-Net's construction here would only slow the run
        _fuzz(work, "lora.safetensors", data, lambda p: read(p, merge), trace=False)

    run()

    # well-formed files with crafted tensors: NaN, other shapes and dtypes, alphas that are not one number
    tensors = read_state_dict(_write(work / "seed_lora.safetensors", seed))
    _, meta = safetensors_header(work / "seed_lora.safetensors")
    crafted = st.sampled_from(
        [
            torch.tensor(float("nan")),
            torch.tensor(float("inf")),
            torch.tensor(-3.0),
            torch.zeros(2),
            torch.zeros(0),
            torch.zeros(0, 16),
            torch.zeros(2, 16, dtype=torch.int32),
            torch.zeros(2, 16, dtype=torch.bool),
            torch.full((2, 16), float("nan")),
            torch.zeros(2, 16, dtype=torch.float16),
            torch.zeros(16, 2, 3, 3),
            torch.zeros(2, 8, 1, 1),
            torch.zeros(1, 1, 1, 1, 1),
        ]
    )

    @settings(FUZZ, max_examples=EXAMPLES // 2)
    @given(st.sampled_from(sorted(tensors)), crafted, st.booleans(), st.booleans())
    def tensor(key, value, merge, drop_metadata):
        path = work / "crafted_lora.safetensors"
        save_file({**tensors, key: value}, path, metadata=None if drop_metadata else meta)
        _outcome(lambda p: read(p, merge), path, path.stat().st_size, trace=False)

    tensor()


def test_fuzz_single_file_metadata(seeds, work):
    """read_single_file_metadata: the pipeline record, U-Net and VAE configs, checked before any tensor is
    read. JSON values spliced anywhere into each record, and raw byte mutations of the file."""
    seed = seeds["pipeline"]
    _, meta = safetensors_header(_write(work / "seed.safetensors", seed))
    records = {k: json.loads(v) for k, v in meta.items()}

    @FUZZ
    @given(st.sampled_from(sorted(records)), st.data())
    def run(key, data):
        changed = dict(meta)
        changed[key] = data.draw(record_text(records[key]))
        path = work / "pipe.safetensors"
        save_file({"x": torch.zeros(2)}, path, metadata=changed)
        _outcome(read_single_file_metadata, path, path.stat().st_size)

    run()

    @settings(FUZZ, max_examples=EXAMPLES // 2)
    @given(mutated(seed, (0, _header_end(seed)), safetensors=True))
    def raw(data):
        _fuzz(work, "pipe.safetensors", data, read_single_file_metadata)

    raw()


@pytest.mark.parametrize("kind", ["png_ldm", "png_a1111"])
def test_fuzz_read_generation(seeds, work, kind):
    seed = seeds[kind]
    rss = _peak_rss_kb()

    @FUZZ
    @given(mutated(seed, _png_text_region(seed)))
    def raw(data):
        _fuzz(work, "in.png", data, read_generation)

    raw()
    assert _peak_rss_kb() - rss < _RSS_BUDGET_KB


def test_fuzz_read_generation_record_and_parameters(work):
    """The values inside the text chunks: ldm's JSON record with any value replaced, A1111 text with
    numbers and separators spliced in."""
    request = GenerationRequest(prompt="a red circle", steps=3, seed=7).to_dict()
    del request["num_images"]
    record = {**request, "model_name": "demo", "loras": {"style": "0123abcd"}, "batch": [0, 1]}
    base_text = "a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, Eta: 0"
    image = Image.new("RGB", (8, 8))

    @FUZZ
    @given(record_text(record), st.text(max_size=40), st.integers(0, len(base_text)), st.booleans())
    def run(new_record, splice, at, use_record):
        path = work / "chunks.png"
        path.unlink(missing_ok=True)
        text = base_text[:at] + splice + base_text[at:]
        save_png(image, path, text, {"ldm": new_record} if use_record else None)
        _outcome(read_generation, path, path.stat().st_size)

    run()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- special files: never a hang

READERS = {
    "read_state_dict (.safetensors)": ("m.safetensors", read_state_dict),
    "read_state_dict (.ckpt)": ("m.ckpt", read_state_dict),
    "load_lora": ("l.safetensors", lambda p: load_lora(UNet(_micro_config()), p)),
    "single-file metadata": ("p.safetensors", read_single_file_metadata),
    "read_generation": ("i.png", read_generation),
}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("special", ["fifo", "socket", "folder", "/dev/zero"])
def test_special_files_are_refused_in_one_line(reader, special, tmp_path):
    name, read = READERS[reader]
    if special == "/dev/zero":
        path = tmp_path / name
        path.symlink_to("/dev/zero")  # the reader's own suffix, so that no suffix check saves it
    else:
        path = tmp_path / name
        if special == "fifo":
            os.mkfifo(path)
        elif special == "folder":
            path.mkdir()
        else:
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(str(path))
    with _no_hang(), pytest.raises(ValueError) as e:
        read(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    if special != "folder":
        assert "not a regular file" in message


def test_a_file_swapped_for_a_fifo_after_the_check_does_not_hang(tmp_path, monkeypatch):
    """The check is made again on the opened descriptor (opened non-blocking): a FIFO put in place between
    the stat and the open is refused too, not waited on."""
    import ldm.formats.metadata as metadata

    monkeypatch.setattr(metadata, "check_regular", lambda path: 0)  # as if the stat had seen a regular file
    fifo = tmp_path / "race.safetensors"
    os.mkfifo(fifo)
    for read in (read_state_dict, read_generation, read_single_file_metadata):
        with _no_hang(), pytest.raises(ValueError, match="not a regular file but a FIFO"):
            read(fifo)
