"""Service benchmark: scanner -> ``neuroscribe serve`` (demo model) -> SR in Orthanc and ORU at the RIS.

Run by hand: ``./run bench bench_service [--slices 300] [--repeats 3] [--scanners 8] [--quiet 2]``
(``--slices 24`` for a quick check; the quoted figures are for 300).

Real peers, as in tests/test_service.py: ``neuroscribe serve`` as a subprocess with the demo model and
its drafting worker (tests/conftest.py ``make_server``), Orthanc as the PACS (tests/orthanc.py), an
MLLP RIS (tests/peers.py ``Ris``), DCMTK ``storescu`` as the scanners. The series are synthetic
512x512 head-CT phantoms (``neuroscribe synth --size clinical``, written once under benchmarks/out/),
cloned with fresh study, series and instance UIDs for every push, so each push is a new series with a
new report. Settings are the shipped defaults except ``series.quiet_seconds`` (``--quiet``, 2 s) and
the peers; in particular ``series.poll_seconds`` stays 1 s, so completion is seen 0-1 s after the
quiet period ends.

Measured:

a. one series pushed by one scanner, ``--repeats`` times one after the other: from the last
   instance's C-STORE response (the time storescu prints it, read live from its ``-v`` output) to the
   SR appearing in Orthanc (Orthanc's ``/changes`` feed polled every 50 ms), minus the quiet period;
   median (target <= 5 s on CPU). The state database gives the breakdown: last instance -> job
   queued (quiet period + assembler poll), the worker's drafting time (volume, model, SR and ORU),
   report -> SR delivered;
b. ``--scanners`` scanners pushing one series each at once (one storescu process per scanner, each
   with its own calling AE title): nothing lost (every instance recorded, every job delivered, one SR
   per study in Orthanc, one ORU per report at the RIS), ingest throughput (instances/s and MB/s from
   the first association to the last response) and p50/p95/max of last instance -> SR in Orthanc,
   minus the quiet period, per series. The drafting worker is one process, so the series queue for it.

The load average is recorded before and after each phase: on the 2-core build machine other jobs may
hold the CPUs, and every figure is then measured under that contention.
Results: a table, benchmarks/out/bench_service.json, and the JSON as the last line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out"
sys.path.insert(0, str(ROOT))  # tests/ holds the real peers (Orthanc, RIS) and the server wrapper

from tests.conftest import DCMTK_ENV, SERVER_AE, Server, make_server  # noqa: E402
from tests.orthanc import ORTHANC_AET, Orthanc  # noqa: E402
from tests.peers import Ris  # noqa: E402

#: Orthanc's change feed is polled this often (the resolution of "SR in Orthanc").
POLL_SECONDS = 0.05
#: Thinnest slices written: a thin-slice head CT's 0.625 mm (selection refuses below 0.5 mm). 300
#: such slices cover 187.5 mm from the skull base up, a little air above the vertex included.
THINNEST_MM = 0.625


# -- series on disk ------------------------------------------------------------------------------


def template_series(slices: int) -> Path:
    """A synthetic clinical-size (512x512) head CT of ``slices`` slices, written once under OUT."""
    from neuroscribe.training.synth import plan_study, write_study

    folder = OUT / f"service-template-{slices}"
    if len(list(folder.glob("*.dcm"))) != slices:
        shutil.rmtree(folder, ignore_errors=True)
        plan = plan_study(2024, 0, "standard", "clinical", slices=slices, scenario="trauma")
        a = plan.acquisition
        if a.slice_thickness_mm < THINNEST_MM:  # 300 slices over the head would be 0.46 mm: rejected
            plan = replace(plan, acquisition=a.with_(
                slice_thickness_mm=THINNEST_MM,
                slice_step_mm=round(THINNEST_MM / math.cos(math.radians(a.gantry_tilt_deg)), 4)))
        write_study(plan, folder)
    return folder


def clone_series(template: list[Any], out_dir: Path, index: int) -> tuple[str, str, list[Path]]:
    """Write the template's instances with new study/series/instance UIDs; ``(study, series, files)``."""
    from pydicom.uid import generate_uid

    study, series = str(generate_uid()), str(generate_uid())
    out_dir.mkdir(parents=True)
    files = []
    for number, ds in enumerate(template, start=1):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.AccessionNumber = f"BENCH{index:04d}"
        ds.PatientID = f"BENCHPID{index:04d}"
        path = out_dir / f"IMG{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return study, series, files


# -- the scanner and the PACS watcher ------------------------------------------------------------


@dataclass
class Push:
    """One storescu run: when it started, each response's time, its exit status."""

    calling_ae: str
    study_uid: str
    series_uid: str
    files: list[Path]
    started: float = 0.0
    responses: list[float] = field(default_factory=list)
    successes: int = 0
    returncode: int | None = None
    proc: subprocess.Popen[str] | None = None
    _reader: threading.Thread | None = None

    @property
    def last_response(self) -> float:
        """Wall-clock time of the last C-STORE response."""
        return self.responses[-1]

    @property
    def bytes(self) -> int:
        """Size of the files pushed."""
        return sum(p.stat().st_size for p in self.files)

    def start(self, port: int) -> Push:
        """Launch storescu and a thread that timestamps every response line as it arrives."""
        self.started = time.time()
        self.proc = subprocess.Popen(
            ["storescu", "-v", "-aet", self.calling_ae, "-aec", SERVER_AE, "127.0.0.1", str(port),
             *map(str, self.files)],
            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            if "Received Store Response" in line:
                self.responses.append(time.time())
                if "(Success" in line or "(Warning" in line:
                    self.successes += 1

    def wait(self, timeout: float = 900) -> Push:
        """Wait for storescu to exit and its output to be read."""
        assert self.proc is not None and self._reader is not None
        self.returncode = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return self


class PacsWatcher:
    """Polls Orthanc's ``/changes`` and records when each new instance's study first appeared."""

    def __init__(self, orthanc: Orthanc) -> None:
        self.orthanc = orthanc
        self.arrived: dict[str, float] = {}  # StudyInstanceUID -> first new instance seen
        self.instances = 0
        self._since = int(orthanc.get("/changes?last")["Last"])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PacsWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            seen = time.time()
            changes = self.orthanc.get(f"/changes?since={self._since}&limit=100")
            for change in changes["Changes"]:
                if change["ChangeType"] == "NewInstance":
                    self.instances += 1
                    study = self.orthanc.get(f"/instances/{change['ID']}/study")
                    self.arrived.setdefault(str(study["MainDicomTags"]["StudyInstanceUID"]), seen)
            self._since = int(changes["Last"])
            if changes["Done"]:
                self._stop.wait(POLL_SECONDS)

    def wait_for(self, study_uids: list[str], timeout: float) -> bool:
        """True once every study has an instance in Orthanc; False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(uid in self.arrived for uid in study_uids):
                return True
            time.sleep(POLL_SECONDS)
        return False


# -- one phase -----------------------------------------------------------------------------------


def breakdown(server: Server, push: Push) -> dict[str, Any]:
    """The series' job and report from the state database: states, counts and server-side times."""
    from neuroscribe.store import JobStore, OutboxStore

    store = server.state()
    try:
        row = store.series_row(push.series_uid)
        jobs = JobStore(store.db).jobs(series_instance_uid=push.series_uid)
        outbox = OutboxStore(store.db)
        reports = outbox.reports_for_series(push.series_uid)
        items = outbox.items(report_id=reports[-1].report_id) if reports else []
    finally:
        store.db.close()
    job = jobs[-1] if jobs else None
    pacs = next((i for i in items if i.destination.kind.value == "pacs"), None)
    result: dict[str, Any] = {
        "instances_recorded": row.instance_count if row else 0,
        "jobs": [j.state.value for j in jobs],
        "reports": len(reports),
        "control_id": reports[-1].control_id if reports else None,
        "deliveries": {str(i.destination): i.state.value for i in items},
    }
    if job is not None and job.reported_at is not None:
        result.update({
            "server_last_instance_to_queued_s": round(job.created_at - job.last_instance_at, 3),
            "queued_to_reported_s": round(job.reported_at - job.created_at, 3),
            "drafting_s": None if job.inference_seconds is None else round(job.inference_seconds, 3),
            "reported_to_pacs_delivered_s": (round(pacs.delivered_at - job.reported_at, 3)
                                             if pacs and pacs.delivered_at else None),
            "client_last_response_to_server_last_instance_s": round(job.last_instance_at
                                                                    - push.last_response, 3),
        })
    return result


def run_phase(server: Server, watcher: PacsWatcher, ris: Ris, pushes: list[Push], quiet: float,
              timeout: float) -> dict[str, Any]:
    """Push all at once, wait for every SR in Orthanc and every job to end; figures and checks."""
    from neuroscribe.store import JobState, JobStore

    ris_before = len(ris.received)
    load_before = os.getloadavg()
    for push in pushes:
        push.start(server.port)
    for push in pushes:
        push.wait()
    ingest_end = max(p.last_response for p in pushes if p.responses)
    ingest_seconds = ingest_end - min(p.started for p in pushes)
    load_after_ingest = os.getloadavg()
    all_in_pacs = watcher.wait_for([p.study_uid for p in pushes], timeout)

    def finished(store: Any) -> bool:
        jobs = JobStore(store.db)
        ends = [jobs.jobs(series_instance_uid=p.series_uid) for p in pushes]
        return all(found and found[-1].state in (JobState.DELIVERED, JobState.DEAD, JobState.FAILED)
                   for found in ends)

    server.wait_for(finished, timeout=timeout)
    deadline = time.monotonic() + 30  # the ORU may trail the SR by a moment
    while len(ris.received) - ris_before < len(pushes) and time.monotonic() < deadline:
        time.sleep(0.1)
    load_after = os.getloadavg()

    per_series = []
    for push in pushes:
        arrived = watcher.arrived.get(push.study_uid)
        to_sr = None if arrived is None else arrived - push.last_response
        per_series.append({
            "calling_ae": push.calling_ae, "storescu_exit": push.returncode, "stored": push.successes,
            "ingest_s": round(push.last_response - push.started, 3),
            "last_response_to_sr_s": None if to_sr is None else round(to_sr, 3),
            "beyond_quiet_s": None if to_sr is None else round(to_sr - quiet, 3),
            **breakdown(server, push),
        })
    received = ris.received[ris_before:]
    control_ids = [er7.split("\r")[0].split("|")[9] for er7 in received]
    total_bytes = sum(p.bytes for p in pushes)
    instances = sum(len(p.files) for p in pushes)
    beyond = [s["beyond_quiet_s"] for s in per_series if s["beyond_quiet_s"] is not None]
    checks = {
        "every_instance_acknowledged": all(s["stored"] == len(p.files) and s["storescu_exit"] == 0
                                           for s, p in zip(per_series, pushes, strict=True)),
        "every_instance_recorded": all(s["instances_recorded"] == len(p.files)
                                       for s, p in zip(per_series, pushes, strict=True)),
        "every_job_delivered": all(s["jobs"] == ["delivered"] for s in per_series),
        "one_sr_per_study_in_orthanc": all_in_pacs and all(
            len(watcher.orthanc.study_instance_uids(p.study_uid)) == 1 for p in pushes),
        "one_oru_per_report_at_ris": sorted(control_ids) == sorted(s["control_id"] for s in per_series),
    }
    return {
        "series": len(pushes), "slices": len(pushes[0].files), "instances": instances,
        "megabytes": round(total_bytes / 1e6, 1), "ingest_s": round(ingest_seconds, 3),
        "instances_per_s": round(instances / ingest_seconds, 1),
        "mb_per_s": round(total_bytes / 1e6 / ingest_seconds, 1),
        "beyond_quiet_s": {"p50": _pct(beyond, 50), "p95": _pct(beyond, 95), "max": _pct(beyond, 100)},
        "oru_received": len(received), "checks": checks, "ok": all(checks.values()),
        "loadavg_1min": {"before": load_before[0], "after_ingest": load_after_ingest[0],
                         "after": load_after[0]},
        "per_series": per_series,
    }


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


# -- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300, help="slices per series (default 300)")
    parser.add_argument("--repeats", type=int, default=3, help="single-scanner pushes for (a) (default 3)")
    parser.add_argument("--scanners", type=int, default=8, help="concurrent scanners for (b) (default 8)")
    parser.add_argument("--quiet", type=float, default=2.0, help="series.quiet_seconds (default 2)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait per phase")
    args = parser.parse_args()

    import pydicom

    OUT.mkdir(parents=True, exist_ok=True)
    template_dir = template_series(args.slices)
    template = [pydicom.dcmread(p) for p in sorted(template_dir.glob("*.dcm"))]
    with tempfile.TemporaryDirectory(dir=OUT, prefix="bench-service-") as tmp:
        work = Path(tmp)
        made = time.monotonic()
        single = [Push("SCANNER0", *clone_series(template, work / f"a{i}", i)) for i in range(args.repeats)]
        many = [Push(f"SCANNER{i + 1}", *clone_series(template, work / f"b{i}", 100 + i))
                for i in range(args.scanners)]
        print(f"wrote {args.repeats + args.scanners} series of {args.slices} slices in "
              f"{time.monotonic() - made:.0f} s", file=sys.stderr)
        del template

        orthanc = Orthanc(root=work / "orthanc", modalities={SERVER_AE: 0}).start()
        ris = Ris().start()
        server = make_server(
            work / "root",
            NEUROSCRIBE_SERIES__QUIET_SECONDS=str(args.quiet),
            NEUROSCRIBE_SERIES__POLL_SECONDS="1.0",  # the shipped default (make_server sets 0.2)
            NEUROSCRIBE_SELECTION__MIN_SLICES="16",  # the shipped default (make_server sets 4)
            NEUROSCRIBE_LOGGING__LEVEL="INFO",
            NEUROSCRIBE_PACS=json.dumps([{"name": "orthanc", "ae_title": ORTHANC_AET, "host": "127.0.0.1",
                                          "port": orthanc.dicom_port}]),
            NEUROSCRIBE_RIS=json.dumps([{"name": "ris", "host": "127.0.0.1", "port": ris.port}]),
        )
        watcher = PacsWatcher(orthanc).start()
        try:
            server.start(timeout=60)
            single_runs = [run_phase(server, watcher, ris, [push], args.quiet, args.timeout)
                           for push in single]
            concurrent = run_phase(server, watcher, ris, many, args.quiet, args.timeout)
            stopped = server.stop(timeout=60)
        except BaseException:
            print(server.logs()[-6000:], file=sys.stderr)
            raise
        finally:
            watcher.stop()
            server.ensure_stopped()
            orthanc.kill()
            ris.stop()

    beyond = [r["beyond_quiet_s"]["max"] for r in single_runs]
    median = round(float(np.median(beyond)), 3) if None not in beyond else None
    result = {
        "benchmark": "service", "cpus": os.cpu_count(), "slices": args.slices,
        "quiet_seconds": args.quiet, "series_poll_seconds": 1.0, "repeats": args.repeats,
        "single": {"beyond_quiet_s": beyond,
                   "median_beyond_quiet_s": median,
                   "ok": all(r["ok"] for r in single_runs), "runs": single_runs},
        "concurrent": concurrent, "service_exit": stopped,
    }
    print_table(result)
    (OUT / "bench_service.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def print_table(result: dict[str, Any]) -> None:
    """The figures as people read them."""
    print(f"machine: {result['cpus']} cores; quiet period {result['quiet_seconds']:g} s, series poll "
          f"{result['series_poll_seconds']:g} s; {result['slices']}-slice 512x512 series")
    print(f"\n(a) one scanner, one series, {result['repeats']}x: last C-STORE response -> SR in Orthanc")
    print(f"{'run':<5}{'total s':>9}{'- quiet':>9}{'->queued':>10}{'drafting':>10}{'->PACS':>8}"
          f"{'load':>7}  checks")
    for i, run in enumerate(result["single"]["runs"], start=1):
        s = run["per_series"][0]
        print(f"{i:<5}{s['last_response_to_sr_s']:>9.2f}{s['beyond_quiet_s']:>9.2f}"
              f"{s.get('server_last_instance_to_queued_s', float('nan')):>10.2f}"
              f"{s.get('drafting_s') or float('nan'):>10.2f}"
              f"{s.get('reported_to_pacs_delivered_s') or float('nan'):>8.2f}"
              f"{run['loadavg_1min']['before']:>7.2f}  {'ok' if run['ok'] else run['checks']}")
    print(f"median beyond the quiet period: {result['single']['median_beyond_quiet_s']} s (target <= 5 s)")
    c = result["concurrent"]
    print(f"\n(b) {c['series']} scanners at once, {c['instances']} instances, {c['megabytes']} MB")
    print(f"ingest: {c['ingest_s']:.1f} s, {c['instances_per_s']:.1f} instances/s, {c['mb_per_s']:.1f} MB/s")
    q = c["beyond_quiet_s"]
    print(f"last instance -> SR in Orthanc beyond the quiet period: p50 {q['p50']} s, p95 {q['p95']} s, "
          f"max {q['max']} s")
    print(f"{'scanner':<10}{'ingest s':>9}{'->SR s':>8}{'drafting':>10}  jobs / deliveries")
    for s in c["per_series"]:
        print(f"{s['calling_ae']:<10}{s['ingest_s']:>9.2f}{s['last_response_to_sr_s'] or float('nan'):>8.2f}"
              f"{s.get('drafting_s') or float('nan'):>10.2f}  {s['jobs']} {s['deliveries']}")
    print(f"checks: {c['checks']} (ORUs at the RIS: {c['oru_received']})")
    print(f"load average (1 min): before {c['loadavg_1min']['before']:.2f}, after ingest "
          f"{c['loadavg_1min']['after_ingest']:.2f}, after {c['loadavg_1min']['after']:.2f} "
          f"({result['cpus']} cores: above that, other jobs shared the CPUs)")
    print(f"service exit status after SIGTERM: {result['service_exit']}")


if __name__ == "__main__":
    main()
