"""Procedural captioned shapes: the demo model's training data, and a pixel-level judge of its images.

Scenes are flat, solid, axis-aligned shapes on a plain background, drawn without anti-aliasing
in an exact palette, and captioned from a small grammar:

    a [small|large] <color> <shape> [at the top left|...|in the center] [on a <background> background]
    a <color> <shape> <to the left of|to the right of|above|below> a <color> <shape> [on a <background> background]

Parts in [ ] are dropped at random in training (`p_drop` each); a dropped attribute is still
drawn, at random. The pairs in HELD_OUT never occur in training, in a caption or an image: they
test whether the model composes a color and a shape it never saw together.

    ds = ShapesDataset(10**9, seed=0)                 # item i = render(sample_scene(default_rng([seed, i])))
    ds[3]  -> {"pixels": (3, 64, 64) float32 in [-1, 1], "caption": "...", "index": 3}
    analyze(image_uint8)  -> [DetectedObject(color, shape, size, position, ...), ...]
    score("a large red circle at the top left on a white background", image_uint8) -> {"color_ok": True, ...}
    evaluate(pipe, n=240) -> accuracies for single objects, held-out pairs and two-object relations

Geometry, for an S x S image (S = 64 unless asked): a small object's box is round(S/5) = 13 px,
a large one's round(S/2) = 32 px; named positions put the box center at (S/4, S/4), (3S/4, S/4),
(S/4, 3S/4), (3S/4, 3S/4) or (S/2, S/2). Pixel (row i, column j) has its center at (x, y) = (j + .5, i + .5).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
SIZE_FRACTIONS = {"small": 1 / 5, "large": 1 / 2}  # box side / image side
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
POSITION_CENTERS = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}  # (x, y) / image side
POSITION_PHRASES = {p: ("in the center" if p == "center" else f"at the {p}") for p in POSITIONS}
RELATIONS = ("to the left of", "to the right of", "above", "below")
HELD_OUT = frozenset({("purple", "triangle"), ("orange", "circle"), ("green", "square")})  # (color, shape)
ALL_PAIRS = tuple((c, s) for c in COLORS for s in SHAPES)
SEEN_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELD_OUT)
OPTIONAL_PARTS = ("size", "position", "background")  # what a one-object caption may leave out

# analyzer constants (documented in `analyze`)
FOREGROUND_DISTANCE = 40.0  # RGB distance from the background above which a pixel is foreground
SQUARE_MIN_FILL = 0.85  # fill ratio of the bounding box: square ~1.0 (0.98 after the 3x3 mean) ...
CIRCLE_MIN_FILL = 0.68  # ... circle ~pi/4 = 0.785 (0.79-0.81 on the grid), triangle ~0.5 (0.53-0.60)
TRIANGLE_MAX_TOP = 0.40  # share of the area above the box's middle: 1/4 for an upright triangle, 1/2 otherwise
LARGE_MIN_WIDTH = 0.35  # box side / image side: small 0.2, large 0.5
CENTER_ZONE = 1 / 8  # |dx| and |dy| from the image center below S/8: "center"
RELATION_MARGIN = 1 / 16  # centers must differ by more than S/16 along the relation's axis


def size_px(size: str, image_size: int = 64) -> int:
    """Side of an object's bounding box in pixels."""
    return max(2, round(SIZE_FRACTIONS[size] * image_size))


# ---------------------------------------------------------------------------------------------- scenes


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str  # "small" | "large"
    center: tuple[float, float]  # (x, y) of the box center, in pixels
    size_px: int  # box side in pixels (width == height for every shape)
    position: str | None = None  # named position, None for the objects of a two-object scene

    def box(self, scale: float = 1.0) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), end exclusive, on the pixel grid."""
        s = max(1, round(self.size_px * scale))
        x0 = math.floor(self.center[0] * scale - s / 2 + 0.5)
        y0 = math.floor(self.center[1] * scale - s / 2 + 0.5)
        return x0, y0, x0 + s, y0 + s


@dataclass
class Scene:
    objects: list[SceneObject]
    background: str
    caption: str
    stated: frozenset[str] = frozenset()  # optional attributes the caption states: size, position, background
    relation: str | None = None  # two objects: objects[0] <relation> objects[1]
    image_size: int = 64


def caption_for(objects: list[SceneObject], background: str, relation: str | None = None, stated=OPTIONAL_PARTS) -> str:
    """The grammar's caption of a scene, stating the optional parts in `stated` (size, position, background)."""
    tail = f" on a {background} background" if "background" in stated else ""
    if relation is not None:
        a, b = objects
        return f"a {a.color} {a.shape} {relation} a {b.color} {b.shape}{tail}"
    (o,) = objects
    size = f"{o.size} " if "size" in stated else ""
    where = f" {POSITION_PHRASES[o.position]}" if "position" in stated and o.position is not None else ""
    return f"a {size}{o.color} {o.shape}{where}{tail}"


def single_scene(
    shape: str, color: str, size: str, position: str, background: str, stated=OPTIONAL_PARTS, image_size: int = 64
) -> Scene:
    """One object at a named position."""
    fx, fy = POSITION_CENTERS[position]
    obj = SceneObject(shape, color, size, (fx * image_size, fy * image_size), size_px(size, image_size), position)
    stated = frozenset(stated)
    return Scene([obj], background, caption_for([obj], background, None, stated), stated, None, image_size)


def pair_scene(
    rng: np.random.Generator,
    a: tuple[str, str],
    relation: str,
    b: tuple[str, str],
    background: str,
    stated=("background",),
    image_size: int = 64,
) -> Scene:
    """Two small objects, a = (color, shape) <relation> b: side by side in a random row ("left of" / "right of")
    or one above the other in a random column ("above" / "below"), at least half a box apart."""
    if a[0] == b[0]:
        raise ValueError(f"the two objects of a scene must have different colors, got {a[0]} twice")
    s = size_px("small", image_size)
    margin = max(1, image_size // 32)
    lo, hi = margin + s / 2, image_size - margin - s / 2  # range of a box center
    across = rng.uniform(lo, hi)  # the shared row (or column)
    gap = rng.uniform(1.5 * s, hi - lo)  # distance between the centers along the axis
    first = rng.uniform(lo, hi - gap)
    second = first + gap
    along = {
        "to the left of": (first, second),
        "to the right of": (second, first),
        "above": (first, second),
        "below": (second, first),
    }[relation]
    horizontal = relation in ("to the left of", "to the right of")
    objs = []
    for (color, shape), t in zip((a, b), along):
        center = (t, across) if horizontal else (across, t)
        objs.append(SceneObject(shape, color, "small", center, s))
    stated = frozenset(stated)
    return Scene(objs, background, caption_for(objs, background, relation, stated), stated, relation, image_size)


def sample_scene(
    rng: np.random.Generator, train: bool = True, p_two: float = 0.3, p_drop: float = 0.3, image_size: int = 64
) -> Scene:
    """A random scene and its caption. Each optional caption part is dropped with probability p_drop (the
    attribute is still drawn at random). train=True never uses a HELD_OUT (color, shape) pair."""
    pairs = SEEN_PAIRS if train else ALL_PAIRS
    background = str(rng.choice(list(BACKGROUNDS)))
    if rng.random() < p_two:
        a = pairs[rng.integers(len(pairs))]
        b_choices = [p for p in pairs if p[0] != a[0]]
        b = b_choices[rng.integers(len(b_choices))]
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        stated: tuple[str, ...] = ("background",) if rng.random() >= p_drop else ()
        return pair_scene(rng, a, relation, b, background, stated, image_size)
    color, shape = pairs[rng.integers(len(pairs))]
    size = SIZES[rng.integers(len(SIZES))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    stated = tuple(part for part in OPTIONAL_PARTS if rng.random() >= p_drop)
    return single_scene(shape, color, size, position, background, stated, image_size)


def render(scene: Scene, size: int | None = None) -> np.ndarray:
    """(size, size, 3) uint8: solid fills in the exact palette, no anti-aliasing (default size: the scene's).

    A pixel belongs to a shape when its center is inside it: square = the whole box; circle = within
    side/2 of the box center; triangle = upright isosceles, apex at the top middle, base = the box's
    bottom row, row r (from the top) spanning (r + 1) / 2 either side of the middle (width == height)."""
    size = size or scene.image_size
    scale = size / scene.image_size
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box(scale)
        s = x1 - x0
        ys, xs = np.mgrid[y0:y1, x0:x1]
        px, py = xs + 0.5 - (x0 + s / 2), ys + 0.5 - (y0 + s / 2)  # pixel centers relative to the box center
        if obj.shape == "square":
            inside = np.ones((s, s), bool)
        elif obj.shape == "circle":
            inside = px**2 + py**2 <= (s / 2) ** 2
        elif obj.shape == "triangle":
            inside = np.abs(px) <= (ys - y0 + 1) / 2
        else:
            raise ValueError(f"unknown shape {obj.shape!r}; use one of {SHAPES}")
        ok = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size) & inside
        image[ys[ok], xs[ok]] = COLORS[obj.color]
    return image


# ---------------------------------------------------------------------------------------------- captions back to specs

_C, _S, _B = "|".join(COLORS), "|".join(SHAPES), "|".join(BACKGROUNDS)
_P = "|".join(POSITION_PHRASES.values())
_R = "|".join(RELATIONS)
ONE_OBJECT_RE = re.compile(rf"a (?:(small|large) )?({_C}) ({_S})(?: ({_P}))?(?: on a ({_B}) background)?")
TWO_OBJECT_RE = re.compile(rf"a ({_C}) ({_S}) ({_R}) a ({_C}) ({_S})(?: on a ({_B}) background)?")


@dataclass(frozen=True)
class ObjectSpec:
    color: str
    shape: str
    size: str | None = None  # None: not stated
    position: str | None = None


@dataclass(frozen=True)
class PromptSpec:
    """What a caption asks for; unstated attributes are None."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    background: str | None = None


def parse_caption(caption: str) -> PromptSpec:
    """The spec of a grammar caption; ValueError for anything else."""
    text = caption.strip()
    if m := ONE_OBJECT_RE.fullmatch(text):
        size, color, shape, where, bg = m.groups()
        position = None if where is None else where.removeprefix("in the ").removeprefix("at the ")
        return PromptSpec((ObjectSpec(color, shape, size, position),), None, bg)
    if m := TWO_OBJECT_RE.fullmatch(text):
        c1, s1, relation, c2, s2, bg = m.groups()
        return PromptSpec((ObjectSpec(c1, s1, "small"), ObjectSpec(c2, s2, "small")), relation, bg)
    raise ValueError(
        f"{caption!r} is not a shapes caption: expected 'a [small|large] <color> <shape> "
        "[at the top left|...|in the center] [on a <background> background]' or "
        "'a <color> <shape> <to the left of|to the right of|above|below> a <color> <shape> [...]'"
    )


def scene_from_caption(caption: str, rng: np.random.Generator, image_size: int = 64) -> Scene:
    """A scene that matches the caption; what it leaves out is drawn with rng."""
    spec = parse_caption(caption)
    background = spec.background or str(rng.choice(list(BACKGROUNDS)))
    stated = tuple(k for k, v in (("background", spec.background),) if v)
    if spec.relation is not None:
        a, b = spec.objects
        return pair_scene(rng, (a.color, a.shape), spec.relation, (b.color, b.shape), background, stated, image_size)
    (o,) = spec.objects
    size = o.size or SIZES[rng.integers(len(SIZES))]
    position = o.position or POSITIONS[rng.integers(len(POSITIONS))]
    stated += tuple(k for k, v in (("size", o.size), ("position", o.position)) if v)
    return single_scene(o.shape, o.color, size, position, background, stated, image_size)


# ---------------------------------------------------------------------------------------------- dataset


class ShapesDataset(torch.utils.data.Dataset):
    """n procedurally generated captioned images; item i is a pure function of (seed, i):
    render(sample_scene(np.random.default_rng([seed, i]), ...)). Same item format as the training data layer.
    caption_dropout: probability that item i's caption is empty (drawn from its own stream, so the scenes
    do not change with it); the unconditional half of classifier-free guidance is learned from those."""

    def __init__(
        self,
        n: int = 10**9,
        seed: int = 0,
        image_size: int = 64,
        train: bool = True,
        p_two: float = 0.3,
        p_drop: float = 0.3,
        caption_dropout: float = 0.0,
    ):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout {caption_dropout}: must be a probability in [0, 1] (0.1 is usual)")
        self.n, self.seed, self.image_size = n, seed, image_size
        self.train, self.p_two, self.p_drop, self.caption_dropout = train, p_two, p_drop, caption_dropout

    def __len__(self) -> int:
        return self.n

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        rng = np.random.default_rng([self.seed, index])
        return sample_scene(rng, self.train, self.p_two, self.p_drop, self.image_size)

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        pixels = torch.from_numpy(render(scene)).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W) in [-1, 1]
        drop = self.caption_dropout > 0 and np.random.default_rng([self.seed, index, 1]).random() < self.caption_dropout
        return {"pixels": pixels, "caption": "" if drop else scene.caption, "index": index}


# ---------------------------------------------------------------------------------------------- analyzer


@dataclass
class DetectedObject:
    color: str  # nearest palette color of the component's core pixels
    shape: str
    size: str
    position: str
    center: tuple[float, float]  # (x, y) of the bounding box center, pixels
    centroid: tuple[float, float]
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1), end exclusive
    area: int
    fill: float  # area / box area
    top: float  # share of the area above the box's middle
    rgb: tuple[float, float, float]  # measured color


def _nearest(rgb, palette: dict) -> str:
    names = list(palette)
    d = np.linalg.norm(np.asarray([palette[n] for n in names], float) - np.asarray(rgb, float), axis=1)
    return names[int(d.argmin())]


def estimate_background(image: np.ndarray) -> tuple[float, float, float]:
    """The most common color: the fullest cell of a 32-level RGB histogram (cells centered on multiples of
    32, so the gray background sits mid-cell), refined to the median of the pixels within 48 of it."""
    pixels = image.reshape(-1, 3).astype(np.float64)
    cell = (pixels.astype(np.int64) + 16) // 32  # 0..8 per channel
    key = (cell[:, 0] * 9 + cell[:, 1]) * 9 + cell[:, 2]
    bg = np.median(pixels[key == np.bincount(key).argmax()], axis=0)
    for _ in range(2):  # the cell cuts a noisy background's spread; widen to its neighbourhood
        bg = np.median(pixels[np.linalg.norm(pixels - bg, axis=1) < 48], axis=0)
    return float(bg[0]), float(bg[1]), float(bg[2])


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean (H, W) mask: labels (0 = off, 1..k) and k.
    Min-label propagation with pointer jumping, in numpy (no scipy)."""
    h, w = mask.shape
    off = h * w
    lab = np.where(mask, np.arange(off).reshape(h, w), off)
    while True:
        new = lab.copy()
        np.minimum(new[1:], lab[:-1], out=new[1:])
        np.minimum(new[:-1], lab[1:], out=new[:-1])
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        new[~mask] = off
        flat = new.ravel()
        fg = flat < off
        for _ in range(2):  # every label is the index of a pixel of the same component: jump through it
            flat[fg] = flat[flat[fg]]
        if np.array_equal(new, lab):
            break
        lab = new
    roots, labels = np.unique(lab[mask], return_inverse=True)
    out = np.zeros((h, w), np.int64)
    out[mask] = labels + 1
    return out, len(roots)


def _box3(a: np.ndarray) -> np.ndarray:
    """3x3 mean, edges repeated."""
    p = np.pad(a, 1, mode="edge")
    h, w = a.shape
    total = np.zeros(a.shape, dtype=p.dtype)  # sum of the 9 shifted copies, in the input dtype
    for i in range(3):
        for j in range(3):
            total += p[i : i + h, j : j + w]
    return total / 9.0


def _dilate8(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for i in range(3):
        for j in range(3):
            out |= p[i : i + h, j : j + w]
    return out


def _position(x: float, y: float, image_size: int) -> str:
    half = image_size / 2
    if abs(x - half) < CENTER_ZONE * image_size and abs(y - half) < CENTER_ZONE * image_size:
        return "center"
    return ("top " if y < half else "bottom ") + ("left" if x < half else "right")


def analyze(image: np.ndarray, background=None, min_area: int | None = None) -> list[DetectedObject]:
    """The objects in an (H, W, 3) uint8 image, largest first.

    1. Background: `background` (a BACKGROUNDS name or an RGB triple), else `estimate_background`.
    2. Foreground: pixels farther than FOREGROUND_DISTANCE (40) in RGB from the background; 4-connected
       components; components under min_area pixels (default S*S/400, 10 at 64x64) are dropped.
    3. Color: the nearest palette color to the median of the component's core (pixels at or above its
       75th distance percentile, i.e. least mixed with the background).
    4. Body: t = projection of (pixel - background) on (color - background), as a fraction of it (0 on the
       background, 1 on the color), averaged over 3x3 (noise); the body is where t >= 0.5 next to the
       component. Under blur the t = 0.5 line stays on the original edge. Box and area come from the body.
    5. Shape: fill = area / box area (square ~1.0, circle ~pi/4, triangle ~0.5) and top = the share of the
       area above the box's middle (upright triangle ~1/4, circle and square 1/2, blur leaves it alone):
       triangle if fill < CIRCLE_MIN_FILL (0.68) or top < TRIANGLE_MAX_TOP (0.40); else square if
       fill >= SQUARE_MIN_FILL (0.85), else circle.
    6. Size: large when the box side max(w, h) >= LARGE_MIN_WIDTH * S (0.35: 22.4 px at 64; boxes are 13 / 32).
    7. Position from the box center (the point the generator places; a triangle's centroid sits side/6
       below it): "center" when both |x - S/2| and |y - S/2| are under S/8 (8 px at 64), else the quadrant
       of the center (x < S/2: left, y < S/2: top).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    h, w = image.shape[:2]
    side = (h + w) / 2
    if background is None:
        bg = np.asarray(estimate_background(image))
    else:
        bg = np.asarray(BACKGROUNDS[background] if isinstance(background, str) else background, float)
    min_area = max(4, round(h * w / 400)) if min_area is None else min_area
    img = image.astype(np.float64)
    diff = img - bg
    dist = np.linalg.norm(diff, axis=2)
    labels, k = label_components(dist > FOREGROUND_DISTANCE)
    counts = np.bincount(labels.ravel(), minlength=k + 1)
    found = []
    for lab in range(1, k + 1):
        if counts[lab] < min_area:
            continue
        comp = labels == lab
        d = dist[comp]
        core = img[comp][d >= np.percentile(d, 75)]
        rgb = np.median(core, axis=0)
        color = _nearest(rgb, COLORS)
        axis = np.asarray(COLORS[color], float) - bg
        t = _box3((diff @ axis) / max(float(axis @ axis), 1e-6))
        body = _dilate8(comp) & ((labels == 0) | comp) & (t >= 0.5)
        area = int(body.sum())
        if area < min_area:
            continue
        ys, xs = np.nonzero(body)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        bw, bh = x1 - x0, y1 - y0
        fill = area / (bw * bh)
        mid = (y0 + y1) / 2 - 0.5  # the row index at the box's middle (a half-integer between two rows when bh is even)
        top = (np.sum(ys < mid) + 0.5 * np.sum(ys == mid)) / area
        if fill < CIRCLE_MIN_FILL or top < TRIANGLE_MAX_TOP:
            shape = "triangle"
        else:
            shape = "square" if fill >= SQUARE_MIN_FILL else "circle"
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        found.append(
            DetectedObject(
                color=color,
                shape=shape,
                size="large" if max(bw, bh) >= LARGE_MIN_WIDTH * side else "small",
                position=_position(cx, cy, side),
                center=(cx, cy),
                centroid=(float(xs.mean()) + 0.5, float(ys.mean()) + 0.5),
                box=(x0, y0, x1, y1),
                area=area,
                fill=float(fill),
                top=float(top),
                rgb=(float(rgb[0]), float(rgb[1]), float(rgb[2])),
            )
        )
    found.sort(key=lambda o: -o.area)
    return found


def relation_holds(a: tuple[float, float], relation: str, b: tuple[float, float], image_size: int = 64) -> bool:
    """a <relation> b for two (x, y) centers: the coordinate along the relation's axis differs by more than
    RELATION_MARGIN * S in the right direction (image y grows downward)."""
    m = RELATION_MARGIN * image_size
    return {
        "to the left of": b[0] - a[0] > m,
        "to the right of": a[0] - b[0] > m,
        "above": b[1] - a[1] > m,
        "below": a[1] - b[1] > m,
    }[relation]


def _largest_of_color(found: list[DetectedObject], color: str) -> DetectedObject | None:
    return next((o for o in found if o.color == color), None)  # analyze lists the largest first


def score(spec: PromptSpec | str, image: np.ndarray) -> dict[str, bool]:
    """Verdicts on an image for what a caption (or its PromptSpec) states.

    One object: the largest detected object is judged: color_ok, shape_ok, color_and_shape_ok, and size_ok /
    position_ok when stated; count_ok = exactly one object. Two objects: each asked (color, shape) must be the
    largest detected object of that color with that shape (objects_ok); relation_ok compares the box centers
    of the largest object of each asked color; count_ok = exactly two. background_ok when stated.
    all_ok: every verdict."""
    if isinstance(spec, str):
        spec = parse_caption(spec)
    image = np.asarray(image)
    side = (image.shape[0] + image.shape[1]) / 2
    found = analyze(image)
    out = {}
    if spec.relation is None:
        (want,) = spec.objects
        got = found[0] if found else None
        out["count_ok"] = len(found) == 1
        out["color_ok"] = got is not None and got.color == want.color
        out["shape_ok"] = got is not None and got.shape == want.shape
        out["color_and_shape_ok"] = out["color_ok"] and out["shape_ok"]
        if want.size is not None:
            out["size_ok"] = got is not None and got.size == want.size
        if want.position is not None:
            out["position_ok"] = got is not None and got.position == want.position
    else:
        a, b = (_largest_of_color(found, o.color) for o in spec.objects)
        out["count_ok"] = len(found) == 2
        out["objects_ok"] = all(got is not None and got.shape == want.shape for got, want in zip((a, b), spec.objects))
        out["relation_ok"] = a is not None and b is not None and relation_holds(a.center, spec.relation, b.center, side)
    if spec.background is not None:
        out["background_ok"] = _nearest(estimate_background(image), BACKGROUNDS) == spec.background
    out["all_ok"] = all(out.values())
    return out


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class EvalPrompt:
    prompt: str
    kind: str  # "single" (seen pair), "heldout" (a HELD_OUT pair), "two" (two objects and a relation)
    scene: Scene  # a ground-truth scene for the prompt (every attribute stated)


def _balanced(rng: np.random.Generator, values, n: int) -> list:
    """n values, each used floor(n/k) or ceil(n/k) times, in random order."""
    values = list(values)
    out: list = []
    while len(out) < n:
        out += [values[i] for i in rng.permutation(len(values))]
    return out[:n]


def eval_prompts(n: int = 240, seed: int = 10_000_000, image_size: int = 64) -> list[EvalPrompt]:
    """A fixed evaluation set of fully specified prompts: n//4 held-out pairs, n//4 two-object relations,
    the rest single objects of seen pairs; within each group colors/shapes (as pairs), sizes, positions,
    backgrounds and relations are each balanced. Deterministic in (n, seed)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng([seed, 0x5EA])
    n_held = n_two = n // 4
    n_single = n - n_held - n_two
    out = []
    for kind, count, pairs in (("single", n_single, SEEN_PAIRS), ("heldout", n_held, sorted(HELD_OUT))):
        cols = [_balanced(rng, vals, count) for vals in (pairs, SIZES, POSITIONS, list(BACKGROUNDS))]
        for (color, shape), size, position, bg in zip(*cols):
            scene = single_scene(shape, color, size, position, bg, OPTIONAL_PARTS, image_size)
            out.append(EvalPrompt(scene.caption, kind, scene))
    cols = [_balanced(rng, vals, n_two) for vals in (SEEN_PAIRS, RELATIONS, list(BACKGROUNDS))]
    for a, relation, bg in zip(*cols):
        others = [p for p in SEEN_PAIRS if p[0] != a[0]]
        b = others[rng.integers(len(others))]
        scene = pair_scene(rng, a, relation, b, bg, ("background",), image_size)
        out.append(EvalPrompt(scene.caption, "two", scene))
    return out


# (group, metric label, kind, verdict keys that must all hold)
METRICS = (
    ("single object", "color", "single", ("color_ok",)),
    ("single object", "shape", "single", ("shape_ok",)),
    ("single object", "position", "single", ("position_ok",)),
    ("single object", "size", "single", ("size_ok",)),
    ("single object", "background", "single", ("background_ok",)),
    ("single object", "everything", "single", ("all_ok",)),
    ("held-out pair", "color and shape", "heldout", ("color_and_shape_ok",)),
    ("held-out pair", "color", "heldout", ("color_ok",)),
    ("held-out pair", "shape", "heldout", ("shape_ok",)),
    ("held-out pair", "everything", "heldout", ("all_ok",)),
    ("two objects", "both objects and relation", "two", ("objects_ok", "relation_ok")),
    ("two objects", "both objects", "two", ("objects_ok",)),
    ("two objects", "relation", "two", ("relation_ok",)),
)


def _to_uint8(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    if isinstance(images, list):  # PIL images
        return np.stack([np.asarray(im.convert("RGB")) for im in images])
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        return arr
    return (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def evaluate(
    pipe,
    n: int = 240,
    steps: int = 25,
    guidance: float | None = None,
    seed: int = 10_000_000,
    batch_size: int = 16,
    keep_images: bool = False,
    progress=None,
) -> dict:
    """Generate eval_prompts(n, seed) with `pipe` (image i from seed + i) and score every image.

    pipe: anything called like ldm.Pipeline: pipe(prompts, steps=, guidance_scale=, seed=, num_images=1,
    output_type="np", progress=False) -> (B, H, W, 3) floats in [0, 1]. progress: optional callable(done, n).
    Returns {"settings", "counts", "accuracy": {"<group>/<metric>": fraction}, "items": [{prompt, kind, seed,
    verdicts}]}, plus "images" (N, H, W, 3) uint8 when keep_images."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if guidance is None:  # the model's recommended value
        guidance = getattr(pipe, "default_guidance", 7.5)
    prompts = eval_prompts(n, seed)
    items: list[dict] = []
    kept: list = []
    for start in range(0, n, batch_size):
        batch = prompts[start : start + batch_size]
        images = _to_uint8(
            pipe(
                [p.prompt for p in batch],
                steps=steps,
                guidance_scale=guidance,
                seed=seed + start,
                num_images=1,
                output_type="np",
                progress=False,
            )
        )
        if len(images) != len(batch):
            raise ValueError(f"the pipeline returned {len(images)} images for {len(batch)} prompts")
        for i, (p, image) in enumerate(zip(batch, images)):
            items.append(
                {"prompt": p.prompt, "kind": p.kind, "seed": seed + start + i, "verdicts": score(p.prompt, image)}
            )
        if keep_images:
            kept.append(images)
        if progress is not None:
            progress(len(items), n)
    counts = {kind: sum(it["kind"] == kind for it in items) for kind in ("single", "heldout", "two")}
    accuracy = {}
    for group, label, kind, keys in METRICS:
        rows = [it["verdicts"] for it in items if it["kind"] == kind]
        if rows:
            accuracy[f"{group}/{label}"] = sum(all(v[k] for k in keys) for v in rows) / len(rows)
    result = {
        "settings": {"n": n, "steps": steps, "guidance": guidance, "seed": seed},
        "counts": counts,
        "accuracy": accuracy,
        "items": items,
    }
    if keep_images:
        result["images"] = np.concatenate(kept)
    return result


REVERSED = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}


def _first_object_side(spec: PromptSpec, image: np.ndarray) -> float | None:
    """Sign of (first-named object - second) along the relation's axis; None when a color is not found."""
    found = analyze(image)
    a, b = (_largest_of_color(found, o.color) for o in spec.objects)
    if a is None or b is None:
        return None
    axis = 0 if spec.relation in ("to the left of", "to the right of") else 1
    return float(np.sign(a.center[axis] - b.center[axis]))


def relation_swap(pipe, result: dict) -> dict[str, int]:
    """Do the words place the two objects, or the starting noise? Each two-object prompt of an
    `evaluate(..., keep_images=True)` result is drawn again from the same seed with its relation
    reversed ("left of" <-> "right of", "above" <-> "below"). Counts: "flipped", the first-named object
    moves to the other side of the second (the relation word decides); "kept", it stays (the noise
    decides); "missing", one of the two colors is absent from either image."""
    if "images" not in result:
        raise ValueError("relation_swap needs the images: call evaluate(..., keep_images=True)")
    s = result["settings"]
    counts = {"flipped": 0, "kept": 0, "missing": 0}
    for item, image in zip(result["items"], result["images"]):
        if item["kind"] != "two":
            continue
        spec = parse_caption(item["prompt"])
        assert spec.relation is not None  # a two-object caption names its relation
        swapped = item["prompt"].replace(spec.relation, REVERSED[spec.relation])
        again = _to_uint8(
            pipe(
                [swapped],
                steps=s["steps"],
                guidance_scale=s["guidance"],
                seed=item["seed"],
                num_images=1,
                output_type="np",
                progress=False,
            )
        )[0]
        before, after = _first_object_side(spec, image), _first_object_side(spec, again)
        if before is None or after is None:
            counts["missing"] += 1
        else:
            counts["flipped" if before * after < 0 else "kept"] += 1
    return counts


def format_report(result: dict) -> str:
    """The accuracies of `evaluate` as a text table."""
    s, c = result["settings"], result["counts"]
    lines = [
        f"{s['n']} images ({c['single']} single objects, {c['heldout']} held-out pairs, {c['two']} two-object), "
        f"{s['steps']} steps, guidance {s['guidance']}, seed {s['seed']}",
        f"  {'group':14} {'metric':26} {'accuracy':>8} {'n':>5}",
    ]
    kinds = {group: kind for group, _, kind, _ in METRICS}
    last = None
    for key, acc in result["accuracy"].items():
        group, label = key.split("/")
        lines.append(f"  {group if group != last else '':14} {label:26} {acc:8.1%} {c[kinds[group]]:5d}")
        last = group
    if "relation_swap" in result:
        r = result["relation_swap"]
        lines.append(
            f"  relation reversed, same seeds: the layout flips in {r['flipped']} of "
            f"{r['flipped'] + r['kept']} two-object prompts ({r['missing']} missing a color)"
        )
    return "\n".join(lines)


def contact_sheet(images: np.ndarray, items: list[dict], scale: int = 2, columns: int = 12):
    """A PIL image: each generated image (upscaled `scale`x) framed green when every verdict holds, red
    otherwise, above its index, kind (one / held / two) and failed verdicts ("no:" c=color s=shape
    p=position z=size b=background n=count o=objects r=relation)."""
    from PIL import Image, ImageDraw

    abbrev = {
        "color_ok": "c",
        "shape_ok": "s",
        "position_ok": "p",
        "size_ok": "z",
        "background_ok": "b",
        "count_ok": "n",
        "objects_ok": "o",
        "relation_ok": "r",
    }
    h, w = images.shape[1] * scale, images.shape[2] * scale
    pad, text_h = 3, 12
    tile_w, tile_h = w + 2 * pad, h + 2 * pad + text_h
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * tile_w, rows * tile_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (image, item) in enumerate(zip(images, items)):
        x, y = (i % columns) * tile_w, (i // columns) * tile_h
        ok = item["verdicts"]["all_ok"]
        draw.rectangle([x, y, x + tile_w - 1, y + h + 2 * pad - 1], fill=(40, 170, 60) if ok else (220, 40, 40))
        sheet.paste(Image.fromarray(image).resize((w, h), Image.Resampling.NEAREST), (x + pad, y + pad))
        failed = "".join(abbrev[k] for k, v in item["verdicts"].items() if not v and k in abbrev)
        tag = {"single": "one", "heldout": "held", "two": "two"}[item["kind"]]
        draw.text((x + pad, y + h + 2 * pad), f"{i} {tag}" + (f" no:{failed}" if failed else ""), fill=(0, 0, 0))
    return sheet


def result_to_json(result: dict) -> dict:
    """`evaluate`'s result without the images, ready for json.dump."""
    return {k: v for k, v in result.items() if k != "images"}


__all__ = [
    "COLORS",
    "BACKGROUNDS",
    "SHAPES",
    "SIZES",
    "POSITIONS",
    "RELATIONS",
    "HELD_OUT",
    "SEEN_PAIRS",
    "ALL_PAIRS",
    "SceneObject",
    "Scene",
    "caption_for",
    "single_scene",
    "pair_scene",
    "sample_scene",
    "render",
    "ObjectSpec",
    "PromptSpec",
    "parse_caption",
    "scene_from_caption",
    "ShapesDataset",
    "DetectedObject",
    "estimate_background",
    "label_components",
    "analyze",
    "relation_holds",
    "score",
    "EvalPrompt",
    "eval_prompts",
    "evaluate",
    "relation_swap",
    "REVERSED",
    "format_report",
    "contact_sheet",
    "result_to_json",
    "size_px",
]
