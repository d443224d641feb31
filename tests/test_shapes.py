"""ldm.demo.shapes: the procedural shapes dataset, its pixel analyzer, the evaluation, scripts/eval_shapes.py."""

import json
import re

import numpy as np
import pytest
import torch

from ldm.cli import eval_shapes
from ldm.demo import shapes
from ldm.demo.shapes import (
    BACKGROUNDS,
    COLORS,
    HELD_OUT,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    ShapesDataset,
    analyze,
    eval_prompts,
    evaluate,
    label_components,
    parse_caption,
    render,
    sample_scene,
    scene_from_caption,
    score,
)

# The grammar, written out independently of ldm.demo.shapes.
_COLOR = "(red|green|blue|yellow|purple|orange)"
_SHAPE = "(circle|square|triangle)"
_BG = "(?: on a (white|black|gray) background)?"
ONE = re.compile(
    rf"a (?:(small|large) )?{_COLOR} {_SHAPE}"
    r"(?: (at the top left|at the top right|at the bottom left|at the bottom right|in the center))?" + _BG
)
TWO = re.compile(rf"a {_COLOR} {_SHAPE} (to the left of|to the right of|above|below) a {_COLOR} {_SHAPE}" + _BG)


def _scenes(n, seed=0, **kw):
    return [sample_scene(np.random.default_rng([seed, i]), **kw) for i in range(n)]


def _perturb(image, rng, sigma=1.0, noise=8.0):
    """Separable Gaussian blur (edges repeated) plus Gaussian noise, back to uint8."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    h, w = image.shape[:2]
    p = np.pad(image.astype(float), ((r, r), (r, r), (0, 0)), mode="edge")
    p = sum(k[i] * p[i : i + h] for i in range(2 * r + 1))
    p = sum(k[i] * p[:, i : i + w] for i in range(2 * r + 1))
    return np.clip(np.round(p + rng.normal(0, noise, p.shape)), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- generator


def test_deterministic_from_seed_and_index():
    a, b, c = ShapesDataset(10**9, seed=3), ShapesDataset(10**9, seed=3), ShapesDataset(10**9, seed=4)
    assert len(a) == 10**9
    for i in (0, 1, 123_456_789):
        x, y = a[i], b[i]
        assert x["caption"] == y["caption"] and x["index"] == i
        assert torch.equal(x["pixels"], y["pixels"])
    assert [a[i]["caption"] for i in range(20)] != [c[i]["caption"] for i in range(20)]
    item = a[7]
    assert item["pixels"].dtype == torch.float32 and item["pixels"].shape == (3, 64, 64)
    assert item["pixels"].min() >= -1 and item["pixels"].max() <= 1
    expected = render(sample_scene(np.random.default_rng([3, 7])))
    assert np.array_equal(((item["pixels"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy(), expected)
    with pytest.raises(IndexError):
        a[10**9]


def test_palette_exact_and_sizes():
    for scene in _scenes(300, seed=1, train=False):
        image = render(scene)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        found = {tuple(int(v) for v in c) for c in np.unique(image.reshape(-1, 3), axis=0)}
        assert found == {BACKGROUNDS[scene.background]} | {COLORS[o.color] for o in scene.objects}
        for o in scene.objects:
            x0, y0, x1, y1 = o.box()
            assert x1 - x0 == y1 - y0 == {"small": 13, "large": 32}[o.size] == o.size_px
            assert 0 <= x0 and x1 <= 64 and 0 <= y0 and y1 <= 64
            mask = np.all(image == COLORS[o.color], axis=2)
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)  # the shape spans its box
    big = render(_scenes(1, seed=2)[0], size=128)
    assert big.shape == (128, 128, 3)


def test_named_positions_center_the_box():
    for position, (fx, fy) in shapes.POSITION_CENTERS.items():
        for size in SIZES:
            scene = shapes.single_scene("square", "red", size, position, "white")
            x0, y0, x1, y1 = scene.objects[0].box()
            assert abs((x0 + x1) / 2 - fx * 64) <= 0.5 and abs((y0 + y1) / 2 - fy * 64) <= 0.5


def test_triangle_upright_base_at_bottom():
    for size in SIZES:
        scene = shapes.single_scene("triangle", "blue", size, "center", "black")
        mask = np.all(render(scene) == COLORS["blue"], axis=2)
        rows = mask[mask.any(axis=1)][:, mask.any(axis=0)]  # the box
        widths = rows.sum(axis=1)
        side = shapes.size_px(size)
        assert rows.shape == (side, side)  # width == height of the box
        assert widths[0] <= 2 and widths[-1] == side  # apex on top, full base at the bottom
        assert np.all(np.diff(widths) >= 0) and np.all(np.diff(widths[::2]) > 0)  # wider going down
        assert np.array_equal(rows, rows[:, ::-1])  # isosceles: mirror-symmetric


def test_held_out_pairs_never_in_training():
    seen_pairs = set()
    for scene in _scenes(5000, seed=5, p_two=0.3):
        pairs = {(o.color, o.shape) for o in scene.objects}
        assert not pairs & HELD_OUT, scene.caption
        spec = parse_caption(scene.caption)
        assert not {(o.color, o.shape) for o in spec.objects} & HELD_OUT
        for color, shape in HELD_OUT:
            assert f"{color} {shape}" not in scene.caption
        seen_pairs |= pairs
    assert seen_pairs == set(shapes.SEEN_PAIRS)
    # train=False (not for training) does draw them
    assert any({(o.color, o.shape) for o in s.objects} & HELD_OUT for s in _scenes(300, seed=5, train=False))


def test_captions_follow_grammar_and_state_the_truth():
    scenes = _scenes(2000, seed=6)
    stated_sets, drawn_when_dropped = set(), {"size": set(), "position": set(), "background": set()}
    n_two = 0
    for scene in scenes:
        bg_stated = scene.caption.endswith(f" on a {scene.background} background")
        assert bg_stated == ("background" in scene.stated)
        if m := ONE.fullmatch(scene.caption):
            (o,) = scene.objects
            size, color, shape, where, bg = m.groups()
            assert (color, shape) == (o.color, o.shape)
            assert size in (None, o.size) and (size is not None) == ("size" in scene.stated)
            phrase = "in the center" if o.position == "center" else f"at the {o.position}"
            assert where in (None, phrase) and (where is not None) == ("position" in scene.stated)
            assert bg in (None, scene.background)
            for part in ("size", "position", "background"):
                if part not in scene.stated:
                    drawn_when_dropped[part].add(getattr(o, part) if part != "background" else scene.background)
        else:
            m = TWO.fullmatch(scene.caption)
            assert m, scene.caption
            n_two += 1
            a, b = scene.objects
            c1, s1, relation, c2, s2, bg = m.groups()
            assert (c1, s1, relation, c2, s2) == (a.color, a.shape, scene.relation, b.color, b.shape)
            assert a.color != b.color and a.size == b.size == "small"
        stated_sets.add(scene.stated)
    assert 0.25 < n_two / len(scenes) < 0.35
    assert len(stated_sets) == 8  # every subset of the optional parts occurs
    assert drawn_when_dropped == {"size": set(SIZES), "position": set(POSITIONS), "background": set(BACKGROUNDS)}


def test_two_object_placement():
    for scene in _scenes(400, seed=7, p_two=1.0):
        a, b = (o.box() for o in scene.objects)
        assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]  # boxes do not overlap
        (ax, ay), (bx, by) = (o.center for o in scene.objects)
        horizontal = scene.relation in ("to the left of", "to the right of")
        assert (ay == by) if horizontal else (ax == bx)  # same row / same column
        sign = {"to the left of": bx - ax, "to the right of": ax - bx, "above": by - ay, "below": ay - by}
        assert sign[scene.relation] >= 1.5 * 13


def test_parse_caption_round_trip_and_errors():
    spec = parse_caption("a large purple triangle at the top left on a white background")
    assert spec.objects[0] == shapes.ObjectSpec("purple", "triangle", "large", "top left")
    assert spec.background == "white" and spec.relation is None
    spec = parse_caption("a red circle below a blue square")
    assert spec.relation == "below" and spec.background is None and [o.color for o in spec.objects] == ["red", "blue"]
    rng = np.random.default_rng(0)
    for scene in _scenes(200, seed=8):
        again = scene_from_caption(scene.caption, rng)
        assert again.caption == scene.caption and again.stated == scene.stated
    for bad in ("a cat", "a huge red circle", "a red circle on a pink background", "a red circle above"):
        with pytest.raises(ValueError, match="not a shapes caption"):
            parse_caption(bad)


# --------------------------------------------------------------------------- analyzer


def test_label_components():
    mask = np.zeros((9, 9), bool)
    mask[1:8, 1] = mask[7, 1:6] = mask[1:8, 5] = True  # a U: the two arms meet only at the bottom
    mask[1, 7] = mask[2, 8] = True  # diagonal neighbours: two components under 4-connectivity
    labels, k = label_components(mask)
    assert k == 3 and (labels > 0).sum() == mask.sum()
    u = labels[:, :6]
    assert len(np.unique(u[u > 0])) == 1
    assert labels[1, 7] != labels[2, 8]


def test_analyzer_exact_on_clean_renders():
    scenes = _scenes(500, seed=9, train=False, p_two=0.4, p_drop=0.0)
    for scene in scenes:
        image = render(scene)
        found = analyze(image)
        assert len(found) == len(scene.objects), scene.caption
        verdicts = score(scene.caption, image)
        assert all(verdicts.values()), (scene.caption, verdicts)
        if len(scene.objects) == 1:
            o, d = scene.objects[0], found[0]
            assert (d.color, d.shape, d.size, d.position) == (o.color, o.shape, o.size, o.position)
    # other image sizes and partial captions
    for scene in _scenes(60, seed=10, train=False, image_size=96):
        assert all(score(scene.caption, render(scene)).values()), scene.caption


def test_analyzer_robust_to_blur_and_noise():
    rng = np.random.default_rng(0)
    scenes = _scenes(300, seed=11, train=False, p_two=0.4, p_drop=0.0)
    right = sum(all(score(s.caption, _perturb(render(s), rng, sigma=1.0, noise=8.0)).values()) for s in scenes)
    assert right / len(scenes) >= 0.95, right
    harder = sum(all(score(s.caption, _perturb(render(s), rng, sigma=1.5, noise=12.0)).values()) for s in scenes[:150])
    assert harder / 150 >= 0.9, harder


def test_score_catches_wrong_attributes():
    image = render(shapes.single_scene("circle", "red", "large", "top left", "white"))
    v = score("a small blue square at the bottom right on a black background", image)
    assert not any(v[k] for k in ("color_ok", "shape_ok", "size_ok", "position_ok", "background_ok", "all_ok"))
    assert v["count_ok"]
    pair = shapes.pair_scene(np.random.default_rng(0), ("red", "circle"), "to the left of", ("blue", "square"), "gray")
    image = render(pair)
    assert score("a red circle to the left of a blue square", image)["all_ok"]
    v = score("a red circle to the right of a blue square", image)
    assert v["objects_ok"] and not v["relation_ok"]
    v = score("a red square above a yellow square", image)
    assert not v["objects_ok"] and not v["relation_ok"]


# --------------------------------------------------------------------------- evaluation


def test_eval_prompts_fixed_complete_and_covering():
    prompts = eval_prompts(240, seed=10_000_000)
    assert [p.prompt for p in prompts] == [p.prompt for p in eval_prompts(240, seed=10_000_000)]
    assert [p.prompt for p in prompts] != [p.prompt for p in eval_prompts(240, seed=1)]
    kinds = [p.kind for p in prompts]
    assert (kinds.count("single"), kinds.count("heldout"), kinds.count("two")) == (120, 60, 60)
    single = [parse_caption(p.prompt) for p in prompts if p.kind == "single"]
    assert all(s.background and s.objects[0].size and s.objects[0].position for s in single)  # fully specified
    objects = [s.objects[0] for s in single]
    assert {o.color for o in objects} == set(COLORS) and {o.shape for o in objects} == set(SHAPES)
    assert {o.size for o in objects} == set(SIZES) and {o.position for o in objects} == set(POSITIONS)
    assert {s.background for s in single} == set(BACKGROUNDS)
    assert not {(s.objects[0].color, s.objects[0].shape) for s in single} & HELD_OUT
    held = [parse_caption(p.prompt) for p in prompts if p.kind == "heldout"]
    assert {(s.objects[0].color, s.objects[0].shape) for s in held} == HELD_OUT
    assert all(
        ONE.fullmatch(p.prompt) and None not in ONE.fullmatch(p.prompt).groups() for p in prompts if p.kind != "two"
    )
    two = [parse_caption(p.prompt) for p in prompts if p.kind == "two"]
    assert {s.relation for s in two} == set(RELATIONS) and all(s.background for s in two)
    assert all({(o.color, o.shape) for o in s.objects}.isdisjoint(HELD_OUT) for s in two)


class FakePipe:
    """Pipeline-like: draws each prompt's ground truth (parsed back from the prompt), or blank images."""

    def __init__(self, blank=False, ignore_order=False):
        self.blank, self.ignore_order, self.calls = blank, ignore_order, []
        self.default_guidance = 4.0  # a model's recommended guidance, used when none is given
        # what eval_shapes checks against before running: the schedule's length, the size and memory
        from types import SimpleNamespace

        import torch

        from ldm.sampling.schedule import NoiseSchedule

        self.schedule, self.default_size = NoiseSchedule(), (64, 64)
        self.unet, self.device = SimpleNamespace(config=SimpleNamespace(model_channels=32)), torch.device("cpu")

    def __call__(
        self, prompt, steps=25, guidance_scale=7.5, seed=0, num_images=1, output_type="pil", progress=True, **kw
    ):
        self.calls.append((list(prompt), steps, guidance_scale, seed))
        assert output_type == "np" and num_images == 1
        out = np.zeros((len(prompt), 64, 64, 3), np.float32)
        if not self.blank:
            for i, p in enumerate(prompt):
                if self.ignore_order:  # reads the axis of the relation but not its direction
                    p = p.replace("to the right of", "to the left of").replace("below", "above")
                out[i] = render(scene_from_caption(p, np.random.default_rng(seed + i))) / 255.0
        return out


def test_evaluate_perfect_and_blank_pipelines():
    pipe = FakePipe()
    result = evaluate(pipe, n=240, steps=3, guidance=4.0, seed=10_000_000, batch_size=50, keep_images=True)
    assert result["accuracy"] and all(v == 1.0 for v in result["accuracy"].values()), result["accuracy"]
    assert result["counts"] == {"single": 120, "heldout": 60, "two": 60}
    assert [c[3] for c in pipe.calls] == [10_000_000 + s for s in range(0, 240, 50)]
    assert all(c[1:3] == (3, 4.0) for c in pipe.calls)
    assert [it["seed"] for it in result["items"]] == list(range(10_000_000, 10_000_240))
    assert result["images"].shape == (240, 64, 64, 3) and result["images"].dtype == np.uint8
    json.dumps(shapes.result_to_json(result))
    report = shapes.format_report(result)
    assert "held-out pair" in report and "100.0%" in report

    blank = evaluate(FakePipe(blank=True), n=40, batch_size=16)
    main = {k: v for k, v in blank["accuracy"].items() if not k.endswith("background")}
    assert all(v == 0.0 for v in main.values()), main


def test_relation_swap_tells_words_from_noise():
    """A pipeline that draws the relation flips every layout when the relation is reversed; one that reads
    only its axis (the demo model's failure before zero terminal SNR) keeps every layout."""
    for pipe, expected in ((FakePipe(), "flipped"), (FakePipe(ignore_order=True), "kept")):
        result = evaluate(pipe, n=40, steps=3, guidance=2.0, batch_size=16, keep_images=True)
        pipe.calls.clear()
        counts = shapes.relation_swap(pipe, result)
        assert counts == {"flipped": 0, "kept": 0, "missing": 0, expected: 10}, counts
        two = [it for it in result["items"] if it["kind"] == "two"]
        assert [c[0][0] for c in pipe.calls] == [
            it["prompt"].replace(r, shapes.REVERSED[r]) for it in two for r in RELATIONS if r in it["prompt"]
        ]
        assert [c[1:] for c in pipe.calls] == [(3, 2.0, it["seed"]) for it in two]  # the same seeds
        result["relation_swap"] = counts
        assert f"the layout flips in {counts['flipped']} of 10 two-object prompts" in shapes.format_report(result)
    assert shapes.relation_swap(FakePipe(blank=True), evaluate(FakePipe(blank=True), n=8, keep_images=True)) == {
        "flipped": 0,
        "kept": 0,
        "missing": 2,
    }
    with pytest.raises(ValueError, match="keep_images=True"):
        shapes.relation_swap(FakePipe(), evaluate(FakePipe(), n=8))


def test_script(tmp_path, monkeypatch, capsys):
    assert eval_shapes.main(["--weights", str(tmp_path / "missing.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err
    assert eval_shapes.main(["--n", "0"]) == 2
    assert eval_shapes.main(["--guidance", "inf"]) == 2 and "finite" in capsys.readouterr().err

    from ldm.pipelines import pipeline

    pipe = FakePipe()
    pipe.model_path, pipe.model_name = None, "fake"
    monkeypatch.setattr(pipeline.Pipeline, "from_pretrained", classmethod(lambda cls, *a, **kw: pipe))
    out = tmp_path / "eval"
    argv = ["--n", "24", "--batch-size", "8", "--out", str(out), "--json", str(tmp_path / "r.json"), "--relation-swap"]
    assert eval_shapes.main(argv) == 0
    printed = capsys.readouterr().out
    assert "two objects" in printed and "100.0%" in printed and "the layout flips in 6 of 6" in printed
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["settings"]["n"] == 24 and len(data["items"]) == 24
    assert data["relation_swap"] == {"flipped": 6, "kept": 0, "missing": 0}
    assert eval_shapes.main(["--n", "8", "--seed", "5"]) == 0  # --seed reaches the prompts and the images
    assert pipe.calls[-1][3] == 5 and "seed 5" in capsys.readouterr().out
    assert data["settings"]["guidance"] == 4.0 and {c[2] for c in pipe.calls} == {4.0}  # the model's default
    assert (out / "contact_sheet.png").is_file() and (out / "results.json").is_file()

    monkeypatch.setattr(
        pipeline.Pipeline,
        "from_pretrained",
        classmethod(lambda cls, *a, **kw: (_ for _ in ()).throw(FileNotFoundError("no demo model"))),
    )
    assert eval_shapes.main([]) == 2
    assert "no demo model" in capsys.readouterr().err


def test_evaluate_runs_a_real_pipeline(tiny_sd_folder):
    from ldm.pipelines.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(tiny_sd_folder, device="cpu")
    result = evaluate(pipe, n=8, steps=2, guidance=5.0, batch_size=3)
    assert result["counts"] == {"single": 4, "heldout": 2, "two": 2}
    assert all(0.0 <= v <= 1.0 for v in result["accuracy"].values())
    assert [it["seed"] for it in result["items"]] == list(range(10_000_000, 10_000_008))


def test_caption_dropout_empties_captions_and_keeps_scenes():
    """Caption dropout reaches the procedural data (the unconditional half of guidance): about the asked
    share of captions are empty, decided per item, and the images are those of the undropped dataset."""
    from ldm.demo.shapes import ShapesDataset

    plain, dropped = ShapesDataset(seed=3), ShapesDataset(seed=3, caption_dropout=0.2)
    items = [dropped[i] for i in range(300)]
    empty = [i for i, item in enumerate(items) if item["caption"] == ""]
    assert 0.12 < len(empty) / 300 < 0.28
    assert all(items[i]["caption"] == plain[i]["caption"] for i in range(300) if i not in empty)
    assert all(torch.equal(items[i]["pixels"], plain[i]["pixels"]) for i in (empty[0], empty[1], 0, 1))
    assert dropped[empty[0]]["caption"] == ""  # deterministic
    with pytest.raises(ValueError, match="caption_dropout"):
        ShapesDataset(caption_dropout=1.5)
