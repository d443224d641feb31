"""One request object: GenerationRequest's validation, the PNG metadata written from it and read back into
it, and `txt2img --from-png` regenerating an image bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_main
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.cli import txt2img
from ldm.outputs import read_generation
from ldm.pipelines.request import GenerationRequest

# --------------------------------------------------------------------------- the request


def test_names_are_normalised_and_round_trip():
    r = GenerationRequest(prompt="a cat", sampler="DPM++ 2M", schedule="Karras", steps=20)
    assert (r.sampler, r.schedule) == ("dpmpp_2m", "karras")
    assert GenerationRequest(prompt="x", sampler="dpmpp_2m_karras").schedule == "karras"
    assert GenerationRequest(prompt="x", sampler="DPM++ 2M SDE Karras").sampler == "dpmpp_2m_sde"
    assert GenerationRequest.from_dict(r.to_dict()) == r
    assert r.replace(steps=5).steps == 5 and r.steps == 20
    with pytest.raises(ValueError, match="unknown generation parameter 'stpes'"):
        r.replace(stpes=5)
    with pytest.raises(ValueError, match="unknown generation parameter 'foo'"):
        GenerationRequest.from_dict({"prompt": "x", "foo": 1})


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(prompt=None), "prompt must be a string"),
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(steps=2.5), "steps must be an integer >= 1"),
        (dict(guidance_scale=-1), "guidance_scale must be >= 0"),
        (dict(guidance_scale=float("inf")), "guidance_scale must be >= 0"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be >= 0"),
        (dict(guidance_scale="7"), "guidance_scale must be >= 0"),
        (dict(guidance_rescale=2), "guidance_rescale must be in 0..1"),
        (dict(eta=-0.5), "eta must be >= 0"),
        (dict(num_images=0), "num_images must be >= 1"),
        (dict(num_images=1.5), "num_images must be >= 1"),
        (dict(seed=-1), "seed must be an integer in 0 .. 2\\*\\*32-1"),
        (dict(seed=2**64), "seed must be an integer"),
        (dict(seed=2**32), "the CPU generator keeps 32 bits"),
        (dict(seed=2**32 - 1, num_images=2), "for every image"),
        (dict(height=60), "height 60 must be a positive multiple of 8"),
        (dict(width=0), "width 0 must be a positive multiple of 8"),
        (dict(height="64"), "height '64' must be a positive multiple of 8"),
        (dict(clip_skip=0), "clip_skip must be an integer >= 1"),
        (dict(negative_prompt=["a", "b"]), "2 negative prompts for 1 prompts"),
        (dict(sampler="nope"), "unknown sampler 'nope'; use one of ddim, plms"),
        (dict(schedule="nope"), "unknown schedule 'nope'; use one of default, karras"),
        (dict(sampler="ddim", schedule="karras"), "schedule 'karras' is not available for sampler 'ddim'"),
        (dict(sampler="euler_a", eta=0.5), "sampler 'euler_a' takes no eta"),
        (dict(sampler="dpmpp_2m_karras", schedule="exponential"), "give one"),
    ],
)
def test_bad_fields_are_one_line_errors(fields, message):
    fields = {"prompt": "a cat", **fields}
    with pytest.raises(ValueError, match=message) as e:
        GenerationRequest(**fields)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- --from-png


def _run(argv, capsys):
    return run_main(txt2img.main, argv, capsys)


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).copy()


def _record(path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.text["ldm"])


BASE = ["--prompt", "a red circle", "--negative-prompt", "blue", "--steps", "3", "--guidance", "4.5"]


def test_from_png_regenerates_bit_for_bit(tiny_sd_folder, tmp_path, capsys):
    """A PNG written by txt2img, fed back with --from-png, gives the same pixels: for a lone image, for
    image 1 of a batch of 2 (regenerated in its batch), and with a stochastic sampler and a schedule."""
    out = tmp_path / "out"
    common = ["--weights", str(tiny_sd_folder), "--out", str(out)]
    code, stdout, stderr = _run([*common, *BASE, "--seed", "7"], capsys)
    assert code == 0, stderr
    first = Path(stdout.split()[0])
    code, stdout, stderr = _run([*common, "--from-png", str(first)], capsys)
    assert code == 0, stderr
    again = Path(stdout.split()[0])
    assert again != first and again.name.endswith("-7.png")
    assert np.array_equal(_pixels(again), _pixels(first))
    assert {k: v for k, v in _record(again).items()} == _record(first)

    code, stdout, stderr = _run(
        [*common, *BASE, "--seed", "20", "--n", "2", "--batch-size", "2", "--sampler", "DPM++ 2M SDE Karras"], capsys
    )
    assert code == 0, stderr
    second_of_batch = Path(stdout.split()[1])
    record = _record(second_of_batch)
    assert (record["sampler"], record["schedule"], record["batch"]) == ("dpmpp_2m_sde", "karras", [1, 2])
    with Image.open(second_of_batch) as im:
        assert "Sampler: DPM++ 2M SDE, Schedule type: Karras," in im.text["parameters"]
    code, stdout, stderr = _run([*common, "--from-png", str(second_of_batch)], capsys)
    assert code == 0, stderr
    assert len(stdout.split()) == 1  # only the image asked for is saved, not its batch
    again = Path(stdout.split()[0])
    assert again.name.endswith("-21.png")
    assert np.array_equal(_pixels(again), _pixels(second_of_batch))


def test_from_png_flags_override_the_file(tiny_sd_folder, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--weights", str(tiny_sd_folder), "--out", str(out)]
    code, stdout, _ = _run([*common, *BASE, "--seed", "3"], capsys)
    source = Path(stdout.split()[0])
    code, stdout, stderr = _run([*common, "--from-png", str(source), "--steps", "2", "--seed", "5"], capsys)
    assert code == 0, stderr
    record = _record(Path(stdout.split()[0]))
    assert (record["steps"], record["seed"], record["prompt"], record["guidance_scale"]) == (
        2,
        5,
        "a red circle",
        4.5,
    )
    assert record["negative_prompt"] == "blue"


def _a1111_png(path: Path, parameters: str) -> Path:
    info = PngInfo()
    info.add_text("parameters", parameters)
    Image.new("RGB", (64, 64)).save(path, pnginfo=info)
    return path


def test_from_png_reads_a1111_parameters(tiny_sd_folder, tmp_path, capsys):
    """A PNG ldm did not write (A1111's `parameters` only): its values are used, fields ldm has no setting for
    are reported once, on one line."""
    png = _a1111_png(
        tmp_path / "a1111.png",
        "a red circle, (detailed)\nNegative prompt: blue\n"
        "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 64x64, "
        "Model hash: 45dee52b00, Model: sd15, Clip skip: 2, Hires upscale: 1.5, Hires steps: 2, "
        "ADetailer model: face_yolov8n.pt, ADetailer confidence: 0.3, Version: v1.9.4",
    )
    g = read_generation(png)
    assert g.source == "parameters"
    r = g.request
    assert (r.prompt, r.negative_prompt, r.steps, r.sampler, r.schedule) == (
        "a red circle, (detailed)",
        "blue",
        3,
        "dpmpp_2m",
        "karras",
    )
    assert (r.guidance_scale, r.seed, r.width, r.height, r.clip_skip) == (6.5, 1234, 64, 64, 2)
    assert (r.hires_scale, r.hires_steps, r.hires_upscaler) == (1.5, 2, "latent")  # read since issue 15
    assert g.ignored == ["ADetailer model: face_yolov8n.pt", "ADetailer confidence: 0.3"]
    assert g.settings["model_sha256"] == "45dee52b00"

    code, stdout, stderr = _run(
        ["--weights", str(tiny_sd_folder), "--out", str(tmp_path / "out"), "--from-png", str(png)], capsys
    )
    assert code == 0, stderr
    notes = [line for line in stderr.splitlines() if line.startswith("note:")]
    assert any("not used" in n and "ADetailer model: face_yolov8n.pt; ADetailer confidence: 0.3" in n for n in notes)
    assert len([n for n in notes if "not used" in n]) == 1
    assert any("was made with model sd15" in n for n in notes)
    record = _record(Path(stdout.split()[0]))
    assert (record["sampler"], record["schedule"], record["seed"], record["clip_skip"]) == (
        "dpmpp_2m",
        "karras",
        1234,
        2,
    )


@pytest.mark.parametrize(
    "parameters, message",
    [
        ("x\nSteps: 3, Sampler: DPM++ 2S a, CFG scale: 7, Seed: 1", r"Sampler: 'DPM\+\+ 2S a': unknown sampler"),
        ("x\nSteps: 3, Sampler: Euler, Schedule type: SGM Uniform, CFG scale: 7", "unknown schedule 'SGM Uniform'"),
        ("x\nSteps: 3, Sampler: DDIM, Schedule type: Karras, CFG scale: 7", "not available for sampler 'ddim'"),
        ("x\nSteps: 3, Sampler: Euler, CFG scale: 7, Size: 60x64", "width 60 must be a positive multiple of 8"),
        ("x\nSteps: 0, Sampler: Euler, CFG scale: 7", "steps must be an integer >= 1"),
    ],
)
def test_from_png_refuses_unsupported_values(parameters, message, tiny_sd_folder, tmp_path, capsys):
    png = _a1111_png(tmp_path / "in.png", parameters)
    with pytest.raises(ValueError, match=message):
        read_generation(png)
    code, stdout, stderr = _run(
        ["--weights", str(tmp_path / "never-loaded"), "--from-png", str(png), "--out", str(tmp_path / "out")], capsys
    )
    # --weights does not exist: the PNG's error comes first only if it is checked before any loading
    assert code == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_from_png_without_parameters(tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    for path, message in ((plain, "no generation parameters"), (tmp_path / "missing.png", "not found")):
        code, stdout, stderr = _run(["--from-png", str(path), "--out", str(tmp_path / "out")], capsys)
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1


def test_from_png_needs_the_loras_it_was_made_with(tmp_path, capsys):
    png = _a1111_png(tmp_path / "in.png", 'x\nSteps: 3, Sampler: Euler, CFG scale: 7, Lora hashes: "style: 0123abcd"')
    code, _, stderr = _run(["--from-png", str(png), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "made with LoRA style (0123abcd); pass the file(s) with --lora FILE" in stderr


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--sampler", "nope"], "invalid choice: 'nope'"),
        (["--schedule", "nope"], "invalid choice: 'nope'"),
        (["--sampler", "ddim", "--schedule", "karras"], "schedule 'karras' is not available for sampler 'ddim'"),
        (["--sampler", "lcm", "--eta", "0.3"], "--eta 0.3 applies to --sampler ddim only"),
        (["--guidance-rescale", "1.5"], "--guidance-rescale 1.5 must be in 0..1"),
        ([], "--prompt is required (or --from-png FILE)"),
    ],
)
def test_sampler_and_schedule_refused_before_loading(args, problem, tmp_path, capsys):
    """Exit 2 with one line naming what is accepted, before any model is touched (the weights file is not
    a checkpoint: loading it would be a different error)."""
    bad = tmp_path / "not-a-model.safetensors"
    bad.write_bytes(b"x")
    prompt = [] if not args else ["--prompt", "x"]
    code, stdout, stderr = _run(["--weights", str(bad), *prompt, *args, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and stdout == ""
    errors = [line for line in stderr.splitlines() if "error: " in line]  # argparse prints its usage first
    assert len(errors) == 1 and problem in errors[0]


def test_a1111_sampler_and_schedule_names_accepted(tiny_sd_folder, tmp_path, capsys):
    code, stdout, stderr = _run(
        [
            "--weights",
            str(tiny_sd_folder),
            "--prompt",
            "x",
            "--steps",
            "2",
            "--sampler",
            "Euler",
            "--schedule",
            "Exponential",
            "--seed",
            "1",
            "--out",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert code == 0, stderr
    record = _record(Path(stdout.split()[0]))
    assert (record["sampler"], record["schedule"]) == ("euler", "exponential")
