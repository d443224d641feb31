"""ldm.outputs (A1111 parameters text, PNG metadata, never-overwriting saves) and scripts/txt2img.py."""

import json
import os
from pathlib import Path

import pytest
from conftest import run_main
from PIL import Image

from ldm.cli import txt2img
from ldm.outputs import (
    a1111_parameters,
    check_output_folder,
    file_sha256,
    next_free_path,
    parse_parameters,
    save_next_png,
    save_png,
)

# --------------------------------------------------------------------------- parameters text


def test_a1111_format_and_round_trip():
    text = a1111_parameters(
        "a photo of a cat",
        "blurry",
        25,
        "ddim",
        7.5,
        1234,
        512,
        768,
        "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
        "v1-5-pruned-emaonly",
    )
    assert text == (
        "a photo of a cat\nNegative prompt: blurry\n"
        "Steps: 25, Sampler: DDIM, CFG scale: 7.5, Seed: 1234, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly"
    )
    d = parse_parameters(text)
    assert d["prompt"] == "a photo of a cat" and d["negative_prompt"] == "blurry"
    assert (d["steps"], d["sampler"], d["guidance"], d["seed"]) == (25, "ddim", 7.5, 1234)
    assert (d["width"], d["height"], d["model_hash"], d["model_name"]) == (
        512,
        768,
        "6ce0161689",
        "v1-5-pruned-emaonly",
    )
    assert a1111_parameters(**d) == text


def test_round_trip_awkward_values():
    text = a1111_parameters(
        "line one, with comma\nline two: colon",
        "bad, ugly\nworse",
        1,
        "ddim",
        7.0,
        0,
        64,
        64,
        None,
        'my "model", v2',
        eta=0.25,
        clip_skip=2,
        rng="CPU",
        extra={"Foo-bar": "x:y"},
    )
    assert "Negative prompt: bad, ugly\nworse\n" in text
    assert "CFG scale: 7," in text and "Eta DDIM: 0.25" in text and "Clip skip: 2" in text
    assert "Model hash" not in text
    d = parse_parameters(text)
    assert d["prompt"] == "line one, with comma\nline two: colon"
    assert d["negative_prompt"] == "bad, ugly\nworse"
    assert d["model_name"] == 'my "model", v2' and d["eta"] == 0.25 and d["clip_skip"] == 2
    assert d["extra"] == {"Foo-bar": "x:y"}
    assert a1111_parameters(**d) == text


def test_defaults_left_out_like_a1111():
    text = a1111_parameters("cat", "", 20, "ddim", 7.5, 1, 512, 512, None, None, eta=0.0, clip_skip=1)
    assert text == "cat\nSteps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 512x512"
    d = parse_parameters(text)
    assert d["negative_prompt"] == "" and d["eta"] is None and d["clip_skip"] is None
    assert a1111_parameters(**d) == text


def test_parse_a1111_written_text():
    text = (
        "girl with a beret, (detailed)\nNegative prompt: ugly, [blurry]\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 965400086, Size: 512x512, "
        'Model hash: 45dee52b00, Model: sd15, Lora hashes: "a: 1234, b: 5678", Version: v1.9.4'
    )
    d = parse_parameters(text)
    assert d["prompt"] == "girl with a beret, (detailed)" and d["negative_prompt"] == "ugly, [blurry]"
    assert (d["sampler"], d["schedule"], d["guidance"], d["seed"]) == ("dpmpp_2m", "karras", 7.0, 965400086)
    assert d["extra"] == {"Lora hashes": "a: 1234, b: 5678", "Version": "v1.9.4"}
    # A1111 < 1.6 put the schedule into the sampler's name
    old = parse_parameters("cat\nSteps: 20, Sampler: DPM++ 2M SDE Karras, CFG scale: 7, Seed: 1")
    assert (old["sampler"], old["schedule"]) == ("dpmpp_2m_sde", "karras")
    kept = parse_parameters("cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1")
    assert (kept["sampler"], kept["schedule"]) == ("dpmpp_2m_karras", None)  # the alias ldm still accepts


def test_bad_extra_key():
    with pytest.raises(ValueError, match="extra parameter"):
        a1111_parameters("x", extra={"Bad: key": 1})
    with pytest.raises(ValueError, match="already written"):
        a1111_parameters("x", steps=2, extra={"Steps": 3})


# --------------------------------------------------------------------------- files


def test_file_sha256(tmp_path):
    import hashlib

    data = os.urandom(3 * 1024 + 17)
    (tmp_path / "m.safetensors").write_bytes(data)
    assert file_sha256(tmp_path / "m.safetensors", chunk_size=1000) == hashlib.sha256(data).hexdigest()
    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(data[:100])
    assert file_sha256(tmp_path / "pipe") == hashlib.sha256(data[:100]).hexdigest()
    with pytest.raises(FileNotFoundError):
        file_sha256(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot hash"):
        file_sha256(tmp_path / "empty")


def _image(color=(255, 0, 0)):
    return Image.new("RGB", (16, 8), color)


def test_save_png_metadata_round_trip(tmp_path):
    text = a1111_parameters("a café at night, ☕", "blur", 3, "ddim", 5.0, 7, 16, 8, "ab" * 32, "m")
    path = save_png(
        _image(), tmp_path / "sub" / "x.png", text, {"ldm": {"seed": 7, "prompt": "a café"}, "Software": "t"}
    )
    with Image.open(path) as im:
        assert im.size == (16, 8) and im.getpixel((0, 0)) == (255, 0, 0)
        assert im.text["parameters"] == text
        assert json.loads(im.text["ldm"]) == {"seed": 7, "prompt": "a café"}
        assert im.text["Software"] == "t"
    assert parse_parameters(Image.open(path).text["parameters"])["prompt"] == "a café at night, ☕"
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.png"]  # no temporary file left


def test_save_png_never_overwrites(tmp_path):
    target = tmp_path / "x.png"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="not overwriting"):
        save_png(_image(), target, "p")
    assert target.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_next_free_path(tmp_path):
    assert next_free_path(tmp_path / "new", "{index:05d}-{seed}", seed=4) == tmp_path / "new" / "00000-4.png"
    for name in ("00002-10.png", "00007-3.png", "notes.txt", "123abc.png", ".00099-1.png.tmp"):
        (tmp_path / name).write_bytes(b"x")
    assert next_free_path(tmp_path, "{index:05d}-{seed}", seed=1).name == "00008-1.png"
    (tmp_path / "00008.png").write_bytes(b"x")
    assert next_free_path(tmp_path).name == "00009.png"
    # a pattern whose names do not start with the index: existing names are skipped, never reused
    (tmp_path / "img9.png").write_bytes(b"x")
    assert next_free_path(tmp_path, "img{index}").name == "img10.png"


def test_save_next_png_takes_next_name_when_taken(tmp_path, monkeypatch):
    import ldm.outputs as images

    real = images.next_free_path
    calls = []

    def racing(folder, stem_pattern, suffix=".png", **fields):
        path = real(folder, stem_pattern, suffix, **fields)
        if not calls:  # another writer takes the first name between choosing and writing it
            path.write_bytes(b"other")
        calls.append(path)
        return path

    monkeypatch.setattr(images, "next_free_path", racing)
    path = save_next_png(_image(), tmp_path, "p", stem_pattern="{index:05d}-{seed}", seed=5)
    assert path.name == "00001-5.png" and (tmp_path / "00000-5.png").read_bytes() == b"other"


def test_check_output_folder(tmp_path):
    assert check_output_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # nothing created
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ValueError, match="existing file"):
        check_output_folder(tmp_path / "f")
    with pytest.raises(ValueError, match="existing file"):
        check_output_folder(tmp_path / "f" / "sub")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_check_output_folder_probe_fails(tmp_path, monkeypatch):
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # what a read-only mount does, also for root
    with pytest.raises(ValueError, match="not writable .*Permission denied"):
        check_output_folder(tmp_path)


# --------------------------------------------------------------------------- the script


def _run(argv, capsys):
    return run_main(txt2img.main, argv, capsys)


def test_generates_pngs_with_metadata(tiny_sd_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000-100.png").write_bytes(b"keep me")  # an existing file: never overwritten
    argv = [
        "--weights",
        str(tiny_sd_folder),
        "--prompt",
        "a red circle, top left",
        "--negative-prompt",
        "blue",
        "--steps",
        "2",
        "--guidance",
        "5",
        "--seed",
        "100",
        "--n",
        "3",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "--clip-skip",
        "2",
    ]
    code, stdout, stderr = _run(argv, capsys)
    assert code == 0, stderr
    written = [Path(line) for line in stdout.split()]
    assert [p.name for p in written] == ["00001-100.png", "00002-101.png", "00003-102.png"]
    assert (out / "00000-100.png").read_bytes() == b"keep me"
    model_hash = file_sha256(tiny_sd_folder)
    for i, path in enumerate(written):
        with Image.open(path) as im:
            assert im.size == (64, 64)
            d = parse_parameters(im.text["parameters"])
            record = json.loads(im.text["ldm"])
        assert d == dict(
            prompt="a red circle, top left",
            negative_prompt="blue",
            steps=2,
            sampler="ddim",
            guidance=5.0,
            seed=100 + i,
            width=64,
            height=64,
            model_hash=model_hash[:10],
            model_name=tiny_sd_folder.name,
            eta=None,
            clip_skip=2,
            rng="CPU",
            extra={},
            schedule=None,
        )
        assert record["seed"] == 100 + i and record["model_sha256"] == model_hash
        assert record["dtype"] == "float32" and record["device"] == "cpu"

    # image i regenerated alone with seed+i is the same image (batching does not change seeds)
    code, stdout, _ = _run(
        [*argv[: argv.index("--seed")], "--seed", "101", "--n", "1", "--out", str(out), "--clip-skip", "2"], capsys
    )
    assert code == 0
    again = Path(stdout.split()[0])
    assert again.name == "00004-101.png"
    import numpy as np

    a = np.asarray(Image.open(again), dtype=np.int16)
    b = np.asarray(Image.open(written[1]), dtype=np.int16)
    assert np.abs(a - b).max() <= 1


def test_random_seed_is_printed(tiny_sd_folder, tmp_path, capsys):
    code, stdout, stderr = _run(
        [
            "--weights",
            str(tiny_sd_folder),
            "--prompt",
            "x",
            "--steps",
            "1",
            "--out",
            str(tmp_path),
            "--height",
            "32",
            "--width",
            "48",
        ],
        capsys,
    )
    assert code == 0
    seed = int(stderr.split("seed: ")[1].split()[0])
    path = Path(stdout.split()[0])
    assert path.name == f"00000-{seed}.png"
    with Image.open(path) as im:
        assert im.size == (48, 32)
        assert parse_parameters(im.text["parameters"])["seed"] == seed


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--height", "60"], "--height 60 must be a positive multiple of 8"),
        (["--width", "0"], "--width 0 must be a positive multiple of 8"),
        (["--width", "-8"], "--width -8 must be a positive multiple of 8"),
        (["--steps", "0"], "--steps 0 must be >= 1"),
        (["--guidance", "-1"], "--guidance -1.0 must be >= 0"),
        (["--eta", "-0.5"], "--eta -0.5 must be >= 0"),
        (["--eta", "0.5", "--sampler", "euler_a"], "--eta 0.5 applies to --sampler ddim only"),
        (["--n", "0"], "--n 0 must be >= 1"),
        (["--clip-skip", "0"], "--clip-skip 0 must be >= 1"),
        (["--seed", "-5"], "--seed -5 must be in"),
        (["--device", "gpu"], "--device gpu: use auto"),
        (["--weights", "MISSING"], "MISSING: not found"),
        (["--out", "FILE"], "is an existing file"),
        (["--out", "FILE/sub"], "is an existing file"),
        (["--sampler", "nope"], "invalid choice: 'nope'"),
        (["--dtype", "int8"], "invalid choice: 'int8'"),
    ],
)
def test_refusals(args, problem, tiny_sd_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_bytes(b"x")
    args = [a.replace("MISSING", str(tmp_path / "missing.safetensors")) for a in args]
    code, stdout, stderr = _run(["--weights", str(tiny_sd_folder), "--prompt", "x", "--out", "outputs", *args], capsys)
    assert code == 2
    assert problem.replace("MISSING", str(tmp_path / "missing.safetensors")) in stderr
    assert stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]  # nothing written, no folder created


def test_model_load_error_exits_2(tmp_path, capsys):
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    code, stdout, stderr = _run(
        ["--weights", str(tmp_path / "bad.safetensors"), "--prompt", "x", "--out", str(tmp_path / "out")], capsys
    )
    assert code == 2 and "bad.safetensors" in stderr and stderr.startswith("error: ")
    assert stdout == "" and not (tmp_path / "out").exists()


def test_no_weights_without_demo_model(tmp_path, capsys, monkeypatch):
    import ldm.pipelines.pipeline

    monkeypatch.setattr(ldm.pipelines.pipeline, "DEMO_MODEL", tmp_path / "no-demo" / "model.safetensors")
    code, stdout, stderr = _run(["--prompt", "x", "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert "--weights" in stderr and "demo model" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert stdout == "" and not (tmp_path / "out").exists()


def test_help_shows_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no line wrapping inside "(default: ...)"
    code, stdout, _ = _run(["--help"], capsys)
    assert code == 0
    for text in (
        "--prompt",
        "--negative-prompt",
        "--weights",
        "--steps",
        "(default: 25)",
        "--guidance",
        "(default: the model's recommended value",
        "--seed",
        "--height",
        "--width",
        "--n",
        "--eta",
        "--sampler",
        "ddim",
        "--clip-skip",
        "--out",
        "(default: outputs)",
        "--device",
        "--dtype",
    ):
        assert text in stdout
