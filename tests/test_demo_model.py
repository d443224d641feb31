"""The embedded demo model: loads with no path, fits its size budget, and draws what it is told.

The eval here is a small version (48 images) of `scripts/eval_shapes.py --n 240 --relation-swap` (the
figures in docs/demo-model.md) at the model's recommended guidance (stored in the file). Every group is
held a little under the issue's target (single objects 95 / 90 / 90%, held-out pairs 80%, two objects
70%), all of which the model meets at n = 240 (100 / 98.3 / 100%, 96.7%, 95.0%). Here, at n = 48: 100 /
95.8 / 100%, 12/12 held-out, 10/12 two-object, and 12 of 12 layouts flip with the relation word.
"""

from pathlib import Path

import numpy as np
import pytest

from ldm.demo.shapes import evaluate, relation_swap, score
from ldm.pipelines.pipeline import DEMO_MODEL, Pipeline

ROOT = Path(__file__).resolve().parents[1]
GUIDANCE = 2.5  # the recommended guidance stored in the file, documented in docs/demo-model.md


@pytest.fixture(scope="module")
def demo():
    return Pipeline.from_pretrained()


def test_demo_model_is_shipped_and_small(demo):
    assert DEMO_MODEL.is_file()
    assert DEMO_MODEL.stat().st_size <= 40 * 2**20
    assert demo.model_path == DEMO_MODEL and demo.default_size == (64, 64)
    assert demo.tokenizer.vocab_size == 49408  # the shipped CLIP tokenizer
    assert demo.default_guidance == GUIDANCE


@pytest.mark.slow
def test_small_eval_meets_thresholds(demo):
    result = evaluate(demo, n=48, steps=25, seed=10_000_000, batch_size=16, keep_images=True)  # its guidance
    assert result["settings"]["guidance"] == GUIDANCE
    acc = result["accuracy"]
    print({k: round(v, 3) for k, v in acc.items()})
    # a 12-image group moves in steps of 8.3 points
    thresholds = {
        "single object/color": 0.9,
        "single object/shape": 0.85,
        "single object/position": 0.85,
        "single object/size": 0.9,
        "held-out pair/color and shape": 0.75,
        "two objects/both objects and relation": 0.65,
    }
    failed = {k: round(acc[k], 3) for k, v in thresholds.items() if acc[k] < v}
    assert not failed, (failed, acc)
    # the relation word, not the starting noise, decides which object goes where (before the model was
    # trained on zero terminal SNR, 3 of 57 layouts flipped at n = 240)
    swap = relation_swap(demo, result)
    assert swap["flipped"] >= 0.8 * (swap["flipped"] + swap["kept"]) and swap["missing"] <= 2, swap


def test_main_job_default_command(tmp_path, capsys):
    """README's main job: txt2img with only a prompt uses the demo model and draws it right."""
    from PIL import Image

    from ldm.cli import txt2img

    assert txt2img.main(["--prompt", "a red circle at the top left", "--seed", "1", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.png")
    image = np.asarray(Image.open(path).convert("RGB"))
    verdict = score("a red circle at the top left", image)
    assert verdict["color_ok"] and verdict["shape_ok"] and verdict["position_ok"], verdict
    parameters = Image.open(path).text["parameters"]
    assert "Model: ldm-shapes-demo" in parameters and "CFG scale: 2.5," in parameters


def test_package_demo_keeps_the_schedule_and_the_budget(tmp_path, capsys, monkeypatch):
    """package_demo.py re-stores a model in float16 with its recommended guidance; the schedule (zero terminal
    SNR for the demo model) travels with it; bad input leaves the destination as it was."""
    from ldm.cli import package_demo

    out = tmp_path / "demo.safetensors"
    assert package_demo.main(["--model", str(DEMO_MODEL), "--out", str(out), "--guidance", "3"]) == 0
    packed = Pipeline.from_pretrained(out)
    shipped = Pipeline.from_pretrained()
    assert packed.default_guidance == 3.0
    assert packed.schedule.to_diffusers_config() == shipped.schedule.to_diffusers_config()
    with pytest.raises(SystemExit) as e:
        package_demo.main(["--model", str(DEMO_MODEL), "--out", str(out), "--guidance", "inf"])
    assert e.value.code == 2 and "must be a finite number >= 0" in capsys.readouterr().err
    monkeypatch.setattr(package_demo, "LIMIT_MB", 1)
    before = out.read_bytes()
    assert package_demo.main(["--model", str(DEMO_MODEL), "--out", str(out)]) == 2
    assert "over the 1 MiB budget" in capsys.readouterr().err
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["demo.safetensors"]
