"""Bad input and faults on the generation path fail cleanly: one line, exit 2 from the CLI, ValueError from the
Python API, nothing written, nothing silently wrong (issue 14: validation before heavy imports, memory
estimates, output sanity, I/O failures, temporaries of killed runs)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_main
from PIL import Image

from ldm.cli import txt2img
from ldm.formats.atomic import remove_stale_temporaries
from ldm.pipelines import memory
from ldm.pipelines.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]


def _run(argv, capsys):
    return run_main(txt2img.main, argv, capsys)


@pytest.fixture(scope="module")
def pipe(tiny_sd_folder):
    return Pipeline.from_pretrained(tiny_sd_folder)


# --------------------------------------------------------------------------- validation before heavy imports


@pytest.mark.parametrize(
    "args",
    [
        ["--steps", "0"],
        ["--seed", str(2**32)],
        ["--sampler", "nope"],
        ["--sampler", "ddim", "--schedule", "karras"],
        ["--eta", "0.5", "--sampler", "euler"],
        ["--height", "100000", "--width", "100000"],
    ],
)
def test_argument_errors_come_before_torch_is_imported(args, tmp_path):
    code = (
        "import sys\nfrom ldm.cli import txt2img\n"
        f"rc = txt2img.main({['--prompt', 'x', '--out', str(tmp_path / 'out'), *args]!r})\n"
        "print('torch' in sys.modules, rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if result.returncode == 2:  # argparse's own refusal (SystemExit(2)) happens before any import too
        assert "error:" in result.stderr
        return
    assert result.stdout.split() == ["False", "2"], (result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_seeds_are_32_bit_because_the_generator_is():
    """torch's CPU generator keeps 32 bits of a seed: 2**32 + k draws k's noise, so ldm refuses seeds >= 2**32
    rather than advertise different images that are not."""
    a = torch.randn(8, generator=torch.Generator().manual_seed(5))
    b = torch.randn(8, generator=torch.Generator().manual_seed(2**32 + 5))
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- memory


def test_memory_estimate_is_calibrated_and_refuses_huge_images(monkeypatch):
    small = memory.estimate(512, 512, 1)
    assert 0.5e9 < small.total < 3e9  # SD1.5 at 512 px: ~0.3 GB U-Net + ~0.9 GB VAE decode
    tiled = memory.estimate(1024, 1024, 1)
    assert tiled.vae < memory.estimate(768, 768, 1).vae * 2  # tiled decoding bounds the VAE's part
    monkeypatch.setattr(memory, "available_memory", lambda device="cpu": 8 * 10**9)
    memory.check(small, "512 px")  # fits
    with pytest.raises(ValueError, match=r"needs about .* TB of memory .* this machine has 8.0 GB available"):
        memory.check(memory.estimate(100_000, 100_000), "--height 100000 --width 100000")


def test_python_api_refuses_before_allocating(pipe, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device="cpu": 10**9)
    with pytest.raises(ValueError, match="image\\(s\\) of 20000x20000 needs about"):
        pipe("x", height=20000, width=20000, steps=1, progress=False)


def test_crafted_default_size_is_checked_too(pipe, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device="cpu": 10**9)
    monkeypatch.setattr(pipe, "default_size", (40000, 40000))
    with pytest.raises(ValueError, match="40000x40000 needs about"):
        pipe("x", steps=1, progress=False)


# --------------------------------------------------------------------------- output sanity


@pytest.mark.parametrize("fields", [dict(guidance_scale=1e30), dict(eta=1e30)])
def test_nan_images_are_an_error_not_a_black_png(pipe, fields):
    with pytest.raises(ValueError, match="NaN/inf values .*nothing was saved.*likely cause: (guidance|eta)"):
        pipe("x", steps=3, seed=1, progress=False, output_type="np", **fields)


def test_nan_from_the_cli_writes_nothing(tiny_sd_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = _run(
        ["--weights", str(tiny_sd_folder), "--prompt", "x", "--steps", "2", "--guidance", "1e30", "--out", str(out)],
        capsys,
    )
    assert code == 2 and stdout == "" and "NaN/inf" in stderr and "guidance_scale" in stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(guidance_scale=float("inf")), "guidance_scale must be >= 0"),
        (dict(eta=float("nan")), "eta must be >= 0"),
        (dict(height="64"), "height '64' must be a positive multiple of 8"),
        (dict(height=0), "height 0 must be a positive multiple of 8"),
        (dict(num_images=1.5), "num_images must be >= 1"),
        (dict(seed=2**64), "seed must be an integer in 0 .. 2\\*\\*32-1"),
    ],
)
def test_python_api_validates(pipe, fields, message):
    with pytest.raises(ValueError, match=message):
        pipe("x", steps=1, progress=False, **fields)
    with pytest.raises(ValueError, match="give a prompt"):
        pipe(None, steps=1, progress=False)


# --------------------------------------------------------------------------- I/O failures


def test_disk_full_while_saving_is_one_line_and_leaves_nothing(tiny_sd_folder, tmp_path, capsys, monkeypatch):
    def no_space(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half a png")  # a partial temporary, as a full disk leaves it
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", no_space)
    out = tmp_path / "out"
    code, stdout, stderr = _run(
        ["--weights", str(tiny_sd_folder), "--prompt", "x", "--steps", "1", "--seed", "1", "--out", str(out)], capsys
    )
    assert code == 2 and stdout == ""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot write") and "No space left on device" in errors[0]
    assert not out.exists()  # the folder this run would have created is not left behind, empty


def test_temporaries_of_killed_runs_are_removed_and_nothing_else(tiny_sd_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    stale_file = out / f".00000-1.png.ldm-tmp-{pid}-abcd.tmp"
    stale_dir = out / f".export.ldm-tmp-{pid}-efgh"
    live = out / f".00001-2.png.ldm-tmp-{os.getpid()}-ijkl.tmp"  # a writer still running
    for path in (stale_file, live, out / ".keep-me", out / "notes.txt"):
        path.write_bytes(b"x")
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"x" * 100)
    assert sorted(p.name for p in remove_stale_temporaries(out)) == sorted([stale_file.name, stale_dir.name])
    stale_file.write_bytes(b"x")  # and the CLI does it when it starts writing into a folder
    code, stdout, stderr = _run(
        ["--weights", str(tiny_sd_folder), "--prompt", "x", "--steps", "1", "--seed", "3", "--out", str(out)], capsys
    )
    assert code == 0, stderr
    assert "removed 1 temporary file(s)" in stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([live.name, ".keep-me", "notes.txt", "00000-3.png"])
