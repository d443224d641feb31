"""The demo model edits images as asked: inpainting, img2img and outpainting, judged by the pixel analyzer.

A small version of `python -m ldm.demo.edit_eval --seeds 40` (the issue's targets: (a) >= 90%, (b) >= 90% /
>= 85%, (c) 100%), at 12 seeds and STEPS DDIM steps to fit the CI budget, with thresholds a little lower.
"""

import numpy as np
import pytest

from ldm.demo import edit_eval
from ldm.demo.edit_eval import (
    BASE_PROMPT,
    blue_square_bottom_right,
    generate_bases,
    img2img_eval,
    inpaint_eval,
    outpaint_eval,
    quadrant_mask,
    recolor_prompt,
    red_circle_top_left,
)
from ldm.demo.shapes import analyze, render, single_scene
from ldm.pipelines.pipeline import Pipeline

SEEDS = 12
STEPS = 10
SEED0 = 0


def _scene(shape, color, position, background="white"):
    return render(single_scene(shape, color, "large", position, background))


def test_judges_on_rendered_scenes():
    red = _scene("circle", "red", "top left")
    blue = _scene("square", "blue", "bottom right")
    both = np.where((blue != 245).any(-1, keepdims=True), blue, red)
    assert red_circle_top_left(analyze(both)) and blue_square_bottom_right(analyze(both))
    assert red_circle_top_left(analyze(red)) and not blue_square_bottom_right(analyze(red))
    assert not red_circle_top_left(analyze(blue))
    assert not blue_square_bottom_right(analyze(_scene("square", "blue", "top right")))
    assert not blue_square_bottom_right(analyze(_scene("circle", "blue", "bottom right")))
    mask = np.asarray(quadrant_mask(64))
    assert mask[32:, 32:].min() == 255 and mask[:32].max() == 0 and mask[:, :32].max() == 0
    assert recolor_prompt("a large purple square in the center on a gray background", "orange") == (
        "a large orange square in the center on a gray background"
    )
    for base, color in edit_eval.IMG2IMG_CASES:  # the cases change the color and nothing else
        assert recolor_prompt(base, color) != base and color not in base.split()


@pytest.fixture(scope="module")
def demo():
    return Pipeline.from_pretrained()


@pytest.fixture(scope="module")
def bases(demo):
    return generate_bases(demo, BASE_PROMPT, SEEDS, STEPS, SEED0)


@pytest.mark.slow
def test_inpaint_puts_the_blue_square_and_keeps_the_red_circle(demo, bases):
    r = inpaint_eval(demo, SEEDS, STEPS, SEED0, bases=bases)
    print({k: v for k, v in r.items() if k != "failures"})
    c = r["counts"]
    assert c["usable"] >= 0.8 * SEEDS, r
    assert r["blue_square_rate"] >= 0.8 and r["red_circle_kept_rate"] >= 0.8 and r["both_rate"] >= 0.8, r
    assert r["unmasked_kept_rate"] == 1.0, r  # the paste-back leaves every pixel outside the blurred mask alone


@pytest.mark.slow
def test_img2img_keeps_at_0_3_and_follows_a_new_color_at_0_9(demo):
    r = img2img_eval(demo, SEEDS, STEPS, SEED0)
    print({k: v for k, v in r.items() if k != "failures"})
    assert r["counts"]["usable"] >= 0.9 * SEEDS, r
    assert r["keep_rate"] >= 0.8, r
    assert r["recolor_color_rate"] >= 0.75, r


@pytest.mark.slow
def test_outpaint_keeps_the_original_columns(demo, bases):
    r = outpaint_eval(demo, SEEDS, STEPS, SEED0, bases=bases)
    print(r)
    assert r["identical_rate"] == 1.0 and r["size_ok_rate"] == 1.0, r
