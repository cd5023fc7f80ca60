"""Site and scanner profiles, and the sizes a synthetic series can have.

A :class:`Profile` describes one site: its scanner (vendor names, slice thickness, field of view,
noise, reconstruction kernel, gantry tilt, rescale), and its case mix (how often each
:class:`~neuroscribe.training.synth.findings.Scenario` occurs). ``standard`` is the training site;
``shifted`` is a second site whose scanner and case mix differ, so a model trained on ``standard``
can be tested out of distribution (as BrainGPT tested on CQ500).

:func:`sample_acquisition` draws the scanner settings of one study; the slice count follows from
the head's height and the slice step (see :func:`fit_slices`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from neuroscribe.training.synth.findings import Scenario

__all__ = [
    "CLINICAL",
    "PROFILES",
    "SHIFTED",
    "SIZES",
    "SMALL",
    "STANDARD",
    "Acquisition",
    "Profile",
    "ReconKernel",
    "SizePreset",
    "fit_slices",
    "get_profile",
    "get_size",
    "sample_acquisition",
]


@dataclass(frozen=True)
class ReconKernel:
    """A reconstruction kernel: its header name and what it does to the image.

    ``blur_mm`` is the Gaussian sigma of the point-spread function applied to the anatomy;
    ``edge_gain`` adds an unsharp mask (sharp kernels overshoot at edges); ``grain_mm`` is the
    correlation length of the noise (smooth kernels give coarse, soft noise).
    """

    name: str
    sharp: bool
    blur_mm: float
    edge_gain: float
    grain_mm: float


@dataclass(frozen=True)
class Profile:
    """One site: scanner settings to draw from and its case mix.

    Ranges are (low, high) for uniform draws; tuples of values are choices.
    """

    name: str
    slice_thickness_mm: tuple[float, ...]
    fov_mm: tuple[float, float]
    noise_sigma_hu: tuple[float, float]
    kernels: tuple[ReconKernel, ...]
    tilt_probability: float
    tilt_deg: tuple[float, float]
    rescale: tuple[tuple[float, int], ...]  # (RescaleIntercept, PixelRepresentation) choices
    kvp: tuple[float, ...]
    manufacturer: str
    model_names: tuple[str, ...]
    station_names: tuple[str, ...]
    institution_name: str
    series_description: str  # formatted with thickness=
    protocol_name: str
    scenario_weights: tuple[tuple[Scenario, float], ...]

    def __post_init__(self) -> None:
        """Reject impossible settings."""
        if not self.slice_thickness_mm or min(self.slice_thickness_mm) <= 0:
            raise ValueError(f"slice_thickness_mm must hold positive values, got {self.slice_thickness_mm}")
        if not 0 <= self.tilt_probability <= 1:
            raise ValueError(f"tilt_probability must be in [0, 1], got {self.tilt_probability}")
        if not self.kernels:
            raise ValueError("kernels must name at least one kernel")
        if sum(w for _s, w in self.scenario_weights) <= 0:
            raise ValueError("scenario_weights must have a positive total")

    def sample_scenario(self, rng: np.random.Generator) -> Scenario:
        """Draw a scenario with the profile's case mix."""
        weights = np.array([w for _s, w in self.scenario_weights], dtype=float)
        return self.scenario_weights[int(rng.choice(len(weights), p=weights / weights.sum()))][0]


_SOFT = ReconKernel("H30s", sharp=False, blur_mm=0.55, edge_gain=0.0, grain_mm=0.9)
_SOFT2 = ReconKernel("H31s", sharp=False, blur_mm=0.6, edge_gain=0.0, grain_mm=1.0)
_FC_SOFT = ReconKernel("FC21", sharp=False, blur_mm=0.5, edge_gain=0.0, grain_mm=0.8)
_FC_SHARP = ReconKernel("FC64", sharp=True, blur_mm=0.3, edge_gain=0.6, grain_mm=0.45)
_UB = ReconKernel("UB", sharp=True, blur_mm=0.35, edge_gain=0.4, grain_mm=0.5)

#: The training site: 5 mm axial slices, soft kernel, low noise, no tilt, intercept -1024.
STANDARD = Profile(
    name="standard",
    slice_thickness_mm=(5.0,),
    fov_mm=(220.0, 240.0),
    noise_sigma_hu=(3.0, 5.0),
    kernels=(_SOFT, _SOFT2),
    tilt_probability=0.0,
    tilt_deg=(0.0, 0.0),
    rescale=((-1024.0, 0),),
    kvp=(120.0,),
    manufacturer="Synthetic Meridian Medical",
    model_names=("Meridian CT 64",),
    station_names=("CT01", "CT02"),
    institution_name="Synthetic General Hospital",
    series_description="HEAD {thickness:g}mm AXIAL",
    protocol_name="HEAD ROUTINE",
    scenario_weights=(
        (Scenario.NORMAL, 0.30), (Scenario.TRAUMA, 0.18), (Scenario.HYPERTENSIVE_HEMORRHAGE, 0.08),
        (Scenario.ACUTE_STROKE, 0.08), (Scenario.OLD_STROKE, 0.08), (Scenario.SMALL_VESSEL, 0.10),
        (Scenario.ATROPHY, 0.10), (Scenario.HYDROCEPHALUS, 0.04), (Scenario.ANEURYSMAL_SAH, 0.04),
    ),
)

#: A different site: thin slices, wider FOV spread, more noise, sharp kernels, tilted gantry on
#: some studies, signed pixels with other intercepts, other vendor, more trauma and fewer normals.
SHIFTED = Profile(
    name="shifted",
    slice_thickness_mm=(2.5, 3.0),
    fov_mm=(200.0, 250.0),
    noise_sigma_hu=(6.0, 10.0),
    kernels=(_FC_SOFT, _FC_SHARP, _UB),
    tilt_probability=0.5,
    tilt_deg=(8.0, 20.0),
    rescale=((0.0, 1), (-1000.0, 0), (-1024.0, 1)),
    kvp=(100.0, 120.0, 140.0),
    manufacturer="Synthetic Northwind Imaging",
    model_names=("Northwind Aquila 16", "Northwind Aquila 128"),
    station_names=("ER-CT", "NEURO-CT"),
    institution_name="Synthetic Regional Trauma Centre",
    series_description="Brain {thickness:g} mm",
    protocol_name="CT BRAIN NON-CONTRAST",
    scenario_weights=(
        (Scenario.NORMAL, 0.15), (Scenario.TRAUMA, 0.30), (Scenario.HYPERTENSIVE_HEMORRHAGE, 0.12),
        (Scenario.ACUTE_STROKE, 0.12), (Scenario.OLD_STROKE, 0.06), (Scenario.SMALL_VESSEL, 0.07),
        (Scenario.ATROPHY, 0.05), (Scenario.HYDROCEPHALUS, 0.06), (Scenario.ANEURYSMAL_SAH, 0.07),
    ),
)

#: Profiles by name.
PROFILES: dict[str, Profile] = {p.name: p for p in (STANDARD, SHIFTED)}


@dataclass(frozen=True)
class SizePreset:
    """Matrix and slice sampling of a series.

    ``z_factor`` multiplies the profile's slice thickness to give the slice step, so a small
    series keeps the profile's thin/thick contrast with fewer slices (standard: 5 mm x 1.25 =
    6.25 mm, about 24 slices over the head).
    """

    name: str
    rows: int
    columns: int
    z_factor: float


#: For tests and training: 128 x 128, about 24 slices at the standard profile.
SMALL = SizePreset("small", 128, 128, 1.25)
#: A clinical head CT: 512 x 512, 5 mm slices (about 30) at the standard profile.
CLINICAL = SizePreset("clinical", 512, 512, 1.0)
#: Sizes by name.
SIZES: dict[str, SizePreset] = {s.name: s for s in (SMALL, CLINICAL)}


def get_profile(profile: str | Profile) -> Profile:
    """A profile by name (or the profile itself); ValueError names the known ones."""
    if isinstance(profile, Profile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}") from None


def get_size(size: str | SizePreset) -> SizePreset:
    """A size preset by name (or the preset itself); ValueError names the known ones."""
    if isinstance(size, SizePreset):
        return size
    try:
        return SIZES[size]
    except KeyError:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}") from None


@dataclass(frozen=True)
class Acquisition:
    """The scanner settings of one study (what the headers say, and how the pixels are made)."""

    rows: int
    columns: int
    slices: int
    slice_thickness_mm: float
    slice_step_mm: float
    pixel_spacing_mm: float  # square pixels
    gantry_tilt_deg: float
    kernel: ReconKernel
    noise_sigma_hu: float
    rescale_intercept: float
    pixel_representation: int
    kvp: float
    manufacturer: str
    model_name: str
    station_name: str
    institution_name: str
    series_description: str
    protocol_name: str

    def __post_init__(self) -> None:
        """Reject sizes and spacings that cannot make a series."""
        if self.rows < 8 or self.columns < 8:
            raise ValueError(f"rows and columns must be >= 8, got {self.rows} x {self.columns}")
        if self.slices < 2:
            raise ValueError(f"slices must be >= 2, got {self.slices}")
        for name in ("slice_thickness_mm", "slice_step_mm", "pixel_spacing_mm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not abs(self.gantry_tilt_deg) < 45:
            raise ValueError(f"gantry_tilt_deg must be within +-45, got {self.gantry_tilt_deg}")
        if self.noise_sigma_hu < 0:
            raise ValueError(f"noise_sigma_hu must be >= 0, got {self.noise_sigma_hu}")

    def with_(self, **changes: Any) -> Acquisition:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready facts about the acquisition (floats rounded)."""
        out = asdict(self)
        out["kernel"] = self.kernel.name
        out["kernel_sharp"] = self.kernel.sharp
        for key, value in out.items():
            if isinstance(value, float):
                out[key] = round(value, 4)
        return out


def sample_acquisition(
    rng: np.random.Generator,
    profile: Profile,
    size: SizePreset,
    *,
    rows: int | None = None,
    columns: int | None = None,
) -> Acquisition:
    """Draw one study's scanner settings; the slice count is provisional until :func:`fit_slices`."""
    rows = rows or size.rows
    columns = columns or size.columns
    thickness = float(rng.choice(profile.slice_thickness_mm))
    fov = float(rng.uniform(*profile.fov_mm))
    tilt = 0.0
    if rng.random() < profile.tilt_probability:
        tilt = round(float(rng.uniform(*profile.tilt_deg)), 1)
    kernel = profile.kernels[int(rng.integers(len(profile.kernels)))]
    noise = float(rng.uniform(*profile.noise_sigma_hu))
    if kernel.sharp:
        noise *= 1.3
    intercept, representation = profile.rescale[int(rng.integers(len(profile.rescale)))]
    step = thickness * size.z_factor
    return Acquisition(
        rows=rows,
        columns=columns,
        slices=2,
        slice_thickness_mm=step,
        slice_step_mm=step,
        pixel_spacing_mm=round(fov / max(rows, columns), 4),
        gantry_tilt_deg=tilt,
        kernel=kernel,
        noise_sigma_hu=round(noise, 2),
        rescale_intercept=intercept,
        pixel_representation=representation,
        kvp=float(rng.choice(profile.kvp)),
        manufacturer=profile.manufacturer,
        model_name=profile.model_names[int(rng.integers(len(profile.model_names)))],
        station_name=profile.station_names[int(rng.integers(len(profile.station_names)))],
        institution_name=profile.institution_name,
        series_description=profile.series_description.format(thickness=round(step, 2)),
        protocol_name=profile.protocol_name,
    )


def fit_slices(acquisition: Acquisition, coverage_mm: float, slices: int | None = None) -> Acquisition:
    """Set the slice count so the series covers ``coverage_mm`` along the slice normal.

    Slices are contiguous: the spacing along the normal equals the slice thickness, and the table
    increment (``slice_step_mm``, along patient z) is the thickness over cos(tilt), as on a tilted
    gantry. With ``slices`` given, the thickness is the coverage divided by that many slices;
    otherwise the count follows from the drawn thickness.
    """
    cos_t = math.cos(math.radians(acquisition.gantry_tilt_deg))
    thickness = acquisition.slice_thickness_mm
    if slices is not None:
        if slices < 2:
            raise ValueError(f"slices must be >= 2, got {slices}")
        thickness = round(coverage_mm / slices, 3)
        count = slices
    else:
        count = max(2, math.ceil(coverage_mm / thickness))
    return replace(acquisition, slices=count, slice_thickness_mm=thickness,
                   slice_step_mm=round(thickness / cos_t, 4))
