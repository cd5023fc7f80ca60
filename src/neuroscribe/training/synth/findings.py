"""Findings of a synthetic head CT: what is there, where, how big, how old.

A :class:`Finding` is the ground truth of one abnormality (or of a derived sign such as midline
shift). It is a frozen dataclass that converts to and from plain JSON (:meth:`Finding.to_dict`,
:meth:`Finding.from_dict`). :func:`sample_findings` draws a plausible combination for one study from
a profile's scenario weights; the phantom later fills in the geometry (centre, density, volume).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from enum import StrEnum
from typing import Any

import numpy as np

__all__ = [
    "EXTRA_AXIAL",
    "SPACE_OCCUPYING",
    "Acuity",
    "Degree",
    "Finding",
    "FindingKind",
    "Region",
    "Scenario",
    "Side",
    "sample_age",
    "sample_findings",
]


class FindingKind(StrEnum):
    """What a finding is; the value is the JSON name."""

    INTRAPARENCHYMAL_HEMORRHAGE = "intraparenchymal_hemorrhage"
    """Blood within the brain: a hyperdense ellipsoid with a hypodense oedema rim; size = diameter."""
    SUBDURAL_HEMATOMA = "subdural_hematoma"
    """Crescent along the inner table, crossing sutures; size = maximal thickness."""
    EPIDURAL_HEMATOMA = "epidural_hematoma"
    """Biconvex lens against the inner table; size = maximal thickness."""
    SUBARACHNOID_HEMORRHAGE = "subarachnoid_hemorrhage"
    """Hyperdense CSF in sulci, fissures and cisterns of a region; no size."""
    ACUTE_INFARCT = "acute_infarct"
    """Subtle hypodensity with loss of grey-white differentiation in a vascular territory."""
    OLD_INFARCT = "old_infarct"
    """CSF-like encephalomalacia in a vascular territory with local volume loss (ex vacuo)."""
    LACUNAR_INFARCT = "lacunar_infarct"
    """Small (3-15 mm) deep infarct: basal ganglia, internal capsule, thalamus, corona radiata."""
    WHITE_MATTER_HYPODENSITY = "white_matter_hypodensity"
    """Periventricular white-matter low density of small-vessel disease; size = band width."""
    ATROPHY = "atrophy"
    """Generalized volume loss: wide sulci, fissures and ventricles."""
    HYDROCEPHALUS = "hydrocephalus"
    """Enlarged ventricles without sulcal widening (sulci normal or effaced)."""
    MIDLINE_SHIFT = "midline_shift"
    """Derived: midline structures displaced by space-occupying lesions; side = direction of the
    displacement, size = shift in mm at the septum pellucidum."""
    CALCIFICATION = "calcification"
    """Small dense dots (>= +150 HU): basal ganglia, pineal gland, choroid plexus."""


class Side(StrEnum):
    """Laterality, in the patient's frame (left is patient left, +x in DICOM LPS)."""

    LEFT = "left"
    RIGHT = "right"
    BILATERAL = "bilateral"
    MIDLINE = "midline"

    @property
    def sign(self) -> int:
        """+1 for left (+x in LPS), -1 for right, 0 otherwise."""
        return {Side.LEFT: 1, Side.RIGHT: -1}.get(self, 0)

    @property
    def opposite(self) -> Side:
        """The contralateral side (bilateral and midline are their own opposite)."""
        return {Side.LEFT: Side.RIGHT, Side.RIGHT: Side.LEFT}.get(self, self)


class Region(StrEnum):
    """Where a finding lies: a lobe, a deep structure, a space or a vascular territory."""

    FRONTAL = "frontal"
    PARIETAL = "parietal"
    TEMPORAL = "temporal"
    OCCIPITAL = "occipital"
    FRONTOPARIETAL = "frontoparietal"
    FRONTOTEMPORAL = "frontotemporal"
    TEMPOROPARIETAL = "temporoparietal"
    FRONTOTEMPOROPARIETAL = "frontotemporoparietal"
    BASAL_GANGLIA = "basal_ganglia"
    INTERNAL_CAPSULE = "internal_capsule"
    THALAMUS = "thalamus"
    CORONA_RADIATA = "corona_radiata"
    CEREBELLUM = "cerebellum"
    PERIVENTRICULAR = "periventricular"
    CONVEXITY = "convexity"
    SYLVIAN_FISSURE = "sylvian_fissure"
    BASAL_CISTERNS = "basal_cisterns"
    MCA_TERRITORY = "mca_territory"
    ACA_TERRITORY = "aca_territory"
    PCA_TERRITORY = "pca_territory"
    PINEAL = "pineal"
    CHOROID_PLEXUS = "choroid_plexus"
    GENERALIZED = "generalized"
    VENTRICULAR_SYSTEM = "ventricular_system"
    MIDLINE = "midline"


class Acuity(StrEnum):
    """Age of a lesion as CT shows it."""

    ACUTE = "acute"
    SUBACUTE = "subacute"
    CHRONIC = "chronic"
    OLD = "old"


class Degree(StrEnum):
    """Severity of a diffuse finding (atrophy, hydrocephalus, small-vessel disease)."""

    MILD = "mild"
    MODERATE = "moderate"
    MARKED = "marked"


class Scenario(StrEnum):
    """The clinical story a study is drawn from; keeps combinations plausible."""

    NORMAL = "normal"
    TRAUMA = "trauma"
    HYPERTENSIVE_HEMORRHAGE = "hypertensive_hemorrhage"
    ACUTE_STROKE = "acute_stroke"
    OLD_STROKE = "old_stroke"
    SMALL_VESSEL = "small_vessel"
    ATROPHY = "atrophy"
    HYDROCEPHALUS = "hydrocephalus"
    ANEURYSMAL_SAH = "aneurysmal_sah"
    CUSTOM = "custom"
    """Findings given by the caller (tests, demos), not sampled."""


#: Kinds whose volume pushes the midline (see phantom.midline_shift_mm).
SPACE_OCCUPYING = frozenset({
    FindingKind.INTRAPARENCHYMAL_HEMORRHAGE,
    FindingKind.SUBDURAL_HEMATOMA,
    FindingKind.EPIDURAL_HEMATOMA,
    FindingKind.ACUTE_INFARCT,
})
#: Kinds that lie between the skull and the brain.
EXTRA_AXIAL = frozenset({FindingKind.SUBDURAL_HEMATOMA, FindingKind.EPIDURAL_HEMATOMA})

_SIDED = frozenset({Side.LEFT, Side.RIGHT})
_ALLOWED_SIDES: dict[FindingKind, frozenset[Side]] = {
    FindingKind.INTRAPARENCHYMAL_HEMORRHAGE: _SIDED,
    FindingKind.SUBDURAL_HEMATOMA: _SIDED | {Side.BILATERAL},
    FindingKind.EPIDURAL_HEMATOMA: _SIDED,
    FindingKind.SUBARACHNOID_HEMORRHAGE: _SIDED | {Side.BILATERAL},
    FindingKind.ACUTE_INFARCT: _SIDED,
    FindingKind.OLD_INFARCT: _SIDED,
    FindingKind.LACUNAR_INFARCT: _SIDED,
    FindingKind.WHITE_MATTER_HYPODENSITY: frozenset({Side.BILATERAL}),
    FindingKind.ATROPHY: frozenset({Side.BILATERAL}),
    FindingKind.HYDROCEPHALUS: frozenset({Side.BILATERAL}),
    FindingKind.MIDLINE_SHIFT: _SIDED,
    FindingKind.CALCIFICATION: _SIDED | {Side.BILATERAL, Side.MIDLINE},
}
_ALLOWED_REGIONS: dict[FindingKind, frozenset[Region]] = {
    FindingKind.INTRAPARENCHYMAL_HEMORRHAGE: frozenset({
        Region.FRONTAL, Region.PARIETAL, Region.TEMPORAL, Region.OCCIPITAL, Region.BASAL_GANGLIA,
        Region.THALAMUS, Region.CEREBELLUM}),
    FindingKind.SUBDURAL_HEMATOMA: frozenset({
        Region.FRONTAL, Region.PARIETAL, Region.TEMPORAL, Region.OCCIPITAL, Region.FRONTOPARIETAL,
        Region.FRONTOTEMPORAL, Region.TEMPOROPARIETAL, Region.FRONTOTEMPOROPARIETAL}),
    FindingKind.EPIDURAL_HEMATOMA: frozenset({
        Region.FRONTAL, Region.PARIETAL, Region.TEMPORAL, Region.OCCIPITAL, Region.TEMPOROPARIETAL,
        Region.FRONTOTEMPORAL}),
    FindingKind.SUBARACHNOID_HEMORRHAGE: frozenset({
        Region.CONVEXITY, Region.SYLVIAN_FISSURE, Region.BASAL_CISTERNS, Region.GENERALIZED}),
    FindingKind.ACUTE_INFARCT: frozenset({
        Region.MCA_TERRITORY, Region.ACA_TERRITORY, Region.PCA_TERRITORY}),
    FindingKind.OLD_INFARCT: frozenset({
        Region.MCA_TERRITORY, Region.ACA_TERRITORY, Region.PCA_TERRITORY}),
    FindingKind.LACUNAR_INFARCT: frozenset({
        Region.BASAL_GANGLIA, Region.INTERNAL_CAPSULE, Region.THALAMUS, Region.CORONA_RADIATA}),
    FindingKind.WHITE_MATTER_HYPODENSITY: frozenset({Region.PERIVENTRICULAR}),
    FindingKind.ATROPHY: frozenset({Region.GENERALIZED}),
    FindingKind.HYDROCEPHALUS: frozenset({Region.VENTRICULAR_SYSTEM}),
    FindingKind.MIDLINE_SHIFT: frozenset({Region.MIDLINE}),
    FindingKind.CALCIFICATION: frozenset({
        Region.BASAL_GANGLIA, Region.PINEAL, Region.CHOROID_PLEXUS}),
}
#: Kinds that need a degree.
_NEEDS_DEGREE = frozenset({
    FindingKind.WHITE_MATTER_HYPODENSITY, FindingKind.ATROPHY, FindingKind.HYDROCEPHALUS})
#: Kinds that need a size (mm).
_NEEDS_SIZE = frozenset({
    FindingKind.INTRAPARENCHYMAL_HEMORRHAGE, FindingKind.SUBDURAL_HEMATOMA,
    FindingKind.EPIDURAL_HEMATOMA, FindingKind.ACUTE_INFARCT, FindingKind.OLD_INFARCT,
    FindingKind.LACUNAR_INFARCT, FindingKind.MIDLINE_SHIFT, FindingKind.CALCIFICATION})
#: Kinds that need an acuity.
_NEEDS_ACUITY = frozenset({
    FindingKind.INTRAPARENCHYMAL_HEMORRHAGE, FindingKind.SUBDURAL_HEMATOMA,
    FindingKind.EPIDURAL_HEMATOMA, FindingKind.SUBARACHNOID_HEMORRHAGE, FindingKind.ACUTE_INFARCT,
    FindingKind.OLD_INFARCT, FindingKind.LACUNAR_INFARCT, FindingKind.HYDROCEPHALUS})


@dataclass(frozen=True)
class Finding:
    """One ground-truth finding of a synthetic study.

    Strings are accepted for the enum fields and converted. The geometry fields (``hu``,
    ``volume_ml``, ``centre_mm``, ``extent_deg``, ``evans_index``) are filled in by the phantom
    when a study is planned; a caller may leave them None.

    Parameters
    ----------
    kind
        What the finding is.
    side
        Laterality (patient left/right), bilateral or midline.
    region
        Lobe, deep structure, space or vascular territory.
    size_mm
        Diameter (hemorrhage, infarct, lacune, calcification), maximal thickness (subdural,
        epidural), band width (white-matter hypodensity) or shift (midline shift); None where the
        kind has no size.
    acuity
        Acute, subacute, chronic or old, where the kind has one.
    degree
        Mild, moderate or marked, for diffuse findings.
    hu
        Mean density of the lesion in Hounsfield units (before noise).
    volume_ml
        Volume of a space-occupying lesion (millilitres).
    centre_mm
        Lesion centre in patient coordinates (DICOM LPS, mm).
    extent_deg
        Angular half-extent of extra-axial collections and territorial infarcts.
    evans_index
        Frontal-horn width over inner-skull width, for hydrocephalus and atrophy.
    """

    kind: FindingKind
    side: Side
    region: Region
    size_mm: float | None = None
    acuity: Acuity | None = None
    degree: Degree | None = None
    hu: float | None = None
    volume_ml: float | None = None
    centre_mm: tuple[float, float, float] | None = None
    extent_deg: float | None = None
    evans_index: float | None = None

    def __post_init__(self) -> None:
        """Convert strings to enums and check the combination; raise ValueError naming the field."""
        for name, enum in (("kind", FindingKind), ("side", Side), ("region", Region)):
            object.__setattr__(self, name, _enum(enum, name, getattr(self, name)))
        for name, enum in (("acuity", Acuity), ("degree", Degree)):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _enum(enum, name, value))
        kind = self.kind
        if self.side not in _ALLOWED_SIDES[kind]:
            raise ValueError(f"side {self.side.value!r} is not allowed for {kind.value}; "
                             f"use one of {sorted(s.value for s in _ALLOWED_SIDES[kind])}")
        if self.region not in _ALLOWED_REGIONS[kind]:
            raise ValueError(f"region {self.region.value!r} is not allowed for {kind.value}; "
                             f"use one of {sorted(r.value for r in _ALLOWED_REGIONS[kind])}")
        if kind in _NEEDS_SIZE and self.size_mm is None:
            raise ValueError(f"size_mm is required for {kind.value}")
        for name in ("size_mm", "hu", "volume_ml", "extent_deg", "evans_index"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                    raise ValueError(f"{name} must be a finite number, got {value!r}")
                object.__setattr__(self, name, float(value))
        if self.size_mm is not None and self.size_mm <= 0:
            raise ValueError(f"size_mm must be positive, got {self.size_mm!r}")
        if kind in _NEEDS_ACUITY and self.acuity is None:
            raise ValueError(f"acuity is required for {kind.value}")
        if kind in _NEEDS_DEGREE and self.degree is None:
            raise ValueError(f"degree is required for {kind.value}")
        if self.centre_mm is not None:
            object.__setattr__(self, "centre_mm", tuple(float(v) for v in self.centre_mm))
            if len(self.centre_mm) != 3:
                raise ValueError(f"centre_mm must have three coordinates, got {self.centre_mm}")

    @property
    def is_space_occupying(self) -> bool:
        """Whether the finding's volume contributes to mass effect and midline shift."""
        return self.kind in SPACE_OCCUPYING

    def with_(self, **changes: Any) -> Finding:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict: enums as their values, floats rounded, None kept."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if isinstance(value, StrEnum):
                value = value.value
            elif isinstance(value, float):
                value = round(value, 3)
            elif isinstance(value, tuple):
                value = [round(float(v), 2) for v in value]
            out[key] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        """The inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown Finding field(s): {sorted(unknown)}")
        values = dict(data)
        if values.get("centre_mm") is not None:
            values["centre_mm"] = tuple(values["centre_mm"])
        return cls(**values)


def _enum(enum: type[StrEnum], name: str, value: object) -> Any:
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {[m.value for m in enum]}, got {value!r}") from None


# --- sampling ---------------------------------------------------------------------------------

#: Age range (years) per scenario.
_AGES: dict[Scenario, tuple[int, int]] = {
    Scenario.NORMAL: (18, 82),
    Scenario.TRAUMA: (18, 94),
    Scenario.HYPERTENSIVE_HEMORRHAGE: (45, 88),
    Scenario.ACUTE_STROKE: (50, 92),
    Scenario.OLD_STROKE: (52, 92),
    Scenario.SMALL_VESSEL: (58, 94),
    Scenario.ATROPHY: (62, 96),
    Scenario.HYDROCEPHALUS: (20, 85),
    Scenario.ANEURYSMAL_SAH: (30, 75),
    Scenario.CUSTOM: (30, 85),
}

_LOBES = (Region.FRONTAL, Region.PARIETAL, Region.TEMPORAL, Region.OCCIPITAL)


def sample_age(rng: np.random.Generator, scenario: Scenario) -> int:
    """A patient age (years) that suits the scenario."""
    low, high = _AGES[scenario]
    return int(rng.integers(low, high + 1))


def _side(rng: np.random.Generator) -> Side:
    return Side.LEFT if rng.random() < 0.5 else Side.RIGHT


def _pick(rng: np.random.Generator, options: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    p = None
    if weights is not None:
        w = np.asarray(weights, dtype=float)
        p = w / w.sum()
    return options[int(rng.choice(len(options), p=p))]


def _size(rng: np.random.Generator, low: float, high: float) -> float:
    return float(round(rng.uniform(low, high)))


def sample_findings(
    rng: np.random.Generator,
    scenario: Scenario,
    age: int,
) -> list[Finding]:
    """Draw a plausible set of primary findings for one study (no derived midline shift).

    Co-findings follow age (small-vessel disease, atrophy and calcifications become common in the
    elderly); exclusive pairs are avoided (atrophy with hydrocephalus, two lesions of one kind in
    one place).
    """
    found: list[Finding] = []
    if scenario is Scenario.TRAUMA:
        found += _trauma(rng, age)
    elif scenario is Scenario.HYPERTENSIVE_HEMORRHAGE:
        side = _side(rng)
        region = _pick(rng, (Region.BASAL_GANGLIA, Region.THALAMUS, Region.CEREBELLUM, *_LOBES),
                       (5, 2.5, 1, 0.6, 0.4, 0.3, 0.2))
        high = {Region.THALAMUS: 35, Region.CEREBELLUM: 40}.get(region, 65)
        acuity = Acuity.ACUTE if rng.random() < 0.8 else Acuity.SUBACUTE
        found.append(Finding(FindingKind.INTRAPARENCHYMAL_HEMORRHAGE, side, region,
                             _size(rng, 15, high), acuity))
        if rng.random() < 0.6:
            found.append(_white_matter(rng, age))
    elif scenario is Scenario.ACUTE_STROKE:
        territory = _pick(rng, (Region.MCA_TERRITORY, Region.ACA_TERRITORY, Region.PCA_TERRITORY),
                          (6.5, 1.5, 2))
        high = 90 if territory is Region.MCA_TERRITORY else 60
        found.append(Finding(FindingKind.ACUTE_INFARCT, _side(rng), territory, _size(rng, 25, high),
                             Acuity.ACUTE))
        if rng.random() < 0.4:
            found.append(_white_matter(rng, age))
    elif scenario is Scenario.OLD_STROKE:
        territory = _pick(rng, (Region.MCA_TERRITORY, Region.ACA_TERRITORY, Region.PCA_TERRITORY),
                          (6, 1.5, 2.5))
        found.append(Finding(FindingKind.OLD_INFARCT, _side(rng), territory, _size(rng, 20, 60),
                             Acuity.OLD))
        if rng.random() < 0.5:
            found.append(_white_matter(rng, age))
    elif scenario is Scenario.SMALL_VESSEL:
        found.append(_white_matter(rng, age, force=True))
        for _ in range(int(rng.integers(0, 3))):
            found.append(_lacune(rng, Acuity.OLD))
        if rng.random() < 0.15:
            found.append(_lacune(rng, Acuity.ACUTE))
    elif scenario is Scenario.ATROPHY:
        degree = _pick(rng, list(Degree), (3, 2.5, 1.5) if age > 80 else (5, 2, 0.5))
        found.append(Finding(FindingKind.ATROPHY, Side.BILATERAL, Region.GENERALIZED, acuity=None,
                             degree=degree))
        if rng.random() < 0.5:
            found.append(_white_matter(rng, age))
    elif scenario is Scenario.HYDROCEPHALUS:
        found.append(Finding(FindingKind.HYDROCEPHALUS, Side.BILATERAL, Region.VENTRICULAR_SYSTEM,
                             acuity=Acuity.ACUTE if rng.random() < 0.4 else Acuity.CHRONIC,
                             degree=_pick(rng, list(Degree), (2, 2, 1))))
    elif scenario is Scenario.ANEURYSMAL_SAH:
        region = _pick(rng, (Region.BASAL_CISTERNS, Region.GENERALIZED, Region.SYLVIAN_FISSURE),
                       (4, 2, 1.5))
        side = _side(rng) if region is Region.SYLVIAN_FISSURE else Side.BILATERAL
        found.append(Finding(FindingKind.SUBARACHNOID_HEMORRHAGE, side, region, acuity=Acuity.ACUTE))
        if rng.random() < 0.3:
            found.append(Finding(FindingKind.HYDROCEPHALUS, Side.BILATERAL, Region.VENTRICULAR_SYSTEM,
                                 acuity=Acuity.ACUTE, degree=Degree.MILD))
    found += _incidental(rng, scenario, age, found)
    return _dedupe(found)


def _trauma(rng: np.random.Generator, age: int) -> list[Finding]:
    found: list[Finding] = []
    primary = _pick(rng, ("sdh_acute", "sdh_chronic", "edh", "contusion", "sah"),
                    (4, 2.5 if age > 60 else 0.5, 2.5 if age < 55 else 0.4, 1.5, 1))
    side = _side(rng)
    if primary == "sdh_acute":
        region = _pick(rng, (Region.FRONTOPARIETAL, Region.FRONTOTEMPOROPARIETAL, Region.FRONTOTEMPORAL,
                             Region.TEMPOROPARIETAL, Region.PARIETAL), (3, 3, 1.5, 1.5, 1))
        acuity = Acuity.ACUTE if rng.random() < 0.85 else Acuity.SUBACUTE
        found.append(Finding(FindingKind.SUBDURAL_HEMATOMA, side, region, _size(rng, 4, 20), acuity))
        if rng.random() < 0.3:
            found.append(Finding(FindingKind.SUBARACHNOID_HEMORRHAGE, _pick(rng, list(_SIDED)),
                                 Region.CONVEXITY, acuity=Acuity.ACUTE))
        if rng.random() < 0.2:
            found.append(_contusion(rng, side.opposite))  # contrecoup
    elif primary == "sdh_chronic":
        bilateral = rng.random() < 0.3
        region = _pick(rng, (Region.FRONTOPARIETAL, Region.FRONTOTEMPOROPARIETAL), (1, 1))
        found.append(Finding(FindingKind.SUBDURAL_HEMATOMA, Side.BILATERAL if bilateral else side, region,
                             _size(rng, 5, 14 if bilateral else 24), Acuity.CHRONIC))
    elif primary == "edh":
        region = _pick(rng, (Region.TEMPORAL, Region.TEMPOROPARIETAL, Region.FRONTAL, Region.PARIETAL),
                       (3, 2, 1.5, 1.5))
        found.append(Finding(FindingKind.EPIDURAL_HEMATOMA, side, region, _size(rng, 8, 30),
                             Acuity.ACUTE))
    elif primary == "contusion":
        found.append(_contusion(rng, side))
        if rng.random() < 0.5:
            found.append(Finding(FindingKind.SUBARACHNOID_HEMORRHAGE, side, Region.CONVEXITY,
                                 acuity=Acuity.ACUTE))
    else:
        found.append(Finding(FindingKind.SUBARACHNOID_HEMORRHAGE, side,
                             _pick(rng, (Region.CONVEXITY, Region.SYLVIAN_FISSURE), (3, 1)),
                             acuity=Acuity.ACUTE))
    return found


def _contusion(rng: np.random.Generator, side: Side) -> Finding:
    region = _pick(rng, (Region.FRONTAL, Region.TEMPORAL), (1, 1))
    return Finding(FindingKind.INTRAPARENCHYMAL_HEMORRHAGE, side, region, _size(rng, 10, 35),
                   Acuity.ACUTE)


def _white_matter(rng: np.random.Generator, age: int, *, force: bool = False) -> Finding:
    weights = (3, 2, 1) if age > 75 or force else (5, 1.5, 0.3)
    degree = _pick(rng, list(Degree), weights)
    width = {Degree.MILD: 3.0, Degree.MODERATE: 7.0, Degree.MARKED: 11.0}[degree]
    return Finding(FindingKind.WHITE_MATTER_HYPODENSITY, Side.BILATERAL, Region.PERIVENTRICULAR,
                   size_mm=width, degree=degree)


def _lacune(rng: np.random.Generator, acuity: Acuity) -> Finding:
    region = _pick(rng, (Region.BASAL_GANGLIA, Region.INTERNAL_CAPSULE, Region.THALAMUS,
                         Region.CORONA_RADIATA), (4, 2, 2, 1.5))
    return Finding(FindingKind.LACUNAR_INFARCT, _side(rng), region, _size(rng, 4, 14), acuity)


def _incidental(rng: np.random.Generator, scenario: Scenario, age: int,
                found: Sequence[Finding]) -> list[Finding]:
    """Age-related co-findings; a normal study gets none (its report must be normal)."""
    if scenario is Scenario.NORMAL:
        return []
    kinds = {f.kind for f in found}
    extra: list[Finding] = []
    if age > 65 and FindingKind.WHITE_MATTER_HYPODENSITY not in kinds and rng.random() < 0.3:
        extra.append(_white_matter(rng, age))
    if (age > 72 and not kinds & {FindingKind.ATROPHY, FindingKind.HYDROCEPHALUS}
            and rng.random() < 0.35):
        extra.append(Finding(FindingKind.ATROPHY, Side.BILATERAL, Region.GENERALIZED,
                             degree=Degree.MILD))
    if age > 60 and scenario is not Scenario.SMALL_VESSEL and rng.random() < 0.15:
        extra.append(_lacune(rng, Acuity.OLD))
    if age > 25 and rng.random() < 0.3:
        extra.append(Finding(FindingKind.CALCIFICATION, Side.MIDLINE, Region.PINEAL,
                             size_mm=_size(rng, 3, 6)))
    if age > 30 and rng.random() < 0.2:
        extra.append(Finding(FindingKind.CALCIFICATION, Side.BILATERAL, Region.CHOROID_PLEXUS,
                             size_mm=_size(rng, 3, 6)))
    if age > 55 and rng.random() < 0.1:
        extra.append(Finding(FindingKind.CALCIFICATION, Side.BILATERAL, Region.BASAL_GANGLIA,
                             size_mm=_size(rng, 2, 5)))
    return extra


def _dedupe(found: Sequence[Finding]) -> list[Finding]:
    """Drop repeats of (kind, side, region) and lacunes where a bigger lesion already lies."""
    seen: set[tuple[FindingKind, Side, Region]] = set()
    occupied = {(f.side, f.region) for f in found
                if f.kind is FindingKind.INTRAPARENCHYMAL_HEMORRHAGE}
    out = []
    for f in found:
        key = (f.kind, f.side, f.region)
        if key in seen:
            continue
        if f.kind is FindingKind.LACUNAR_INFARCT and (f.side, f.region) in occupied:
            continue
        seen.add(key)
        out.append(f)
    return out
