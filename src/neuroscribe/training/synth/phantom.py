"""A head-CT phantom in Hounsfield units, evaluated in patient coordinates slice by slice.

The head is a handful of analytic shapes (ellipsoids, tapered capsules, a cranial floor, a
gyroid for the sulci) in *model coordinates*: millimetres of a reference head, origin near the
centre of the brain, axes as DICOM LPS (+x patient left, +y posterior, +z superior). A study's
:class:`HeadModel` places and scales that head in patient coordinates. Every pixel of every slice is
mapped to patient and then model coordinates, so gantry tilt, field of view and matrix changes
keep the anatomy consistent.

A slice is a plane whose rows are lines of constant (y, z) and whose columns are lines of constant
x (the gantry tilts about the patient x axis), so coordinates are three 1-D arrays and most shape
tests are sums of a row term and a column term: cheap, vectorised, bounded memory.

Findings become lesions (:class:`Lesion` subclasses built by :func:`build_lesion`) that paint on
top of the anatomy; space-occupying lesions also push the midline (:func:`midline_shift_mm`) and
efface nearby sulci, atrophy widens sulci and ventricles, hydrocephalus widens only ventricles.

Values are plausible, not calibrated: this is a synthetic phantom without clinical validity.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any, ClassVar, NamedTuple

import numpy as np

from neuroscribe.training.synth.findings import (
    EXTRA_AXIAL,
    Acuity,
    Degree,
    Finding,
    FindingKind,
    Region,
    Side,
)
from neuroscribe.training.synth.profiles import Acquisition

__all__ = [
    "CEREBRUM_CENTRE",
    "CEREBRUM_SEMI_AXES",
    "CHUNK_PIXELS",
    "HU",
    "EllipsoidLesion",
    "ExtraAxialLesion",
    "HeadModel",
    "Lesion",
    "MaskedLesion",
    "PeriventricularLesion",
    "Phantom",
    "RenderedSlice",
    "SliceGeometry",
    "SubarachnoidLesion",
    "TerritoryLesion",
    "Tissue",
    "apply_mass_effect",
    "build_lesion",
    "midline_shift_mm",
    "sample_head",
]

Vec3 = tuple[float, float, float]


class Tissue(IntEnum):
    """Ground-truth label of a pixel (what the phantom painted there)."""

    AIR = 0
    SOFT_TISSUE = 1
    FAT = 2
    BONE = 3
    SINUS_AIR = 4
    SUBARACHNOID = 5
    """CSF between the brain surface and the inner table."""
    SULCUS = 6
    SYLVIAN_FISSURE = 7
    INTERHEMISPHERIC_FISSURE = 8
    CISTERN = 9
    VENTRICLE = 10
    GREY_MATTER = 11
    WHITE_MATTER = 12
    DEEP_GREY = 13
    """Caudate, lentiform nucleus, thalamus."""
    CEREBELLUM = 14
    BRAINSTEM = 15
    FALX = 16
    CHOROID_PLEXUS = 17
    PINEAL = 18
    GLOBE = 19
    LENS = 20
    LESION = 21
    """Any finding (the lesion map says which)."""
    CALCIFICATION = 22


#: Nominal densities (HU) before per-study jitter, kernel and noise.
HU: dict[str, float] = {
    "air": -1000.0,
    "fat": -80.0,
    "scalp": 40.0,
    "skin": 45.0,
    "csf": 7.0,
    "grey_matter": 37.0,
    "white_matter": 27.0,
    "deep_grey": 35.0,
    "cerebellum": 34.0,
    "brainstem": 30.0,
    "falx": 70.0,
    "choroid_plexus": 30.0,
    "pineal": 38.0,
    "cortical_bone": 1500.0,
    "diploe": 650.0,
    "skull_base": 900.0,
    "petrous_bone": 1300.0,
    "globe": 12.0,
    "lens": 100.0,
    "orbital_fat": -85.0,
}

#: Brain tissue labels that parenchymal lesions may replace.
_PARENCHYMA = (Tissue.GREY_MATTER, Tissue.WHITE_MATTER, Tissue.DEEP_GREY, Tissue.CEREBELLUM,
               Tissue.BRAINSTEM)
#: CSF spaces outside the ventricles (where subarachnoid blood goes).
_SUBARACHNOID_SPACES = (Tissue.SUBARACHNOID, Tissue.SULCUS, Tissue.SYLVIAN_FISSURE,
                        Tissue.INTERHEMISPHERIC_FISSURE, Tissue.CISTERN)
#: Everything inside the cranial cavity that a lesion may cover.
_INTRACRANIAL = (*_PARENCHYMA, *_SUBARACHNOID_SPACES, Tissue.VENTRICLE, Tissue.FALX,
                 Tissue.CHOROID_PLEXUS, Tissue.PINEAL)

# --- the reference head (model coordinates, mm) -----------------------------------------------

#: Supratentorial cavity: an ellipsoid cut by the cranial floor.
CEREBRUM_CENTRE: Vec3 = (0.0, 0.0, 5.0)
CEREBRUM_SEMI_AXES: Vec3 = (68.0, 84.0, 68.0)
#: Posterior fossa: an ellipsoid below the tentorium.
_PF_CENTRE: Vec3 = (0.0, 38.0, -32.0)
_PF_SEMI: Vec3 = (50.0, 36.0, 27.0)
#: Face and skull base soft tissue.
_FACE_CENTRE: Vec3 = (0.0, -30.0, -58.0)
_FACE_SEMI: Vec3 = (62.0, 78.0, 46.0)
#: Cranial floor heights: anterior fossa, middle fossa laterally and centrally (sella).
_FLOOR_ANTERIOR = -22.0
_FLOOR_MIDDLE_LATERAL = -46.0
_FLOOR_MIDDLE_CENTRAL = -24.0
#: Extreme points of the head (model mm) that the scan must cover, bottom then top.
_COVERAGE_POINTS = (
    (0.0, 40.0, -64.0), (0.0, -70.0, -52.0), (0.0, 0.0, -60.0),
    (0.0, 0.0, 82.0), (0.0, -40.0, 77.0), (0.0, 40.0, 77.0),
)
#: Head extent for the field of view (model mm): x, y, z boxes.
_HEAD_LO = np.array([-90.0, -112.0, -110.0])
_HEAD_HI = np.array([90.0, 104.0, 95.0])
#: Ventricle centre-line distance from the midline at the septum pellucidum (half septum width).
_SEPTUM_HALF_MM = 1.0
#: Frontal horn radius (mm) at ventricle scale 1 (sets the Evans index).
_FRONTAL_HORN_RADIUS = 6.5
#: Depth (mm) over which midline displacement fades to zero towards the skull.
_SHIFT_FADE_MM = 40.0

#: Model-space region centres for parenchymal lesions (x is multiplied by the side's sign).
_REGION_CENTRES: dict[Region, Vec3] = {
    Region.FRONTAL: (28.0, -48.0, 26.0),
    Region.PARIETAL: (32.0, 28.0, 42.0),
    Region.TEMPORAL: (46.0, -4.0, -16.0),
    Region.OCCIPITAL: (22.0, 60.0, 12.0),
    Region.BASAL_GANGLIA: (22.0, -2.0, 4.0),
    Region.INTERNAL_CAPSULE: (17.0, 4.0, 6.0),
    Region.THALAMUS: (10.0, 16.0, 6.0),
    Region.CORONA_RADIATA: (22.0, 2.0, 32.0),
    Region.CEREBELLUM: (22.0, 48.0, -38.0),
    Region.PINEAL: (0.0, 27.0, 5.0),
}
#: Directions (in normalised-ellipsoid space, x times the side's sign) of surface regions.
_REGION_DIRECTIONS: dict[Region, Vec3] = {
    Region.FRONTAL: (0.55, -0.75, 0.35),
    Region.PARIETAL: (0.6, 0.35, 0.7),
    Region.TEMPORAL: (0.95, 0.0, -0.3),
    Region.OCCIPITAL: (0.35, 0.92, 0.15),
    Region.FRONTOPARIETAL: (0.75, -0.25, 0.6),
    Region.FRONTOTEMPORAL: (0.85, -0.45, 0.0),
    Region.TEMPOROPARIETAL: (0.9, 0.35, 0.15),
    Region.FRONTOTEMPOROPARIETAL: (0.92, 0.0, 0.3),
    Region.CONVEXITY: (0.8, 0.0, 0.6),
    Region.MCA_TERRITORY: (1.0, -0.05, 0.1),
    Region.ACA_TERRITORY: (0.25, -0.45, 0.85),
    Region.PCA_TERRITORY: (0.3, 0.92, -0.15),
}


def _unit(v: Sequence[float]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


@dataclass(frozen=True)
class HeadModel:
    """One study's head: where it lies, how big it is, its tissue densities and its brain state.

    Parameters are in model millimetres unless named otherwise. ``centre_mm`` is the patient
    (LPS) position of the model origin; a model point p lies at ``centre_mm + scale * p``.
    ``ventricle_scale`` is (left, right); ``midline_shift_mm`` is signed along patient x
    (negative: towards the patient's right).
    """

    centre_mm: Vec3
    scale: float = 1.0
    skull_mm: float = 6.5
    scalp_mm: float = 6.0
    cortex_mm: float = 3.0
    subarachnoid_mm: float = 1.0
    sulcal_half_width_mm: float = 0.7
    sulcal_depth_mm: float = 13.0
    sylvian_half_width_mm: float = 1.3
    fissure_half_width_mm: float = 0.9
    cistern_mm: float = 3.0
    folia_half_width_mm: float = 0.35
    ventricle_scale: tuple[float, float] = (1.0, 1.0)
    temporal_horn_scale: float = 1.0
    third_ventricle_scale: float = 1.0
    fourth_ventricle_scale: float = 1.0
    midline_shift_mm: float = 0.0
    csf_hu: float = HU["csf"]
    grey_hu: float = HU["grey_matter"]
    white_hu: float = HU["white_matter"]
    bone_hu: float = HU["cortical_bone"]
    diploe_hu: float = HU["diploe"]
    gyrus_period_mm: float = 28.0
    gyrus_phases: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

    # --- placement ---------------------------------------------------------------------------

    def to_model(self, patient: Sequence[float]) -> np.ndarray:
        """Patient LPS mm to model mm."""
        return (np.asarray(patient, dtype=np.float64) - np.asarray(self.centre_mm)) / self.scale

    def to_patient(self, model: Sequence[float]) -> Vec3:
        """Model mm to patient LPS mm."""
        p = np.asarray(self.centre_mm) + self.scale * np.asarray(model, dtype=np.float64)
        return (float(p[0]), float(p[1]), float(p[2]))

    def ventricle_factor(self, sign: int) -> float:
        """Lateral ventricle scale of the left (+1) or right (-1) side."""
        return self.ventricle_scale[0] if sign > 0 else self.ventricle_scale[1]

    @property
    def shift_model(self) -> float:
        """Midline shift in model mm (signed along x)."""
        return self.midline_shift_mm / self.scale

    @property
    def evans_index(self) -> float:
        """Maximal frontal-horn width over maximal inner-skull width (normal below 0.3)."""
        v = 0.5 * (self.ventricle_scale[0] + self.ventricle_scale[1])
        width = 2 * (_SEPTUM_HALF_MM + 2 * _FRONTAL_HORN_RADIUS * v)
        return width / (2 * CEREBRUM_SEMI_AXES[0])

    def coverage_mm(self, tilt_deg: float) -> tuple[float, float]:
        """(low, high) offsets along the slice normal (patient mm) that the scan must cover."""
        t = math.radians(tilt_deg)
        normal = np.array([0.0, math.sin(t), math.cos(t)])
        offsets = [float(normal @ np.asarray(self.to_patient(p))) for p in _COVERAGE_POINTS]
        return min(offsets), max(offsets)

    # --- shape functions (broadcasting arrays of model coordinates) ----------------------------

    def cavity_distance(self, x: Any, y: Any, z: Any) -> np.ndarray:
        """Approximate signed distance (model mm) to the inner table; negative inside the cavity."""
        d_cere = _ellipsoid_distance(x, y, z, CEREBRUM_CENTRE, CEREBRUM_SEMI_AXES)
        d_cere = np.maximum(d_cere, _floor(x, y) - z)
        d_pf = _ellipsoid_distance(x, y, z, _PF_CENTRE, _PF_SEMI)
        return np.minimum(d_cere, d_pf)

    def infratentorial(self, x: Any, y: Any, z: Any) -> np.ndarray:
        """Whether points lie in the posterior fossa below the tentorium."""
        q = _ellipsoid_q(x, y, z, _PF_CENTRE, _PF_SEMI)
        return (q < 1.0) & (z < _tentorium(y))

    def lateral_ventricle(self, sign: int) -> list[tuple[Vec3, Vec3, float, float]]:
        """Tapered capsules (a, b, radius at a, radius at b) of one lateral ventricle (model mm).

        The frontal horn and body hug the septum pellucidum: their centre line lies one radius
        from the midline, so the ventricles grow outwards as they enlarge.
        """
        v = self.ventricle_factor(sign)
        th = v * self.temporal_horn_scale
        s = float(sign)
        r_tip, r_fh, r_body, r_atrium, r_occ = 3.0 * v, _FRONTAL_HORN_RADIUS * v, 5.0 * v, 7.5 * v, 2.0 * v
        lat = 1.0 + 0.35 * (v - 1.0)
        fh_tip = (s * (_SEPTUM_HALF_MM + r_tip), -32.0, 16.0)
        fh = (s * (_SEPTUM_HALF_MM + r_fh), -8.0, 19.0)
        body = (s * (3.0 + r_body), 18.0, 22.0)
        atrium = (s * 22.0 * lat, 34.0, 12.0)
        occ = (s * 18.0 * lat, 56.0, 10.0)
        temporal_top = (s * 24.0 * lat, 30.0, 6.0)
        temporal_tip = (s * 30.0 * lat, 4.0, -16.0)
        return [
            (fh_tip, fh, r_tip, r_fh),
            (fh, body, r_fh, r_body),
            (body, atrium, r_body, r_atrium),
            (atrium, occ, r_atrium, r_occ),
            (temporal_top, temporal_tip, 3.2 * th, 1.6 * th),
        ]

    def landmarks(self) -> dict[str, Vec3]:
        """Named points in patient coordinates, for tests and evaluation (unshifted anatomy)."""
        model: dict[str, Vec3] = {
            "left_frontal_horn": (_SEPTUM_HALF_MM + _FRONTAL_HORN_RADIUS * self.ventricle_scale[0],
                                  -10.0, 19.0),
            "right_frontal_horn": (-(_SEPTUM_HALF_MM + _FRONTAL_HORN_RADIUS * self.ventricle_scale[1]),
                                   -10.0, 19.0),
            "left_centrum_semiovale": (26.0, 0.0, 40.0),
            "right_centrum_semiovale": (-26.0, 0.0, 40.0),
            "sphenoid_sinus": (0.0, -22.0, -42.0),
            "frontal_sinus": (0.0, -89.0, 3.0),
            "left_mastoid": (55.0, 30.0, -47.0),
            "right_mastoid": (-55.0, 30.0, -47.0),
            "vertex_skull": (0.0, 0.0, CEREBRUM_CENTRE[2] + CEREBRUM_SEMI_AXES[2] + self.skull_mm / 2),
            "septum_pellucidum": (0.0, -5.0, 20.0),
            "head_centre": (0.0, 0.0, 0.0),
            "fourth_ventricle": (0.0, 30.0, -34.0),
        }
        return {name: self.to_patient(p) for name, p in model.items()}


def _ellipsoid_q(x: Any, y: Any, z: Any, c: Sequence[float], semi: Sequence[float]) -> np.ndarray:
    """Normalised squared radius; < 1 inside."""
    return ((x - c[0]) / semi[0]) ** 2 + ((y - c[1]) / semi[1]) ** 2 + ((z - c[2]) / semi[2]) ** 2


def _ellipsoid_distance(x: Any, y: Any, z: Any, c: Sequence[float], semi: Sequence[float]) -> np.ndarray:
    """First-order signed distance to an ellipsoid surface: (r - 1) / |grad r|."""
    ux, uy, uz = x - c[0], y - c[1], z - c[2]
    a, b, cc = semi
    r = np.sqrt((ux / a) ** 2 + (uy / b) ** 2 + (uz / cc) ** 2)
    n = np.sqrt((ux / a**2) ** 2 + (uy / b**2) ** 2 + (uz / cc**2) ** 2)
    mean_axis = (a + b + cc) / 3
    return (r - 1.0) * (r + 1e-9) / (n + 1e-9 / mean_axis)


def _floor(x: Any, y: Any) -> np.ndarray:
    """Height of the cranial floor: anterior fossa rising forwards and domed over the orbits,
    middle fossa deep laterally and high at the sella, none in the posterior fossa."""
    w_ant = np.clip((-25.0 - y) / 10.0, 0.0, 1.0)
    w_post = np.clip((y - 20.0) / 10.0, 0.0, 1.0)
    anterior = (_FLOOR_ANTERIOR + 0.18 * np.clip(-35.0 - y, 0.0, 60.0)
                + 5.0 * np.exp(-(((np.abs(x) - 31.0) / 12.0) ** 2)))
    sella = np.exp(-((x / 16.0) ** 2))
    middle = _FLOOR_MIDDLE_LATERAL + (_FLOOR_MIDDLE_CENTRAL - _FLOOR_MIDDLE_LATERAL) * sella
    return w_ant * anterior + (1.0 - w_ant - w_post) * middle + w_post * -100.0


def _tentorium(y: Any) -> np.ndarray:
    """Height of the tentorium cerebelli over y."""
    return -10.0 - 0.3 * np.maximum(y - 10.0, 0.0)


def _capsule_excess(x: Any, y: Any, z: Any, a: Sequence[float], b: Sequence[float],
                    ra: float, rb: float) -> np.ndarray:
    """Distance to a tapered capsule's axis minus its local radius; negative inside."""
    d = np.subtract(b, a)
    length2 = float(d @ d)
    t = ((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / length2
    t = np.clip(t, 0.0, 1.0)
    dist = np.sqrt((x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (z - a[2] - t * d[2]) ** 2)
    return dist - (ra + t * (rb - ra))


def _capsule_box(a: Sequence[float], b: Sequence[float], r: float) -> tuple[np.ndarray, np.ndarray]:
    lo = np.minimum(a, b) - r
    hi = np.maximum(a, b) + r
    return lo, hi


def _gyroid(x: Any, y: Any, z: Any, omega: float, phases: Sequence[float]) -> np.ndarray:
    """A gyroid (its zero set is a convoluted surface: cortical sulci where it meets the cortex)."""
    px, py, pz = phases
    sx, cx = np.sin(omega * x + px), np.cos(omega * x + px)
    sy, cy = np.sin(omega * y + py), np.cos(omega * y + py)
    sz, cz = np.sin(omega * z + pz), np.cos(omega * z + pz)
    return sx * cy + sy * cz + sz * cx


#: Mean gradient of the gyroid near its zero set, per unit omega (measured numerically).
_GYROID_GRADIENT = 1.5


def _direction_cos(x: Any, y: Any, z: Any, u0: np.ndarray) -> np.ndarray:
    """Cosine between a point's normalised-ellipsoid direction (from the cerebrum centre) and u0."""
    ux = (x - CEREBRUM_CENTRE[0]) / CEREBRUM_SEMI_AXES[0]
    uy = (y - CEREBRUM_CENTRE[1]) / CEREBRUM_SEMI_AXES[1]
    uz = (z - CEREBRUM_CENTRE[2]) / CEREBRUM_SEMI_AXES[2]
    norm = np.sqrt(ux * ux + uy * uy + uz * uz) + 1e-9
    return (ux * u0[0] + uy * u0[1] + uz * u0[2]) / norm


@functools.lru_cache(maxsize=256)
def _surface_box(u0: Vec3, max_angle: float, depth: float) -> tuple[np.ndarray, np.ndarray]:
    """Model-space box of the cavity surface patch within ``max_angle`` of ``u0``, ``depth`` deep.

    Cached: callers must not modify the returned arrays.
    """
    n = 1500
    u = np.asarray(u0)
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = math.pi * (1 + 5**0.5) * i
    dirs = np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)
    keep = dirs @ u >= math.cos(min(max_angle * 1.05 + 0.05, math.pi))
    dirs = dirs[keep] if keep.any() else u[None, :]
    semi = np.asarray(CEREBRUM_SEMI_AXES)
    outer = np.asarray(CEREBRUM_CENTRE) + dirs * semi
    inner = np.asarray(CEREBRUM_CENTRE) + dirs * np.maximum(semi - depth - 3.0, 0.0)
    points = np.concatenate([outer, inner])
    return points.min(axis=0) - 3.0, points.max(axis=0) + 3.0


# --- the slice being rendered ----------------------------------------------------------------


class _Slice:
    """Model coordinates of one slice and the maps the anatomy pass leaves for the lesions."""

    def __init__(self, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray, pixel_mm: float,
                 *, linear: bool = True) -> None:
        self.xs, self.ys, self.zs = xs, ys, zs
        self.linear = linear  # rows are one slice (coordinates linear in the row index)
        self.pixel_mm = pixel_mm  # pixel size in model mm
        rows, columns = ys.size, xs.size
        self.hu = np.full((rows, columns), HU["air"], dtype=np.float32)
        self.tissue = np.zeros((rows, columns), dtype=np.uint8)
        self.lesion = np.full((rows, columns), -1, dtype=np.int16)
        self.x = xs[None, :]
        self.y = ys[:, None]
        self.z = zs[:, None]
        self.dcav = np.empty(0, dtype=np.float32)
        self.xdef: np.ndarray = np.broadcast_to(self.x, (rows, columns))
        self.shift = 0.0
        self.vent_dist = np.full((rows, columns), np.inf, dtype=np.float32)
        self.brain_depth = np.full((rows, columns), -1.0, dtype=np.float32)
        self._x0 = float(xs[0])
        self._dx = float(xs[-1] - xs[0]) / (columns - 1) if columns > 1 else 1.0
        self._y0, self._z0 = float(ys[0]), float(zs[0])
        self._dy = float(ys[-1] - ys[0]) / (rows - 1) if rows > 1 else 0.0
        self._dz = float(zs[-1] - zs[0]) / (rows - 1) if rows > 1 else 0.0

    def window(self, lo: Sequence[float], hi: Sequence[float], *, deformed: bool = False
               ) -> tuple[slice, slice] | None:
        """Rows and columns whose pixels may lie in the model box [lo, hi]; None when none do.

        Within one slice coordinates are linear in the row and column index, so the window is
        found in closed form (one pixel of margin on each side); for stacked slices each row's
        (y, z) is tested.
        """
        rows, columns = self.ys.size, self.xs.size
        if not self.linear:  # several slices stacked: find the rows by testing each one
            ys, zs = self.ys, self.zs
            hit = np.flatnonzero((ys >= lo[1] - 1e-3) & (ys <= hi[1] + 1e-3)
                                 & (zs >= lo[2] - 1e-3) & (zs <= hi[2] + 1e-3))
            if hit.size == 0:
                return None
            i_lo, i_hi = max(0, int(hit[0]) - 1), min(rows - 1, int(hit[-1]) + 1)
        else:
            i_lo, i_hi = self._linear_rows(lo, hi)
        if i_lo > i_hi:
            return None
        margin = abs(self.shift) + 1.0 if deformed else 0.0
        c_lo = max(0, math.ceil((lo[0] - margin - self._x0) / self._dx) - 1)
        c_hi = min(columns - 1, math.floor((hi[0] + margin - self._x0) / self._dx) + 1)
        if c_lo > c_hi:
            return None
        return slice(i_lo, i_hi + 1), slice(c_lo, c_hi + 1)

    def _linear_rows(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[int, int]:
        """First and last row of one slice within the box's y and z range (first > last: none)."""
        i_lo, i_hi = 0, self.ys.size - 1
        for start, step, a, b in ((self._y0, self._dy, lo[1], hi[1]), (self._z0, self._dz, lo[2], hi[2])):
            if abs(step) < 1e-9:
                if not a - 1e-3 <= start <= b + 1e-3:
                    return 1, 0
                continue
            f1, f2 = (a - start) / step, (b - start) / step
            if f1 > f2:
                f1, f2 = f2, f1
            i_lo = max(i_lo, math.ceil(f1) - 1)
            i_hi = min(i_hi, math.floor(f2) + 1)
        return i_lo, i_hi

    def coords(self, win: tuple[slice, slice], *, deformed: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, z) of a window, broadcastable; x follows the midline shift if ``deformed``."""
        rs, cs = win
        x = self.xdef[rs, cs] if deformed else self.x[:, cs]
        return x, self.y[rs], self.z[rs]

    def paint(self, win: tuple[slice, slice], mask: np.ndarray, hu: float | np.ndarray,
              tissue: Tissue, lesion: int | None = None) -> None:
        """Set HU, tissue label and (optionally) lesion index where ``mask`` holds in ``win``."""
        rs, cs = win
        if isinstance(hu, np.ndarray):
            self.hu[rs, cs][mask] = hu[mask]
        else:
            self.hu[rs, cs][mask] = hu
        self.tissue[rs, cs][mask] = tissue
        if lesion is not None:
            self.lesion[rs, cs][mask] = lesion


# --- lesions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lesion(ABC):
    """Geometry and density of one finding in model coordinates (a base class).

    ``index`` is the finding's position in the study's findings list (the lesion map holds it).
    """

    index: int

    #: Whether the lesion moves with the midline shift (deep structures) or causes it.
    deformed: ClassVar[bool] = False
    #: Whether the lesion occupies space (its volume pushes the midline).
    space_occupying: ClassVar[bool] = False
    #: Tissues the lesion may replace.
    replaces: ClassVar[tuple[Tissue, ...]] = _PARENCHYMA

    @abstractmethod
    def box(self) -> tuple[np.ndarray, np.ndarray]:
        """Model-space bounding box (lo, hi)."""

    @abstractmethod
    def paint(self, head: HeadModel, sl: _Slice) -> None:
        """Paint the lesion on a slice after the anatomy pass."""

    def influence_box(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Box outside which :meth:`thickness` and :meth:`sulcal_factor` change nothing (None: no
        influence); it bounds where the anatomy pass evaluates them."""
        return None

    def thickness(self, head: HeadModel, x: Any, y: Any, z: Any) -> np.ndarray | None:
        """Extra-axial thickness map (pushes the brain surface inwards), or None."""
        return None

    def sulcal_factor(self, head: HeadModel, x: Any, y: Any, z: Any) -> np.ndarray | None:
        """Multiplier of sulcal width near the lesion (< 1 effaces, > 1 widens), or None."""
        return None


@dataclass(frozen=True)
class MaskedLesion(Lesion):
    """A lesion whose extent is a membership test of model points (so it has a volume)."""

    hu: float = 60.0

    @abstractmethod
    def mask(self, head: HeadModel, x: Any, y: Any, z: Any) -> np.ndarray:
        """Membership of model points (broadcasting arrays)."""

    def paint(self, head: HeadModel, sl: _Slice) -> None:
        """Replace the replaceable tissue inside :meth:`mask` with the lesion's density."""
        win = sl.window(*self.box(), deformed=self.deformed)
        if win is None:
            return
        x, y, z = sl.coords(win, deformed=self.deformed)
        rs, cs = win
        mask = self.mask(head, x, y, z) & np.isin(sl.tissue[rs, cs], self.replaces)
        sl.paint(win, mask, self.hu, Tissue.LESION, self.index)

    def volume_ml(self, head: HeadModel, step_mm: float = 1.5) -> float:
        """Volume (mL, patient scale) by counting grid points of :meth:`mask` in the box."""
        lo, hi = self.box()
        axes = [np.arange(lo[i] + step_mm / 2, hi[i], step_mm) for i in range(3)]
        x = axes[0][:, None, None]
        y = axes[1][None, :, None]
        z = axes[2][None, None, :]
        count = int(np.count_nonzero(self.mask(head, x, y, z)))
        return count * step_mm**3 * head.scale**3 / 1000.0


@dataclass(frozen=True)
class EllipsoidLesion(MaskedLesion):
    """An ellipsoid: hemorrhage (with an oedema rim), lacune or calcification."""

    centre: Vec3 = (0.0, 0.0, 0.0)
    semi: Vec3 = (1.0, 1.0, 1.0)
    hu: float = 60.0
    rim_mm: float = 0.0
    rim_hu: float = 22.0
    side_sign: int = 0  # > 0 keeps x > 0 (no crossing of the midline), < 0 keeps x < 0
    is_deformed: bool = False
    occupies_space: bool = False
    label: Tissue = Tissue.LESION
    replaceable: tuple[Tissue, ...] = _PARENCHYMA

    @property
    def deformed(self) -> bool:  # type: ignore[override]
        """Deep small lesions move with the midline; hemorrhages cause the shift."""
        return self.is_deformed

    @property
    def space_occupying(self) -> bool:  # type: ignore[override]
        """Hemorrhages occupy space; lacunes and calcifications do not."""
        return self.occupies_space

    @property
    def replaces(self) -> tuple[Tissue, ...]:  # type: ignore[override]
        """Tissues the ellipsoid may cover."""
        return self.replaceable

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        """Box of the ellipsoid and its rim."""
        r = np.asarray(self.semi) + self.rim_mm + 1.0
        return np.asarray(self.centre) - r, np.asarray(self.centre) + r

    def mask(self, head: HeadModel, x: Any, y: Any, z: Any) -> np.ndarray:
        """Inside the ellipsoid (and on its side of the midline)."""
        inside = _ellipsoid_q(x, y, z, self.centre, self.semi) < 1.0
        if self.side_sign:
            inside &= x * self.side_sign > 1.0
        return inside

    def paint(self, head: HeadModel, sl: _Slice) -> None:
        """Core, then the oedema rim around it (rim only over parenchyma)."""
        win = sl.window(*self.box(), deformed=self.deformed)
        if win is None:
            return
        x, y, z = sl.coords(win, deformed=self.deformed)
        rs, cs = win
        allowed = np.isin(sl.tissue[rs, cs], self.replaces)
        if self.rim_mm > 0:
            grown = tuple(s + self.rim_mm for s in self.semi)
            rim = (_ellipsoid_q(x, y, z, self.centre, grown) < 1.0) & np.isin(sl.tissue[rs, cs], _PARENCHYMA)
            sl.paint(win, rim, self.rim_hu, Tissue.LESION, self.index)
            allowed |= rim
        sl.paint(win, self.mask(head, x, y, z) & allowed, self.hu, self.label, self.index)

    def influence_box(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Where the mass effaces sulci (see :meth:`sulcal_factor`)."""
        if not self.occupies_space:
            return None
        reach = 2.3 * (max(self.semi) + self.rim_mm) + 12.0
        return np.asarray(self.centre) - reach, np.asarray(self.centre) + reach

    def sulcal_factor(self, head: HeadModel, x: Any, y: Any, z: Any) -> np.ndarray | None:
        """Space-occupying ellipsoids efface sulci within about two radii."""
        if not self.occupies_space:
            return None
        r = max(self.semi) + self.rim_mm
        dist = np.sqrt((x - self.centre[0]) ** 2 + (y - self.centre[1]) ** 2 + (z - self.centre[2]) ** 2)
        return np.clip((dist - 1.1 * r) / (1.2 * r + 10.0), 0.0, 1.0)

    def volume_ml(self, head: HeadModel, step_mm: float = 1.0) -> float:
        """Volume of the core (the hematoma), without the oedema rim."""
        return super().volume_ml(head, step_mm)


@dataclass(frozen=True)
class ExtraAxialLesion(MaskedLesion):
    """A collection between inner table and brain: subdural crescent or epidural lens.

    Thickness at angle theta from the centre direction ``u0`` is
    ``thickness * (1 - (theta / max_angle)^2) ** power``: a small power keeps the thickness
    nearly even over a wide extent (crescent), power 1 over a small extent bulges (lens).
    """

    side_sign: int = 1
    u0: Vec3 = (1.0, 0.0, 0.0)
    max_angle: float = 1.0  # radians
    thickness_mm: float = 10.0
    power: float = 0.4
    hu: float = 70.0

    space_occupying = True
    replaces = _INTRACRANIAL

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        """Box of the surface patch and its depth."""
        return _surface_box(self.u0, self.max_angle, self.thickness_mm)

    def influence_box(self) -> tuple[np.ndarray, np.ndarray]:
        """The effaced surface around the collection, deep enough to cover the displaced cortex."""
        return _surface_box(self.u0, min(math.pi, 1.45 * self.max_angle), self.thickness_mm + 40.0)

    def thickness(self, head: HeadModel, x: Any, y: Any, z: Any) -> np.ndarray:
        """Local thickness of the collection (0 outside its extent or on the other side)."""
        cos = np.clip(_direction_cos(x, y, z, np.asarray(self.u0)), -1.0, 1.0)
        frac = np.clip(1.0 - (np.arccos(cos) / self.max_angle) ** 2, 0.0, 1.0)
        t = self.thickness_mm * frac**self.power
        return np.where(x * self.side_sign > 1.5, t, 0.0)

    def mask(self, head: HeadModel, x: Any, y: Any, z: Any) -> np.ndarray:
        """Within the local thickness of the inner table, supratentorial, on its side."""
        depth = -head.cavity_distance(x, y, z)
        t = self.thickness(head, x, y, z)
        return (depth >= 0.0) & (depth < t) & ~head.infratentorial(x, y, z)

    def sulcal_factor(self, head: HeadModel, x: Any, y: Any, z: Any) -> np.ndarray | None:
        """Sulci under and around the collection are effaced (in proportion to its thickness)."""
        if self.thickness_mm < 4.0:
            return None
        cos = np.clip(_direction_cos(x, y, z, np.asarray(self.u0)), -1.0, 1.0)
        rel = np.arccos(cos) / self.max_angle
        factor = np.clip((rel - 0.9) / 0.5, 0.0, 1.0)
        return np.where(x * self.side_sign > 0, factor, 1.0)


@dataclass(frozen=True)
class TerritoryLesion(MaskedLesion):
    """A territorial infarct: a cone of cortex and white matter from the surface, ``depth_mm`` deep.

    Acute: density drops (grey matter to about white matter: loss of grey-white differentiation)
    and sulci in the territory are effaced by swelling. Old: CSF-like encephalomalacia and local
    sulcal widening (volume loss).
    """

    side_sign: int = 1
    u0: Vec3 = (1.0, 0.0, 0.0)
    max_angle: float = 0.5
    depth_mm: float = 30.0
    old: bool = False
    hu: float = 10.0  # acute: a few HU below white matter; old: CSF-like

    replaces = _PARENCHYMA

    @property
    def space_occupying(self) -> bool:  # type: ignore[override]
        """Acute infarcts swell a little; old ones have lost volume."""
        return not self.old

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        """Box of the cone."""
        return _surface_box(self.u0, self.max_angle, self.depth_mm)

    def mask(self, head: HeadModel, x: Any, y: Any, z: Any) -> np.ndarray:
        """Within the cone and depth, supratentorial, on its side."""
        cos = _direction_cos(x, y, z, np.asarray(self.u0))
        depth = -head.cavity_distance(x, y, z)
        return ((cos > math.cos(self.max_angle)) & (depth > 0.0) & (depth < self.depth_mm)
                & (x * self.side_sign > 1.5) & ~head.infratentorial(x, y, z))

    def influence_box(self) -> tuple[np.ndarray, np.ndarray]:
        """The territory's surface and a margin (see :meth:`sulcal_factor`)."""
        return _surface_box(self.u0, min(math.pi, 1.3 * self.max_angle), self.depth_mm + 40.0)

    def sulcal_factor(self, head: HeadModel, x: Any, y: Any, z: Any) -> np.ndarray | None:
        """Swollen (acute) territories efface sulci; old ones widen the nearby sulci."""
        cos = _direction_cos(x, y, z, np.asarray(self.u0))
        near = (cos > math.cos(self.max_angle * 1.2)) & (x * self.side_sign > 0)
        return np.where(near, 1.8 if self.old else 0.35, 1.0)

    def volume_ml(self, head: HeadModel, step_mm: float = 2.0) -> float:
        """Volume of the territory (mL)."""
        return super().volume_ml(head, step_mm)


@dataclass(frozen=True)
class PeriventricularLesion(Lesion):
    """Low density in the white matter around the lateral ventricles (small-vessel disease, or
    transependymal CSF in acute hydrocephalus); ``patchy`` adds confluent deep patches."""

    width_mm: float = 5.0
    hu_drop: float = 8.0
    patchy: bool = False
    phases: Vec3 = (0.0, 0.0, 0.0)

    deformed = True
    replaces = (Tissue.WHITE_MATTER,)

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        """The supratentorial white matter."""
        return np.array([-70.0, -90.0, -8.0]), np.array([70.0, 90.0, 80.0])

    def paint(self, head: HeadModel, sl: _Slice) -> None:
        """White matter within the (modulated) band width of the ventricle surface."""
        win = sl.window(*self.box(), deformed=True)
        if win is None:
            return
        x, y, z = sl.coords(win, deformed=True)
        rs, cs = win
        wobble = 0.75 + 0.25 * np.sin(0.21 * x + self.phases[0]) * np.cos(0.17 * y + self.phases[1])
        dist = sl.vent_dist[rs, cs]
        mask = (dist > 0) & (dist < self.width_mm * wobble) & (z > -6.0)
        if self.patchy:
            g = _gyroid(x, y, z, 2 * math.pi / 22.0, self.phases)
            depth = sl.brain_depth[rs, cs]
            mask |= (g > 0.9) & (depth > 8.0) & (z > 10.0) & (np.abs(x) > 8.0)
        mask &= sl.tissue[rs, cs] == Tissue.WHITE_MATTER
        sl.paint(win, mask, sl.hu[rs, cs] - self.hu_drop, Tissue.LESION, self.index)


@dataclass(frozen=True)
class SubarachnoidLesion(Lesion):
    """Blood in the subarachnoid spaces of a region: sulci, fissures, cisterns become hyperdense."""

    region: Region = Region.GENERALIZED
    side_sign: int = 0
    u0: Vec3 = (0.8, 0.0, 0.6)
    hu: float = 60.0

    replaces = _SUBARACHNOID_SPACES

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole cranial cavity."""
        return _HEAD_LO, _HEAD_HI

    def paint(self, head: HeadModel, sl: _Slice) -> None:
        """Replace the CSF of the region's subarachnoid spaces with blood."""
        tissue = sl.tissue
        x, y, z = sl.x, sl.y, sl.z
        side = (x * self.side_sign > 0) if self.side_sign else np.ones_like(x, dtype=bool)
        if self.region is Region.CONVEXITY:
            cos = _direction_cos(x, y, z, np.asarray(self.u0))
            mask = np.isin(tissue, (Tissue.SUBARACHNOID, Tissue.SULCUS)) & (cos > math.cos(0.75)) & side
        elif self.region is Region.SYLVIAN_FISSURE:
            mask = (tissue == Tissue.SYLVIAN_FISSURE) & side
            mask |= (tissue == Tissue.CISTERN) & side & (np.abs(x) > 6) & (z > -25)
        elif self.region is Region.BASAL_CISTERNS:
            mask = np.isin(tissue, (Tissue.CISTERN, Tissue.SYLVIAN_FISSURE))
            mask |= (tissue == Tissue.INTERHEMISPHERIC_FISSURE) & (y < -30) & (z < 25)
        else:
            mask = np.isin(tissue, _SUBARACHNOID_SPACES) & (z > -40)
        sl.paint((slice(None), slice(None)), mask, self.hu, Tissue.LESION, self.index)


# --- building lesions from findings ------------------------------------------------------------


def _push_inward(head: HeadModel, centre: np.ndarray, clearance: float) -> np.ndarray:
    """Move ``centre`` towards the brain centre until it lies ``clearance`` mm inside the cavity."""
    target = np.array([np.sign(centre[0]) * 12.0, 0.0, 10.0])
    c = centre.copy()
    for _ in range(60):
        if -float(head.cavity_distance(c[0], c[1], c[2])) >= clearance:
            break
        c = c + (target - c) * 0.06
    return c


def build_lesion(head: HeadModel, finding: Finding, index: int, rng: np.random.Generator) -> list[Lesion]:
    """The lesion(s) of one finding (two for bilateral ones), geometry drawn from ``rng``.

    The finding's own ``centre_mm`` and ``hu`` are used when given.
    """
    kind, side = finding.kind, finding.side
    s = side.sign
    size = (finding.size_mm or 0.0) / head.scale
    given_centre = head.to_model(finding.centre_mm) if finding.centre_mm is not None else None

    def region_centre(region: Region, sign: int, jitter: float = 3.0) -> np.ndarray:
        base = np.array(_REGION_CENTRES[region], dtype=np.float64)
        base[0] *= sign if sign else 1
        return base + rng.uniform(-jitter, jitter, 3)

    def direction(region: Region, sign: int, jitter: float = 0.08) -> Vec3:
        u = np.array(_REGION_DIRECTIONS[region], dtype=np.float64)
        u[0] *= sign
        u = _unit(u + rng.uniform(-jitter, jitter, 3))
        return (float(u[0]), float(u[1]), float(u[2]))

    if kind is FindingKind.INTRAPARENCHYMAL_HEMORRHAGE:
        ratios = [1.0, rng.uniform(0.7, 0.9), rng.uniform(0.6, 0.85)]
        rng.shuffle(ratios)
        semi = tuple(float(size / 2 * r) for r in ratios)
        if given_centre is not None:
            centre = given_centre
        else:
            centre = region_centre(finding.region, s)
            if finding.region not in (Region.BASAL_GANGLIA, Region.THALAMUS):
                centre = _push_inward(head, centre, max(semi) * 0.9 + 4.0)
        acute = finding.acuity is Acuity.ACUTE
        hu = finding.hu if finding.hu is not None else float(
            rng.uniform(62, 80) if acute else rng.uniform(42, 56))
        rim = float(rng.uniform(1.5, 3.0) if acute else rng.uniform(4.0, 7.0))
        return [EllipsoidLesion(index, centre=_vec(centre), semi=_vec(semi), hu=hu, rim_mm=rim,
                                rim_hu=float(rng.uniform(18, 23)), side_sign=s, occupies_space=True)]

    if kind in EXTRA_AXIAL:
        subdural = kind is FindingKind.SUBDURAL_HEMATOMA
        if subdural:
            hu_range = {Acuity.ACUTE: (62, 80), Acuity.SUBACUTE: (30, 45)}.get(finding.acuity, (8, 20))
            angle = math.radians(finding.extent_deg or rng.uniform(42, 58))
            power = 0.5
        else:
            hu_range = (60, 85)
            angle = math.radians(finding.extent_deg or rng.uniform(20, 30))
            power = 1.0
        hu = finding.hu if finding.hu is not None else float(rng.uniform(*hu_range))
        signs = (1, -1) if side is Side.BILATERAL else (s,)
        return [ExtraAxialLesion(index, side_sign=sign, u0=direction(finding.region, sign),
                                 max_angle=angle, thickness_mm=size, power=power, hu=hu)
                for sign in signs]

    if kind is FindingKind.SUBARACHNOID_HEMORRHAGE:
        hu = finding.hu if finding.hu is not None else float(rng.uniform(55, 75))
        u0 = direction(Region.CONVEXITY, s or 1)
        return [SubarachnoidLesion(index, region=finding.region, side_sign=s, u0=u0, hu=hu)]

    if kind in (FindingKind.ACUTE_INFARCT, FindingKind.OLD_INFARCT):
        old = kind is FindingKind.OLD_INFARCT
        angle = math.radians(finding.extent_deg) if finding.extent_deg else size / 140.0
        depth = min(0.5 * size + 6.0, 48.0)
        drawn = rng.uniform(8, 14) if old else head.white_hu - rng.uniform(4.5, 6.5)
        hu = finding.hu if finding.hu is not None else float(drawn)
        return [TerritoryLesion(index, side_sign=s, u0=direction(finding.region, s, 0.04),
                                max_angle=float(angle), depth_mm=float(depth), old=old, hu=hu)]

    if kind is FindingKind.LACUNAR_INFARCT:
        centre = given_centre if given_centre is not None else region_centre(finding.region, s, 2.0)
        r = size / 2
        semi = (r, r * float(rng.uniform(0.8, 1.0)), r * float(rng.uniform(0.8, 1.0)))
        hu = finding.hu if finding.hu is not None else float(
            rng.uniform(9, 15) if finding.acuity is not Acuity.ACUTE else rng.uniform(19, 23))
        return [EllipsoidLesion(index, centre=_vec(centre), semi=semi, hu=hu, side_sign=s,
                                is_deformed=True)]

    if kind is FindingKind.CALCIFICATION:
        hu = finding.hu if finding.hu is not None else float(rng.uniform(180, 600))
        r = size / 2
        places: list[np.ndarray] = []
        if finding.region is Region.PINEAL:
            places = [np.array(_REGION_CENTRES[Region.PINEAL])]
        elif finding.region is Region.CHOROID_PLEXUS:
            signs = (1, -1) if side is Side.BILATERAL else (s,)
            places = [np.array([sg * 22.0 * _lateral(head, sg), 32.0, 13.0]) for sg in signs]
        else:
            signs = (1, -1) if side is Side.BILATERAL else (s,)
            places = [np.array([sg * 18.0, 0.0, 2.0]) for sg in signs]
        if given_centre is not None and len(places) == 1:
            places = [given_centre]
        return [EllipsoidLesion(index, centre=_vec(p), semi=(r, r, r), hu=hu, is_deformed=True,
                                label=Tissue.CALCIFICATION, replaceable=_INTRACRANIAL)
                for p in places]

    if kind is FindingKind.WHITE_MATTER_HYPODENSITY:
        return [PeriventricularLesion(index, width_mm=size, hu_drop=float(rng.uniform(6, 9)),
                                      patchy=finding.degree is Degree.MARKED,
                                      phases=_vec(rng.uniform(0, 2 * math.pi, 3)))]

    if kind is FindingKind.HYDROCEPHALUS and finding.acuity is Acuity.ACUTE:
        return [PeriventricularLesion(index, width_mm=4.0, hu_drop=7.0,
                                      phases=_vec(rng.uniform(0, 2 * math.pi, 3)))]
    return []  # atrophy, chronic hydrocephalus, midline shift: the head model carries them


def _lateral(head: HeadModel, sign: int) -> float:
    return 1.0 + 0.35 * (head.ventricle_factor(sign) - 1.0)


def _vec(values: Sequence[float] | np.ndarray) -> Vec3:
    return (float(values[0]), float(values[1]), float(values[2]))


# --- mass effect -------------------------------------------------------------------------------

#: Largest midline shift the model produces (mm) and the volume scale of its saturation (mL).
SHIFT_MAX_MM = 15.0
SHIFT_VOLUME_ML = 200.0
#: Pixels rendered at once by Phantom.slice_hu (whole slices; at least one).
CHUNK_PIXELS = 1 << 19
#: Shifts below this are not produced (nor reported): too small to see.
SHIFT_MIN_MM = 2.0
#: Effective volume per lesion volume: an acute infarct swells a little, a hematoma has oedema
#: around it; chronic subdural collections push less.
_SWELLING = {FindingKind.ACUTE_INFARCT: 0.12, FindingKind.INTRAPARENCHYMAL_HEMORRHAGE: 1.3}
_CHRONIC_SUBDURAL_FACTOR = 0.7


def midline_shift_mm(findings: Sequence[Finding]) -> float:
    """Signed midline shift (mm along patient x) from the volumes of space-occupying findings.

    Net volume V = sum over lesions of side sign x effective volume (left positive); the shift
    is ``-sign(V) * SHIFT_MAX_MM * (1 - exp(-|V| / SHIFT_VOLUME_ML))``, away from the lesion,
    rounded to 0.5 mm, and 0 below SHIFT_MIN_MM. Bilateral lesions cancel.
    """
    net = 0.0
    for f in findings:
        if not f.is_space_occupying or f.volume_ml is None or f.side.sign == 0:
            continue
        volume = f.volume_ml * _SWELLING.get(f.kind, 1.0)
        if f.kind is FindingKind.SUBDURAL_HEMATOMA and f.acuity is Acuity.CHRONIC:
            volume *= _CHRONIC_SUBDURAL_FACTOR
        net += f.side.sign * volume
    shift = SHIFT_MAX_MM * (1.0 - math.exp(-abs(net) / SHIFT_VOLUME_ML))
    shift = round(shift * 2) / 2
    if shift < SHIFT_MIN_MM:
        return 0.0
    return -math.copysign(shift, net)


# --- the study's head --------------------------------------------------------------------------

#: Atrophy by degree: sulcal half-width, sulcal depth added, subarachnoid layer, sylvian and
#: interhemispheric half-widths, cistern width (mm), then scales of the lateral ventricles,
#: temporal horns, third and fourth ventricles.
_ATROPHY = {
    Degree.MILD: (1.5, 3.0, 2.0, 2.6, 1.8, 4.0, 1.2, 1.2, 1.35, 1.1),
    Degree.MODERATE: (2.2, 6.0, 3.0, 3.6, 2.6, 5.0, 1.35, 1.4, 1.7, 1.2),
    Degree.MARKED: (3.0, 9.0, 4.0, 5.0, 3.5, 6.0, 1.5, 1.6, 2.1, 1.3),
}
_HYDROCEPHALUS = {  # ventricle, temporal horn, third, fourth
    Degree.MILD: (1.5, 1.7, 2.0, 1.3),
    Degree.MODERATE: (1.85, 2.3, 2.8, 1.6),
    Degree.MARKED: (2.2, 2.8, 3.5, 2.0),
}


def sample_head(rng: np.random.Generator, *, sex: str, findings: Sequence[Finding]) -> HeadModel:
    """A head for one study: size, position, densities and the brain state the findings imply.

    Midline shift and ventricle compression are set later (:meth:`HeadModel` via
    :func:`dataclasses.replace`) once lesion volumes are known.
    """
    scale = float(rng.uniform(0.95, 1.06) if sex == "M" else rng.uniform(0.92, 1.02))
    centre = (float(rng.uniform(-5, 5)), float(rng.uniform(-3, 7)), float(rng.uniform(-170, -110)))
    v = float(rng.uniform(0.92, 1.06))
    grey = float(rng.uniform(35, 39))
    white = float(grey - rng.uniform(8, 11))
    head = HeadModel(
        centre_mm=centre,
        scale=scale,
        skull_mm=float(rng.uniform(5.5, 7.5)),
        scalp_mm=float(rng.uniform(5.0, 7.0)),
        cortex_mm=float(rng.uniform(2.6, 3.2)),
        subarachnoid_mm=float(rng.uniform(0.8, 1.2)),
        sulcal_half_width_mm=float(rng.uniform(0.55, 0.8)),
        sulcal_depth_mm=float(rng.uniform(12, 15)),
        ventricle_scale=(v * float(rng.uniform(0.97, 1.03)), v * float(rng.uniform(0.97, 1.03))),
        csf_hu=float(rng.uniform(4, 10)),
        grey_hu=grey,
        white_hu=white,
        bone_hu=float(rng.uniform(1300, 1750)),
        diploe_hu=float(rng.uniform(500, 800)),
        gyrus_period_mm=float(rng.uniform(26, 31)),
        gyrus_phases=tuple(float(p) for p in rng.uniform(0, 2 * math.pi, 6)),
    )
    changes: dict[str, Any] = {}
    for f in findings:
        if f.kind is FindingKind.ATROPHY and f.degree is not None:
            sw, dd, sas, syl, fis, cis, vent, temp, third, fourth = _ATROPHY[f.degree]
            changes.update(
                sulcal_half_width_mm=sw, sulcal_depth_mm=head.sulcal_depth_mm + dd, subarachnoid_mm=sas,
                sylvian_half_width_mm=syl, fissure_half_width_mm=fis, cistern_mm=cis,
                ventricle_scale=(head.ventricle_scale[0] * vent, head.ventricle_scale[1] * vent),
                temporal_horn_scale=temp, third_ventricle_scale=third, fourth_ventricle_scale=fourth,
                folia_half_width_mm=head.folia_half_width_mm * (1 + 0.6 * (sw - 0.7)))
        elif f.kind is FindingKind.HYDROCEPHALUS and f.degree is not None:
            vent, temp, third, fourth = _HYDROCEPHALUS[f.degree]
            changes.update(
                sulcal_half_width_mm=0.35, subarachnoid_mm=0.5, sylvian_half_width_mm=0.8,
                fissure_half_width_mm=0.6, sulcal_depth_mm=head.sulcal_depth_mm - 3.0,
                ventricle_scale=(head.ventricle_scale[0] * vent, head.ventricle_scale[1] * vent),
                temporal_horn_scale=temp, third_ventricle_scale=third, fourth_ventricle_scale=fourth)
    head = replace(head, **changes)
    for f in findings:  # ex vacuo dilatation next to old infarcts
        if f.kind is FindingKind.OLD_INFARCT and f.side.sign:
            left, right = head.ventricle_scale
            factor = float(rng.uniform(1.15, 1.3))
            head = replace(head, ventricle_scale=(left * factor, right) if f.side.sign > 0
                           else (left, right * factor))
    return head


def apply_mass_effect(head: HeadModel, shift_mm: float) -> HeadModel:
    """The head with its midline shifted and the ventricle on the lesion side compressed."""
    if shift_mm == 0:
        return replace(head, midline_shift_mm=0.0)
    left, right = head.ventricle_scale
    squeeze = 1.0 - min(0.45, 0.04 * abs(shift_mm))
    if shift_mm < 0:  # shifted to the right: the lesion is on the left
        left *= squeeze
    else:
        right *= squeeze
    return replace(head, midline_shift_mm=float(shift_mm), ventricle_scale=(left, right))


# --- the phantom -------------------------------------------------------------------------------


class RenderedSlice(NamedTuple):
    """One noise-free slice: HU, tissue labels (:class:`Tissue`) and lesion indices (-1: none)."""

    hu: np.ndarray
    tissue: np.ndarray
    lesion: np.ndarray


@dataclass(frozen=True)
class SliceGeometry:
    """Where the slices lie: the arguments of ImagePositionPatient/ImageOrientationPatient."""

    origin_mm: Vec3
    rows: int
    columns: int
    slices: int
    pixel_spacing_mm: float
    slice_step_mm: float
    gantry_tilt_deg: float

    @classmethod
    def from_acquisition(cls, acquisition: Acquisition, origin_mm: Vec3) -> SliceGeometry:
        """The geometry of an acquisition placed at ``origin_mm``."""
        return cls(origin_mm, acquisition.rows, acquisition.columns, acquisition.slices,
                   acquisition.pixel_spacing_mm, acquisition.slice_step_mm, acquisition.gantry_tilt_deg)

    def patient_coordinates(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient x of each column, and y and z of each row, of slice ``k`` (1-D arrays)."""
        t = math.radians(self.gantry_tilt_deg)
        ox, oy, oz = self.origin_mm
        j = np.arange(self.columns, dtype=np.float64)
        i = np.arange(self.rows, dtype=np.float64)
        x = ox + j * self.pixel_spacing_mm
        y = oy + i * self.pixel_spacing_mm * math.cos(t)
        z = oz + k * self.slice_step_mm - i * self.pixel_spacing_mm * math.sin(t)
        return x, y, z

    def nearest_slice_point(self, point: Sequence[float]) -> Vec3:
        """``point`` moved along the slice normal onto the nearest slice centre plane."""
        t = math.radians(self.gantry_tilt_deg)
        normal = np.array([0.0, math.sin(t), math.cos(t)])
        p = np.asarray(point, dtype=np.float64)
        base = float(normal @ np.asarray(self.origin_mm))
        spacing = self.slice_step_mm * math.cos(t)
        k = round((float(normal @ p) - base) / spacing)
        k = min(max(k, 0), self.slices - 1)
        moved = p + normal * (base + k * spacing - float(normal @ p))
        return _vec(moved)


@dataclass(frozen=True)
class Phantom:
    """A study's head, lesions and acquisition: renders slices in HU.

    :meth:`render` gives the noise-free ground truth; :meth:`slice_hu` adds the kernel and the
    scanner noise (seeded per slice, so slices can be made in any order) and is the pixel function
    for :func:`neuroscribe.dicom_io.writer.write_ct_series`.
    """

    head: HeadModel
    lesions: tuple[Lesion, ...]
    geometry: SliceGeometry
    acquisition: Acquisition
    noise_seed: tuple[int, ...] = (0,)
    _order: tuple[Lesion, ...] = field(default=(), repr=False, compare=False)
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Order the lesions: parenchymal changes, then blood, then calcification, then extra-axial."""
        def rank(lesion: Lesion) -> int:
            if isinstance(lesion, PeriventricularLesion):
                return 0
            if isinstance(lesion, TerritoryLesion):
                return 1
            if isinstance(lesion, SubarachnoidLesion):
                return 3
            if isinstance(lesion, EllipsoidLesion):
                return 4 if lesion.label is Tissue.CALCIFICATION else 2 if not lesion.occupies_space else 3
            return 5
        object.__setattr__(self, "_order", tuple(sorted(self.lesions, key=rank)))

    def render(self, k: int) -> RenderedSlice:
        """Slice ``k`` without kernel or noise: HU, tissue labels and lesion indices."""
        block = self.render_block(k, k + 1)
        return RenderedSlice(block.hu[0], block.tissue[0], block.lesion[0])

    def render_block(self, start: int, stop: int) -> RenderedSlice:
        """Slices ``start`` to ``stop - 1`` without kernel or noise, arrays of (slices, rows, columns).

        The slices are stacked as one tall image (each row still has one y and z), so the numpy
        calls per study do not grow with the slice count; :meth:`slice_hu` renders
        ``CHUNK_PIXELS`` at a time, which bounds memory.
        """
        if not 0 <= start < stop <= self.geometry.slices:
            raise IndexError(f"slices {start}..{stop - 1} are outside 0..{self.geometry.slices - 1}")
        head = self.head
        cx, cy, cz = head.centre_mm
        xs = ys = zs = np.empty(0)
        rows_y, rows_z = [], []
        for k in range(start, stop):
            xs, ys, zs = self.geometry.patient_coordinates(k)
            rows_y.append(ys)
            rows_z.append(zs)
        sl = _Slice(((xs - cx) / head.scale).astype(np.float32),
                    ((np.concatenate(rows_y) - cy) / head.scale).astype(np.float32),
                    ((np.concatenate(rows_z) - cz) / head.scale).astype(np.float32),
                    self.geometry.pixel_spacing_mm / head.scale, linear=stop - start == 1)
        _paint_anatomy(head, self._order, sl)
        for lesion in self._order:
            lesion.paint(head, sl)
        _paint_skull_base(head, sl)
        shape = (stop - start, self.geometry.rows, self.geometry.columns)
        return RenderedSlice(sl.hu.reshape(shape), sl.tissue.reshape(shape), sl.lesion.reshape(shape))

    def slice_hu(self, k: int) -> np.ndarray:
        """Slice ``k`` as the scanner shows it: kernel blur/sharpening plus correlated noise.

        Noise-free slices are rendered in chunks and kept until the next chunk is needed, so
        calling this for k = 0, 1, 2... (as the writer does) renders each chunk once.
        """
        if not 0 <= k < self.geometry.slices:
            raise IndexError(f"slice index {k} is outside 0..{self.geometry.slices - 1}")
        per_chunk = max(1, CHUNK_PIXELS // (self.geometry.rows * self.geometry.columns))
        chunk = k // per_chunk
        if chunk not in self._cache:
            self._cache.clear()
            start = chunk * per_chunk
            self._cache[chunk] = self.render_block(start, min(start + per_chunk, self.geometry.slices)).hu
        hu = self._cache[chunk][k - chunk * per_chunk]
        kernel = self.acquisition.kernel
        px = self.geometry.pixel_spacing_mm
        out = _blur(hu, kernel.blur_mm / px)
        if kernel.edge_gain > 0:
            out = out + kernel.edge_gain * (out - _blur(out, 0.8 / px))
        sigma = self.acquisition.noise_sigma_hu
        if sigma > 0:
            rng = np.random.default_rng([*self.noise_seed, k])
            noise = rng.standard_normal(hu.shape, dtype=np.float32)
            grain = kernel.grain_mm / px
            noise = _blur(noise, grain)
            noise *= np.float32(sigma / _blur_gain(grain))
            out = out + noise
        return np.array(out, dtype=np.float32)


def _gaussian_taps(sigma_px: float) -> np.ndarray | None:
    if sigma_px < 0.3:
        return None
    radius = max(1, math.ceil(2.5 * sigma_px))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma_px) ** 2)
    return (w / w.sum()).astype(np.float32)


def _blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur, renormalised at the borders (no blur below 0.3 px)."""
    taps = _gaussian_taps(sigma_px)
    if taps is None:
        return image
    r = taps.size // 2
    out = image
    for axis in (0, 1):
        n = out.shape[axis]
        src = out if axis == 0 else out.T
        acc = src * taps[r]
        norm = np.full(n, taps[r], dtype=np.float32)
        for k in range(1, min(r, n - 1) + 1):
            w = taps[r + k]
            acc[k:] += w * src[:-k]
            acc[:-k] += w * src[k:]
            norm[k:] += w
            norm[:-k] += w
        acc /= norm[:, None]
        out = acc if axis == 0 else acc.T
    return np.ascontiguousarray(out)


def _blur_gain(sigma_px: float) -> float:
    """Standard deviation of blurred unit white noise."""
    taps = _gaussian_taps(sigma_px)
    if taps is None:
        return 1.0
    return float(np.sum(taps.astype(np.float64) ** 2))  # two axes: sqrt(s)^2


# --- the anatomy pass --------------------------------------------------------------------------


def _paint_anatomy(head: HeadModel, lesions: Sequence[Lesion], sl: _Slice) -> None:
    """Scalp, skull, face and everything inside the cranial cavity, before lesions."""
    x, y, z = sl.x, sl.y, sl.z
    dcav = head.cavity_distance(x, y, z).astype(np.float32)
    sl.dcav = dcav
    full = (slice(None), slice(None))

    # Midline shift: deep structures displaced, fading towards the skull and the posterior fossa.
    shift = head.shift_model
    sl.shift = shift
    if shift:
        weight = np.clip(-dcav / _SHIFT_FADE_MM, 0.0, 1.0) * np.clip((z + 25.0) / 15.0, 0.0, 1.0)
        sl.xdef = (x - shift * weight).astype(np.float32)

    # Extra-axial collections push the brain surface in; masses efface sulci nearby.
    pushed = np.zeros_like(dcav)
    sulcal = np.ones_like(dcav)
    for lesion in lesions:
        box = lesion.influence_box()
        win = sl.window(*box) if box is not None else None
        if win is None:
            continue
        wx, wy, wz = sl.coords(win)
        rs, cs = win
        t = lesion.thickness(head, wx, wy, wz)
        if t is not None:
            pushed[rs, cs] += t
        f = lesion.sulcal_factor(head, wx, wy, wz)
        if f is not None:
            sulcal[rs, cs] *= f

    # Scalp, face and skull.
    lat = np.clip(np.abs(x) / 70.0, 0.0, 1.0) ** 2 * np.exp(-(((z + 5.0) / 28.0) ** 2))
    skull = head.skull_mm * (1.0 - 0.45 * lat)
    outer = dcav < skull + head.scalp_mm
    sl.paint(full, outer, HU["scalp"], Tissue.SOFT_TISSUE)
    win = sl.window(np.subtract(_FACE_CENTRE, _FACE_SEMI), np.add(_FACE_CENTRE, _FACE_SEMI))
    if win is not None:
        wx, wy, wz = sl.coords(win)
        rs, cs = win
        face = (_ellipsoid_q(wx, wy, wz, _FACE_CENTRE, _FACE_SEMI) < 1.0) & (dcav[rs, cs] > 0)
        sl.paint(win, face, HU["scalp"], Tissue.SOFT_TISSUE)
    fat = (dcav > skull + 1.2) & (dcav < skull + head.scalp_mm - 1.5)
    sl.paint(full, fat, HU["fat"], Tissue.FAT)
    bone = (dcav >= 0) & (dcav < skull)
    frac = dcav / skull
    tables = (frac < 0.28) | (frac > 0.72)
    sl.paint(full, bone, np.where(tables, head.bone_hu, head.diploe_hu).astype(np.float32), Tissue.BONE)

    # The cranial cavity (computed only in its bounding window): CSF, then brain where deep enough.
    cavity = dcav < 0
    rows = np.flatnonzero(cavity.any(axis=1))
    if rows.size == 0:
        return
    cols = np.flatnonzero(cavity.any(axis=0))
    cw = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    x, y, z = sl.coords(cw)
    cav = cavity[cw]
    sl.paint(cw, cav, head.csf_hu, Tissue.SUBARACHNOID)
    sulcal_w = sulcal[cw]
    brain_depth = -dcav[cw] - pushed[cw] - head.subarachnoid_mm * sulcal_w
    brain = cav & (brain_depth >= 0)
    infra = head.infratentorial(x, y, z)
    cere = brain & ~infra
    grey = cere & (brain_depth < head.cortex_mm)
    sl.paint(cw, grey, head.grey_hu, Tissue.GREY_MATTER)
    sl.paint(cw, cere & ~grey, head.white_hu, Tissue.WHITE_MATTER)

    phases = head.gyrus_phases
    omega = 2 * math.pi / head.gyrus_period_mm
    g = _gyroid(x, y, z, omega, phases[:3]) + 0.45 * _gyroid(x, y, z, 1.7 * omega, phases[3:])
    half = head.sulcal_half_width_mm * sulcal_w * np.clip(1.0 - brain_depth / head.sulcal_depth_mm, 0.0, 1.0)
    sulci = cere & (np.abs(g) < half * (omega * _GYROID_GRADIENT))
    sl.paint(cw, sulci, head.csf_hu, Tissue.SULCUS)

    fissure_zone = cere & ((z > 36.0) | (y < -38.0) | (y > 42.0))
    falx_half = max(0.7, 0.55 * sl.pixel_mm)
    fissure_half = max(head.fissure_half_width_mm, falx_half + 0.5 * sl.pixel_mm)
    xdef = np.abs(sl.xdef[cw])
    sl.paint(cw, fissure_zone & (xdef < fissure_half), head.csf_hu, Tissue.INTERHEMISPHERIC_FISSURE)
    sl.paint(cw, fissure_zone & (xdef < falx_half) & (z > -5.0), HU["falx"], Tissue.FALX)

    shape = dcav.shape
    full_depth = np.full(shape, -1.0, dtype=np.float32)
    full_depth[cw] = brain_depth
    sl.brain_depth = full_depth
    full_cere = np.zeros(shape, dtype=bool)
    full_cere[cw] = cere
    full_brain = np.zeros(shape, dtype=bool)
    full_brain[cw] = brain
    full_infra = np.zeros(shape, dtype=bool)
    full_infra[cw] = infra
    _paint_sylvian(head, sl, full_cere, sulcal)
    _paint_posterior_fossa(head, sl, full_brain, full_infra, full_depth)
    _paint_deep_structures(head, sl, full_cere)


def _paint_sylvian(head: HeadModel, sl: _Slice, cere: np.ndarray, sulcal: np.ndarray) -> None:
    """The sylvian fissures: an oblique cleft from the lateral surface to the insula, then a
    thin CSF layer over the insula."""
    for sign in (1.0, -1.0):
        x_lo, x_hi = sorted((sign * 68.0, sign * 30.0))
        win = sl.window((x_lo, -30.0, -16.0), (x_hi, 20.0, 16.0))
        if win is None:
            continue
        x, y, z = sl.coords(win)
        rs, cs = win
        ax, ay, bx, by = sign * 66.0, -24.0, sign * 38.0, 2.0
        dx, dy = bx - ax, by - ay
        length2 = dx * dx + dy * dy
        t = ((x - ax) * dx + (y - ay) * dy) / length2
        dist = np.abs((x - ax) * dy - (y - ay) * dx) / math.sqrt(length2)
        taper = np.clip(1.0 - (z / 15.0) ** 2, 0.0, 1.0)
        half = head.sylvian_half_width_mm * np.minimum(sulcal[rs, cs], 1.5) * taper
        cleft = (t > -0.1) & (t < 1.05) & (dist < half)
        insula = (np.abs(x * sign - 37.0) < 0.7 * half) & (y > -16.0) & (y < 12.0)
        sl.paint(win, (cleft | insula) & cere[rs, cs], head.csf_hu, Tissue.SYLVIAN_FISSURE)


def _paint_posterior_fossa(head: HeadModel, sl: _Slice, brain: np.ndarray, infra: np.ndarray,
                           brain_depth: np.ndarray) -> None:
    """Cerebellum with its fissures, brainstem, fourth ventricle, cisterns."""
    win = sl.window(np.array([-60.0, -25.0, -90.0]), np.array([60.0, 80.0, 5.0]))
    if win is None:
        return
    x, y, z = sl.coords(win)
    rs, cs = win
    cerebellum = brain[rs, cs] & infra[rs, cs]
    offset = head.grey_hu - HU["grey_matter"]
    sl.paint(win, cerebellum, HU["cerebellum"] + offset, Tissue.CEREBELLUM)
    omega = 2 * math.pi / 11.0
    g = _gyroid(x, y, z, omega, head.gyrus_phases[3:])
    g += 0.5 * _gyroid(x, y, z, 1.6 * omega, head.gyrus_phases[:3])
    folia = cerebellum & (brain_depth[rs, cs] < 8.0) & (
        np.abs(g) < head.folia_half_width_mm * omega * _GYROID_GRADIENT)
    sl.paint(win, folia, head.csf_hu, Tissue.SULCUS)
    cavity = sl.dcav[rs, cs] < 0
    stem_hu = head.white_hu + 3.0
    midbrain = _ellipsoid_q(x, y, z, (0.0, 12.0, -14.0), (11.0, 10.0, 9.0))
    pons = _ellipsoid_q(x, y, z, (0.0, 14.0, -36.0), (14.0, 11.0, 15.0)) < 1.0
    medulla = _capsule_excess(x, y, z, (0.0, 14.0, -45.0), (0.0, 18.0, -80.0), 9.0, 8.0) < 0
    cist = 1.0 + head.cistern_mm / 11.0
    shell = (_ellipsoid_q(x, y, z, (0.0, 12.0, -14.0), (11.0 * cist, 10.0 * cist, 9.0 * 1.1)) < 1.0) & (
        midbrain >= 1.0) & (z < -4.0) & (z > -24.0)
    sl.paint(win, shell & cavity, head.csf_hu, Tissue.CISTERN)
    sl.paint(win, (midbrain < 1.0) & cavity, stem_hu, Tissue.BRAINSTEM)
    prepontine = _ellipsoid_q(x, y, z, (0.0, 1.0, -40.0), (9.0, 2.5 + head.cistern_mm / 2, 14.0)) < 1.0
    sl.paint(win, prepontine & cavity, head.csf_hu, Tissue.CISTERN)
    sl.paint(win, (pons | medulla) & cavity, stem_hu, Tissue.BRAINSTEM)
    f4 = head.fourth_ventricle_scale
    fourth = _ellipsoid_q(x, y, z, (0.0, 30.0, -34.0), (6.0 * f4, 4.0 * f4, 7.0 * f4)) < 1.0
    sl.paint(win, fourth & cavity, head.csf_hu, Tissue.VENTRICLE)
    magna = _ellipsoid_q(x, y, z, (0.0, 68.0, -50.0), (12.0, 7.0, 8.0)) < 1.0
    sl.paint(win, magna & cavity, head.csf_hu, Tissue.CISTERN)
    supra = _ellipsoid_q(x, y, z, (0.0, -12.0, -18.0), (10.0, 7.0, 4.0 + head.cistern_mm / 2)) < 1.0
    sl.paint(win, supra & cavity, head.csf_hu, Tissue.CISTERN)
    quad = _ellipsoid_q(x, y, z, (0.0, 25.0, -6.0), (5.0 + head.cistern_mm / 2, 5.0, 5.0)) < 1.0
    sl.paint(win, quad & cavity, head.csf_hu, Tissue.CISTERN)


def _paint_deep_structures(head: HeadModel, sl: _Slice, cere: np.ndarray) -> None:
    """Basal ganglia, thalami, ventricles, choroid plexus and pineal (following the midline shift)."""
    deep_hu = head.grey_hu - 2.0
    nuclei = []
    for sign in (1, -1):
        nuclei += [
            ((sign * 16.0, -16.0, 14.0), (5.0, 9.0, 9.0)),  # caudate head
            ((sign * 23.0, -2.0, 4.0), (6.0, 14.0, 9.0)),  # lentiform nucleus
            ((sign * 10.0, 16.0, 6.0), (7.5, 12.0, 8.0)),  # thalamus
        ]
    for centre, semi in nuclei:
        lo, hi = np.subtract(centre, semi), np.add(centre, semi)
        win = sl.window(lo, hi, deformed=True)
        if win is None:
            continue
        x, y, z = sl.coords(win, deformed=True)
        rs, cs = win
        inside = (_ellipsoid_q(x, y, z, centre, semi) < 1.0) & cere[rs, cs]
        sl.paint(win, inside, deep_hu, Tissue.DEEP_GREY)

    for sign in (1, -1):
        capsules, lo, hi = _ventricle_geometry(head, sign)
        win = sl.window(lo, hi, deformed=True)
        if win is None:
            continue
        x, y, z = sl.coords(win, deformed=True)
        rs, cs = win
        excess = np.full(np.broadcast_shapes(x.shape, y.shape), np.inf, dtype=np.float32)
        for a, b, ra, rb in capsules:
            lo_c, hi_c = _capsule_box(a, b, max(ra, rb))
            if sl.window(lo_c - 14.0, hi_c + 14.0, deformed=True) is not None:
                np.minimum(excess, _capsule_excess(x, y, z, a, b, ra, rb), out=excess)
        excess = np.where(x * sign > 0.0, excess, np.inf)  # the septum pellucidum
        inside = (excess < 0) & (sl.dcav[rs, cs] < 0)
        np.minimum(sl.vent_dist[rs, cs], excess, out=sl.vent_dist[rs, cs])
        sl.paint(win, inside, head.csf_hu, Tissue.VENTRICLE)
        glomus_centre = (sign * 22.0 * _lateral(head, sign), 32.0, 13.0)
        glomus = _ellipsoid_q(x, y, z, glomus_centre, (3.0, 3.5, 3.0)) < 1.0
        sl.paint(win, glomus & inside, HU["choroid_plexus"], Tissue.CHOROID_PLEXUS)

    f3 = head.third_ventricle_scale
    win = sl.window((-10.0, -12.0, -8.0), (10.0, 32.0, 14.0), deformed=True)
    if win is not None:
        x, y, z = sl.coords(win, deformed=True)
        third = _ellipsoid_q(x, y, z, (0.0, 4.0, 3.0), (2.0 * f3, 12.0, 8.0)) < 1.0
        sl.paint(win, third, head.csf_hu, Tissue.VENTRICLE)
        pineal = _ellipsoid_q(x, y, z, _REGION_CENTRES[Region.PINEAL], (3.0, 4.0, 3.0)) < 1.0
        sl.paint(win, pineal, HU["pineal"], Tissue.PINEAL)


@functools.lru_cache(maxsize=64)
def _ventricle_geometry(head: HeadModel, sign: int
                        ) -> tuple[list[tuple[Vec3, Vec3, float, float]], np.ndarray, np.ndarray]:
    """A lateral ventricle's capsules and their box widened by the largest periventricular band.

    Cached per head (computed once per study, not per slice); do not modify the result.
    """
    capsules = head.lateral_ventricle(sign)
    lo = np.min([_capsule_box(a, b, max(ra, rb))[0] for a, b, ra, rb in capsules], axis=0) - 14.0
    hi = np.max([_capsule_box(a, b, max(ra, rb))[1] for a, b, ra, rb in capsules], axis=0) + 14.0
    return capsules, lo, hi


def _paint_skull_base(head: HeadModel, sl: _Slice) -> None:
    """Orbits, paranasal sinuses, mastoid air cells, petrous bones and clivus (over the brain)."""
    if sl.zs.max() < -75.0 or sl.zs.min() > 20.0:
        return
    outside = sl.dcav > 0.5

    def ellipsoid(centre: Vec3, semi: Vec3, hu: float, tissue: Tissue, *, only_outside: bool = True,
                  cells: float | None = None) -> None:
        lo, hi = np.subtract(centre, semi), np.add(centre, semi)
        win = sl.window(lo, hi)
        if win is None:
            return
        x, y, z = sl.coords(win)
        rs, cs = win
        mask = _ellipsoid_q(x, y, z, centre, semi) < 1.0
        if only_outside:
            mask &= outside[rs, cs]
        if cells is not None:  # honeycomb of air cells in bone
            w = 2 * math.pi / cells
            air = np.cos(w * x) * np.cos(w * y) * np.cos(w * z) > -0.25
            sl.paint(win, mask & ~air, head.diploe_hu + 150.0, Tissue.BONE)
            mask &= air
        sl.paint(win, mask, hu, tissue)

    def capsule(a: Vec3, b: Vec3, r: float, hu: float, tissue: Tissue, *, only_outside: bool) -> None:
        win = sl.window(*_capsule_box(a, b, r))
        if win is None:
            return
        x, y, z = sl.coords(win)
        rs, cs = win
        mask = _capsule_excess(x, y, z, a, b, r, r) < 0
        if only_outside:
            mask &= outside[rs, cs]
        sl.paint(win, mask, hu, tissue)

    air, bone = HU["air"], HU["skull_base"]
    for s in (1.0, -1.0):
        ellipsoid((s * 31.0, -64.0, -33.0), (17.0, 24.0, 16.0), bone, Tissue.BONE)
        ellipsoid((s * 31.0, -64.0, -33.0), (15.5, 22.5, 14.5), HU["orbital_fat"], Tissue.FAT)
        ellipsoid((s * 31.0, -72.0, -33.0), (11.5, 11.5, 11.5), HU["globe"], Tissue.GLOBE)
        ellipsoid((s * 31.0, -83.0, -33.0), (4.5, 1.8, 4.5), HU["lens"], Tissue.LENS)
        ellipsoid((s * 27.0, -62.0, -66.0), (14.5, 16.5, 17.5), bone, Tissue.BONE)
        ellipsoid((s * 27.0, -62.0, -66.0), (13.0, 15.0, 16.0), air, Tissue.SINUS_AIR)
        ellipsoid((s * 55.0, 30.0, -47.0), (11.0, 12.0, 11.0), air, Tissue.SINUS_AIR, cells=5.0)
        capsule((s * 48.0, 18.0, -38.0), (s * 16.0, 4.0, -32.0), 5.5, HU["petrous_bone"], Tissue.BONE,
                only_outside=False)
        capsule((s * 60.0, 16.0, -46.0), (s * 80.0, 16.0, -46.0), 3.5, air, Tissue.SINUS_AIR,
                only_outside=True)
    ellipsoid((0.0, -62.0, -34.0), (11.0, 17.0, 11.0), air, Tissue.SINUS_AIR, cells=6.0)
    ellipsoid((0.0, -22.0, -42.0), (15.0, 13.0, 12.0), bone, Tissue.BONE)
    ellipsoid((0.0, -22.0, -42.0), (13.0, 11.0, 10.0), air, Tissue.SINUS_AIR)
    win = sl.window((-22.0, -96.0, -12.0), (22.0, -80.0, 16.0))
    if win is not None:  # frontal bone boss with the frontal sinus inside
        x, y, z = sl.coords(win)
        rs, cs = win
        d = sl.dcav[rs, cs]
        boss = (_ellipsoid_q(x, y, z, (0.0, -88.0, 2.0), (22.0, 8.0, 14.0)) < 1.0) & (d > -0.5)
        sl.paint(win, boss, head.bone_hu, Tissue.BONE)
        sinus = (_ellipsoid_q(x, y, z, (0.0, -89.0, 3.0), (15.0, 4.0, 9.0)) < 1.0) & (d > 1.5)
        sl.paint(win, sinus, air, Tissue.SINUS_AIR)
    ellipsoid((0.0, -78.0, -62.0), (12.0, 20.0, 18.0), air, Tissue.SINUS_AIR)
    capsule((0.0, -8.0, -26.0), (0.0, 0.0, -60.0), 6.0, bone, Tissue.BONE, only_outside=False)
