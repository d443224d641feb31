"""Bad input to compare_diffusers and eval_shapes (issue 14): exit 2, one line on stderr, nothing written.

Argument errors are refused before torch is imported (checked in a fresh process: it reports whether torch
was loaded), so they come back in well under a second; inputs that need the file read (garbage weights, a
model whose schedule is shorter than --steps) are refused before anything is generated or written.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ldm.cli import compare_diffusers, eval_shapes

# runs a subcommand and reports on stdout whether torch got imported
CHILD = r"""
import sys
from ldm.cli import run
try:
    rc = run(sys.argv[1], sys.argv[2:])
except SystemExit as e:
    rc = e.code
print("torch loaded" if "torch" in sys.modules else "torch not loaded")
sys.exit(rc)
"""


def _refused_fast(tmp_path: Path, command: str, argv: list[str]) -> str:
    """Run `command argv` in a fresh process in tmp_path; assert exit 2, one 'error:' line, torch never
    imported, tmp_path unchanged. Returns the error line."""
    before = sorted(tmp_path.rglob("*"))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, command, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    lines = done.stderr.splitlines()
    assert done.returncode == 2, (argv, done.stdout, done.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), (argv, done.stderr)
    assert done.stdout.strip() == "torch not loaded", (argv, done.stdout)
    assert sorted(tmp_path.rglob("*")) == before, argv
    return lines[0]


def _refused(capsys, tmp_path: Path, main, argv: list[str]) -> str:
    """In this process (for inputs that need files read): exit 2, one 'error:' line, tmp_path unchanged."""
    before = sorted(tmp_path.rglob("*"))
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, argv
    assert len(lines) == 1 and lines[0].startswith("error:"), (argv, lines)
    assert sorted(tmp_path.rglob("*")) == before, argv
    return lines[0]


@pytest.fixture
def garbage(tmp_path):
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(1000))
    (tmp_path / "garbage.ckpt").write_text("not a checkpoint")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("x")
    return tmp_path


# --------------------------------------------------------------------------- compare_diffusers

COMPARE_BAD_FLAGS = [
    ["--threads", "-1"],
    ["--threads", "0"],
    ["--threads", str(10**20)],
    ["--threads", "two"],
    ["--seed", "-1"],
    ["--seed", str(2**32)],
    ["--seed", str(2**70)],
    ["--height", "0"],
    ["--height", "500"],
    ["--width", "-8"],
    ["--height", "100000"],
    ["--height", "8192", "--width", "8192", "--batch", "1024"],  # ~41 TB by the memory estimate
    ["--batch", "0"],
    ["--batch", "-3"],
    ["--timestep", "-1"],
    ["--timestep", "1000"],
    ["--repeats", "0"],
    ["--steps", "0"],
    ["--steps", "5000"],
    ["--guidance", "nan"],
    ["--guidance", "inf"],
    ["--guidance", "-1"],
    ["--preset", "sd99"],
    ["--device", "foo"],
    ["--unknown-flag"],
    ["--weights", "missing.safetensors"],
    ["--weights", "/dev/zero"],
    ["--weights", "/dev/zero", "--prompt", "a red circle"],
]


@pytest.mark.parametrize("argv", COMPARE_BAD_FLAGS, ids=" ".join)
def test_compare_refuses_bad_flags_before_importing_torch(tmp_path, argv):
    line = _refused_fast(tmp_path, "compare_diffusers", argv)
    flag = argv[0].lstrip("-")
    assert flag in line or "unrecognized" in line, line


@pytest.mark.parametrize(
    "argv",
    [
        ["--weights", "garbage.safetensors"],
        ["--weights", "garbage.ckpt"],
        ["--weights", "empty"],
        ["--weights", "garbage.safetensors", "--prompt", "a red circle"],
        ["--weights", "empty", "--prompt", "a red circle"],
    ],
    ids=" ".join,
)
def test_compare_refuses_unreadable_weights(garbage, capsys, monkeypatch, argv):
    monkeypatch.chdir(garbage)
    line = _refused(capsys, garbage, compare_diffusers.main, argv)
    assert argv[1] in line


# --------------------------------------------------------------------------- eval_shapes

EVAL_BAD_FLAGS = [
    ["--steps", "5000"],
    ["--steps", "0"],
    ["--seed", str(2**70)],
    ["--seed", str(2**32)],
    ["--seed", str(2**32 - 1), "--n", "2"],  # image 1 would use seed 2**32
    ["--seed", "-1"],
    ["--n", "0"],
    ["--batch-size", "0"],
    ["--guidance", "nan"],
    ["--guidance", "-2"],
    ["--device", "foo"],
    ["--dtype", "float8"],
    ["--json", "."],  # an existing folder
    ["--json", "a-file/r.json"],  # below a regular file
    ["--json", "/proc/ldm-test/r.json"],  # cannot be created (root included)
    ["--out", "a-file"],
    ["--out", "/proc/ldm-test"],
    ["--weights", "missing.safetensors"],
    ["--weights", "/dev/zero"],
]


@pytest.mark.parametrize("argv", EVAL_BAD_FLAGS, ids=" ".join)
def test_eval_shapes_refuses_bad_flags_before_the_evaluation(tmp_path, argv):
    if "/proc" in " ".join(argv) and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    (tmp_path / "a-file").write_text("x")
    line = _refused_fast(tmp_path, "eval_shapes", argv)
    assert argv[0].lstrip("-") in line, line


@pytest.mark.parametrize("weights", ["garbage.safetensors", "garbage.ckpt", "empty"])
def test_eval_shapes_refuses_unreadable_weights(garbage, capsys, monkeypatch, weights):
    monkeypatch.chdir(garbage)
    argv = ["--weights", weights, "--n", "1", "--json", "out/r.json"]
    assert weights in _refused(capsys, garbage, eval_shapes.main, argv)


def test_eval_shapes_refuses_a_batch_beyond_memory(tmp_path, capsys):
    """The model's size is known once it is read: the estimate is checked then, before any image."""
    argv = ["--n", str(10**8), "--batch-size", str(10**8), "--json", str(tmp_path / "r.json")]
    line = _refused(capsys, tmp_path, eval_shapes.main, argv)
    assert "--batch-size" in line and "of memory" in line and "available" in line, line


def test_eval_shapes_checks_steps_against_the_models_own_schedule(tiny_sd_folder, tmp_path, capsys):
    """A schedule of 100 timesteps: --steps 500 passes the flag check (1 .. 1000) and is refused once the
    model is read, before any image is made or any file written."""
    folder = Path(shutil.copytree(tiny_sd_folder, tmp_path / "short"))
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_train_timesteps": 100}))
    argv = ["--weights", str(folder), "--steps", "500", "--n", "1", "--json", str(tmp_path / "r.json")]
    line = _refused(capsys, tmp_path, eval_shapes.main, argv)
    assert "100 timesteps" in line, line


def test_eval_shapes_writes_its_results_whole_or_not_at_all(tmp_path, capsys, monkeypatch):
    """The files are written through atomic_write; a write that fails (no space) is one line, exit 2, the
    report still on stdout, and no file, temporary or new folder left behind."""
    import ldm.formats.atomic as atomic

    argv = ["--n", "1", "--steps", "1", "--out", str(tmp_path / "out"), "--json", str(tmp_path / "j" / "r.json")]
    assert eval_shapes.main(argv) == 0
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["contact_sheet.png", "j", "out", "r.json", "results.json"]
    assert json.loads((tmp_path / "j" / "r.json").read_text())["settings"]["n"] == 1

    def disk_full(path, write, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(atomic, "atomic_write", disk_full)
    other = tmp_path / "other"
    other.mkdir()
    argv = ["--n", "1", "--steps", "1", "--out", str(other / "out"), "--json", str(other / "j" / "r.json")]
    assert eval_shapes.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith("error: could not write the results") and "No space left" in lines[-1]
    assert "single object" in captured.out  # the report was printed before the writes
    assert list(other.iterdir()) == []
