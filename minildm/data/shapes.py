"""The shapes world: procedural scenes of coloured shapes, rendered anti-aliased, with ground truth.

Item ``i`` of a stream is a pure function of ``(seed, i)``: :func:`make_scene` draws the scene
from ``numpy.random.default_rng([seed, i])`` and :func:`render` turns it into pixels. Nothing is
stored, so the dataset is infinite, reproducible and free.

A scene holds 1–3 objects, each on its own cell of a 3×3 grid (with a little jitter), over a
soft low-frequency textured background. Every object carries its ground truth: shape, colour,
size, grid cell, box and pixel mask. The scene is drawn for one of the six caption categories
of the evaluation (see :mod:`minildm.data.captions`), so every category is well represented.

Sizes: at 32 px a small object spans 7 px and a large one 10 px. Smaller shapes (4–5 px) are
not legible after an f = 4 autoencoder: crosses and triangles come back as blobs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from minildm.config import ShapesConfig

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SIZES = ("small", "large")
GRID = 3  # the image is a GRID × GRID board of cells; cell = row * GRID + col

# Reference RGB of each colour, in [0, 1]; each object gets a small random variation of it.
COLOUR_RGB = {
    "red": (0.86, 0.14, 0.14),
    "orange": (0.96, 0.55, 0.08),
    "yellow": (0.95, 0.87, 0.15),
    "green": (0.15, 0.68, 0.22),
    "blue": (0.15, 0.32, 0.90),
    "purple": (0.58, 0.22, 0.80),
}

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cell: int  # row * 3 + col
    centre: tuple[float, float]  # (x, y) in pixels
    extent: float  # side of the object's bounding square, pixels
    rgb: tuple[float, float, float]

    @property
    def row(self) -> int:
        return self.cell // GRID

    @property
    def col(self) -> int:
        return self.cell % GRID

    def describe(self) -> tuple[str, str, str, int]:
        """The attributes a caption can name: (shape, colour, size, cell)."""
        return (self.shape, self.colour, self.size, self.cell)


@dataclass(frozen=True)
class Scene:
    seed: int
    index: int
    image_size: int
    category: str
    objects: tuple[SceneObject, ...]
    background: dict = field(repr=False, compare=False, default_factory=dict)


# ------------------------------------------------------------------------------------------
# Sampling a scene
# ------------------------------------------------------------------------------------------

def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of item ``index``: independent of every other item."""
    return np.random.default_rng([seed, index])


def _place(rng, cfg: ShapesConfig, shape, colour, size, cell) -> SceneObject:
    s = cfg.image_size
    row, col = divmod(cell, GRID)
    jitter = rng.uniform(-cfg.jitter, cfg.jitter, size=2) * s
    centre = ((col + 0.5) * s / GRID + jitter[0], (row + 0.5) * s / GRID + jitter[1])
    extent = (cfg.small_size if size == "small" else cfg.large_size) * s
    base = np.array(COLOUR_RGB[colour])
    rgb = np.clip(base + rng.uniform(-0.04, 0.04, size=3), 0, 1)
    return SceneObject(shape, colour, size, int(cell), (float(centre[0]), float(centre[1])),
                       float(extent), tuple(float(c) for c in rgb))


def _pick(rng, options, exclude=()):
    allowed = [o for o in options if o not in exclude]
    return allowed[rng.integers(len(allowed))]


def _attributes(rng, n, shapes=None, colours=None):
    """n (shape, colour, size) triples; shapes/colours fixed when given."""
    out = []
    for k in range(n):
        shape = shapes[k] if shapes else _pick(rng, SHAPES)
        colour = colours[k] if colours else _pick(rng, COLOURS)
        out.append((shape, colour, _pick(rng, SIZES)))
    return out


def _cells_for_relation(rng) -> list[int]:
    """Two cells on one row or one column, so exactly one of left/right/above/below holds."""
    line = rng.integers(GRID)
    a, b = rng.choice(GRID, size=2, replace=False)
    if rng.random() < 0.5:  # same row
        return [int(line * GRID + a), int(line * GRID + b)]
    return [int(a * GRID + line), int(b * GRID + line)]


def make_scene(seed: int, index: int, cfg: ShapesConfig = ShapesConfig(),
               category: str | None = None) -> Scene:
    """Scene ``index`` of stream ``seed``: a pure function of its arguments."""
    rng = scene_rng(seed, index)
    category = category or CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    distractor = rng.random() < 0.3  # a third object that the category caption does not name
    if category in ("single_object", "colors"):
        attrs = _attributes(rng, 1)
    elif category == "two_object":
        a = _pick(rng, SHAPES)
        attrs = _attributes(rng, 2, shapes=[a, _pick(rng, SHAPES, exclude=[a])])
    elif category == "color_attr" or category == "position":
        a = _pick(rng, SHAPES)
        ca = _pick(rng, COLOURS)
        b = _pick(rng, SHAPES, exclude=[a] if category == "color_attr" else [])
        cb = _pick(rng, COLOURS, exclude=[ca])
        attrs = _attributes(rng, 2, shapes=[a, b], colours=[ca, cb])
    elif category == "counting":
        shape, colour = _pick(rng, SHAPES), _pick(rng, COLOURS)
        count = 2 + int(rng.integers(2))
        attrs = _attributes(rng, count, shapes=[shape] * count, colours=[colour] * count)
        distractor = distractor and count == 2
    else:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    if distractor and category not in ("single_object", "colors"):
        named = {a[0] for a in attrs}
        attrs.append((_pick(rng, SHAPES, exclude=named), _pick(rng, COLOURS), _pick(rng, SIZES)))

    if category == "position":
        cells = _cells_for_relation(rng)
        free = [c for c in range(GRID * GRID) if c not in cells]
        cells += [int(c) for c in rng.choice(free, size=len(attrs) - 2, replace=False)]
    else:
        cells = [int(c) for c in rng.choice(GRID * GRID, size=len(attrs), replace=False)]
    objects = tuple(_place(rng, cfg, *attr, cell) for attr, cell in zip(attrs, cells))
    background = {
        "tint": rng.uniform(0.38, 0.62) + rng.uniform(-0.05, 0.05, size=3),
        "grid": rng.normal(0.0, 0.07, size=(4, 4, 3)) + rng.normal(0.0, 0.05, size=(4, 4, 1)),
    }
    return Scene(seed, index, cfg.image_size, category, objects, background)


# ------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------

def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    """Whether points at offset (dx, dy) from the centre lie inside the shape of half-extent h."""
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "square":
        return (np.abs(dx) <= 0.86 * half) & (np.abs(dy) <= 0.86 * half)
    if shape == "triangle":  # apex up, base at +0.85h
        base = 0.85 * half
        return (dy >= -half) & (dy <= base) & (np.abs(dx) <= half * (dy + half) / (base + half))
    if shape == "cross":  # a plus sign with arms 0.76h thick
        arm = 0.38 * half
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= half)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= half))
    raise ValueError(f"unknown shape {shape!r}")


def coverage(obj: SceneObject, image_size: int, supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel covered by the object, (H, W) in [0, 1] — the anti-aliasing.

    Only the pixels of the object's bounding window are supersampled; the rest stay 0.
    """
    s, k = image_size, supersample
    reach = obj.extent / 2 + 1
    x0, x1 = max(int(obj.centre[0] - reach), 0), min(int(obj.centre[0] + reach) + 1, s)
    y0, y1 = max(int(obj.centre[1] - reach), 0), min(int(obj.centre[1] + reach) + 1, s)
    sub_x = x0 + (np.arange((x1 - x0) * k) + 0.5) / k  # sub-pixel centres, pixel units
    sub_y = y0 + (np.arange((y1 - y0) * k) + 0.5) / k
    dx = sub_x[None, :] - obj.centre[0]
    dy = sub_y[:, None] - obj.centre[1]
    inside = _inside(obj.shape, dx, dy, obj.extent / 2).astype(np.float32)
    out = np.zeros((s, s), np.float32)
    out[y0:y1, x0:x1] = inside.reshape(y1 - y0, k, x1 - x0, k).mean(axis=(1, 3))
    return out


@functools.lru_cache(maxsize=8)
def _upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) bilinear interpolation matrix, corners aligned."""
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.floor(pos).astype(int).clip(0, n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] = 1 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def render_background(scene: Scene) -> np.ndarray:
    """Soft low-frequency texture: a 4×4 random grid bilinearly upsampled, (H, W, 3)."""
    m = _upsample_matrix(4, scene.image_size)
    grid = scene.background["grid"]
    texture = np.stack([m @ grid[..., c] @ m.T for c in range(3)], axis=-1)  # (H, W, 3)
    return np.clip(scene.background["tint"][None, None, :] + texture, 0, 1)


def render(scene: Scene, supersample: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and masks of a scene.

    Returns ``image`` (H, W, 3) float32 in [0, 1] and ``masks`` (n_objects, H, W) bool, where a
    pixel belongs to an object when the object covers at least half of it.
    """
    image = render_background(scene).astype(np.float32)
    masks = []
    for obj in scene.objects:
        alpha = coverage(obj, scene.image_size, supersample)[..., None]
        image = image * (1 - alpha) + np.asarray(obj.rgb, dtype=np.float32) * alpha
        masks.append(alpha[..., 0] >= 0.5)
    masks = np.stack(masks) if masks else np.zeros((0, scene.image_size, scene.image_size), bool)
    return image.astype(np.float32), masks


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight pixel box (x0, y0, x1, y1) of a mask, end-exclusive."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def render_item(seed: int, index: int, cfg: ShapesConfig = ShapesConfig()) -> dict:
    """Item ``index`` of stream ``seed``: image, masks, boxes, the scene and its captions."""
    from minildm.data.captions import category_caption, full_caption

    scene = make_scene(seed, index, cfg)
    image, masks = render(scene, cfg.supersample)
    return {
        "image": image,
        "masks": masks,
        "boxes": [box_of(m) for m in masks],
        "scene": scene,
        "caption": category_caption(scene),
        "full_caption": full_caption(scene),
    }
