"""Synthetic video corpus: the data of the demo and of the tests.

Real video files written through ffmpeg (numpy renders rgb24 frames, ffmpeg's stdin takes them),
fully determined by ``SynthSpec.seed``. Two kinds of content:

* **Labelled motion clips.** A textured object (a crop of a scikit-image photo or a procedural
  texture, under a non-symmetric shape mask with an optional contrasting border) over a textured,
  slowly drifting background. The class is the object's *motion* only: ``move_left``,
  ``move_right``, ``move_up``, ``move_down``, ``approach`` (grows), ``recede`` (shrinks),
  ``rotate_cw``, ``rotate_ccw``.
  Appearance is drawn from the same distribution for every class, so a single frame cannot tell the
  classes apart; paired classes are exact time reverses of each other for the same generator state.
  The same clips are written in three layouts (see below).
* **Uncurated videos.** Longer unlabelled videos made of 1-4 s shots with hard cuts, in mixed
  containers/codecs (mp4/H.264, webm/VP9, avi/MPEG-4), sizes, aspect ratios and frame rates, some
  with an audio track: the stand-in for a pre-training crawl.

Layouts under ``out_dir`` (paths relative to it):

* ``list/``: ``train.txt`` and ``val.txt`` with ``videos/{Class}/{split}_{i:03d}.mp4 {label}`` lines
  (0-based labels, paths relative to ``list/``; the videos are H.264 mp4 files of their own under
  ``list/videos/`` so the layout stands alone), plus ``classes.txt`` (one class name a line).
* ``ssv2/``: Something-Something V2's release layout: ``20bn-something-something-v2/{id}.webm``
  (VP9) and ``labels/something-something-v2-{labels,train,validation,test}.json``. The test split
  has ``val_per_class`` extra clips per class whose labels are withheld (ids only).
* ``ucf101/``: UCF101's layout: ``UCF-101/{Class}/v_{Class}_gGG_cCC.avi`` (MPEG-4, XVID tag) and
  ``ucfTrainTestlist/{classInd,trainlist0k,testlist0k}.txt`` with CRLF line endings. Split 1's test
  groups hold exactly the ``val`` clips; splits 2 and 3 test the next groups.
* ``uncurated/``: ``video_{j:03d}.{mp4,webm,avi}`` plus ``shots.json`` (per video: size, fps,
  codec, audio, and each shot's first frame and motion).

``corpus.json`` records the spec and a summary; a finished folder with the same spec is left alone.
Class indices follow ``SynthSpec.classes`` order in every layout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import subprocess
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vimpac.common.ffmpeg_exe import ffmpeg_exe
from vimpac.common.progress import NULL_PROGRESS, Progress

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

# Motion class -> (SSV2-style template, UCF101-style CamelCase class name).
MOTIONS: dict[str, tuple[str, str]] = {
    "move_left": ("Moving [something] from right to left", "MoveLeft"),
    "move_right": ("Moving [something] from left to right", "MoveRight"),
    "move_up": ("Moving [something] up", "MoveUp"),
    "move_down": ("Moving [something] down", "MoveDown"),
    "approach": ("Moving [something] towards the camera", "Approach"),
    "recede": ("Moving [something] away from the camera", "Recede"),
    "rotate_cw": ("Turning [something] clockwise", "RotateCw"),
    "rotate_ccw": ("Turning [something] counterclockwise", "RotateCcw"),
    # Not in DEFAULT_CLASSES; used by uncurated shots (and allowed as classes).
    "still": ("Holding [something] still", "Still"),
    "pan": ("Turning the camera while filming [something]", "Pan"),
}
DEFAULT_CLASSES: tuple[str, ...] = (
    "move_left", "move_right", "move_up", "move_down",
    "approach", "recede", "rotate_cw", "rotate_ccw",
)
LAYOUTS: tuple[str, ...] = ("list", "ssv2", "ucf101")


@dataclass
class SynthSpec:
    """What :func:`write_corpus` writes; every field is part of the corpus identity."""

    seed: int = 0  # everything below is a pure function of this seed
    classes: tuple[str, ...] = DEFAULT_CLASSES  # motion classes (keys of MOTIONS), label order
    train_per_class: int = 12  # labelled videos per class in the train split
    val_per_class: int = 4  # labelled videos per class in the val/test split
    width: int = 96  # labelled clip frame width (even)
    height: int = 96  # labelled clip frame height (even)
    clip_seconds: float = 2.0  # labelled clip duration
    clip_fps: int = 12  # labelled clip frame rate
    uncurated_videos: int = 12  # unlabelled multi-shot videos
    uncurated_seconds: tuple[float, float] = (6.0, 12.0)  # uncurated duration range
    layouts: tuple[str, ...] = LAYOUTS  # labelled layouts to write (subset of LAYOUTS)
    background_contrast: tuple[float, float] = (0.35, 0.75)  # background texture contrast range
    travel: tuple[float, float] = (0.4, 0.62)  # move_* distance range, fraction of the frame side
    camera_drift: float = 0.1  # largest background drift over a clip, fraction of the frame side

    @property
    def clip_frames(self) -> int:
        """Frames per labelled clip."""
        return int(round(self.clip_seconds * self.clip_fps))

    @property
    def scene(self) -> Scene:
        return Scene(tuple(self.background_contrast), tuple(self.travel), self.camera_drift)


@dataclass(frozen=True)
class Scene:
    """How a clip looks and moves, beyond its motion class (every clip of a corpus shares it)."""

    background_contrast: tuple[float, float] = (0.35, 0.75)
    travel: tuple[float, float] = (0.4, 0.62)
    camera_drift: float = 0.1


def classes_problem(classes: Sequence[str], minimum: int = 1) -> str | None:
    """Why ``classes`` cannot be a corpus's motion classes, or None when they can."""
    if (len(classes) < minimum or len(set(classes)) != len(classes)
            or any(c not in MOTIONS for c in classes)):
        return f"expected {minimum} or more distinct names from {sorted(MOTIONS)}"
    return None


def validate_spec(spec: SynthSpec) -> None:
    """Raise ValueError naming the field and value of the first invalid setting."""
    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"SynthSpec.{field}={getattr(spec, field)!r}: {why}")

    why = classes_problem(spec.classes)
    if why:
        raise bad("classes", why)
    for field in ("train_per_class", "val_per_class"):
        if getattr(spec, field) < 1:
            raise bad(field, "must be >= 1")
    for field in ("width", "height"):
        value = getattr(spec, field)
        if value < 16 or value % 2:
            raise bad(field, "must be an even number >= 16 (yuv420p video)")
    if spec.clip_fps < 1 or spec.clip_frames < 2:
        raise bad("clip_seconds", f"with clip_fps={spec.clip_fps} gives < 2 frames")
    lo, hi = spec.uncurated_seconds
    if spec.uncurated_videos < 0:
        raise bad("uncurated_videos", "must be >= 0")
    if not 0.5 <= lo <= hi:
        raise bad("uncurated_seconds", "must be (low, high) with 0.5 <= low <= high")
    for field in ("background_contrast", "travel"):
        lo, hi = getattr(spec, field)
        if not 0.0 <= lo <= hi <= 1.0:
            raise bad(field, "must be (low, high) with 0 <= low <= high <= 1")
    if not 0.0 <= spec.camera_drift <= 1.0:
        raise bad("camera_drift", "must be in [0, 1]")
    extra = [x for x in spec.layouts if x not in LAYOUTS]
    if extra:
        raise bad("layouts", f"unknown {extra}; known: {list(LAYOUTS)}")


def spec_from_config(d: Any) -> SynthSpec:
    """The corpus a pipeline's ``data`` section describes (a DataConfig)."""
    return SynthSpec(seed=d.synth_seed, classes=tuple(d.synth_classes),
                     train_per_class=d.synth_train_per_class,
                     val_per_class=d.synth_val_per_class, width=d.synth_size,
                     height=d.synth_size, uncurated_videos=d.synth_uncurated_videos,
                     background_contrast=tuple(d.synth_background_contrast),
                     travel=tuple(d.synth_travel), camera_drift=d.synth_camera_drift)


def spec_to_json(spec: SynthSpec) -> dict[str, Any]:
    """The spec as plain JSON types (tuples become lists), for corpus.json."""
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def camel_name(cls: str) -> str:
    """UCF101-style class folder name of a motion class, e.g. 'move_left' -> 'MoveLeft'."""
    return MOTIONS[cls][1]


# ---------------------------------------------------------------------------------------------
# Textures: float32 [H, W, 3] in [0, 1]
# ---------------------------------------------------------------------------------------------

_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "immunohistochemistry",
           "brick", "grass", "gravel", "moon", "coins", "colorwheel")
_PROCEDURAL = ("noise", "stripes", "checker")


@functools.cache
def _photo(name: str) -> tuple[np.ndarray, bool] | None:
    """(float32 RGB [H, W, 3], is grey) of a scikit-image sample image; None without skimage."""
    try:
        import skimage.data
    except ImportError:  # pragma: no cover - scikit-image is installed in dev environments
        return None
    img = np.asarray(getattr(skimage.data, name)())
    grey = img.ndim == 2
    if grey:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3], dtype=np.float32) / 255.0, grey


def _procedural(kind: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A random procedural texture, float32 [size, size, 3]."""
    if kind == "noise":
        cells = int(rng.integers(4, 12))
        grid = rng.random((cells, cells, 3), dtype=np.float32)
        yy = np.linspace(0, cells - 1, size, dtype=np.float32)
        return _bilinear(grid, yy[:, None], yy[None, :])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ang = rng.uniform(0, np.pi)
    period = rng.uniform(10, 40)
    u = xx * np.cos(ang) + yy * np.sin(ang)
    if kind == "stripes":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * u / period)
    else:  # checker
        v = -xx * np.sin(ang) + yy * np.cos(ang)
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    c0, c1 = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
    return c0 + t[..., None] * (c1 - c0)


@dataclass
class _Texture:
    """An image and the random colour map applied to what is sampled from it."""

    name: str
    image: np.ndarray  # float32 [H, W, 3] in [0, 1]
    mix: np.ndarray  # float32 [3, 3]: out = sample @ mix + offset
    offset: np.ndarray  # float32 [3]

    def sample(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Colour-mapped bilinear samples at float coords (broadcast shapes S): [*S, 3]."""
        return np.clip(_bilinear(self.image, ys, xs) @ self.mix + self.offset, 0.0, 1.0)


def _random_texture(rng: np.random.Generator, avoid: str = "") -> _Texture:
    """A random texture (never the one named `avoid`) with a random colour map."""
    names = [n for n in _PHOTOS + _PROCEDURAL if n != avoid]
    name = names[int(rng.integers(len(names)))]
    photo = _photo(name) if name in _PHOTOS else None
    if photo is None:
        kind = name if name in _PROCEDURAL else _PROCEDURAL[int(rng.integers(3))]
        image, grey = _procedural(kind, rng), False
    else:
        image, grey = photo
    mix = np.zeros((3, 3), np.float32)
    if grey:  # tint grey photos: black -> a dark colour, white -> a light colour
        dark = rng.random(3, dtype=np.float32) * 0.5
        light = 0.5 + rng.random(3, dtype=np.float32) * 0.5
        mix[0] = light - dark
        return _Texture(name, image, mix, dark)
    mix[rng.permutation(3), np.arange(3)] = rng.uniform(0.7, 1.3, 3)  # permute + gain channels
    return _Texture(name, image, mix, np.zeros(3, np.float32))


def _bilinear(img: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Sample img [H, W, C] at float coords (broadcast shapes S), edges clamped: float32 [*S, C]."""
    h, w, c = img.shape
    ys = np.clip(ys, 0, h - 1.001).astype(np.float32)
    xs = np.clip(xs, 0, w - 1.001).astype(np.float32)
    y0, x0 = np.floor(ys), np.floor(xs)
    fy, fx = (ys - y0)[..., None], (xs - x0)[..., None]
    base = y0.astype(np.int32) * w + x0.astype(np.int32)  # flat index of the top-left tap
    flat = img.reshape(-1, c)
    top = np.take(flat, base, axis=0) * (1 - fx) + np.take(flat, base + 1, axis=0) * fx
    bot = np.take(flat, base + w, axis=0) * (1 - fx) + np.take(flat, base + w + 1, axis=0) * fx
    return top * (1 - fy) + bot * fy


# ---------------------------------------------------------------------------------------------
# Shapes: a star-shaped outline as radius-per-angle table R(phi), phi in [-pi, pi), max radius ~1.
# None is rotation-symmetric, so rotation is visible from the outline as well as the texture.
# ---------------------------------------------------------------------------------------------

_TABLE = 720
_SHAPES = ("blob", "triangle", "notched_square", "pacman", "ellipse")


def _polygon_table(angles: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """R(phi) [_TABLE] of the star-shaped polygon with vertices at (angles, radii) about 0."""
    order = np.argsort(angles)
    a, r = angles[order], radii[order]
    pts = np.stack([r * np.cos(a), r * np.sin(a)], 1)  # [K, 2]
    phi = np.linspace(-np.pi, np.pi, _TABLE, endpoint=False)
    edge = (np.searchsorted(a, phi, side="right") - 1) % len(a)  # vertex starting each ray's edge
    p, q = pts[edge], pts[(edge + 1) % len(a)]
    e = q - p
    d = np.stack([np.cos(phi), np.sin(phi)], 1)
    cross_pe = p[:, 0] * e[:, 1] - p[:, 1] * e[:, 0]
    cross_de = d[:, 0] * e[:, 1] - d[:, 1] * e[:, 0]
    return (cross_pe / cross_de).astype(np.float32)


def _random_shape(rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """(name, R(phi) table [_TABLE] float32) of a random non-rotation-symmetric outline."""
    name = _SHAPES[int(rng.integers(len(_SHAPES)))]
    phi = np.linspace(-np.pi, np.pi, _TABLE, endpoint=False)
    if name == "blob":
        k = int(rng.integers(5, 9))
        ang = 2 * np.pi * (np.arange(k) + rng.uniform(-0.3, 0.3, k)) / k - np.pi
        table = _polygon_table(ang, rng.uniform(0.55, 1.0, k))
    elif name == "triangle":
        beta = rng.uniform(0.45, 0.8)
        table = _polygon_table(np.array([0.0, np.pi - beta, beta - np.pi]),
                               np.array([1.0, 0.8, 0.8]))
    elif name == "notched_square":
        cut = rng.uniform(0.55, 0.75)
        ang = np.array([np.pi / 4 - 0.35, np.pi / 4 + 0.35, 3 * np.pi / 4, -3 * np.pi / 4,
                        -np.pi / 4])
        table = _polygon_table(ang, np.array([cut, cut, 1.0, 1.0, 1.0]))
    elif name == "pacman":
        mouth = rng.uniform(0.35, 0.6)
        table = np.where(np.abs(phi) < mouth, 0.12, 1.0).astype(np.float32)
    else:  # ellipse, axis ratio well away from 1
        b = rng.uniform(0.45, 0.65)
        table = (b / np.sqrt((b * np.cos(phi)) ** 2 + np.sin(phi) ** 2)).astype(np.float32)
    return name, table / table.max()


# ---------------------------------------------------------------------------------------------
# Trajectories: per-frame object centre (px), radius (px), angle (rad, + = clockwise on screen)
# and background offset (px). Paired classes are time reverses of one another.
# ---------------------------------------------------------------------------------------------

_REVERSE_OF = {"move_left": "move_right", "move_up": "move_down", "recede": "approach",
               "rotate_ccw": "rotate_cw"}
_DIRECTIONS = {"move_right": (1.0, 0.0), "move_down": (0.0, 1.0)}


@dataclass
class Track:
    """Per-frame scene parameters, each float32 [n]."""

    cx: np.ndarray  # object centre x, px
    cy: np.ndarray  # object centre y, px
    radius: np.ndarray  # object outer radius, px
    angle: np.ndarray  # object rotation, rad; increasing = clockwise on screen (y points down)
    bg_dx: np.ndarray  # background shift x, px (content moves by -bg_dx)
    bg_dy: np.ndarray  # background shift y, px

    def reversed(self) -> Track:
        return Track(*(a[::-1].copy() for a in dataclasses.astuple(self)))


def _ramp(rng: np.random.Generator, n: int) -> np.ndarray:
    """Progress 0 -> 1 over n frames with a mild random ease: float32 [n]."""
    t = np.linspace(0.0, 1.0, n)
    return (t ** rng.uniform(0.8, 1.25)).astype(np.float32)


def _track(motion: str, rng: np.random.Generator, n: int, h: int, w: int,
           scene: Scene = Scene()) -> Track:
    """Scene parameters of one clip of `motion` (see Track)."""
    if motion in _REVERSE_OF:
        return _track(_REVERSE_OF[motion], rng, n, h, w, scene).reversed()
    s = float(min(h, w))
    ramp = _ramp(rng, n)
    ones = np.ones(n, np.float32)
    drift_ang, drift = rng.uniform(-np.pi, np.pi), rng.uniform(0.0, scene.camera_drift) * s
    bg_dx, bg_dy = ramp * drift * np.cos(drift_ang), ramp * drift * np.sin(drift_ang)
    angle0 = rng.uniform(-np.pi, np.pi)
    cx0, cy0 = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    if motion in _DIRECTIONS:
        ux, uy = _DIRECTIONS[motion]
        length, across = (w, h) if ux else (h, w)
        dist = rng.uniform(*scene.travel) * length
        margin = 0.12 * length
        start = margin + rng.uniform() * (length - 2 * margin - dist)
        along = start + ramp * dist
        side = rng.uniform(0.25, 0.75) * across * ones
        cx, cy = (along, side) if ux else (side, along)
        return Track(cx, cy, rng.uniform(0.12, 0.24) * s * ones, angle0 * ones, bg_dx, bg_dy)
    if motion == "approach":
        r0, k = rng.uniform(0.08, 0.12) * s, rng.uniform(2.0, 2.6)
        wob_a, wob = rng.uniform(-np.pi, np.pi), rng.uniform(0, 0.06) * s
        cx, cy = cx0 + ramp * wob * np.cos(wob_a), cy0 + ramp * wob * np.sin(wob_a)
        return Track(cx, cy, r0 * k ** ramp, angle0 * ones, bg_dx, bg_dy)
    if motion == "rotate_cw":
        turn = rng.uniform(0.6, 1.1) * np.pi
        r = rng.uniform(0.12, 0.24) * s * ones
        return Track(cx0 * ones, cy0 * ones, r, angle0 + ramp * turn, bg_dx, bg_dy)
    r = rng.uniform(0.12, 0.24) * s * ones
    if motion == "pan":  # the camera turns: background and object shift together
        pan_a, pan = rng.uniform(-np.pi, np.pi), rng.uniform(0.3, 0.5) * s
        bg_dx, bg_dy = ramp * pan * np.cos(pan_a), ramp * pan * np.sin(pan_a)
        return Track(cx0 - bg_dx, cy0 - bg_dy, r, angle0 * ones, bg_dx, bg_dy)
    if motion == "still":
        return Track(cx0 * ones, cy0 * ones, r, angle0 * ones, 0 * ones, 0 * ones)
    raise ValueError(f"unknown motion class {motion!r}; known: {sorted(MOTIONS)}")


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def _shift(canvas: np.ndarray, y: float, x: float, h: int, w: int) -> np.ndarray:
    """Window [h, w, C] of canvas at float offset (y, x) >= 0, bilinear between integer shifts."""
    iy, ix = int(y), int(x)
    fy, fx = y - iy, x - ix
    win = canvas[iy:iy + h + 1, ix:ix + w + 1]
    rows = win[:h] * (1 - fy) + win[1:h + 1] * fy
    return rows[:, :w] * (1 - fx) + rows[:, 1:w + 1] * fx


def _background(rng: np.random.Generator, track: Track, h: int, w: int, avoid: str,
                object_rgb: np.ndarray, scene: Scene = Scene()) -> tuple[str, np.ndarray]:
    """(texture name, float32 [n, h, w, 3]) low-contrast background shifted by the track.

    The background never uses the object's texture (`avoid`), and is darkened or lightened when
    its mean colour is too close to the object's mean colour `object_rgb` [3].
    """
    tex = _random_texture(rng, avoid)
    th, tw = tex.image.shape[:2]
    oy, ox = float(track.bg_dy.min()), float(track.bg_dx.min())
    ch = h + int(np.ceil(float(track.bg_dy.max()) - oy)) + 2  # canvas covering every shift
    cw = w + int(np.ceil(float(track.bg_dx.max()) - ox)) + 2
    zoom_max = min(th / ch, tw / cw)  # texture px per screen px that still fits the texture
    zoom = rng.uniform(min(0.8, zoom_max), min(2.0, zoom_max))
    ty = rng.uniform(0, max(th - zoom * ch, 0))
    tx = rng.uniform(0, max(tw - zoom * cw, 0))
    grid_y = ty + zoom * np.arange(ch, dtype=np.float32)[:, None]
    grid_x = tx + zoom * np.arange(cw, dtype=np.float32)[None, :]
    canvas = tex.sample(grid_y, grid_x)  # [ch, cw, 3]
    mean = canvas.mean(axis=(0, 1))
    canvas = mean + np.float32(rng.uniform(*scene.background_contrast)) * (canvas - mean)
    if np.linalg.norm(mean - object_rgb) < 0.3:  # too similar: push away in brightness
        canvas = canvas * 0.55 if object_rgb.mean() > 0.5 else 0.45 + canvas * 0.55
    shifts = zip(track.bg_dy - oy, track.bg_dx - ox, strict=True)
    frames = [_shift(canvas, float(dy), float(dx), h, w) for dy, dx in shifts]
    return tex.name, np.stack(frames)


@dataclass
class _Sprite:
    """The object in a moving square box: box corner (y0, x0) int [n], colour, alpha."""

    y0: np.ndarray  # int [n], box top row in the frame (may be negative)
    x0: np.ndarray  # int [n], box left column
    colour: np.ndarray  # float32 [n, B, B, 3]
    alpha: np.ndarray  # float32 [n, B, B] coverage in [0, 1]


def _object(rng: np.random.Generator, track: Track) -> tuple[str, str, _Sprite]:
    """(texture name, shape name, sprite) of the textured object following the track."""
    tex = _random_texture(rng)
    shape_name, table = _random_shape(rng)
    th, tw = tex.image.shape[:2]
    side = rng.uniform(0.2, 0.5) * min(th, tw)  # texture patch the object shows
    py, px = rng.uniform(0, th - side), rng.uniform(0, tw - side)
    scale = float(track.radius.mean()) / 15.0  # border widths relative to a 15 px object
    border = rng.uniform(1.0, 2.5) * max(scale, 0.5) if rng.random() < 0.7 else 0.0
    border_rgb = rng.random(3).astype(np.float32)
    border_rgb[int(rng.integers(3))] = float(rng.integers(2))  # saturated: contrasts more often
    box = int(np.ceil(2 * float(track.radius.max()))) + 4
    y0 = np.floor(track.cy).astype(np.int64) - box // 2
    x0 = np.floor(track.cx).astype(np.int64) - box // 2
    grid = np.arange(box, dtype=np.float32)
    dx = (x0 - track.cx).astype(np.float32)[:, None, None] + grid[None, None, :]  # [n, 1, B]
    dy = (y0 - track.cy).astype(np.float32)[:, None, None] + grid[None, :, None]  # [n, B, 1]
    r = track.radius[:, None, None]
    cos, sin = np.cos(track.angle)[:, None, None], np.sin(track.angle)[:, None, None]
    u = (cos * dx + sin * dy) / r  # object coords: screen -> object is rotation by -angle
    v = (cos * dy - sin * dx) / r  # [n, B, B]
    rho = np.sqrt(u * u + v * v)
    idx = ((np.arctan2(v, u) + np.pi) * (_TABLE / (2 * np.pi))).astype(np.int32) % _TABLE
    inside_px = r * (table[idx] - rho)  # ~ distance inside the outline along the ray, px
    alpha = np.clip(inside_px + 0.5, 0.0, 1.0)
    colour = tex.sample(py + (v + 1) * (side / 2), px + (u + 1) * (side / 2))
    if border > 0:
        mix = np.clip(border - inside_px + 0.5, 0.0, 1.0)[..., None]
        colour = colour + mix * (border_rgb - colour)
    return tex.name, shape_name, _Sprite(y0, x0, colour, alpha)


def _composite(bg: np.ndarray, sprite: _Sprite) -> tuple[np.ndarray, np.ndarray]:
    """Paste the sprite over bg [n, h, w, 3] (in place): (frames, alpha [n, h, w])."""
    n, h, w = bg.shape[:3]
    box = sprite.alpha.shape[1]
    alpha = np.zeros((n, h, w), np.float32)
    for t in range(n):
        y, x = int(sprite.y0[t]), int(sprite.x0[t])
        ys, ye, xs, xe = max(y, 0), min(y + box, h), max(x, 0), min(x + box, w)
        if ys >= ye or xs >= xe:
            continue
        a = sprite.alpha[t, ys - y:ye - y, xs - x:xe - x]
        c = sprite.colour[t, ys - y:ye - y, xs - x:xe - x]
        bg[t, ys:ye, xs:xe] += a[..., None] * (c - bg[t, ys:ye, xs:xe])
        alpha[t, ys:ye, xs:xe] = a
    return bg, alpha


def render_clip_with_mask(cls: str, rng: np.random.Generator, n_frames: int, height: int,
                          width: int, scene: Scene = Scene()
                          ) -> tuple[np.ndarray, np.ndarray, Track, dict[str, str]]:
    """Render one clip of motion `cls`.

    Returns frames uint8 [n, H, W, 3], the object mask bool [n, H, W] (coverage > 0.5), the
    :class:`Track` of scene parameters, and a description {"texture", "shape", "background"}.
    """
    if cls not in MOTIONS:
        raise ValueError(f"unknown motion class {cls!r}; known: {sorted(MOTIONS)}")
    track = _track(cls, rng, n_frames, height, width, scene)
    tex_name, shape_name, sprite = _object(rng, track)
    a = sprite.alpha[..., None]  # mean over all frames: the same for a time-reversed track
    object_rgb = (a * sprite.colour).sum((0, 1, 2)) / max(float(a.sum()), 1e-6)
    bg_name, bg = _background(rng, track, height, width, tex_name, object_rgb, scene)
    frames, alpha = _composite(bg, sprite)
    frames = np.clip(frames * 255.0 + 0.5, 0, 255).astype(np.uint8)
    about = {"texture": tex_name, "shape": shape_name, "background": bg_name}
    return frames, alpha > 0.5, track, about


def render_clip(cls: str, rng: np.random.Generator, n_frames: int, height: int,
                width: int, scene: Scene = Scene()) -> np.ndarray:
    """Frames uint8 [n_frames, height, width, 3] of one clip of motion class `cls`."""
    return render_clip_with_mask(cls, rng, n_frames, height, width, scene)[0]


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------

_VIDEO_CODECS: dict[str, list[str]] = {
    "mp4": ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "20", "-pix_fmt", "yuv420p",
            "-f", "mp4"],
    "webm": ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "0",
             "-crf", "40", "-row-mt", "0", "-pix_fmt", "yuv420p", "-f", "webm"],
    "avi": ["-c:v", "mpeg4", "-vtag", "XVID", "-q:v", "5", "-pix_fmt", "yuv420p", "-f", "avi"],
}
_AUDIO_CODECS = {"mp4": ["-c:a", "aac", "-b:a", "48k"], "webm": ["-c:a", "libopus", "-b:a", "32k"],
                 "avi": ["-c:a", "pcm_s16le"]}  # mp3 in avi shifts video timestamps


def _part(path: Path) -> Path:
    """Temporary name a file is written under before the atomic rename."""
    return path.with_name(path.name + ".part")


def _encode(frames: Callable[[], Any], paths: Sequence[Path], width: int, height: int, fps: int,
            audio_seconds: float | None = None) -> None:
    """Encode rgb24 frames into each of `paths` (codec from the suffix), atomically.

    `frames()` yields uint8 arrays [k, height, width, 3]; one ffmpeg process writes all outputs.
    With `audio_seconds`, a sine tone of that length is muxed in as well.
    """
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps),
           "-i", "pipe:0"]
    if audio_seconds is not None:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=330:sample_rate=24000:"
                f"duration={audio_seconds:.3f}"]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        ext = path.suffix.lstrip(".")
        cmd += ["-map", "0:v", "-threads", "1", *_VIDEO_CODECS[ext]]
        if audio_seconds is not None:
            cmd[-2:-2] = ["-map", "1:a", *_AUDIO_CODECS[ext]]
        cmd.append(str(_part(path)))
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for chunk in frames():
            proc.stdin.write(np.ascontiguousarray(chunk, dtype=np.uint8).tobytes())
        proc.stdin.close()
    except BrokenPipeError:
        pass  # ffmpeg exited early: its error message follows
    except BaseException:
        proc.kill()
        proc.wait()
        for path in paths:
            _part(path).unlink(missing_ok=True)
        raise
    err = proc.stderr.read().decode(errors="replace")
    if proc.wait() != 0:
        raise RuntimeError(f"ffmpeg failed writing {[str(p) for p in paths]}: {err[-2000:]}")
    for path in paths:
        os.replace(_part(path), path)


# ---------------------------------------------------------------------------------------------
# Corpus plan: which clips exist, where each is written, and their labels
# ---------------------------------------------------------------------------------------------

@dataclass
class ClipJob:
    """One labelled clip, rendered once and written to every layout that holds it."""

    cls: str
    label: int  # 0-based index in spec.classes
    split: str  # "train", "val" or "test" (test: SSV2 only, label withheld)
    index: int  # running number within (class, split)
    paths: list[Path]  # outputs, relative to out_dir
    ssv2_id: str = ""
    ucf_group: int = 0
    ucf_clip: int = 0

    def seed_key(self, seed: int) -> list[int]:
        split_code = ("train", "val", "test").index(self.split)
        return [seed, 1, zlib.crc32(self.cls.encode()), split_code, self.index]


def _ucf_groups(spec: SynthSpec) -> tuple[int, list[list[int]]]:
    """(clips per group, per split k=1..3 the 1-based test groups). Split 1 tests the val clips."""
    per_group = max(1, min(4, spec.val_per_class // 2))
    n_test = math.ceil(spec.val_per_class / per_group)
    n_groups = n_test + math.ceil(spec.train_per_class / per_group)
    tests = [[(k * n_test + g) % n_groups + 1 for g in range(n_test)] for k in range(3)]
    return per_group, tests


def _plan_clips(spec: SynthSpec) -> list[ClipJob]:
    """Every labelled clip of the corpus with its output paths, in a fixed order."""
    per_group, _ = _ucf_groups(spec)
    n_test_groups = math.ceil(spec.val_per_class / per_group)
    counts = {"train": spec.train_per_class, "val": spec.val_per_class, "test": spec.val_per_class}
    jobs = []
    for label, cls in enumerate(spec.classes):
        camel = camel_name(cls)
        for split, count in counts.items():
            for i in range(count):
                job = ClipJob(cls, label, split, i, [])
                if split != "test":
                    # val clips fill groups 1..n_test_groups, train clips the groups after them
                    group = i // per_group + 1 + (n_test_groups if split == "train" else 0)
                    job.ucf_group, job.ucf_clip = group, i % per_group + 1
                    if "list" in spec.layouts:
                        job.paths.append(Path("list", "videos", camel, f"{split}_{i:03d}.mp4"))
                    if "ucf101" in spec.layouts:
                        name = f"v_{camel}_g{group:02d}_c{job.ucf_clip:02d}.avi"
                        job.paths.append(Path("ucf101", "UCF-101", camel, name))
                jobs.append(job)
    ids = np.random.default_rng([spec.seed, 2]).choice(max(100_000, 10 * len(jobs)), len(jobs),
                                                       replace=False) + 1
    for job, vid in zip(jobs, ids, strict=True):
        job.ssv2_id = str(int(vid))
        if "ssv2" in spec.layouts:
            job.paths.append(Path("ssv2", "20bn-something-something-v2", f"{job.ssv2_id}.webm"))
    return [j for j in jobs if j.paths]


@dataclass
class UncuratedJob:
    """One unlabelled multi-shot video."""

    index: int
    path: Path  # relative to out_dir
    width: int
    height: int
    fps: int
    frames: int
    audio: bool
    shots: list[tuple[int, str]]  # (first frame, motion) per shot


_UNCURATED_SIZES = ((160, 96), (128, 128), (96, 144), (130, 98), (176, 100), (112, 80), (144, 108))
_UNCURATED_FPS = (8, 12, 15, 24)
_SHOT_MOTIONS = DEFAULT_CLASSES + ("still", "pan")


def _plan_uncurated(spec: SynthSpec) -> list[UncuratedJob]:
    """Every uncurated video: container by index (mp4, webm, avi, ...), audio on every other
    video (so each container appears with and without), the rest drawn from the seed."""
    jobs = []
    for j in range(spec.uncurated_videos):
        rng = np.random.default_rng([spec.seed, 3, j])
        ext = ("mp4", "webm", "avi")[j % 3]
        width, height = _UNCURATED_SIZES[int(rng.integers(len(_UNCURATED_SIZES)))]
        fps = int(_UNCURATED_FPS[int(rng.integers(len(_UNCURATED_FPS)))])
        frames = max(1, int(round(rng.uniform(*spec.uncurated_seconds) * fps)))
        shots, start = [], 0
        while start < frames:
            motion = _SHOT_MOTIONS[int(rng.integers(len(_SHOT_MOTIONS)))]
            shots.append((start, motion))
            start += max(2, int(round(rng.uniform(1.0, 4.0) * fps)))
            if frames - start < fps:  # no shot shorter than 1 s: the last one runs to the end
                break
        jobs.append(UncuratedJob(j, Path("uncurated", f"video_{j:03d}.{ext}"), width, height, fps,
                                 frames, j % 2 == 0, shots))
    return jobs


# ---------------------------------------------------------------------------------------------
# Writing videos
# ---------------------------------------------------------------------------------------------

def _write_clip(out: Path, spec: SynthSpec, job: ClipJob) -> None:
    """Render one labelled clip and encode it to all its paths (skips paths already there)."""
    todo = [out / p for p in job.paths if not (out / p).exists()]
    if not todo:
        return
    rng = np.random.default_rng(job.seed_key(spec.seed))
    frames = render_clip(job.cls, rng, spec.clip_frames, spec.height, spec.width, spec.scene)
    _encode(lambda: [frames], todo, spec.width, spec.height, spec.clip_fps)


def _write_uncurated(out: Path, spec: SynthSpec, job: UncuratedJob) -> None:
    """Render and encode one multi-shot video, shot by shot (hard cuts between shots)."""
    path = out / job.path
    if path.exists():
        return
    ends = [s for s, _ in job.shots[1:]] + [job.frames]

    def shots():
        for (start, motion), end in zip(job.shots, ends, strict=True):
            rng = np.random.default_rng([spec.seed, 4, job.index, start])
            yield render_clip(motion, rng, end - start, job.height, job.width, spec.scene)

    audio = job.frames / job.fps if job.audio else None
    _encode(shots, [path], job.width, job.height, job.fps, audio_seconds=audio)


# ---------------------------------------------------------------------------------------------
# Label files
# ---------------------------------------------------------------------------------------------

def _write_text(path: Path, text: str, newline: str = "\n") -> None:
    """Write a text file atomically with the given line ending."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _part(path)
    with open(tmp, "w", encoding="utf-8", newline=newline) as f:
        f.write(text)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=1) + "\n")


def _lines(rows: Sequence[str]) -> str:
    return "".join(row + "\n" for row in rows)


def _write_list_layout(out: Path, spec: SynthSpec, jobs: Sequence[ClipJob]) -> dict[str, str]:
    root = out / "list"
    for split in ("train", "val"):
        rows = [f"{p.relative_to('list').as_posix()} {j.label}"
                for j in jobs if j.split == split for p in j.paths if p.parts[0] == "list"]
        _write_text(root / f"{split}.txt", _lines(rows))
    _write_text(root / "classes.txt", _lines(spec.classes))
    return {"root": "list", "train": "list/train.txt", "val": "list/val.txt",
            "classes": "list/classes.txt"}


def ssv2_placeholder(about: dict[str, str]) -> str:
    """The object's free-text name used in SSV2 labels, e.g. 'coffee pacman'."""
    return f"{about['texture']} {about['shape'].replace('_', ' ')}"


def _write_ssv2_layout(out: Path, spec: SynthSpec, jobs: Sequence[ClipJob],
                       about: dict[str, dict[str, str]]) -> dict[str, str]:
    labels = out / "ssv2" / "labels"
    prefix = "something-something-v2"
    templates = [MOTIONS[c][0] for c in spec.classes]
    _write_json(labels / f"{prefix}-labels.json",
                {t.replace("[", "").replace("]", ""): str(i) for i, t in enumerate(templates)})
    for split, name in (("train", "train"), ("val", "validation")):
        entries = []
        for j in (j for j in jobs if j.split == split):
            thing = ssv2_placeholder(about[j.ssv2_id])
            template = templates[j.label]
            entries.append({"id": j.ssv2_id, "label": template.replace("[something]", thing),
                            "template": template, "placeholders": [thing]})
        _write_json(labels / f"{prefix}-{name}.json", entries)
    test = [{"id": j.ssv2_id} for j in jobs if j.split == "test"]
    _write_json(labels / f"{prefix}-test.json", test)
    files = {s: f"ssv2/labels/{prefix}-{s}.json" for s in ("labels", "train", "validation", "test")}
    return {"root": "ssv2", "videos": "ssv2/20bn-something-something-v2", **files}


def _write_ucf_layout(out: Path, spec: SynthSpec, jobs: Sequence[ClipJob]) -> dict[str, Any]:
    lists = out / "ucf101" / "ucfTrainTestlist"
    _, tests = _ucf_groups(spec)
    ucf = sorted((j.label, j.ucf_group, j.ucf_clip, p) for j in jobs for p in j.paths
                 if p.parts[0] == "ucf101")
    rel = [p.relative_to("ucf101/UCF-101").as_posix() for *_, p in ucf]
    _write_text(lists / "classInd.txt",
                _lines([f"{i + 1} {camel_name(c)}" for i, c in enumerate(spec.classes)]), "\r\n")
    for k, test_groups in enumerate(tests, start=1):
        rows = list(zip(ucf, rel, strict=True))
        train = [f"{r} {lab + 1}" for (lab, g, _, _), r in rows if g not in test_groups]
        test = [r for (_, g, _, _), r in rows if g in test_groups]
        _write_text(lists / f"trainlist0{k}.txt", _lines(train), "\r\n")
        _write_text(lists / f"testlist0{k}.txt", _lines(test), "\r\n")
    return {"root": "ucf101", "videos": "ucf101/UCF-101", "splits": "ucf101/ucfTrainTestlist",
            "test_groups": tests}


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def _load_existing(out: Path, spec: SynthSpec) -> dict[str, Any] | None:
    """corpus.json of a finished corpus for `spec`, else None; raises on a foreign folder."""
    meta_path = out / "corpus.json"
    if not meta_path.exists():
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{out}: folder is not empty and has no corpus.json; "
                             "write the synthetic corpus into a new or empty folder")
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{meta_path}: unreadable ({exc}); delete the folder to rewrite "
                         "the corpus") from exc
    want = spec_to_json(spec)
    if meta.get("version") != FORMAT_VERSION or meta.get("spec") != want:
        have = meta.get("spec") or {}
        diff = sorted(k for k in want if have.get(k) != want[k])
        raise ValueError(f"{meta_path}: holds a corpus for another spec (differs in {diff} or "
                         f"format version {meta.get('version')} != {FORMAT_VERSION}); "
                         "use a new folder or delete this one")
    return meta if meta.get("complete") else None


def _run_jobs(fns: Sequence[Callable[[], Any]], workers: int, progress: Progress) -> list[Any]:
    """Run the callables (threads; the heavy work is in ffmpeg subprocesses and numpy)."""
    task = progress.task("synth videos", total=len(fns), unit="video")
    results = []
    try:
        if workers <= 1:
            for fn in fns:
                results.append(fn())
                task.advance(1)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for res in pool.map(lambda fn: fn(), fns):
                    results.append(res)
                    task.advance(1)
    finally:
        task.close()
    return results


def write_corpus(out_dir: str | os.PathLike[str], spec: SynthSpec = SynthSpec(), *,
                 progress: Progress = NULL_PROGRESS, workers: int = 2) -> dict[str, Any]:
    """Write the synthetic corpus of `spec` under `out_dir` (see the module docstring).

    Returns the summary also written to ``out_dir/corpus.json``: spec, counts, classes and the
    paths (relative to out_dir) of each layout's root and list files. A finished corpus with the
    same spec is returned as is; an interrupted one resumes (videos are written atomically).
    """
    validate_spec(spec)
    out = Path(out_dir)
    done = _load_existing(out, spec)
    if done is not None:
        log.info("%s: synthetic corpus already complete", out)
        return done
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "corpus.json", {"version": FORMAT_VERSION, "spec": spec_to_json(spec),
                                      "complete": False})
    clips, uncurated = _plan_clips(spec), _plan_uncurated(spec)
    # the long uncurated videos first, so the short clips fill in around them
    fns = [functools.partial(_write_uncurated, out, spec, j) for j in uncurated]
    fns += [functools.partial(_write_clip, out, spec, j) for j in clips]
    log.info("%s: writing %d labelled clips and %d uncurated videos", out, len(clips),
             len(uncurated))
    _run_jobs(fns, workers, progress)
    summary = _write_labels(out, spec, clips, uncurated)
    _write_json(out / "corpus.json", summary)
    log.info("%s: synthetic corpus complete", out)
    return summary


def _clip_about(spec: SynthSpec, job: ClipJob) -> dict[str, str]:
    """Texture/shape names of a clip (re-derived cheaply from its seed on a 16x16 render)."""
    rng = np.random.default_rng(job.seed_key(spec.seed))
    return render_clip_with_mask(job.cls, rng, 2, 16, 16, spec.scene)[3]


def _write_labels(out: Path, spec: SynthSpec, clips: Sequence[ClipJob],
                  uncurated: Sequence[UncuratedJob]) -> dict[str, Any]:
    """Write every layout's label files and return the corpus summary."""
    layouts: dict[str, Any] = {}
    if "list" in spec.layouts:
        layouts["list"] = _write_list_layout(out, spec, clips)
    if "ssv2" in spec.layouts:
        about = {j.ssv2_id: _clip_about(spec, j) for j in clips}
        layouts["ssv2"] = _write_ssv2_layout(out, spec, clips, about)
    if "ucf101" in spec.layouts:
        layouts["ucf101"] = _write_ucf_layout(out, spec, clips)
    shots = [{"path": j.path.as_posix(), "width": j.width, "height": j.height, "fps": j.fps,
              "frames": j.frames, "audio": j.audio,
              "shots": [{"start": s, "motion": m} for s, m in j.shots]} for j in uncurated]
    if uncurated:
        _write_json(out / "uncurated" / "shots.json", shots)
        layouts["uncurated"] = {"root": "uncurated", "shots": "uncurated/shots.json",
                                "videos": [j.path.as_posix() for j in uncurated]}
    counts = {s: spec.val_per_class * len(spec.classes) for s in ("val", "test")}
    counts.update(train=spec.train_per_class * len(spec.classes), uncurated=len(uncurated))
    return {"version": FORMAT_VERSION, "spec": spec_to_json(spec), "complete": True,
            "classes": list(spec.classes), "templates": [MOTIONS[c][0] for c in spec.classes],
            "ucf101_names": [camel_name(c) for c in spec.classes], "clip_frames": spec.clip_frames,
            "counts": counts, "layouts": layouts}
