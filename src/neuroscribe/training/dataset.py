"""Site dataset: studies with reports become cached, patient-split model inputs with a digest.

The pipeline, top to bottom:

1. :func:`load_manifest` reads the studies: a ``neuroscribe synth`` output folder (its
   ``dataset.jsonl``), or a JSONL or CSV manifest with ``study_id``, ``patient_id``,
   ``series_path`` and ``report``. Every problem is reported with its file and line.
2. :func:`~neuroscribe.dicom_io.model_input.series_to_input` (in ``dicom_io``, so the service can
   use it without the training package) turns one series folder into the model input, float32
   ``(slices, channels, height, width)`` in [0, 1], through :mod:`neuroscribe.dicom_io.volume`:
   :func:`~neuroscribe.dicom_io.volume.build_volume` (resampled in-plane while decoding) ->
   :func:`~neuroscribe.dicom_io.volume.resample` along z ->
   :func:`~neuroscribe.dicom_io.volume.windowed_channels`. The service calls the same function,
   so training and serving see the same inputs; this module imports no torch.
3. :func:`build_cache` writes one ``.npy`` per study, keyed by a content hash of the series files
   and the :class:`ModelGrid`, so a rebuild only does new or changed studies. Series that fail the
   volume checks are recorded as skipped with their reason. Each patient goes to one split
   (:class:`SplitSpec`), and a sha256 digest of the data (:func:`data_digest`) is recorded for the
   model bundle's manifest.
4. :class:`CacheIndex` reads the cache back: ``index.split("train")`` is a sequence of
   :class:`Sample` (a memory-mapped array, the report, the study id) for a trainer to wrap.

See docs/site-dataset.md for the manifest formats, the cache layout, the split and the digest.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from neuroscribe.dicom_io.model_input import (
    DEFAULT_GRID,
    ModelGrid,
    ModelGridError,
    series_files,
    series_to_input,
)
from neuroscribe.dicom_io.volume import VolumeCheckError
from neuroscribe.durable import atomic_file, fsync_dir
from neuroscribe.errors import NeuroScribeError
from neuroscribe.log import get_logger, hash_uid

__all__ = [
    "CACHE_DTYPE",
    "CACHE_FORMAT",
    "INDEX_FILE",
    "MISSING_SERIES",
    "SAMPLES_DIR",
    "BuildStats",
    "CacheIndex",
    "CachedSplit",
    "CachedStudy",
    "DatasetError",
    "ManifestError",
    "ModelGrid",
    "ModelGridError",
    "Sample",
    "SkippedStudy",
    "Split",
    "SplitSpec",
    "StudyEntry",
    "assign_split",
    "build_cache",
    "data_digest",
    "load_manifest",
    "series_files",
    "series_to_input",
]

LOG = get_logger(__name__)

#: Version of the cache layout and of what a sample holds. Bump it when the index format, the
#: sample dtype or the meaning of a sample changes (e.g. a change in dicom_io.volume that alters
#: its output): every cache key and the data digest change with it, so old samples are rebuilt.
CACHE_FORMAT = 1
#: Samples are stored as float16: the model input lies in [0, 1], where float16 is exact to
#: 2**-12 (about 2.4e-4; 0.02 HU in the brain window, 0.7 HU in the bone window, far below CT
#: noise), at half the size of float32. uint8 would halve it again but round to 1/255 (0.3 HU
#: brain, 11 HU bone) and make training inputs differ visibly from what the service computes.
CACHE_DTYPE = np.dtype(np.float16)
#: The cache's index, in the cache folder.
INDEX_FILE = "index.json"
#: The sample arrays, one ``<key>.npy`` per distinct series, in this sub-folder.
SAMPLES_DIR = "samples"
#: Skip reason for a series folder that is gone or unreadable as a folder at build time
#: (every other skip reason is a :class:`~neuroscribe.dicom_io.volume.Reason`).
MISSING_SERIES = "missing_series"
#: Temporary files older than this (seconds) are leftovers of an interrupted build.
STALE_TMP_SECONDS = 3600
#: Manifest suffixes read as JSON Lines and as CSV.
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
CSV_SUFFIXES = frozenset({".csv"})
#: Keys every manifest record needs; ``study_instance_uid`` (synth) may stand for ``study_id``.
MANIFEST_KEYS = ("study_id", "patient_id", "series_path", "report")
STUDY_ID_ALIAS = "study_instance_uid"
#: Files in a series folder that are never slices.
#: At most this many manifest problems are listed in one ManifestError.
MAX_LISTED_PROBLEMS = 20


class DatasetError(NeuroScribeError):
    """The site dataset cannot be read or cached (bad grid, bad split, unreadable cache index)."""


class ManifestError(DatasetError):
    """A manifest is malformed; the message lists each problem as ``file:line: what``."""


# --- the model input ---------------------------------------------------------------------------


# --- manifests ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyEntry:
    """One study of a manifest: its series folder and its (final) report."""

    study_id: str
    patient_id: str
    series_dir: Path  # absolute
    report: str
    source: str  # "manifest-file:line", for error messages


def load_manifest(path_or_dir: Path | str) -> list[StudyEntry]:
    """Read the studies of a synth output folder, a JSONL manifest or a CSV manifest.

    Parameters
    ----------
    path_or_dir
        A folder holding ``dataset.jsonl`` (``neuroscribe synth`` output), or a ``.jsonl`` /
        ``.ndjson`` / ``.csv`` manifest. Records need ``study_id`` (or ``study_instance_uid``),
        ``patient_id``, ``series_path`` (absolute, or relative to the manifest's folder) and a
        non-empty ``report``; other keys and columns are ignored.

    Returns
    -------
    list of StudyEntry
        In manifest order.

    Raises
    ------
    ManifestError
        Listing every problem as ``file:line: what`` (missing keys, non-string values, empty
        reports, series folders that do not exist, duplicate study ids, malformed lines).
    """
    path = Path(path_or_dir)
    if path.is_dir():
        # Imported here so that the service, which calls series_to_input, never loads synth.
        from neuroscribe.training.synth.generate import DATASET_FILE

        path = path / DATASET_FILE
        if not path.is_file():
            raise ManifestError(f"{path_or_dir} is a folder without {DATASET_FILE}; give a synth "
                                "output folder or a .jsonl/.csv manifest")
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        records = _jsonl_records(path)
    elif suffix in CSV_SUFFIXES:
        records = _csv_records(path)
    else:
        raise ManifestError(f"manifest {path}: unknown suffix {path.suffix!r}; use one of "
                            f"{sorted(JSONL_SUFFIXES | CSV_SUFFIXES)}")
    entries: list[StudyEntry] = []
    problems: list[str] = []
    first_seen: dict[str, str] = {}
    for where, record in records:
        if isinstance(record, str):  # a line that could not be parsed
            problems.append(f"{where}: {record}")
            continue
        entry = _entry(path, where, record, problems)
        if entry is None:
            continue
        if entry.study_id in first_seen:
            problems.append(f"{where}: duplicate study_id (first at {first_seen[entry.study_id]})")
            continue
        first_seen[entry.study_id] = where
        entries.append(entry)
    if problems:
        listed = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(listed)
        raise ManifestError("\n".join([f"manifest {path}: {len(problems)} problem(s)", *listed]
                                      + ([f"... and {more} more"] if more else [])))
    if not entries:
        raise ManifestError(f"manifest {path} lists no studies")
    return entries


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any] | str]]:
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, f"not valid JSON ({exc.msg})"
                continue
            yield where, record if isinstance(record, dict) else "a line must be a JSON object"


def _csv_records(path: Path) -> Iterator[tuple[str, dict[str, Any] | str]]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [k for k in MANIFEST_KEYS if k not in header
                   and not (k == "study_id" and STUDY_ID_ALIAS in header)]
        if missing:
            yield f"{path}:1", f"header lacks column(s) {', '.join(map(repr, missing))}"
            return
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            where = f"{path}:{start}" if start == end else f"{path}:{start}-{end}"
            if None in row:
                yield where, f"more fields than the header's {len(header)}"
                continue
            yield where, {k: v for k, v in row.items() if v is not None}


def _entry(manifest: Path, where: str, record: Mapping[str, Any],
           problems: list[str]) -> StudyEntry | None:
    values: dict[str, str] = {}
    missing: list[str] = []
    before = len(problems)
    for key in MANIFEST_KEYS:
        name = key
        if key == "study_id" and key not in record and STUDY_ID_ALIAS in record:
            name = STUDY_ID_ALIAS
        if name not in record:
            missing.append(f"{key!r} (or {STUDY_ID_ALIAS!r})" if key == "study_id" else repr(key))
        elif not isinstance(record[name], str):
            problems.append(f"{where}: {name!r} must be a string, got {type(record[name]).__name__}")
        elif not record[name].strip():
            problems.append(f"{where}: empty {name!r}")
        else:
            values[key] = record[name]
    if missing:
        problems.append(f"{where}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    if len(problems) > before:
        return None
    series_dir = Path(values["series_path"])
    if not series_dir.is_absolute():
        series_dir = manifest.parent / series_dir
    series_dir = series_dir.resolve()
    if not series_dir.is_dir():
        problems.append(f"{where}: series_path {values['series_path']!r} is not a folder "
                        f"(looked at {series_dir})")
        return None
    return StudyEntry(study_id=values["study_id"], patient_id=values["patient_id"],
                      series_dir=series_dir, report=values["report"], source=where)


# --- split by patient ---------------------------------------------------------------------------


class Split(StrEnum):
    """The three disjoint parts of a site dataset; every study of a patient is in one."""

    TRAIN = "train"
    """Fits the model."""
    VAL = "val"
    """Chooses checkpoints and hyper-parameters."""
    TEST = "test"
    """Scores the model for promotion; never seen in training."""


@dataclass(frozen=True)
class SplitSpec:
    """Fractions of patients per split and the salt of the patient hash.

    A patient's split depends only on ``(salt, patient_id)`` and the fractions, never on which
    other patients are in the dataset: adding studies leaves everyone's split unchanged, and a
    new salt draws a new split. Fractions hold for many patients; a dataset of a few patients may
    leave a split empty.
    """

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    salt: str = "neuroscribe-split-v1"

    def __post_init__(self) -> None:
        """Fractions must be in [0, 1] and add up to 1."""
        fractions = (self.train, self.val, self.test)
        if not all(isinstance(f, int | float) and 0.0 <= f <= 1.0 for f in fractions):
            raise DatasetError(f"split fractions must be in [0, 1], got {fractions}")
        if not math.isclose(sum(fractions), 1.0, abs_tol=1e-9):
            raise DatasetError(f"split fractions must add up to 1, got {fractions} "
                               f"(sum {sum(fractions)})")
        if not isinstance(self.salt, str):
            raise DatasetError(f"split salt must be a string, got {self.salt!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description."""
        return {"train": self.train, "val": self.val, "test": self.test, "salt": self.salt}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SplitSpec:
        """The spec :meth:`to_dict` described."""
        try:
            return cls(float(data["train"]), float(data["val"]), float(data["test"]),
                       str(data["salt"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"not a SplitSpec description: {data!r}") from exc


def assign_split(patient_id: str, spec: SplitSpec = SplitSpec()) -> Split:
    """The split of a patient: the first 64 bits of sha256(salt, NUL, patient_id) as u in [0, 1),
    then train below ``spec.train``, val below ``spec.train + spec.val``, else test."""
    digest = hashlib.sha256(f"{spec.salt}\0{patient_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < spec.train:
        return Split.TRAIN
    if u < spec.train + spec.val:
        return Split.VAL
    return Split.TEST


# --- the cache ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedStudy:
    """One cached sample: where its array is and what it was made from."""

    study_id: str
    patient_id: str
    split: Split
    report: str
    sample: str  # path of the .npy, relative to the cache folder
    shape: tuple[int, ...]
    series_sha256: str  # sha256 over the sorted sha256s of the series files
    file_sha256: tuple[str, ...]  # sorted
    key: str  # the cache key: sha256 of (CACHE_FORMAT, dtype, grid, series_sha256)
    source: str  # manifest file:line

    def to_dict(self) -> dict[str, Any]:
        """The study's line in index.json."""
        return {"study_id": self.study_id, "patient_id": self.patient_id, "split": str(self.split),
                "report": self.report, "sample": self.sample, "shape": list(self.shape),
                "series_sha256": self.series_sha256, "file_sha256": list(self.file_sha256),
                "key": self.key, "source": self.source}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CachedStudy:
        """The study :meth:`to_dict` wrote."""
        return cls(study_id=data["study_id"], patient_id=data["patient_id"],
                   split=Split(data["split"]), report=data["report"], sample=data["sample"],
                   shape=tuple(data["shape"]), series_sha256=data["series_sha256"],
                   file_sha256=tuple(data["file_sha256"]), key=data["key"], source=data["source"])


@dataclass(frozen=True)
class SkippedStudy:
    """A study whose series could not become a model input, and why."""

    study_id: str
    patient_id: str
    reason: str  # a dicom_io.volume.Reason value, or MISSING_SERIES
    message: str  # the VolumeCheckError message (no patient data)
    key: str | None  # the cache key, when the files could be hashed (reused on rebuild)
    source: str

    def to_dict(self) -> dict[str, Any]:
        """The study's line in index.json."""
        return {"study_id": self.study_id, "patient_id": self.patient_id, "reason": self.reason,
                "message": self.message, "key": self.key, "source": self.source}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SkippedStudy:
        """The record :meth:`to_dict` wrote."""
        return cls(study_id=data["study_id"], patient_id=data["patient_id"],
                   reason=data["reason"], message=data["message"], key=data["key"],
                   source=data["source"])


@dataclass(frozen=True)
class BuildStats:
    """What one :func:`build_cache` run did."""

    built: int  # samples computed and written
    reused: int  # up-to-date samples (and known failures) taken from the cache
    skipped: int  # studies whose series failed (new or reused failures)
    pruned: int  # sample files no study refers to any more, removed
    seconds: float


class Sample(NamedTuple):
    """One training example: the cached input, its report and its study id."""

    array: np.ndarray  # (slices, channels, height, width) float16, read-only memory map
    report: str
    study_id: str


class CachedSplit(Sequence[Sample]):
    """The samples of one split, in study-id order; indexable, so a torch Dataset can wrap it."""

    def __init__(self, cache_dir: Path, studies: Sequence[CachedStudy]) -> None:
        self._cache_dir = cache_dir
        self._studies = tuple(studies)

    @property
    def studies(self) -> tuple[CachedStudy, ...]:
        """The index records of this split."""
        return self._studies

    def __len__(self) -> int:
        """Number of samples."""
        return len(self._studies)

    def __getitem__(self, i: int) -> Sample:  # type: ignore[override]
        """Sample ``i``, its array memory-mapped read-only."""
        study = self._studies[i]
        array = np.load(self._cache_dir / study.sample, mmap_mode="r")
        return Sample(array, study.report, study.study_id)


@dataclass(frozen=True)
class CacheIndex:
    """A built cache: the grid, the split, the digest and every study, cached or skipped."""

    cache_dir: Path
    grid: ModelGrid
    split_spec: SplitSpec
    digest: str
    studies: tuple[CachedStudy, ...]  # sorted by study_id
    skipped: tuple[SkippedStudy, ...]  # sorted by study_id
    stats: BuildStats | None = field(default=None, compare=False)  # None when loaded from disk

    @classmethod
    def load(cls, cache_dir: Path | str) -> CacheIndex:
        """Read ``cache_dir/index.json``.

        Raises
        ------
        DatasetError
            No index, an unreadable one, or one of another CACHE_FORMAT.
        """
        cache_dir = Path(cache_dir)
        path = cache_dir / INDEX_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DatasetError(f"cannot read cache index {path}: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise DatasetError(f"cache index {path} is not format {CACHE_FORMAT}; rebuild it")
        try:
            return cls(cache_dir=cache_dir, grid=ModelGrid.from_dict(data["grid"]),
                       split_spec=SplitSpec.from_dict(data["split"]), digest=data["digest"],
                       studies=tuple(CachedStudy.from_dict(s) for s in data["studies"]),
                       skipped=tuple(SkippedStudy.from_dict(s) for s in data["skipped"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"cache index {path} is malformed ({exc!r}); rebuild it") from exc

    def split(self, name: Split | str) -> CachedSplit:
        """The samples of one split."""
        wanted = Split(name)
        return CachedSplit(self.cache_dir, [s for s in self.studies if s.split == wanted])

    def samples(self, split: Split | str | None = None) -> Iterator[Sample]:
        """Yield (array, report, study_id) of one split, or of all splits for None."""
        if split is None:
            return iter(CachedSplit(self.cache_dir, self.studies))
        return iter(self.split(split))

    def counts(self) -> dict[str, int]:
        """Samples per split, plus ``skipped``."""
        counts = {str(s): 0 for s in Split}
        for study in self.studies:
            counts[str(study.split)] += 1
        counts["skipped"] = len(self.skipped)
        return counts

    def to_dict(self) -> dict[str, Any]:
        """The content of index.json."""
        return {"format": CACHE_FORMAT, "dtype": CACHE_DTYPE.name, "grid": self.grid.to_dict(),
                "split": self.split_spec.to_dict(), "digest": self.digest,
                "counts": self.counts(), "studies": [s.to_dict() for s in self.studies],
                "skipped": [s.to_dict() for s in self.skipped]}


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _cache_key(grid: ModelGrid, series_sha256: str) -> str:
    return hashlib.sha256(_canonical({"format": CACHE_FORMAT, "dtype": CACHE_DTYPE.name,
                                      "grid": grid.to_dict(), "series": series_sha256})).hexdigest()


def _series_sha256(file_sha256: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(file_sha256)).encode()).hexdigest()


def data_digest(studies: Iterable[CachedStudy], grid: ModelGrid, split_spec: SplitSpec) -> str:
    """sha256 of the training data: a canonical JSON listing of every cached study (study id,
    patient id, split, report text, the sorted sha256s of its series files), sorted by study id,
    with the grid, the split spec, CACHE_FORMAT and the sample dtype.

    Identical data gives an identical digest wherever and whenever it is built (paths, file
    names, manifest order and build time are not in it); an edited report, a changed file, a
    moved patient or another grid gives another. Skipped studies are not training data and are
    not in it.
    """
    listing = [[s.study_id, s.patient_id, str(s.split), s.report, list(s.file_sha256)]
               for s in sorted(studies, key=lambda s: s.study_id)]
    return hashlib.sha256(_canonical({
        "format": CACHE_FORMAT, "dtype": CACHE_DTYPE.name, "grid": grid.to_dict(),
        "split": split_spec.to_dict(), "studies": listing,
    })).hexdigest()


@dataclass(frozen=True)
class _Hashed:
    """Phase 1 result for one study: its files' hashes, or why there are none."""

    files: tuple[str, ...] = ()  # paths
    file_sha256: tuple[str, ...] = ()  # sorted
    error: str | None = None


def _hash_series(series_dir: Path) -> _Hashed:
    try:
        paths = series_files(series_dir)
        hashes = []
        for path in paths:
            with path.open("rb") as fh:
                hashes.append(hashlib.file_digest(fh, "sha256").hexdigest())
    except OSError as exc:
        return _Hashed(error=f"series folder cannot be read ({type(exc).__name__})")
    return _Hashed(files=tuple(str(p) for p in paths), file_sha256=tuple(sorted(hashes)))


def _build_sample(job: tuple[tuple[str, ...], ModelGrid, str]) -> tuple[str, str] | None:
    """Phase 2 for one series: compute and write its sample; (reason, message) if it fails."""
    files, grid, out = job
    try:
        array = series_to_input([Path(f) for f in files], grid).astype(CACHE_DTYPE)
    except VolumeCheckError as exc:
        return str(exc.reason), str(exc)
    _save_atomic(Path(out), array)
    return None


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """np.save, durably (see :func:`neuroscribe.durable.atomic_file`)."""
    with atomic_file(path) as fh:
        np.save(fh, array, allow_pickle=False)


def _write_json_atomic(path: Path, data: Any) -> None:
    with atomic_file(path, "w") as fh:
        json.dump(data, fh, ensure_ascii=False, indent=1)
        fh.write("\n")


def _sample_ok(path: Path, grid: ModelGrid) -> bool:
    """An existing sample file of the right shape and dtype (the key already fixed its content)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return False
    return bool(array.shape == grid.shape and array.dtype == CACHE_DTYPE)


def _previous_failures(cache_dir: Path) -> dict[str, tuple[str, str]]:
    """Failed cache keys of the previous index: the same files and grid fail the same way."""
    try:
        previous = CacheIndex.load(cache_dir)
    except DatasetError:
        return {}
    return {s.key: (s.reason, s.message) for s in previous.skipped if s.key is not None}


def _run(function: Any, jobs: list[Any], workers: int) -> list[Any]:
    if workers == 1 or len(jobs) <= 1:
        return [function(job) for job in jobs]
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        return list(pool.map(function, jobs))


def build_cache(
    entries: Sequence[StudyEntry],
    cache_dir: Path | str,
    grid: ModelGrid = DEFAULT_GRID,
    *,
    split_spec: SplitSpec = SplitSpec(),
    workers: int = 1,
    prune: bool = True,
    retry_skipped: bool = False,
) -> CacheIndex:
    """Turn studies into cached model inputs with a patient split and a data digest.

    Each study's series files are hashed (sha256 of their bytes); the cache key is a hash of those
    hashes, the grid, the sample dtype and CACHE_FORMAT. A sample ``samples/<key>.npy`` that
    already exists with the right shape is reused, and a key that failed in the previous index
    is skipped again without decoding, so a rebuild after adding studies only decodes the new
    ones. A series that fails :func:`series_to_input` is recorded as skipped with its reason.
    ``index.json`` is written last, to a temporary name, then renamed.

    Parameters
    ----------
    entries
        From :func:`load_manifest`.
    cache_dir
        Created if absent. One cache folder holds one index (the last build's).
    grid
        The model input spec.
    split_spec
        Fractions and salt of the patient split.
    workers
        Processes for hashing and decoding; the result does not depend on it.
    prune
        Remove sample files that the new index does not use, and temporary files an interrupted
        build left (older than STALE_TMP_SECONDS).
    retry_skipped
        Decode series again that failed in the previous index (e.g. after installing a missing
        decoder); otherwise the same files and grid are taken to fail the same way.

    Returns
    -------
    CacheIndex
        With ``stats`` of this run.
    """
    started = time.monotonic()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise DatasetError(f"workers must be an int >= 1, got {workers!r}")
    ids = [e.study_id for e in entries]
    if len(set(ids)) != len(ids):
        raise DatasetError("entries hold duplicate study ids; load them with load_manifest")
    cache_dir = Path(cache_dir)
    samples_dir = cache_dir / SAMPLES_DIR
    samples_dir.mkdir(parents=True, exist_ok=True)
    failures = {} if retry_skipped else _previous_failures(cache_dir)

    hashed: list[_Hashed] = _run(_hash_series, [e.series_dir for e in entries], workers)
    keys = [None if h.error else _cache_key(grid, _series_sha256(h.file_sha256)) for h in hashed]

    # Decode each distinct key at most once; identical series in two studies share a sample.
    jobs: dict[str, tuple[tuple[str, ...], ModelGrid, str]] = {}
    reused: set[str] = set()
    for h, key in zip(hashed, keys, strict=True):
        if key is None or key in jobs or key in reused:
            continue
        if key in failures or _sample_ok(samples_dir / f"{key}.npy", grid):
            reused.add(key)
        else:
            jobs[key] = (h.files, grid, str(samples_dir / f"{key}.npy"))
    outcomes = dict(zip(jobs, _run(_build_sample, list(jobs.values()), workers), strict=True))
    failures.update({k: v for k, v in outcomes.items() if v is not None})

    studies: list[CachedStudy] = []
    skipped: list[SkippedStudy] = []
    for entry, h, key in zip(entries, hashed, keys, strict=True):
        if key is None or key in failures:
            reason, message = (MISSING_SERIES, h.error or "") if key is None else failures[key]
            skipped.append(SkippedStudy(entry.study_id, entry.patient_id, reason, message, key,
                                        entry.source))
            LOG.warning("site_study_skipped", study=hash_uid(entry.study_id), reason=reason)
            continue
        studies.append(CachedStudy(
            study_id=entry.study_id, patient_id=entry.patient_id,
            split=assign_split(entry.patient_id, split_spec), report=entry.report,
            sample=f"{SAMPLES_DIR}/{key}.npy", shape=grid.shape,
            series_sha256=_series_sha256(h.file_sha256), file_sha256=h.file_sha256, key=key,
            source=entry.source))
    studies.sort(key=lambda s: s.study_id)
    skipped.sort(key=lambda s: s.study_id)
    if jobs:
        fsync_dir(samples_dir)

    pruned = 0
    if prune:
        used = {f"{s.key}.npy" for s in studies}
        now = time.time()
        for path in samples_dir.iterdir():
            stale_tmp = path.suffix == ".tmp" and now - path.stat().st_mtime > STALE_TMP_SECONDS
            if stale_tmp or (path.suffix == ".npy" and path.name not in used):
                path.unlink(missing_ok=True)
                pruned += 1

    index = CacheIndex(cache_dir=cache_dir, grid=grid, split_spec=split_spec,
                       digest=data_digest(studies, grid, split_spec), studies=tuple(studies),
                       skipped=tuple(skipped))
    _write_json_atomic(cache_dir / INDEX_FILE, index.to_dict())
    fsync_dir(cache_dir)
    built = sum(1 for k in keys if k in outcomes and outcomes[k] is None)
    stats = BuildStats(built=built, reused=sum(1 for k in keys if k in reused and k not in failures),
                       skipped=len(skipped), pruned=pruned,
                       seconds=round(time.monotonic() - started, 3))
    counts = index.counts()
    LOG.info("site_cache_built", studies=len(studies), built=stats.built, reused=stats.reused,
             skipped=stats.skipped, pruned=pruned, digest=index.digest[:16], seconds=stats.seconds,
             train=counts["train"], val=counts["val"], test=counts["test"])
    return CacheIndex(cache_dir=cache_dir, grid=grid, split_spec=split_spec, digest=index.digest,
                      studies=index.studies, skipped=index.skipped, stats=stats)
