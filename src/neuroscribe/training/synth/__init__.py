"""Synthetic site data: head-CT phantoms with known findings and reports written from them.

No patient data and no clinical validity: the studies are analytic phantoms whose ground truth is
known exactly, so tests, benchmarks, the demo and training can use them, and evaluation can tell
whether a model learned the findings. See docs/synthetic-data.md.

Modules: :mod:`.findings` (what can be found), :mod:`.profiles` (site/scanner profiles and sizes),
:mod:`.phantom` (anatomy and lesions in HU), :mod:`.report` (report text), :mod:`.generate`
(plans, DICOM series and dataset.jsonl), :mod:`.command` (``neuroscribe synth``).
"""

from neuroscribe.training.synth.findings import (
    Acuity,
    Degree,
    Finding,
    FindingKind,
    Region,
    Scenario,
    Side,
    sample_findings,
)
from neuroscribe.training.synth.generate import (
    DATASET_FILE,
    Patient,
    StudyPlan,
    SynthError,
    generate_dataset,
    plan_study,
    study_folder,
    write_study,
)
from neuroscribe.training.synth.phantom import (
    HeadModel,
    Phantom,
    RenderedSlice,
    Tissue,
    midline_shift_mm,
)
from neuroscribe.training.synth.profiles import (
    CLINICAL,
    PROFILES,
    SHIFTED,
    SIZES,
    SMALL,
    STANDARD,
    Acquisition,
    Profile,
    SizePreset,
)
from neuroscribe.training.synth.report import report_template, write_report

__all__ = [
    "CLINICAL",
    "DATASET_FILE",
    "PROFILES",
    "SHIFTED",
    "SIZES",
    "SMALL",
    "STANDARD",
    "Acquisition",
    "Acuity",
    "Degree",
    "Finding",
    "FindingKind",
    "HeadModel",
    "Patient",
    "Phantom",
    "Profile",
    "Region",
    "RenderedSlice",
    "Scenario",
    "Side",
    "SizePreset",
    "StudyPlan",
    "SynthError",
    "Tissue",
    "generate_dataset",
    "midline_shift_mm",
    "plan_study",
    "report_template",
    "sample_findings",
    "study_folder",
    "write_report",
    "write_study",
]
