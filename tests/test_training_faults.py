"""Training under faults: bad numbers refused at once, damaged checkpoints skipped or named, temporaries of
killed runs cleaned, retention that never removes the newest, and a run killed (SIGKILL) 10 times that ends
bit-identical to one never interrupted."""

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder
from safetensors.torch import load_file

from ldm.training.checkpoints import (
    CheckpointError,
    apply_retention,
    check_checkpoint,
    find_resume,
    list_checkpoints,
    remove_leftovers,
)
from ldm.training.config import TrainConfig
from ldm.training.loop import Trainer, train

ROOT = Path(__file__).resolve().parents[1]


def _cfg(out, base, data, **kw) -> TrainConfig:
    base_kw = dict(
        data=str(data),
        output_dir=str(out),
        mode="full",
        base=str(base),
        resolution=64,
        batch_size=4,
        max_steps=3,
        lr=1e-3,
        save_every=1,
        keep_checkpoints=0,
        validation_steps=2,
    )
    return TrainConfig(**{**base_kw, **kw})


def _argv(out, base, data, *extra) -> list[str]:
    return [
        "--data",
        str(data),
        "--base",
        str(base),
        "--resolution",
        "64",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--save-every",
        "1",
        "--validation-steps",
        "2",
        "--output-dir",
        str(out),
        *extra,
    ]


def _cli(argv, capsys) -> tuple[int, list[str], str]:
    """Exit code, the stderr lines that are not progress bars, stdout."""
    from ldm.cli import train as train_script

    code = train_script.main(argv)
    captured = capsys.readouterr()
    lines = [x for x in captured.err.splitlines() if x.strip() and "step/s" not in x and "it/s" not in x]
    return code, [x for x in lines if not x.startswith(("train ", "\r"))], captured.out


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --------------------------------------------------------------------------- numbers refused at once

BAD_FLAGS = [
    (["--keep-checkpoints", "-1"], "--keep-checkpoints -1 must be >= 1, or 0"),
    (["--num-workers", "-1"], "--num-workers -1 must be in 0..1024"),
    (["--max-steps", "100000000"], "--max-steps 100000000 must be >= 1 and at most 10,000,000"),
    (["--max-steps", "0"], "--max-steps 0 must be >= 1"),
    (["--stop-at", "9", "--max-steps", "5"], "--stop-at 9 must be <= max_steps 5"),
    (["--warmup-steps", "50", "--max-steps", "5"], "--warmup-steps 50 must be <= max_steps 5"),
    (["--validation-steps", "5000"], "--validation-steps 5000 must be in 1..1000"),
    (["--save-every", "0"], "--save-every 0 must be >= 1"),
    (["--log-every", "0"], "--log-every 0 must be >= 1"),
    (["--seed", str(2**70)], "--seed 1180591620717411303424 must be in 0.."),
    (["--lr", "nan"], "--lr nan must be > 0"),
    (["--lr", "inf"], "--lr inf must be > 0"),
    (["--caption-dropout", "1.5"], "--caption-dropout 1.5 must be in [0, 1]"),
    (["--ema-decay", "1"], "--ema-decay 1.0 must be 0 (off) or in (0, 1)"),
    (["--adam-beta2", "1"], "--adam-beta2 1.0 must be in [0, 1)"),
    (["--max-grad-norm", "-1"], "--max-grad-norm -1.0 must be >= 0"),
    (["--lora-rank", "0"], "--lora-rank 0 must be in 1..4096"),
    (["--lora-alpha", "-2"], "--lora-alpha -2.0 must be > 0"),
    (["--validation-guidance", "1e30"], "--validation-guidance 1e+30 must be in [0, 100]"),
    (["--resolution", "100000"], "--resolution 100000 must be a positive multiple of 8, at most 8192"),
    (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
    (["--snr-gamma=-inf"], "--snr-gamma -inf must be >= 0"),
]


@pytest.mark.parametrize("flags,expected", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_numeric_flags_refused_before_anything(tmp_path, capsys, flags, expected):
    out = tmp_path / "out"
    argv = ["--data", str(tmp_path / "data"), "--base", str(tmp_path / "none.safetensors"), "--output-dir", str(out)]
    code, errors, _ = _cli([*argv, *flags], capsys)
    assert code == 2
    assert len(errors) == 1 and errors[0].startswith("error: ") and expected in errors[0], errors
    assert not out.exists()


def test_argument_errors_answer_before_torch_is_imported(tmp_path):
    """A subprocess as users run it: exit 2, one line, torch never imported, well under a second."""
    out = tmp_path / "out"
    code = (
        "import sys\n"
        "from ldm.cli import train\n"
        f"rc = train.main(['--data', 'x', '--base', 'y', '--output-dir', {str(out)!r}, '--keep-checkpoints', '-1'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(rc)\n"
    )
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == ["error: --keep-checkpoints -1 must be >= 1, or 0 to keep every checkpoint"]
    assert elapsed < 1.0, elapsed
    assert not out.exists()


def test_too_few_images_refused_before_the_model_is_loaded(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", n=3)
    out = tmp_path / "out"
    # the base does not exist: the data is checked first, so the error names the batch size
    code, errors, _ = _cli(_argv(out, tmp_path / "none.safetensors", data, "--max-steps", "2"), capsys)
    assert code == 2 and len(errors) == 1 and "fewer than --batch-size 4" in errors[0], errors
    assert not out.exists()


# --------------------------------------------------------------------------- retention


def test_keep_checkpoints(tmp_path, tiny_train_base, capsys):
    data = make_image_folder(tmp_path / "data")
    for keep, expected in [("0", [1, 2, 3]), ("1", [3]), ("2", [2, 3])]:
        out = tmp_path / f"keep{keep}"
        code, _, _ = _cli(_argv(out, tiny_train_base, data, "--max-steps", "3", "--keep-checkpoints", keep), capsys)
        assert code == 0
        assert [int(p.name[5:]) for p in list_checkpoints(out)] == expected, keep
        assert all(check_checkpoint(p) for p in list_checkpoints(out))
    out = tmp_path / "keep-1"
    code, errors, _ = _cli(_argv(out, tiny_train_base, data, "--max-steps", "3", "--keep-checkpoints", "-1"), capsys)
    assert code == 2 and "--keep-checkpoints -1" in errors[0] and not out.exists()


def test_retention_never_removes_the_newest(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4, 9):
        (ckpts / f"step-{step:07d}").mkdir(parents=True)
    newest = ckpts / "step-0000004"
    removed = apply_retention(tmp_path, newest, keep=1)
    assert sorted(p.name for p in removed) == ["step-0000001", "step-0000002", "step-0000003"]
    # a later step left by an earlier trajectory is neither counted nor removed: reaching it replaces it
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000004", "step-0000009"]
    assert apply_retention(tmp_path, newest, keep=0) == []


# --------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory, tiny_train_base):
    """A finished 3-step run (EMA on) with checkpoints at steps 1, 2 and 3, copied afresh for each test."""
    root = tmp_path_factory.mktemp("three")
    data = make_image_folder(root / "data")
    train(_cfg(root / "run", tiny_train_base, data, ema_decay=0.9))
    return root / "run", data


@pytest.fixture
def run_copy(tmp_path, three_checkpoints):
    run, data = three_checkpoints
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", data


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def _damage(ckpt: Path, case: str) -> tuple[str, str]:
    """Damage a checkpoint as a kill, a full disk or a bad copy would; returns (file named, what is said)."""
    if case == "truncated_weights":
        _truncate(ckpt / "trainable.safetensors", 0.5)
        return "trainable.safetensors", "truncated"
    if case == "empty_weights":
        _truncate(ckpt / "trainable.safetensors", 0.0)
        return "trainable.safetensors", "truncated"
    if case == "corrupt_optimizer":
        _flip_middle(ckpt / "optimizer.pt")
        return "optimizer.pt", "corrupted"
    if case == "corrupt_trainer_state":
        (ckpt / "trainer.json").write_text('{"step": 3, "conf')
        return "trainer.json", ""
    if case == "corrupt_manifest":
        (ckpt / "manifest.json").write_text("{")
        return "manifest.json", "unreadable"
    if case == "missing_file":
        (ckpt / "ema.safetensors").unlink()
        return "ema.safetensors", "missing"
    # checkpoints of the release before manifests: judged by whether their files load
    (ckpt / "manifest.json").unlink()
    if case == "legacy_corrupt_optimizer":
        (ckpt / "optimizer.pt").write_bytes(b"\x00garbage" * 100)
        return "optimizer.pt", "not a readable torch file"
    if case == "legacy_corrupt_trainer_state":
        (ckpt / "trainer.json").write_text("{not json")
        return "trainer.json", "not valid JSON"
    if case == "legacy_truncated_weights":
        _truncate(ckpt / "trainable.safetensors", 0.7)
        return "trainable.safetensors", "not a readable safetensors file"
    if case == "legacy_pickle_payload":
        torch.save({"optimizer": _Payload()}, ckpt / "optimizer.pt")
        return "optimizer.pt", "refused: the file asks for posix.system"
    if case == "legacy_empty_optimizer":
        (ckpt / "optimizer.pt").write_bytes(b"")
        return "optimizer.pt", "not a readable torch file"
    raise AssertionError(case)


DAMAGE = [
    "truncated_weights",
    "empty_weights",
    "corrupt_optimizer",
    "corrupt_trainer_state",
    "corrupt_manifest",
    "missing_file",
    "legacy_corrupt_optimizer",
    "legacy_corrupt_trainer_state",
    "legacy_truncated_weights",
    "legacy_empty_optimizer",
    "legacy_pickle_payload",
]


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_newest_checkpoint_is_skipped_and_named(run_copy, case):
    run, _ = run_copy
    newest = run / "checkpoints" / "step-0000003"
    name, what = _damage(newest, case)
    with pytest.raises(CheckpointError) as e:
        check_checkpoint(newest)
    message = str(e.value)
    assert "\n" not in message and str(newest / name) in message and what in message, message
    assert "download" not in message and "weights_only" not in message
    said: list[str] = []
    chosen = find_resume("latest", run, lambda folder, meta: None, said.append)
    assert chosen == run / "checkpoints" / "step-0000002"
    assert said == [f"skipping checkpoint step-0000003: {message}"]


def test_empty_step_folder_and_checkpoints_without_manifest(run_copy):
    run, _ = run_copy
    (run / "checkpoints" / "step-0000004").mkdir()
    (run / "checkpoints" / "step-oops").mkdir()  # not a step number: not a checkpoint, ignored
    for ckpt in list_checkpoints(run)[:-1]:
        (ckpt / "manifest.json").unlink()  # as the release before manifests wrote them: still resumable
    said: list[str] = []
    assert find_resume("latest", run, lambda folder, meta: None, said.append) == run / "checkpoints" / "step-0000003"
    empty = run / "checkpoints" / "step-0000004"
    assert said == [f"skipping checkpoint step-0000004: {empty}: empty folder: a checkpoint that was never written"]
    for ckpt in list_checkpoints(run)[:-1]:
        shutil.rmtree(ckpt)
    said.clear()
    assert find_resume("latest", run, lambda folder, meta: None, said.append) is None  # a fresh start, said so
    assert len(said) == 2 and said[1].startswith("no complete checkpoint in")


@pytest.mark.parametrize("case", ["corrupt_optimizer", "legacy_corrupt_optimizer", "legacy_corrupt_trainer_state"])
def test_resume_through_the_command(run_copy, tiny_train_base, capsys, case):
    """--resume latest falls back to step 2 and finishes; --resume PATH of the damaged one is one line, exit 2."""
    run, data = run_copy
    newest = run / "checkpoints" / "step-0000003"
    name, what = _damage(newest, case)
    before = sorted(p.name for p in run.rglob("*"))
    code, errors, _ = _cli(_argv(run, tiny_train_base, data, "--ema-decay", "0.9", "--resume", str(newest)), capsys)
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: {newest / name}: ") and what in errors[0], errors[0]
    assert "Traceback" not in errors[0] and "download" not in errors[0]
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing written
    code, lines, out = _cli(
        _argv(run, tiny_train_base, data, "--ema-decay", "0.9", "--max-steps", "4", "--resume", "latest"), capsys
    )
    assert code == 0, lines
    assert lines[0].startswith(f"skipping checkpoint step-0000003: {newest / name}: "), lines
    assert f"resumed from {run / 'checkpoints' / 'step-0000002'} at step 2" in out
    assert check_checkpoint(newest)["step"] == 3  # step 3 was trained again and replaced the damaged one
    assert [p.name for p in list_checkpoints(run)] == ["step-0000003", "step-0000004"]  # the default: keep 2


def test_resumed_checkpoint_equals_the_one_it_replaced(run_copy, tiny_train_base):
    """The replacement step 3 (trained again from step 2) holds the same tensors as the damaged original had."""
    run, data = run_copy
    newest = run / "checkpoints" / "step-0000003"
    original = {k: v.clone() for k, v in load_file(newest / "trainable.safetensors").items()}  # not a view of the file
    _damage(newest, "truncated_weights")
    train(_cfg(run, tiny_train_base, data, ema_decay=0.9, resume="latest"))
    again = load_file(newest / "trainable.safetensors")
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)


# --------------------------------------------------------------------------- what killed runs leave


def test_temporaries_of_killed_runs_are_removed_and_nothing_else(tmp_path, tiny_train_base, capsys):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    ckpts, validation = out / "checkpoints", out / "validation"
    for folder in (ckpts, validation):
        folder.mkdir(parents=True)
    dead, alive = _dead_pid(), os.getpid()
    stale = [
        ckpts / f".step-0000002.ldm-tmp-{dead}-k3j4h5g6",  # a checkpoint killed before its rename
        ckpts / ".step-0000001.a1b2c3d4",  # the same, as the release before process ids in names left it
        out / ".diffusers.ldm-tmp-{dead}-zz9y8x7w".replace("{dead}", str(dead)),
    ]
    for folder in stale:
        folder.mkdir()
        (folder / "trainable.safetensors").write_bytes(b"x" * 1000)
    stale_files = [
        out / f".model.safetensors.ldm-tmp-{dead}-q1w2e3r4.tmp",
        out / ".model.safetensors.p0o9i8u7.tmp",
        out / "loss.tmp.png",
        validation / f".step-0000001.png.ldm-tmp-{dead}-m1n2b3v4.tmp",
        validation / ".step-0000001.png.tmp",
    ]
    kept = [
        out / ".hidden",
        out / ".model.safetensors.bak",
        out / f".model.safetensors.ldm-tmp-{alive}-l1k2j3h4.tmp",  # a live writer's: not ours to remove
        ckpts / ".step-0000002.notes",
        ckpts / ".keep",
        out / "notes.txt",
    ]
    for path in stale_files + kept:
        path.write_bytes(b"y")
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref")
    code, lines, _ = _cli(_argv(out, tiny_train_base, data, "--max-steps", "1"), capsys)
    assert code == 0, lines
    removed = sorted(line for line in lines if line.startswith("removed "))
    assert removed == sorted(
        f"removed {p}: a temporary that an interrupted run left behind" for p in stale + stale_files
    )
    assert not any(p.exists() for p in stale + stale_files)
    assert all(p.exists() for p in kept) and (out / ".git" / "HEAD").exists()
    assert remove_leftovers(out) == []  # and nothing of the finished run is a leftover


def test_frozen_modules_sit_on_the_accelerator_device(tmp_path, tiny_train_base):
    """Under accelerate only the trained module is prepared; the frozen VAE and text encoder must be moved
    to the same device (a no-op here on the CPU, the fix for GPUs: batches are encoded there)."""
    data = make_image_folder(tmp_path / "data")
    trainer = Trainer(_cfg(tmp_path / "run", tiny_train_base, data, max_steps=1))
    device = trainer.acc.device
    for module in (trainer.models.vae, trainer.models.text_encoder, trainer.models.unet):
        assert all(p.device == device for p in module.parameters())


# --------------------------------------------------------------------------- the kill loop

# One process that imports torch and ldm once, then forks a child per training segment: a real process that
# is SIGKILLed, without paying ~4 s of imports for each of the 11 segments. A child counts the file system
# events (Python audit events: open, mkstemp, mkdtemp, rename, chmod, rmtree, ...) under the run's folder
# from its start, or from the end of a given step, and SIGKILLs itself just before the n-th one of a kind:
# "checkpoint" (under checkpoints/: a checkpoint write: temporary folder, its files, the manifest, the final
# rename; retention; reading one to resume) or "outputs" (config.json, loss.csv, loss.png, the model, the
# validation grid).
ZYGOTE = r"""
import json, os, signal, sys, traceback
import torch
torch.set_num_threads(1)
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
import accelerate, diffusers.optimization, ldm.pipelines.pipeline
from ldm.training.config import TrainConfig
from ldm.training.loop import train

EVENTS = {"open", "os.rename", "os.remove", "os.unlink", "os.rmdir", "os.mkdir", "os.chmod", "os.link",
          "shutil.rmtree", "tempfile.mkstemp", "tempfile.mkdtemp", "os.truncate", "os.scandir", "os.listdir"}

def child(job):
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    out = job["config"]["output_dir"]
    counts = {"checkpoint": 0, "outputs": 0}
    kill = job["kill"] or {}
    kind, n = kill.get("kind"), kill.get("n", 0)
    armed = [kill.get("at_start", False)]
    note = os.open(job["notes"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def on_step(step):
        if step == kill.get("after_step"):
            armed[0] = True

    def hook(event, args):
        if event not in EVENTS or not armed[0]:
            return
        paths = [os.fsdecode(a) if isinstance(a, bytes) else os.fspath(a) for a in args
                 if isinstance(a, (str, bytes, os.PathLike))]
        paths = [p for p in paths if p.startswith(out)]
        if not paths:
            return
        inside = any(os.sep + "checkpoints" + os.sep in p for p in paths)
        counts["checkpoint" if inside else "outputs"] += 1
        if kind is not None and counts[kind] == n:
            os.write(note, (json.dumps([event, paths]) + "\n").encode())
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    result = train(TrainConfig(**job["config"]), on_step=on_step)
    result["events"] = dict(counts)
    with open(job["result"], "w") as f:
        json.dump(result, f)

for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            child(job)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    print(json.dumps({"killed": killed, "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}),
          flush=True)
"""


def _files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


def _loss_rows(run: Path) -> list[tuple[str, str, str]]:
    rows = (run / "loss.csv").read_text().splitlines()
    return [tuple(r.split(",")[:3]) for r in rows]


@pytest.mark.slow
def test_kill_loop_ends_bit_identical(tmp_path, tiny_train_base):
    """10 SIGKILLs at seeded random moments (half of them among the file events of checkpoint writes: temp
    folder, files, manifest, rename, retention), each followed by --resume latest; the last run finishes.
    The weights, EMA, loss log and the files left equal those of a run never interrupted (torch.equal)."""
    data = make_image_folder(tmp_path / "data")
    common = dict(
        max_steps=8,
        save_every=1,
        keep_checkpoints=2,
        ema_decay=0.9,
        lr_scheduler="cosine",
        warmup_steps=2,
        random_flip=True,
        caption_dropout=0.2,
        resume="latest",
    )
    zygote = subprocess.Popen(
        [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert zygote.stdin is not None and zygote.stdout is not None
    notes, log = tmp_path / "kills.jsonl", tmp_path / "segments.log"

    def segment(run: Path, kill) -> dict:
        job = dict(
            config=_cfg(run, tiny_train_base, data, **common).to_dict(),
            kill=kill,
            log=str(log),
            notes=str(notes),
            result=str(tmp_path / "result.json"),
        )
        zygote.stdin.write(json.dumps(job) + "\n")
        zygote.stdin.flush()
        return json.loads(zygote.stdout.readline())

    try:
        t0 = time.perf_counter()
        reference = tmp_path / "reference"
        assert segment(reference, None) == {"killed": False, "code": 0}, log.read_text()
        rng = random.Random(14)
        last = common["max_steps"]
        targets = sorted(rng.randint(0, last) for _ in range(10))  # the steps after which the kills come
        run = tmp_path / "killed"
        kills, segments = 0, 0
        while kills < 10 and segments < 20:
            resumed = find_resume("latest", run, lambda folder, meta: None, lambda message: None)
            current = int(resumed.name[5:]) if resumed else 0
            after = max(targets[kills], current)
            # a checkpoint write is ~45 events; at the start config.json and loss.csv ~15 "outputs" events
            # (counted from the start, else the run would go on to the end); at the end, plot, model and
            # validation grid ~20
            kind = rng.choice(["checkpoint", "checkpoint", "outputs"]) if after < last else "outputs"
            at_start = after == current or kind == "outputs" and after < last
            n = rng.randint(1, 45 if kind == "checkpoint" else 15 if current < last else 30)
            status = segment(run, dict(after_step=after, at_start=at_start, kind=kind, n=n))
            assert status["killed"] or status["code"] == 0, log.read_text()[-3000:]
            kills, segments = kills + status["killed"], segments + 1
        status = segment(run, None)  # the last resume runs to the end
        assert status == {"killed": False, "code": 0}, log.read_text()[-3000:]
        elapsed = time.perf_counter() - t0
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=60)
    assert kills == 10
    noted = [json.loads(x) for x in notes.read_text().splitlines()]
    inside = [paths for _, paths in noted if any(f"{os.sep}checkpoints{os.sep}.step-" in p for p in paths)]
    assert len(inside) >= 3  # killed inside checkpoint writes (seeded: 5 of the 10)
    assert "a temporary that an interrupted run left behind" in log.read_text()
    assert _files(run) == _files(reference)  # nothing stray: no temporaries, no half checkpoints
    final = ["step-0000008/trainable.safetensors", "step-0000008/ema.safetensors", "step-0000007/trainable.safetensors"]
    for name in ["model.safetensors"] + [f"checkpoints/{f}" for f in final]:
        a, b = load_file(reference / name), load_file(run / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a = torch.load(reference / "checkpoints/step-0000008/optimizer.pt", weights_only=True)["optimizer"]["state"]
    b = torch.load(run / "checkpoints/step-0000008/optimizer.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
    assert _loss_rows(run) == _loss_rows(reference)
    print(f"kill loop: {segments + 2} segments in {elapsed:.1f} s")
