"""One completed, selected CT series becomes one report on its way to every PACS and RIS.

::

    record = draft_report(engine, series_files, settings=settings, outbox=outbox)
    outbox.deliver_due()    # or the outbox thread: Outbox.run_forever

:func:`draft_report` reads the headers of the series' files (no pixels), builds the model input on
the bundle's grid (:func:`~neuroscribe.dicom_io.model_input.series_to_input`), writes the draft with
the engine, builds the SR (:func:`~neuroscribe.reporting.sr.build_sr`, every instance read is
evidence) and the ORU^R01 (:func:`~neuroscribe.reporting.hl7.build_oru`, first instance as source,
``[hl7]`` options), and queues both durably (:meth:`~neuroscribe.reporting.outbox.Outbox.enqueue_report`)
for every ``[[pacs]]`` and ``[[ris]]`` destination. It returns the report's
:class:`~neuroscribe.store.ReportRecord`; delivery is the outbox's job.

Decisions:

* **One report per instance set.** The SR's SOP Instance and Series Instance UIDs are derived from
  the series UID and the sorted SOP Instance UIDs of its files (:func:`sr_uids_for`, UUID-derived
  ``2.25`` UIDs). A second call for the same files (after a crash, a restart, a re-queued job, or
  on another node sharing the database) finds that SR's report row before running the model and
  returns it; two callers racing past that check meet at the reports table's unique SR UID and
  :meth:`~neuroscribe.reporting.outbox.Outbox.enqueue_report` hands both the one stored record.
  So the PACS gets one SR and the RIS one control ID per instance set. A late instance that changes
  the set (the series' next revision) makes a new report; callers that want at most one report per
  series UID whatever happens ask :meth:`~neuroscribe.store.OutboxStore.reports_for_series` first.
* **The control ID** (MSH-10) is fresh (:func:`~neuroscribe.reporting.outbox.new_control_id`) and
  fixed in the stored ORU with the SR UID, so retries resend the same objects.
* **No ORU without an accession number or Patient ID**: the report still goes to the PACS, and a
  warning names the reason (:class:`~neuroscribe.reporting.hl7.Hl7BuildError` messages hold no values).
* **The disclaimer** is in the SR and the ORU already; a model trained only on synthetic phantoms
  (``manifest.synthetic_training_data``) is only flagged in the log line (``synthetic_model``).

It blocks for the whole inference: run it in the worker, never on an association thread.
Logs hold hashed UIDs, IDs and figures; never report text, names, patient IDs or accession numbers.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from neuroscribe.config import Settings
from neuroscribe.dicom_io.model_input import ModelGrid, series_to_input
from neuroscribe.dicom_io.model_input import series_files as folder_files
from neuroscribe.errors import NeuroScribeError
from neuroscribe.log import get_logger, hash_uid
from neuroscribe.reporting.draft import DraftReport, ModelIdentity
from neuroscribe.reporting.hl7 import Hl7BuildError, OruOptions, build_oru
from neuroscribe.reporting.outbox import Outbox, SrUids, new_control_id
from neuroscribe.reporting.sr import build_sr
from neuroscribe.store import ReportRecord

if TYPE_CHECKING:
    from neuroscribe.inference.engine import Engine

__all__ = ["SR_UID_NAMESPACE", "DraftError", "draft_report", "model_identity", "read_headers", "sr_uids_for"]

LOG = get_logger(__name__)

#: Names the UUIDs behind derived SR UIDs (:func:`sr_uids_for`); changing it changes every SR UID.
SR_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, "neuroscribe.reporting.drafting")


class DraftError(NeuroScribeError):
    """A series cannot become a report; the message names the rule, never patient data or UIDs."""


def sr_uids_for(series_instance_uid: str, sop_instance_uids: Sequence[str]) -> SrUids:
    """The SR UIDs of the report on exactly these instances of this series (order does not matter).

    ``2.25.<UUID>`` (PS3.5 B.2) with name-based UUIDs (RFC 4122 version 5) of the series UID and
    the sorted, de-duplicated SOP Instance UIDs: the same instances always give the same SR.
    """
    if not series_instance_uid or not sop_instance_uids:
        raise ValueError("sr_uids_for needs a series UID and at least one SOP Instance UID")
    name = "\0".join([series_instance_uid, *sorted(set(sop_instance_uids))])
    sop = uuid.uuid5(SR_UID_NAMESPACE, f"sr-instance\0{name}")
    series = uuid.uuid5(SR_UID_NAMESPACE, f"sr-series\0{name}")
    return SrUids(f"2.25.{sop.int}", f"2.25.{series.int}")


def read_headers(files: Sequence[Path]) -> list[Dataset]:
    """The headers (no pixel data) of one series' files, in the given order.

    Raises
    ------
    DraftError
        No files, a file that is not DICOM, a missing UID, a repeated instance, or several series or
        studies; files are named by their index.
    """
    if not files:
        raise DraftError("the series has no files")
    headers = []
    for index, path in enumerate(files):
        try:
            headers.append(dcmread(path, stop_before_pixels=True))
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise DraftError(f"series file {index} cannot be read as DICOM ({type(exc).__name__})") from None
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        missing = [i for i, ds in enumerate(headers) if not str(ds.get(keyword, "") or "")]
        if missing:
            raise DraftError(f"series file {missing[0]} has no {keyword}")
    for keyword in ("SeriesInstanceUID", "StudyInstanceUID"):
        if len({str(ds.get(keyword)) for ds in headers}) > 1:
            raise DraftError(f"the files are not one series: they have several {keyword} values")
    sops = [str(ds.SOPInstanceUID) for ds in headers]
    if len(set(sops)) != len(sops):
        raise DraftError("the files repeat an instance (same SOPInstanceUID twice)")
    return headers


def model_identity(engine: Engine) -> ModelIdentity:
    """The bundle's manifest ``name``, ``version`` and ``model_uid`` as the SR and ORU name them."""
    manifest = engine.bundle.manifest
    return ModelIdentity(name=str(manifest["name"]), version=str(manifest["version"]),
                         uid=str(manifest["model_uid"]))


def draft_report(
    engine: Engine,
    series_files: Sequence[Path | str] | Path | str,
    *,
    settings: Settings,
    outbox: Outbox,
    now: datetime | None = None,
) -> ReportRecord:
    """Draft, build and queue the report of one completed, selected series; returns its record.

    Parameters
    ----------
    engine
        The loaded model (:meth:`~neuroscribe.inference.engine.Engine.load`).
    series_files
        Every file of the series (e.g. ``StateStore.instance_paths``), in any order, or its folder.
    settings
        ``[hl7]`` maps the ORU; the outbox's ``[[pacs]]``/``[[ris]]`` are the destinations.
    outbox
        Where the report is kept and queued.
    now
        When the report is made (timezone-aware): SR dates, ORU report time and MSH-7. Default: now.

    Returns
    -------
    ReportRecord
        The new report's row, or the existing one when these instances were already reported on
        (then the model does not run and nothing is queued again).

    Raises
    ------
    DraftError
        Unreadable or inconsistent files, an empty report from the model, or an SR that cannot be built.
    VolumeCheckError
        The series failed a volume check (``series_to_input``).
    StoreError
        The report could not be committed (nothing is queued; a later call makes it).
    """
    if now is not None and now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if isinstance(series_files, str | os.PathLike):
        path = Path(series_files)
        files = folder_files(path) if path.is_dir() else [path]
    else:
        files = [Path(p) for p in series_files]
    headers = read_headers(files)
    first = headers[0]
    series_uid, study_uid = str(first.SeriesInstanceUID), str(first.StudyInstanceUID)
    uids = sr_uids_for(series_uid, [str(ds.SOPInstanceUID) for ds in headers])
    log = LOG.bind(series_uid_hash=hash_uid(series_uid), sr_uid_hash=hash_uid(uids.sop_instance_uid))

    known = outbox.store.report_by_sr_uid(uids.sop_instance_uid)
    if known is not None:
        log.info("report already made", report_id=known.report_id, instances=len(headers))
        return known

    images = series_to_input(files, ModelGrid.from_dict(engine.input_spec))[None]  # (1, S, C, H, W)
    result = engine.generate(images)[0]
    created = now if now is not None else datetime.now(UTC).astimezone()
    model = model_identity(engine)
    try:
        report = DraftReport.from_text(result.text, model, created)
    except ValueError:
        raise DraftError(f"the model wrote no report text ({result.n_tokens} tokens, stopped by "
                         f"{result.stopped_by})") from None
    try:
        sr = build_sr(report, headers, sop_instance_uid=uids.sop_instance_uid,
                      series_instance_uid=uids.series_instance_uid)
    except ValueError as exc:  # build_sr's messages hold no patient data or UIDs
        raise DraftError(f"the SR cannot be built: {exc}") from None

    control_id = new_control_id()
    er7: str | None = None
    try:
        er7 = build_oru(report, first, control_id, OruOptions(**settings.hl7.oru_options()), created)
    except Hl7BuildError as exc:  # no accession or patient ID: the PACS still gets the SR
        log.warning("no ORU for this report; it goes to the PACS only", reason=str(exc))

    record = outbox.enqueue_report(report, sr, er7, control_id if er7 is not None else None,
                                   series_instance_uid=series_uid)
    log.info("report drafted", report_id=record.report_id, study_uid_hash=hash_uid(study_uid),
             instances=len(headers), model=engine.bundle.label, synthetic_model=engine.synthetic,
             tokens=result.n_tokens, stopped_by=result.stopped_by,
             generate_seconds=round(result.seconds, 3), oru=er7 is not None)
    return record
