"""``neuroscribe demo``: push one synthetic head-CT study to the running service and show its report.

::

    ./run serve &          # the service, with the demo model (synthetic phantoms only)
    ./run demo             # phantom -> C-STORE -> job -> SR + ORU -> outbox, printed

Talks to the service that the same settings describe (``--config``, ``NEUROSCRIBE_*``): its Storage
SCP at ``dicom.bind``/``dicom.port`` with called AE ``dicom.ae_title`` (a wildcard bind is reached
on loopback), and its state database (``storage.resolved_database_url``), read only in spirit: the
demo never changes a row. Steps:

1. C-ECHO the service; exit 1 with "start it with ./run serve" when nothing answers.
2. Plan and write one synthetic study with findings (:mod:`neuroscribe.training.synth`, numpy only,
   the size the demo model learned from) in a temporary folder.
3. Push it with DCMTK ``storescu`` when on PATH, else (or with ``--no-dcmtk``) pynetdicom
   (:func:`neuroscribe.dicom_io.scu.store`).
4. Follow the series and its job (a progress line per state) until the job is delivered, or dead,
   failed, or ``--timeout`` passes.
5. Print the notice, timings from the last instance received, the phantom's ground truth beside the
   model's draft, the SR as a content tree (``dsrdump`` when present, else a pydicom rendering), the
   ORU one segment per line, and each destination's delivery state.

Everything printed is synthetic (the phantom's made-up patient, the model's text); log lines go to
stderr at WARNING unless ``--verbose``. Exit status: 0 delivered (or no destination configured),
2 when the service's DICOM port speaks TLS only (the demo pushes plain DICOM), 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from neuroscribe.argtypes import non_negative_int
from neuroscribe.config import Settings
from neuroscribe.daemon.commands.infer import notice

#: Scenarios accepted by --scenario (names of ``training.synth.Scenario``; kept here so --help
#: imports nothing heavy). ``custom`` needs findings from code, so it is not offered.
SCENARIO_NAMES = ("trauma", "hypertensive_hemorrhage", "acute_stroke", "old_stroke", "small_vessel",
                  "atrophy", "hydrocephalus", "aneurysmal_sah", "normal")
#: Calling AE title of the demo's pushes and echo (unless the service allows only others).
DEMO_CALLING_AE = "NSDEMO"
#: Wildcard listen addresses and the loopback address that reaches them.
_WILDCARD_BINDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 (compared, not bound)
#: Seconds between two looks at the state database while waiting.
_POLL_SECONDS = 0.25
#: Environment for DCMTK tools: without TCP_NODELAY both ends stall ~45 ms per image on loopback.
_DCMTK_ENV = {"TCP_NODELAY": "1"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Scenario, seed, transport and waiting options."""
    parser.add_argument("--scenario", choices=SCENARIO_NAMES, default="trauma",
                        help="what the phantom shows (default trauma: a subdural haematoma)")
    parser.add_argument("--seed", type=non_negative_int,
                        help="seed of the phantom (default: a new one each run, so each run is a new study)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for the delivered report after the push (default 120)")
    parser.add_argument("--no-dcmtk", action="store_true",
                        help="push with pynetdicom even when DCMTK storescu is on PATH")
    parser.add_argument("--calling-ae", default=None,
                        help=f"calling AE title (default {DEMO_CALLING_AE}, or the first of "
                             "dicom.allowed_calling_aes when that list excludes it)")
    parser.add_argument("--verbose", action="store_true", help="log at the configured level (stderr)")


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Echo, make, push, wait, show; 0 when the report was delivered (or had nowhere to go)."""
    from neuroscribe.log import configure_logging

    # stdout is for the demo's own output; log lines go to stderr.
    configure_logging(level=settings.logging.level if args.verbose else "WARNING",
                      fmt=settings.logging.format, stream=sys.stderr)
    if not args.verbose:  # a refused echo is reported below in words, not as pynetdicom's errors
        for name in ("pynetdicom", "py.warnings"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if settings.dicom.tls.enabled:
        print("neuroscribe demo: the service's DICOM port speaks TLS only ([dicom.tls]); the demo pushes "
              "plain DICOM. Run it against a service without [dicom.tls].", file=sys.stderr)
        return 2
    peer = _service_peer(settings, args.calling_ae)
    if not _echo(peer):
        return 1
    print(f"NeuroScribe answers C-ECHO at {peer.describe()}.")

    from neuroscribe.training.synth import plan_study, write_study

    seed = args.seed if args.seed is not None else secrets.randbelow(1_000_000)
    plan = plan_study(seed, 0, "standard", "small", scenario=args.scenario)
    thickest = settings.selection.slice_thickness_max_mm
    if plan.acquisition.slice_thickness_mm > thickest:  # thinner slices, or the service rejects it
        coverage = plan.acquisition.slices * plan.acquisition.slice_thickness_mm
        plan = plan_study(seed, 0, "standard", "small", scenario=args.scenario,
                          slices=math.ceil(coverage / (0.95 * thickest)))
    with tempfile.TemporaryDirectory(prefix="neuroscribe-demo-") as tmp:
        files = write_study(plan, Path(tmp) / "ct")
        a = plan.acquisition
        kinds = ", ".join(f.kind.value for f in plan.findings) or "none (a normal study)"
        print(f"Made a synthetic head CT (seed {seed}, scenario {args.scenario}): {len(files)} slices of "
              f"{a.rows}x{a.columns}; findings: {kinds}.")
        use_dcmtk = not args.no_dcmtk and shutil.which("storescu") is not None
        started = time.monotonic()
        error = _push_storescu(peer, files) if use_dcmtk else _push_pynetdicom(peer, files)
        if error:
            print(f"neuroscribe demo: the push failed: {error}", file=sys.stderr)
            return 1
        print(f"Pushed {len(files)} instances with {'DCMTK storescu' if use_dcmtk else 'pynetdicom'} "
              f"in {time.monotonic() - started:.1f} s.")
    return _follow_and_show(settings, plan, args.timeout)


# -- talking to the service --------------------------------------------------------------------


def _service_peer(settings: Settings, calling_ae: str | None) -> Any:
    """The service's SCP as a :class:`~neuroscribe.dicom_io.scu.PacsPeer`, called from loopback."""
    from neuroscribe.dicom_io.scu import PacsPeer

    dicom = settings.dicom
    if calling_ae is None:
        allowed = dicom.allowed_calling_aes
        calling_ae = allowed[0] if allowed and DEMO_CALLING_AE not in allowed else DEMO_CALLING_AE
    host = _WILDCARD_BINDS.get(dicom.bind, dicom.bind)
    return PacsPeer(ae_title=dicom.ae_title, host=host, port=dicom.port, calling_ae_title=calling_ae)


def _echo(peer: Any) -> bool:
    """C-ECHO the service; print what to do when it does not answer."""
    from neuroscribe.dicom_io.scu import Timeouts, echo

    result = echo(peer, timeout=Timeouts(connect=5, acse=10, dimse=10, network=10))
    if not result:
        print(f"neuroscribe demo: no NeuroScribe service answers C-ECHO at {peer.describe()} "
              f"({result.reason}).\nStart it with ./run serve (with the same --config and NEUROSCRIBE_* "
              "settings as this command), then run the demo again.", file=sys.stderr)
    return bool(result)


def _push_storescu(peer: Any, files: Sequence[Path]) -> str | None:
    """Send with DCMTK storescu; None on success, else why (no patient data: statuses only)."""
    done = subprocess.run(
        ["storescu", "-v", "-aet", peer.calling_ae_title, "-aec", peer.ae_title, peer.host, str(peer.port),
         *map(str, files)],
        env={**os.environ, **_DCMTK_ENV}, capture_output=True, text=True, timeout=300, check=False,
    )
    stored = sum(1 for line in done.stderr.splitlines()
                 if "Received Store Response (Success" in line or "Received Store Response (Warning" in line)
    if done.returncode == 0 and stored == len(files):
        return None
    tail = [line for line in done.stderr.splitlines() if line.startswith(("E:", "F:"))][-3:]
    return f"storescu exit {done.returncode}, {stored}/{len(files)} stored; {' '.join(tail)}".strip()


def _push_pynetdicom(peer: Any, files: Sequence[Path]) -> str | None:
    """Send with pynetdicom on one association; None on success, else why."""
    from neuroscribe.dicom_io.scu import store

    result = store(peer, files)
    return None if result else result.reason


# -- waiting for the report ----------------------------------------------------------------------


def _follow_and_show(settings: Settings, plan: Any, timeout: float) -> int:
    """Wait for the series' job to end, then print what the service made of it."""
    from neuroscribe.store import Database, JobState, JobStore, OutboxStore, StateStore

    url = settings.storage.resolved_database_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        print(f"neuroscribe demo: no state database at {url.removeprefix('sqlite:///')}: is the service "
              "running with the same settings (--config, NEUROSCRIBE_STORAGE__ROOT)?", file=sys.stderr)
        return 1
    db = Database(url)
    try:
        state, jobs, outbox = StateStore(db), JobStore(db), OutboxStore(db)
        quiet = settings.series.quiet_seconds
        print(f"Waiting for the report (series complete after {quiet:g} s of quiet, then the model; "
              f"timeout {timeout:g} s):")
        finished = False
        for label, finished in _progress(state, jobs, plan.series_instance_uid, timeout):
            print(f"  {label}", flush=True)
            if finished:
                break
        found = jobs.jobs(series_instance_uid=plan.series_instance_uid)
        job = found[-1] if found else None
        if job is None:
            row = state.series_row(plan.series_instance_uid)
            why = "no job yet" if not finished or row is None else row.reason_detail or row.reason
            print(f"neuroscribe demo: no report on the series within {timeout:g} s ({why}): see the "
                  "service's log, or run again with a larger --timeout.", file=sys.stderr)
            return 1
        if job.state in (JobState.FAILED, JobState.SUPERSEDED):
            print(f"neuroscribe demo: the job ended {job.state.value}: {job.reason}", file=sys.stderr)
            return 1
        reports = outbox.reports_for_series(plan.series_instance_uid)
        if not reports:
            print(f"neuroscribe demo: no report within {timeout:g} s (job {job.state.value}): the service "
                  "may be busy; see its log, or run again with a larger --timeout.", file=sys.stderr)
            return 1
        report = reports[-1]
        _show(settings, plan, job, report, outbox.items(report_id=report.report_id))
        if job.state != JobState.DELIVERED:
            print(f"neuroscribe demo: the report was not delivered within {timeout:g} s (job "
                  f"{job.state.value}); see the delivery states above and `neuroscribe outbox list`.",
                  file=sys.stderr)
            return 1
        return 0
    finally:
        db.close()


def _progress(state: Any, jobs: Any, series_uid: str, timeout: float) -> Iterator[tuple[str, bool]]:
    """Yield ``(line, finished)`` at each change of the series' or job's state, until it ends or
    ``timeout`` passes (a rejected series, or a job in a final state, ends it)."""
    from neuroscribe.store import SeriesState
    from neuroscribe.store.jobs import FINAL_STATES

    started = time.monotonic()
    deadline = started + timeout
    last = None
    while time.monotonic() < deadline:
        row = state.series_row(series_uid)
        found = jobs.jobs(series_instance_uid=series_uid)
        job = found[-1] if found else None
        if job is not None:
            current = f"job {job.state.value}"
        elif row is not None:
            current = f"series {row.state.value.lower()} ({row.instance_count} instances)"
        else:
            current = "series not yet recorded"
        rejected = job is None and row is not None and row.state == SeriesState.REJECTED
        finished = rejected or (job is not None and job.state in FINAL_STATES)
        if current != last or finished:  # a finished state is always new: it ends the loop
            last = current
            yield f"[{time.monotonic() - started:6.1f} s] {current}", finished
        if finished:
            return
        time.sleep(_POLL_SECONDS)


# -- showing the result --------------------------------------------------------------------------


def _show(settings: Settings, plan: Any, job: Any, report: Any, items: Sequence[Any]) -> None:
    """Print the notice, timings, ground truth and draft, SR tree, ORU and deliveries."""
    from pydicom import dcmread

    from neuroscribe.reporting.outbox import ER7_FILE_ENCODING, reports_dir

    root = reports_dir(settings)
    sr_path = root / report.sr_file
    sr = dcmread(sr_path)
    synthetic = _synthetic_model(settings, report.model_name, report.model_version)
    print()
    print(notice(synthetic is not False))
    if synthetic is None:
        print(f"(The model {report.model_name} {report.model_version} was not found beside the service's "
              "settings; read its model card before trusting any of its text.)")
    print()
    print(f"Model: {report.model_name} {report.model_version}")
    print("Timings, from the last instance received:")
    quiet = settings.series.quiet_seconds
    rows = [(f"job queued (after the quiet period of {quiet:g} s)", job.created_at)]
    if job.reported_at is not None:
        rows.append(("report made (SR and ORU written)", job.reported_at))
    for item in items:
        if item.delivered_at is not None:
            rows.append((f"delivered to {item.destination}", item.delivered_at))
    for label, at in rows:
        print(f"  {at - job.last_instance_at:7.2f} s  {label}")
    if job.inference_seconds is not None:
        print(f"  ({job.inference_seconds:.2f} s of it in the model: volume, vision encoder, decoding)")

    print("\n--- Ground truth of the phantom (what the report should say) ---")
    print(plan.report)
    print("\n--- The model's draft (from the SR) ---")
    print("\n".join(_draft_lines(sr)))
    if synthetic:
        print("(The demo model often misses what the phantom shows: its model card, docs/MODEL_CARD.md, "
              "says how often and why.)")

    print(f"\n--- DICOM SR ({report.sr_file} under {root}) ---")
    print("\n".join(_sr_tree(sr_path, sr)))

    print("\n--- HL7 ORU^R01 (ER7, one segment per line) ---")
    if report.er7_file is None:
        print("(no ORU was made: no RIS is configured)")
    else:
        er7 = (root / report.er7_file).read_bytes().decode(ER7_FILE_ENCODING)
        print("\n".join(segment for segment in er7.replace("\r\n", "\r").split("\r") if segment))

    print("\n--- Delivery (outbox) ---")
    if not items:
        print("no destinations configured ([[pacs]], [[ris]]): the report stays in the reports folder")
    for item in sorted(items, key=lambda i: str(i.destination)):  # PACS before RIS, by name
        when = f" after {item.delivered_at - job.last_instance_at:.2f} s" if item.delivered_at else ""
        reason = f" ({item.last_reason})" if item.last_reason and item.state.value != "delivered" else ""
        print(f"  {item.destination!s:<24} {item.state.value:<10} attempts {item.attempts}{when}{reason}")


def _synthetic_model(settings: Settings, name: str, version: str) -> bool | None:
    """``synthetic_training_data`` of the bundle with this name and version, or None if not found.

    Looks where the worker finds its model: the configured bundle, the registry, the demo bundle.
    """
    from neuroscribe.daemon.worker import DEMO_BUNDLE
    from neuroscribe.training.registry import BUNDLES_DIR  # no torch: registry only

    registry = Path(settings.models.dir or settings.storage.models_dir) / BUNDLES_DIR
    candidates = [Path(settings.models.bundle)] if settings.models.bundle else []
    candidates += sorted(registry.iterdir()) if registry.is_dir() else []
    candidates.append(DEMO_BUNDLE)
    for folder in candidates:
        manifest = _manifest_or_none(folder)
        if manifest and str(manifest.get("name")) == name and str(manifest.get("version")) == version:
            return bool(manifest.get("synthetic_training_data", False))
    return None


def _manifest_or_none(folder: Path) -> dict[str, Any] | None:
    """The bundle manifest in ``folder``, or None when it holds no readable bundle."""
    from neuroscribe.inference.bundle import BundleError, read_manifest

    try:
        return read_manifest(folder)
    except BundleError:
        return None


def _draft_lines(sr: Any) -> list[str]:
    """The report's text lines from the SR: each section's heading, then its statements."""
    lines: list[str] = []
    for section in getattr(sr, "ContentSequence", []):
        if section.ValueType != "CONTAINER":
            continue
        lines.append(f"{_concept(section)}:")
        lines += [str(item.TextValue) for item in getattr(section, "ContentSequence", [])
                  if item.ValueType == "TEXT" and _concept(item) != "Comment"]
    return lines


def _sr_tree(path: Path, sr: Any) -> list[str]:
    """``dsrdump`` of the SR (full values), or the content tree rendered with pydicom."""
    if shutil.which("dsrdump"):
        done = subprocess.run(["dsrdump", "+Pl", "+U8", str(path)], capture_output=True, text=True,
                              timeout=60, check=False)
        if done.returncode == 0 and done.stdout.strip():
            return ["(dsrdump)", *done.stdout.rstrip().splitlines()]
    lines = [f"(pydicom) {sr.SOPClassUID.name}; completion {sr.get('CompletionFlag', '?')}, "
             f"verification {sr.get('VerificationFlag', '?')}", "",
             f"<CONTAINER:{_code(sr)}={sr.get('ContinuityOfContent', '')}>"]
    lines += _render_items(getattr(sr, "ContentSequence", []), 1)
    return lines


def _render_items(items: Sequence[Any], depth: int) -> list[str]:
    lines = []
    for item in items:
        relation = str(item.get("RelationshipType", "")).lower()
        lines.append(f"{'  ' * depth}<{relation} {item.ValueType}:{_code(item)}={_value(item)}>")
        lines += _render_items(getattr(item, "ContentSequence", []), depth + 1)
    return lines


def _concept(item: Any) -> str:
    names = item.get("ConceptNameCodeSequence")
    return str(names[0].CodeMeaning) if names else ""


def _code(item: Any) -> str:
    names = item.get("ConceptNameCodeSequence")
    if not names:
        return "()"
    code = names[0]
    return f'({code.get("CodeValue", "")},{code.get("CodingSchemeDesignator", "")},"{code.CodeMeaning}")'


def _value(item: Any) -> str:
    kind = item.ValueType
    if kind == "TEXT":
        return f'"{item.TextValue}"'
    if kind == "CODE":
        code = item.ConceptCodeSequence[0]
        return f'({code.get("CodeValue", "")},{code.get("CodingSchemeDesignator", "")},"{code.CodeMeaning}")'
    if kind == "UIDREF":
        return f'"{item.UID}"'
    if kind == "CONTAINER":
        return str(item.get("ContinuityOfContent", ""))
    if kind == "NUM":
        measured = item.get("MeasuredValueSequence")
        return f'"{measured[0].NumericValue}"' if measured else '""'
    return "..."
