"""Synthetic image/mask pairs for tests, demos and benchmarks.

Each case is a volume (3D) or an image (2D) with one or more simple objects on a dark background,
a smooth multiplicative bias field and Gaussian noise, together with its ground-truth mask.

Shapes and their 2D analogues (either name is accepted in both modes; 2D output reports the 2D name):

==========  ==========  =====================================================================
3D          2D          geometry
==========  ==========  =====================================================================
sphere      disk        ball of radius ``r``
cube        square      axis-aligned cube / square of half-side ``a``
cylinder    rectangle   randomly oriented cylinder; in 2D its side view, a rotated rectangle
ellipsoid   ellipse     randomly oriented ellipsoid / ellipse with random semi-axes
torus       ring        randomly oriented torus; in 2D its cross-section, a ring (annulus)
==========  ==========  =====================================================================

Conventions: arrays are in SimpleITK order, ``(Z, Y, X)`` in 3D and ``(Y, X)`` in 2D; ``spacing``
arguments are in physical ``(x, y[, z])`` order, as in :mod:`ncatool.data.io`. Shapes are built in
physical (mm) coordinates, so a sphere stays round when the spacing is anisotropic.

Intensities: the background is uniform in ``[0.0, 0.2]`` per case. With one label the object mean is
uniform in ``[0.8, 1.0]``; with ``K > 1`` labels, label ``k`` has mean ``0.5 + 0.5 * k / K`` (with a
small jitter), so labels differ by intensity and the task is learnable. The clean image is then
multiplied by a bias field ``exp(bias * f)`` (``f`` a smooth random field with ``max |f| = 1``) and
Gaussian noise with standard deviation ``noise * (mean object intensity - background)`` is added.

Harder cases (``--difficulty hard``, or each setting on its own) make one voxel's intensity a poor
guide, so that a model has to look at neighbourhoods, not learn one threshold in a single epoch:

* ``contrast`` — instead of the levels above, label ``k`` has mean ``background + k * contrast``
  (a small jitter added): a step of ``contrast`` from the background to label 1 and between labels;
* ``texture`` — a fine-grained random texture (white noise smoothed over about one voxel, standard
  deviation ``texture * (mean object intensity - background)``) added everywhere, so neighbouring
  voxels share their deviation and simple smoothing does not remove it;
* ``touching`` — every object after the first is placed in face contact with one already there
  (clusters, shared boundaries between labels);
* several labels — ``n_objects`` objects labelled 1..K by intensity, as above.

The presets (:data:`DIFFICULTIES`) fix these together with ``noise``, ``bias`` and the number of
objects; ``easy`` is the classic behaviour and the default.

Every case gets its own random generator derived from ``(seed, case index)``, so case ``i`` is the
same however many cases are made, and the same seed gives byte-identical files.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ncatool.errors import NcaError

#: Canonical shape names (the 3D names), in the order used for ``all``.
SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder", "ellipsoid", "torus")

#: 2D display name of each canonical shape.
SHAPES_2D: dict[str, str] = {
    "sphere": "disk",
    "cube": "square",
    "cylinder": "rectangle",
    "ellipsoid": "ellipse",
    "torus": "ring",
}

#: Every accepted name (3D names, 2D names and a few synonyms) -> canonical name.
SHAPE_ALIASES: dict[str, str] = {
    **{name: name for name in SHAPES},
    **{name2d: name for name, name2d in SHAPES_2D.items()},
    "ball": "sphere",
    "circle": "sphere",
    "box": "cube",
    "rect": "cylinder",
    "annulus": "torus",
}

#: Smallest allowed side length (voxels) of a generated case.
MIN_SIZE = 8
#: Largest number of labels in multi-object mode (the mask is uint8).
MAX_OBJECTS = 255

_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

#: Attempts at a touching position per object before it is placed freely instead.
TOUCH_ATTEMPTS = 30
#: Standard deviation (voxels) of the Gaussian that smooths white noise into the texture.
TEXTURE_SIGMA = 1.0


@dataclass(frozen=True)
class Difficulty:
    """The generation settings a ``--difficulty`` preset stands for.

    Attributes:
        n_objects: Objects (= labels) per case.
        noise: Gaussian noise std relative to the object/background contrast.
        bias: Strength of the multiplicative bias field.
        contrast: Intensity step from the background to label 1 and between labels; None keeps the
            easy levels (objects at 0.5..1.0 on a 0..0.2 background).
        texture: Std of the fine texture relative to the object/background contrast (0 = none).
        touching: Place every object after the first in contact with an earlier one.
    """

    n_objects: int = 1
    noise: float = 0.1
    bias: float = 0.2
    contrast: float | None = None
    texture: float = 0.0
    touching: bool = False


#: ``--difficulty`` presets. ``hard``: three labels 0.25 apart, the faintest 0.25 above the background
#: (easy objects stand 0.6..1.0 above it); noise and texture each with a std of 0.15 of the mean
#: object contrast (0.5), so 0.075 each, together 0.42 of a label step; a bias field of 0.15
#: (x0.86..x1.16) and touching objects. Even the best thresholds chosen per case reach a label Dice of
#: only about 0.65 (1.0 on easy volumes): the labels have to be told apart from their surroundings.
DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty(),
    "hard": Difficulty(n_objects=3, noise=0.15, bias=0.15, contrast=0.25, texture=0.15, touching=True),
}


def resolve_difficulty(name: str, **overrides: Any) -> Difficulty:
    """The preset ``name`` with every override that is not None applied.

    Raises:
        NcaError: ``name`` is not a preset.
    """
    if name not in DIFFICULTIES:
        raise NcaError(f"--difficulty must be one of {', '.join(DIFFICULTIES)}, got {name!r}")
    return replace(DIFFICULTIES[name], **{k: v for k, v in overrides.items() if v is not None})


# ----------------------------------------------------------------------------------------------------
# Option parsing / validation
# ----------------------------------------------------------------------------------------------------


def shape_display_name(shape: str, dim: int) -> str:
    """The name of a canonical shape as shown for ``dim`` (``"sphere"`` -> ``"disk"`` in 2D)."""
    return SHAPES_2D[shape] if dim == 2 else shape


def parse_shapes(values: Iterable[str] | None) -> tuple[str, ...]:
    """Parse ``--shapes`` values (each may be a comma list) into canonical shape names.

    Args:
        values: Shape names such as ``["sphere,cube", "ring"]``; ``None``, empty or ``"all"`` means
            every shape.

    Returns:
        Canonical (3D) names, without duplicates, in the order given.

    Raises:
        NcaError: A name is not a known shape (the message names it and lists the valid ones).
    """
    names: list[str] = []
    for value in values or ():
        for part in str(value).split(","):
            part = part.strip().lower()
            if not part:
                continue
            if part == "all":
                names.extend(SHAPES)
                continue
            if part not in SHAPE_ALIASES:
                valid = ", ".join(f"{s} ({SHAPES_2D[s]})" for s in SHAPES)
                raise NcaError(f"unknown shape {part!r} in --shapes; choose from: {valid}, or all")
            names.append(SHAPE_ALIASES[part])
    if not names:
        return SHAPES
    return tuple(dict.fromkeys(names))


def parse_spacing(value: str | Sequence[float] | None, dim: int) -> tuple[float, ...]:
    """Parse ``--spacing`` (``"1.0"`` or ``"1.0,1.0,2.5"``) into one positive value per axis.

    Args:
        value: A comma-separated string or a sequence of numbers, in ``(x, y[, z])`` order; one value
            applies to every axis. ``None`` means 1.0 mm on every axis.
        dim: Number of spatial dimensions (2 or 3).

    Returns:
        ``dim`` spacings in ``(x, y[, z])`` order.

    Raises:
        NcaError: A value is not a positive finite number, or the count is neither 1 nor ``dim``.
    """
    if value is None:
        return (1.0,) * dim
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value)
    spacing: list[float] = []
    for part in parts:
        try:
            number = float(part)
        except (TypeError, ValueError):
            raise NcaError(
                f"--spacing: {part!r} is not a number (expected e.g. '1.0' or '1,1,2.5')"
            ) from None
        if not math.isfinite(number) or number <= 0:
            raise NcaError(f"--spacing: {part!r} must be a positive number")
        spacing.append(number)
    if len(spacing) == 1:
        spacing *= dim
    if len(spacing) != dim:
        raise NcaError(
            f"--spacing: got {len(spacing)} values ({value!r}); expected 1 or {dim} for --dim {dim}"
        )
    return tuple(spacing)


def _validate(
    dim: int,
    size_min: int,
    size_max: int,
    shapes: Sequence[str],
    n_objects: int,
    noise: float,
    bias: float,
    contrast: float | None = None,
    texture: float = 0.0,
) -> None:
    """Raise :class:`NcaError` for any out-of-range generation parameter."""
    if dim not in (2, 3):
        raise NcaError(f"--dim must be 2 or 3, got {dim}")
    if size_min < MIN_SIZE:
        raise NcaError(f"--size-min must be at least {MIN_SIZE}, got {size_min}")
    if size_max < size_min:
        raise NcaError(f"--size-max ({size_max}) must not be smaller than --size-min ({size_min})")
    if not shapes:
        raise NcaError("--shapes: at least one shape is needed")
    for shape in shapes:
        if shape not in SHAPES:
            raise NcaError(f"unknown shape {shape!r}; choose from: {', '.join(SHAPES)}")
    if not 1 <= n_objects <= MAX_OBJECTS:
        raise NcaError(f"--multi must be between 1 and {MAX_OBJECTS}, got {n_objects}")
    if not (math.isfinite(noise) and noise >= 0):
        raise NcaError(f"--noise must be a non-negative number, got {noise}")
    if not (math.isfinite(bias) and bias >= 0):
        raise NcaError(f"--bias must be a non-negative number, got {bias}")
    if contrast is not None and not (math.isfinite(contrast) and contrast > 0):
        raise NcaError(f"--contrast must be a positive number, got {contrast}")
    if not (math.isfinite(texture) and texture >= 0):
        raise NcaError(f"--texture must be a non-negative number, got {texture}")


# ----------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of case ``index`` (0-based), independent of how many cases are made."""
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(index,)))


def random_rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A uniformly random rotation matrix.

    Args:
        rng: Random generator.
        dim: 2 or 3.

    Returns:
        ``(dim, dim)`` orthonormal matrix with determinant +1 (rows are the local axes).
    """
    if dim == 2:
        theta = rng.uniform(0.0, 2.0 * math.pi)
        c, s = math.cos(theta), math.sin(theta)
        return np.array([[c, -s], [s, c]])
    q = rng.standard_normal(4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _sample_params(rng: np.random.Generator, shape: str, dim: int, radius: float) -> dict[str, Any]:
    """Random parameters (mm) of one object whose typical radius is ``radius``."""
    if shape == "sphere":
        return {"r": radius}
    if shape == "cube":
        return {"a": radius * 0.85}
    if shape == "ellipsoid":
        axes = radius * rng.uniform(0.45, 1.0, size=dim)
        axes[rng.integers(dim)] = radius  # the longest semi-axis is the nominal radius
        return {"axes": axes, "rot": random_rotation(rng, dim)}
    if shape == "cylinder":
        return {
            "rc": radius * rng.uniform(0.35, 0.6),
            "h": radius * rng.uniform(0.7, 1.0),
            "rot": random_rotation(rng, dim),
        }
    if shape == "torus":
        major = radius * rng.uniform(0.6, 0.75)
        return {"R": major, "rt": major * rng.uniform(0.3, 0.45), "rot": random_rotation(rng, dim)}
    raise NcaError(f"unknown shape {shape!r}; choose from: {', '.join(SHAPES)}")


def _bound(shape: str, params: dict[str, Any], dim: int) -> float:
    """Radius (mm) of a ball around the centre that contains the whole object."""
    if shape == "sphere":
        return float(params["r"])
    if shape == "cube":
        return float(params["a"]) * math.sqrt(dim)
    if shape == "ellipsoid":
        return float(np.max(params["axes"]))
    if shape == "cylinder":
        return math.hypot(params["h"], params["rc"])
    return float(params["R"] + params["rt"])  # torus


def _scale_params(params: dict[str, Any], factor: float) -> dict[str, Any]:
    """Scale every length parameter by ``factor`` (rotations unchanged)."""
    return {k: (v if k == "rot" else v * factor) for k, v in params.items()}


def _inside(shape: str, params: dict[str, Any], coords: Sequence[np.ndarray], dim: int) -> np.ndarray:
    """Boolean mask of the object on a grid.

    Args:
        shape: Canonical shape name.
        params: Lengths in mm (and a rotation ``rot`` with local axes as rows).
        coords: ``dim`` open-grid arrays (``np.ogrid`` style) of physical offsets from the centre, in
            array axis order; they broadcast to the grid shape.
        dim: 2 or 3.

    Returns:
        Boolean array of the broadcast grid shape.
    """
    if shape == "sphere":
        return sum(c * c for c in coords) <= params["r"] ** 2
    if shape == "cube":
        a = params["a"]
        out = np.abs(coords[0]) <= a
        for c in coords[1:]:
            out = out & (np.abs(c) <= a)
        return out
    rot = params["rot"]
    local = [sum(rot[k, i] * coords[i] for i in range(dim)) for k in range(dim)]
    if shape == "ellipsoid":
        return sum((u / ax) ** 2 for u, ax in zip(local, params["axes"], strict=True)) <= 1.0
    if shape == "cylinder":
        radial = sum(u * u for u in local[1:])
        return (np.abs(local[0]) <= params["h"]) & (radial <= params["rc"] ** 2)
    # torus; in 2D its cross-section perpendicular to the axis, a ring
    if dim == 2:
        rho = np.sqrt(sum(c * c for c in coords))
        return np.abs(rho - params["R"]) <= params["rt"]
    rho = np.sqrt(sum(u * u for u in local[1:]))
    return (rho - params["R"]) ** 2 + local[0] ** 2 <= params["rt"] ** 2


def render_object(
    rng: np.random.Generator,
    shape: str,
    params: dict[str, Any],
    spacing_zyx: Sequence[float],
) -> np.ndarray:
    """Rasterise one object on its own small grid, cropped to its bounding box.

    Args:
        rng: Random generator (for the sub-voxel position of the centre).
        shape: Canonical shape name.
        params: Object parameters in mm (see :func:`_sample_params`).
        spacing_zyx: Voxel size in array axis order.

    Returns:
        Boolean array ``(z, y, x)`` or ``(y, x)``, tight around the object, never empty.
    """
    dim = len(spacing_zyx)
    bound = _bound(shape, params, dim)
    half = [math.ceil(bound / sp) + 1 for sp in spacing_zyx]
    centre = [h + rng.uniform(-0.5, 0.5) for h in half]
    grid = np.ogrid[tuple(slice(0, 2 * h + 1) for h in half)]
    coords = [(g - c) * sp for g, c, sp in zip(grid, centre, spacing_zyx, strict=True)]
    obj = np.asarray(_inside(shape, params, coords, dim), dtype=bool)
    obj = np.broadcast_to(obj, tuple(2 * h + 1 for h in half))
    if not obj.any():  # too small to hit a voxel centre: keep the centre voxel
        return np.ones((1,) * dim, dtype=bool)
    idx = [np.flatnonzero(obj.any(axis=tuple(a for a in range(dim) if a != ax))) for ax in range(dim)]
    return np.ascontiguousarray(obj[tuple(slice(i[0], i[-1] + 1) for i in idx)])


def bias_field(rng: np.random.Generator, shape: Sequence[int], strength: float, waves: int = 3) -> np.ndarray:
    """A smooth multiplicative intensity inhomogeneity.

    Args:
        rng: Random generator.
        shape: Spatial array shape, ``(Z, Y, X)`` or ``(Y, X)``.
        strength: 0 gives a field of ones; the field is ``exp(strength * f)`` with ``max |f| = 1``.
        waves: Number of low-frequency cosine waves summed into ``f``.

    Returns:
        float32 array of ``shape``, positive, in ``[exp(-strength), exp(strength)]``.
    """
    if strength <= 0:
        return np.ones(tuple(shape), dtype=np.float32)
    axes = np.ogrid[tuple(slice(-1.0, 1.0, complex(0, n)) for n in shape)]
    field = np.zeros(tuple(shape), dtype=np.float64)
    for _ in range(waves):
        freq = rng.uniform(-0.75, 0.75, size=len(shape))  # at most ~3/4 of a period across the image
        phase = rng.uniform(0.0, 2.0 * math.pi)
        amp = rng.uniform(0.5, 1.0)
        field += amp * np.cos(math.pi * sum(f * a for f, a in zip(freq, axes, strict=True)) + phase)
    peak = float(np.abs(field).max())
    if peak > 0:
        field /= peak
    return np.exp(strength * field).astype(np.float32)


def texture_field(rng: np.random.Generator, shape: Sequence[int], sigma: float = TEXTURE_SIGMA) -> np.ndarray:
    """Fine random texture: white noise smoothed by a Gaussian of ``sigma`` voxels, scaled to std 1.

    Args:
        rng: Random generator.
        shape: Spatial array shape, ``(Z, Y, X)`` or ``(Y, X)``.
        sigma: Grain size in voxels.

    Returns:
        float32 array of ``shape`` with mean about 0 and standard deviation 1.
    """
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.standard_normal(tuple(shape)), sigma, mode="reflect")
    field -= field.mean()
    std = float(field.std())
    return (field / std if std > 0 else field).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------


def _touching_start(rng: np.random.Generator, mask: np.ndarray, obj: np.ndarray) -> list[int] | None:
    """A corner at which ``obj`` shares a face with a painted voxel of ``mask`` without overlapping
    it and keeps a one-voxel margin to the border, or None if this try found none.

    The object's centre starts on a random painted voxel and moves outwards along a random direction
    in half-voxel steps until the object no longer overlaps; there it touches, or nearly does.
    """
    from scipy import ndimage

    painted = np.argwhere(mask > 0)
    size = np.array(mask.shape)
    room = size - 2 - np.array(obj.shape)
    if painted.size == 0 or np.any(room < 0):
        return None
    anchor = painted[rng.integers(len(painted))]
    direction = rng.standard_normal(mask.ndim)
    direction /= max(float(np.linalg.norm(direction)), 1e-9)
    half = np.array(obj.shape) // 2
    # the object with its one-voxel shell of face neighbours
    shell = ndimage.binary_dilation(np.pad(obj, 1)) & ~np.pad(obj, 1)
    for t in np.arange(0.0, float(size.max()), 0.5):
        start = np.round(anchor + t * direction).astype(int) - half
        if np.any(start < 1) or np.any(start > room + 1):
            return None
        region = tuple(slice(a, a + n) for a, n in zip(start, obj.shape, strict=True))
        if np.any(mask[region][obj]):
            continue
        around = tuple(slice(a - 1, a + n + 1) for a, n in zip(start, obj.shape, strict=True))
        return [int(a) for a in start] if np.any(mask[around][shell]) else None
    return None


def _place_objects(
    rng: np.random.Generator,
    mask: np.ndarray,
    shapes: Sequence[str],
    n_objects: int,
    spacing_zyx: Sequence[float],
    shape_labels: bool = False,
    touching: bool = False,
) -> list[dict[str, Any]]:
    """Paint ``n_objects`` non-overlapping objects with labels 1..n into ``mask`` (in place); with
    ``shape_labels`` an object's label is its shape's position in ``shapes`` plus one instead; with
    ``touching`` every object after the first is first tried in contact with those already there."""
    dim = mask.ndim
    size = np.array(mask.shape)
    sp = np.array(spacing_zyx, dtype=float)
    extent = size * sp
    # largest bound (mm) so that the object plus a one-voxel margin fits on every axis
    max_bound = float(np.min((size - 4) / 2.0 * sp))
    objects: list[dict[str, Any]] = []
    for index in range(1, n_objects + 1):
        shape = str(rng.choice(list(shapes)))
        label = list(shapes).index(shape) + 1 if shape_labels else index
        radius = rng.uniform(0.15, 0.25) * float(extent.min()) / n_objects ** (1.0 / dim)
        params = _sample_params(rng, shape, dim, radius)
        bound = _bound(shape, params, dim)
        if bound > max_bound:
            params = _scale_params(params, max_bound / bound)
        placed = False
        if touching and index > 1:
            for _ in range(TOUCH_ATTEMPTS):
                obj = render_object(rng, shape, params, spacing_zyx)
                start = _touching_start(rng, mask, obj)
                if start is not None:
                    region = tuple(slice(s, s + n) for s, n in zip(start, obj.shape, strict=True))
                    mask[region][obj] = label
                    placed = True
                    break
        for attempt in range(0 if placed else 40):
            if attempt >= 10 and attempt % 5 == 0:  # crowded: try smaller versions of the object
                params = _scale_params(params, 0.8)
            obj = render_object(rng, shape, params, spacing_zyx)
            room = size - 2 - np.array(obj.shape)
            if np.any(room < 0):
                continue
            start = [1 + int(rng.integers(0, r + 1)) for r in room]
            region = tuple(slice(s, s + n) for s, n in zip(start, obj.shape, strict=True))
            if not np.any(mask[region][obj]):
                mask[region][obj] = label
                placed = True
                break
        if not placed:
            # Last resort (tiny or crowded volumes): one free voxel, so every label is present.
            free = np.flatnonzero(mask.ravel() == 0)
            if free.size == 0:
                raise NcaError(f"volume {tuple(mask.shape)} is too small for --multi {n_objects}")
            mask.ravel()[free[rng.integers(free.size)]] = label
        objects.append({"label": label, "shape": shape})
    return objects


def generate_case(
    rng: np.random.Generator,
    dim: int = 3,
    size_min: int = 60,
    size_max: int = 70,
    shapes: Sequence[str] = SHAPES,
    n_objects: int = 1,
    noise: float = 0.1,
    bias: float = 0.2,
    spacing: Sequence[float] | None = None,
    shape_labels: bool = False,
    contrast: float | None = None,
    texture: float = 0.0,
    touching: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Generate one synthetic image and its mask.

    Args:
        rng: Random generator of this case (see :func:`case_rng`).
        dim: 2 or 3 spatial dimensions.
        size_min: Smallest side length in voxels; each axis is drawn independently.
        size_max: Largest side length in voxels (inclusive).
        shapes: Canonical shape names to draw from (see :func:`parse_shapes`).
        n_objects: Objects per case, labelled ``1..n_objects`` (1 = binary mask).
        noise: Gaussian noise standard deviation relative to the object/background contrast.
        bias: Strength of the multiplicative bias field (0 disables it).
        spacing: Voxel size in ``(x, y[, z])`` order (mm); shapes are round in physical space.
            ``None`` means 1.0 on every axis.
        shape_labels: Label each object by its shape class (label k = ``shapes[k - 1]``, intensities
            per class) instead of 1..n_objects: a multi-task set, one structure class per label;
            a case then holds the classes it drew, not necessarily all.
        contrast: Intensity step background -> label 1 -> label 2 ...; None keeps the easy levels.
        texture: Fine texture std relative to the object/background contrast (0 = none).
        touching: Place every object after the first in face contact with an earlier one.

    Returns:
        ``(image, mask, info)``: image float32 ``(Z, Y, X)`` / ``(Y, X)``; mask uint8 of the same
        shape with values ``0..n_objects``, every label present; info with ``shape`` (array shape),
        ``shapes`` (canonical name of each object, by label), ``label_voxels`` ``{label: count}``,
        ``background`` and ``intensities`` (mean per label).

    Raises:
        NcaError: A parameter is out of range.
    """
    shapes = tuple(shapes)
    _validate(dim, size_min, size_max, shapes, n_objects, noise, bias, contrast, texture)
    spacing_xyz = parse_spacing(None if spacing is None else list(spacing), dim)
    spacing_zyx = tuple(reversed(spacing_xyz))

    size = tuple(int(rng.integers(size_min, size_max + 1)) for _ in range(dim))
    mask = np.zeros(size, dtype=np.uint8)
    objects = _place_objects(rng, mask, shapes, n_objects, spacing_zyx, shape_labels, touching)
    n_labels = len(shapes) if shape_labels else n_objects

    background = float(rng.uniform(0.0, 0.2))
    if contrast is not None:
        jitter = rng.uniform(-contrast / 8, contrast / 8, size=n_labels)
        levels = background + contrast * np.arange(1, n_labels + 1) + jitter
    elif n_labels == 1:
        levels = np.array([rng.uniform(0.8, 1.0)])
    else:
        step = 0.5 / n_labels
        jitter = rng.uniform(-step / 4, step / 4, size=n_labels)
        levels = 0.5 + step * np.arange(1, n_labels + 1) + jitter
    lut = np.concatenate([[background], levels]).astype(np.float32)
    image = lut[mask]
    image *= bias_field(rng, size, bias)
    object_contrast = float(levels.mean()) - background
    if texture > 0:
        image += texture_field(rng, size) * np.float32(texture * object_contrast)
    if noise > 0:
        image += rng.standard_normal(size, dtype=np.float32) * np.float32(noise * object_contrast)

    counts = np.bincount(mask.ravel(), minlength=n_labels + 1)
    info: dict[str, Any] = {
        "shape": list(size),
        "shapes": [o["shape"] for o in objects],
        "label_voxels": {
            int(k): int(counts[k]) for k in range(1, n_labels + 1) if counts[k] or not shape_labels
        },
        "background": background,
        "intensities": {int(k): float(levels[k - 1]) for k in range(1, n_labels + 1)},
    }
    return image.astype(np.float32, copy=False), mask, info


def case_names(prefix: str, cases: int) -> list[str]:
    """Case identifiers ``<prefix>_001 ... <prefix>_<cases>`` (at least three digits)."""
    width = max(3, len(str(cases)))
    return [f"{prefix}_{i:0{width}d}" for i in range(1, cases + 1)]


def write_mock_dataset(
    out: str | Path,
    cases: int = 6,
    *,
    dim: int = 3,
    size_min: int = 60,
    size_max: int = 70,
    shapes: Sequence[str] = SHAPES,
    n_objects: int = 1,
    noise: float = 0.1,
    bias: float = 0.2,
    spacing: Sequence[float] | None = None,
    seed: int = 0,
    prefix: str = "case",
    overwrite: bool = False,
    on_case: Callable[[dict[str, Any]], None] | None = None,
    shape_labels: bool = False,
    contrast: float | None = None,
    texture: float = 0.0,
    touching: bool = False,
) -> list[dict[str, Any]]:
    """Generate cases and write ``<out>/<case>_img.nii.gz`` and ``<out>/<case>_gt.nii.gz``.

    Every target path is checked before anything is written, so an existing file (without
    ``overwrite``) leaves the folder untouched. Files are written atomically with spacing from
    ``spacing``, origin 0 and identity direction. Case ``i`` uses :func:`case_rng` ``(seed, i)``.

    Args:
        out: Output folder (created if missing).
        cases: Number of cases (>= 1).
        dim: 2 or 3.
        size_min: Smallest side length in voxels.
        size_max: Largest side length in voxels.
        shapes: Canonical shape names (see :func:`parse_shapes`).
        n_objects: Labels per case (1 = binary).
        noise: Noise standard deviation relative to the contrast.
        bias: Bias field strength (0 disables).
        spacing: Voxel size ``(x, y[, z])`` in mm; ``None`` means 1.0.
        seed: Non-negative random seed.
        prefix: Case name prefix (letters, digits, ``_ . -``).
        overwrite: Replace existing files instead of refusing.
        on_case: Called with each case's record right after it is written (progress).
        shape_labels: One label per shape class (see :func:`generate_case`).
        contrast: Intensity step between background and labels; None keeps the easy levels.
        texture: Fine texture std relative to the contrast (0 = none).
        touching: Objects in contact with each other.

    Returns:
        One record per case: ``case``, ``image``, ``label`` (paths as strings), ``shape`` (array
        shape, ``(Z, Y, X)``), ``size`` (``(x, y[, z])`` voxels), ``spacing`` (``(x, y[, z])``),
        ``shapes`` (names per label, 2D names in 2D) and ``label_voxels`` ``{label: count}``.

    Raises:
        NcaError: Bad parameters, ``out`` is a file, or a target exists and ``overwrite`` is false.
    """
    from ncatool.data.io import Image, write_image

    out = Path(out)
    shapes = tuple(shapes)
    if cases < 1:
        raise NcaError(f"--cases must be at least 1, got {cases}")
    if seed < 0:
        raise NcaError(f"--seed must be non-negative, got {seed}")
    if not _PREFIX_RE.match(prefix):
        raise NcaError(
            f"--prefix {prefix!r}: use letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    _validate(dim, size_min, size_max, shapes, n_objects, noise, bias, contrast, texture)
    spacing_xyz = parse_spacing(None if spacing is None else list(spacing), dim)
    if out.exists() and not out.is_dir():
        raise NcaError("exists and is not a folder", out)

    names = case_names(prefix, cases)
    targets = [(out / f"{n}_img.nii.gz", out / f"{n}_gt.nii.gz") for n in names]
    if not overwrite:
        existing = [p for pair in targets for p in pair if p.exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise NcaError(f"already exists{more}; use --overwrite to replace", existing[0])
    else:
        for pair in targets:
            for p in pair:
                if p.is_dir():
                    raise NcaError("is a folder, cannot overwrite it with an image", p)

    records: list[dict[str, Any]] = []
    for index, (name, (img_path, gt_path)) in enumerate(zip(names, targets, strict=True)):
        image, mask, info = generate_case(
            case_rng(seed, index),
            dim=dim,
            size_min=size_min,
            size_max=size_max,
            shapes=shapes,
            n_objects=n_objects,
            noise=noise,
            bias=bias,
            spacing=spacing_xyz,
            shape_labels=shape_labels,
            contrast=contrast,
            texture=texture,
            touching=touching,
        )
        write_image(Image.from_array(image, spacing=spacing_xyz), img_path)
        write_image(Image.from_array(mask, spacing=spacing_xyz), gt_path)
        record = {
            "case": name,
            "image": str(img_path),
            "label": str(gt_path),
            "shape": info["shape"],
            "size": list(reversed(info["shape"])),
            "spacing": list(spacing_xyz),
            "shapes": [shape_display_name(s, dim) for s in info["shapes"]],
            "label_voxels": {str(k): v for k, v in info["label_voxels"].items()},
        }
        records.append(record)
        if on_case is not None:
            on_case(record)
    return records
