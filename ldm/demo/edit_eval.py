"""Does the demo model edit images as asked? Three measurements of inpainting, img2img and outpainting.

Every image is judged by the pixel analyzer (`ldm.demo.shapes.analyze`), never by eye; every figure is a
fraction of seeds and is deterministic in (seeds, steps, seed0). Image i of a measurement uses seed0 + i for
its base image (txt2img) and for its edit.

(a) `inpaint_eval`: base "a red circle at the top left on a white background"; the bottom-right quadrant
    (x, y in 32..64) is masked and repainted with "a blue square at the bottom right on a white background".
    Only seeds whose base image shows a red circle at the top left are judged (`usable`). Rates: a blue square
    whose box center lies in the bottom-right quadrant; a red circle still at the top left; both; and every
    pixel outside the blurred mask equal to the base's (the paste-back).
(b) `img2img_eval`: base images of a few prompts (`IMG2IMG_CASES`, seed i uses case i % len); strength 0.3
    with the base prompt must keep the base's largest object (color, shape and position, compared analyzer to
    analyzer); strength 0.9 with the same prompt in another color must take the prompt's color. Seeds whose
    base image shows no object are skipped (`usable`).
(c) `outpaint_eval`: each base image of (a) extended by 32 px on the right (64x64 -> 96x64); the rate of
    results whose first 64 columns are bit-identical to the input.

    python -m ldm.demo.edit_eval --seeds 40 [--steps 25] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
from PIL import Image

from ldm.demo.shapes import DetectedObject, analyze, parse_caption

BASE_PROMPT = "a red circle at the top left on a white background"
INPAINT_PROMPT = "a blue square at the bottom right on a white background"
# (base prompt, the color the strength-0.9 edit asks for instead); no HELD_OUT (color, shape) pair in either
IMG2IMG_CASES = (
    ("a red circle at the top left on a white background", "green"),
    ("a blue square at the bottom right on a white background", "yellow"),
    ("a yellow triangle at the top right on a black background", "red"),
    ("a large purple square in the center on a gray background", "orange"),
)
KEEP_STRENGTH = 0.3
RECOLOR_STRENGTH = 0.9
OUTPAINT_RIGHT = 32
BATCH = 20  # txt2img images per call


def _pixels(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)


def quadrant_mask(size: int = 64) -> Image.Image:
    """The "L" mask of the bottom-right quadrant: white (repaint) at x, y in size/2 .. size."""
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 2, size // 2, size, size))
    return mask


def generate_bases(pipe, prompts: str | list[str], n: int, steps: int, seed0: int = 0) -> list[Image.Image]:
    """n txt2img images, image i from seed0 + i: one prompt for all, or prompts[i] for image i; BATCH per call."""
    out: list[Image.Image] = []
    for start in range(0, n, BATCH):
        k = min(BATCH, n - start)
        if isinstance(prompts, str):
            batch = pipe(prompts, seed=seed0 + start, num_images=k, steps=steps, output_type="pil", progress=False)
        else:
            batch = pipe(
                list(prompts[start : start + k]), seed=seed0 + start, steps=steps, output_type="pil", progress=False
            )
        out += batch
    return out


def recolor_prompt(prompt: str, color: str) -> str:
    """A one-object caption with its object's color replaced."""
    old = parse_caption(prompt).objects[0].color
    return prompt.replace(f" {old} ", f" {color} ", 1)


def _is(o: DetectedObject, color: str, shape: str) -> bool:
    return o.color == color and o.shape == shape


def red_circle_top_left(found: list[DetectedObject]) -> bool:
    return any(_is(o, "red", "circle") and o.position == "top left" for o in found)


def blue_square_bottom_right(found: list[DetectedObject], size: int = 64) -> bool:
    half = size / 2
    return any(_is(o, "blue", "square") and o.center[0] >= half and o.center[1] >= half for o in found)


def _rate(hits: int, n: int) -> float:
    return hits / n if n else float("nan")


def inpaint_eval(
    pipe, seeds: int = 40, steps: int = 25, seed0: int = 0, bases: list[Image.Image] | None = None, **options: Any
) -> dict:
    """Measurement (a). `bases`: the base images of BASE_PROMPT (seed0 + i) when already made; `options` go to
    the inpainting call (mask_blur, strength, guidance_scale, ...) for experiments."""
    from ldm.pipelines.images import blur_mask

    if bases is None:
        bases = generate_bases(pipe, BASE_PROMPT, seeds, steps, seed0)
    mask = quadrant_mask(64)
    keep = np.asarray(blur_mask(mask, options.get("mask_blur", 4))) == 0  # pixels the paste must leave alone
    counts = {"seeds": seeds, "usable": 0, "blue_square": 0, "red_circle_kept": 0, "both": 0, "unmasked_kept": 0}
    failures = []
    for i, base in enumerate(bases[:seeds]):
        if not red_circle_top_left(analyze(_pixels(base))):
            continue
        counts["usable"] += 1
        (out,) = pipe(
            INPAINT_PROMPT, image=base, mask=mask, seed=seed0 + i, steps=steps, output_type="pil", progress=False,
            **options,
        )  # fmt: skip
        pixels = _pixels(out)
        found = analyze(pixels)
        blue, red = blue_square_bottom_right(found), red_circle_top_left(found)
        counts["blue_square"] += blue
        counts["red_circle_kept"] += red
        counts["both"] += blue and red
        counts["unmasked_kept"] += bool(np.array_equal(pixels[keep], _pixels(base)[keep]))
        if not (blue and red):
            failures.append({"seed": seed0 + i, "found": [(o.color, o.shape, o.position) for o in found]})
    n = counts["usable"]
    return {
        "blue_square_rate": _rate(counts["blue_square"], n),
        "red_circle_kept_rate": _rate(counts["red_circle_kept"], n),
        "both_rate": _rate(counts["both"], n),
        "unmasked_kept_rate": _rate(counts["unmasked_kept"], n),
        "usable_rate": _rate(n, seeds),
        "counts": counts,
        "failures": failures,
    }


def img2img_eval(pipe, seeds: int = 40, steps: int = 25, seed0: int = 0, **options: Any) -> dict:
    """Measurement (b): seed0 + i edits a base image of IMG2IMG_CASES[i % len]."""
    cases = [IMG2IMG_CASES[i % len(IMG2IMG_CASES)] for i in range(seeds)]
    bases = generate_bases(pipe, [base for base, _ in cases], seeds, steps, seed0)
    recolor = {base: recolor_prompt(base, color) for base, color in IMG2IMG_CASES}
    keys = ("color", "shape", "position")
    counts: dict[str, int] = {"seeds": seeds, "usable": 0, "keep_all": 0, "recolor_color": 0, "recolor_all": 0}
    counts.update({f"keep_{k}": 0 for k in keys})
    per_case = {base: {"usable": 0, "keep_all": 0, "recolor_color": 0} for base, _ in IMG2IMG_CASES}
    failures = []
    for i, ((base_prompt, want), base) in enumerate(zip(cases, bases)):
        before = analyze(_pixels(base))
        if not before:
            continue
        was = before[0]  # the largest object
        counts["usable"] += 1
        per_case[base_prompt]["usable"] += 1
        common = {"image": base, "seed": seed0 + i, "steps": steps, "output_type": "pil", "progress": False}
        (kept,) = pipe(base_prompt, strength=KEEP_STRENGTH, **common, **options)
        after = analyze(_pixels(kept))
        same = {k: bool(after) and getattr(after[0], k) == getattr(was, k) for k in keys}
        for k in keys:
            counts[f"keep_{k}"] += same[k]
        counts["keep_all"] += all(same.values())
        per_case[base_prompt]["keep_all"] += all(same.values())
        (recolored,) = pipe(recolor[base_prompt], strength=RECOLOR_STRENGTH, **common, **options)
        got = analyze(_pixels(recolored))
        color_ok = bool(got) and got[0].color == want
        counts["recolor_color"] += color_ok
        counts["recolor_all"] += color_ok and got[0].shape == was.shape and got[0].position == was.position
        per_case[base_prompt]["recolor_color"] += color_ok
        if not (all(same.values()) and color_ok):
            failures.append(
                {
                    "seed": seed0 + i,
                    "base": (was.color, was.shape, was.position),
                    "kept": [(o.color, o.shape, o.position) for o in after[:2]],
                    "recolored": [(o.color, o.shape, o.position) for o in got[:2]],
                }
            )
    n = counts["usable"]
    return {
        "keep_rate": _rate(counts["keep_all"], n),
        **{f"keep_{k}_rate": _rate(counts[f"keep_{k}"], n) for k in keys},
        "recolor_color_rate": _rate(counts["recolor_color"], n),
        "recolor_all_rate": _rate(counts["recolor_all"], n),  # color as asked, shape and position as the base's
        "usable_rate": _rate(n, seeds),
        "counts": counts,
        "per_case": per_case,
        "failures": failures,
    }


def outpaint_eval(
    pipe, seeds: int = 40, steps: int = 25, seed0: int = 0, bases: list[Image.Image] | None = None, **options: Any
) -> dict:
    """Measurement (c): base images of BASE_PROMPT (or `bases`) outpainted OUTPAINT_RIGHT px to the right."""
    if bases is None:
        bases = generate_bases(pipe, BASE_PROMPT, seeds, steps, seed0)
    counts = {"seeds": seeds, "identical": 0, "size_ok": 0}
    for i, base in enumerate(bases[:seeds]):
        (out,) = pipe(
            BASE_PROMPT, image=base, outpaint=(0, 0, OUTPAINT_RIGHT, 0), seed=seed0 + i, steps=steps,
            output_type="pil", progress=False, **options,
        )  # fmt: skip
        w, h = base.size
        counts["size_ok"] += out.size == (w + OUTPAINT_RIGHT, h)
        counts["identical"] += bool(np.array_equal(_pixels(out)[:, :w], _pixels(base)))
    return {
        "identical_rate": _rate(counts["identical"], seeds),
        "size_ok_rate": _rate(counts["size_ok"], seeds),
        "counts": counts,
    }


def run_all(seeds: int = 40, steps: int = 25, seed0: int = 0, pipe=None) -> dict:
    """The three measurements on the embedded demo model (or `pipe`); (a) and (c) share their base images."""
    if pipe is None:
        from ldm.pipelines.pipeline import Pipeline

        pipe = Pipeline.from_pretrained()
    seconds = {}
    t = time.perf_counter()
    bases = generate_bases(pipe, BASE_PROMPT, seeds, steps, seed0)
    seconds["bases"] = time.perf_counter() - t
    out: dict[str, Any] = {"settings": {"seeds": seeds, "steps": steps, "seed0": seed0}}
    for name, fn in (
        ("inpaint", lambda: inpaint_eval(pipe, seeds, steps, seed0, bases=bases)),
        ("img2img", lambda: img2img_eval(pipe, seeds, steps, seed0)),
        ("outpaint", lambda: outpaint_eval(pipe, seeds, steps, seed0, bases=bases)),
    ):
        t = time.perf_counter()
        out[name] = fn()
        seconds[name] = time.perf_counter() - t
    out["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    return out


TABLE = (  # (group, label, measurement, rate, count, out of)
    ("(a) inpaint", "blue square in the bottom-right quadrant", "inpaint", "blue_square", "usable"),
    ("", "red circle still at the top left", "inpaint", "red_circle_kept", "usable"),
    ("", "both", "inpaint", "both", "usable"),
    ("", "pixels outside the blurred mask unchanged", "inpaint", "unmasked_kept", "usable"),
    ("", "usable bases (red circle at the top left)", "inpaint", "usable", "seeds"),
    (f"(b) img2img {KEEP_STRENGTH}", "color, shape and position kept", "img2img", "keep_all", "usable"),
    ("", "color kept", "img2img", "keep_color", "usable"),
    ("", "shape kept", "img2img", "keep_shape", "usable"),
    ("", "position kept", "img2img", "keep_position", "usable"),
    (f"(b) img2img {RECOLOR_STRENGTH}", "color follows the prompt", "img2img", "recolor_color", "usable"),
    ("", "... and shape, position kept", "img2img", "recolor_all", "usable"),
    ("", "usable bases (an object found)", "img2img", "usable", "seeds"),
    ("(c) outpaint", "first 64 columns bit-identical", "outpaint", "identical", "seeds"),
    ("", "size 96x64", "outpaint", "size_ok", "seeds"),
)


def format_table(result: dict) -> str:
    """The rates of `run_all` as a text table (rate, count / out of)."""
    s = result["settings"]
    lines = [f"{s['seeds']} seeds from {s['seed0']}, {s['steps']} steps; seconds {result.get('seconds', {})}"]
    for group, label, name, key, total in TABLE:
        counts = result[name]["counts"]
        k, n = counts[key], counts[total]
        lines.append(f"  {group:16} {label:42} {_rate(k, n):7.1%} {k:>3}/{n}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.demo.edit_eval", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed0", type=int, default=0)
    parser.add_argument("--json", help="write the full result (with the failures) here")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        parser.error("--seeds and --steps must be >= 1")
    result = run_all(args.seeds, args.steps, args.seed0)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
