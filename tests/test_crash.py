"""Crash safety of ingest: ``kill -9`` at any point loses no acknowledged instance."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pydicom

from neuroscribe.dicom_io.writer import CtSeriesSpec, write_ct_series
from neuroscribe.store import SeriesState
from tests.conftest import DCMTK_ENV, SERVER_AE, ServerFactory, decided, storescu

SUCCESS = "Received Store Response (Success)"


def test_kill_9_mid_series_keeps_every_acknowledged_instance(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Kill the server while a series streams in; after restart every acknowledged slice is there."""
    # The quiet period outlasts kill + restart, so the half series does not complete before the resend.
    server = server_factory(NEUROSCRIBE_SERIES__QUIET_SECONDS="10").start()
    spec = CtSeriesSpec(rows=128, columns=128, slices=100)
    files = write_ct_series(spec, tmp_path / "ct")

    scanner = subprocess.Popen(
        ["storescu", "-v", "-aet", "CT_CRASH", "-aec", SERVER_AE, "127.0.0.1", str(server.port),
         *map(str, files)],
        env=DCMTK_ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    assert scanner.stderr is not None
    acknowledged: list[Path] = []
    sending: Path | None = None
    for line in scanner.stderr:
        if match := re.match(r"I: Sending file: (.+)$", line.strip()):
            sending = Path(match.group(1))
        elif SUCCESS in line and sending is not None:
            acknowledged.append(sending)
            if len(acknowledged) == 30:
                server.kill()
                break
    scanner.wait(timeout=60)
    assert len(acknowledged) == 30
    assert scanner.returncode != 0  # the scanner saw the association die

    series_dir = server.root / "spool" / spec.series_instance_uid
    for path in acknowledged:
        sent = pydicom.dcmread(path)
        kept = pydicom.dcmread(series_dir / f"{sent.SOPInstanceUID}.dcm")
        assert kept.PixelData == sent.PixelData

    server.start()  # same root and port
    store = server.state()
    recorded = {h["sop_instance_uid"] for h in store.instance_headers(spec.series_instance_uid)}
    assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in acknowledged} <= recorded
    assert list((server.root / "incoming").iterdir()) == []

    result = storescu(server.port, files, calling_ae="CT_CRASH")  # the scanner retries everything
    assert result.returncode == 0, result.stderr
    row = server.wait_for(decided(spec.series_instance_uid))
    assert (row.state, row.instance_count, row.revision) == (SeriesState.SELECTED, 100, 1)


def test_restart_recovers_every_crash_point_of_the_write_path(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """A partial file is dropped, a renamed-but-unrecorded file is recorded, an open series resumes."""
    server = server_factory().start()
    spec = CtSeriesSpec(rows=32, columns=32, slices=6)
    files = write_ct_series(spec, tmp_path / "ct")
    # Crash point 0: the first four slices were fully acknowledged before the crash.
    assert storescu(server.port, files[:4]).returncode == 0
    server.kill()
    store = server.state()
    assert store.series_row(spec.series_instance_uid).state in (SeriesState.RECEIVING,
                                                                SeriesState.COMPLETE,
                                                                SeriesState.SELECTED)
    store.db.close()

    # Crash point 1: mid-stream, or fsync'd but not yet renamed: a partial file in incoming/.
    partial = server.root / "incoming" / "tmpcrash.part"
    partial.write_bytes(files[5].read_bytes()[:1000])
    # Crash point 2: renamed into the spool, killed before the state row was committed.
    sop4 = str(pydicom.dcmread(files[4]).SOPInstanceUID)
    unrecorded = server.root / "spool" / spec.series_instance_uid / f"{sop4}.dcm"
    shutil.copyfile(files[4], unrecorded)

    server.start()
    assert not partial.exists()
    assert "spool_files_recovered" in server.logs()
    row = server.wait_for(lambda st: (r := st.series_row(spec.series_instance_uid))
                          and r.instance_count == 5 and r)
    assert row.instance_count == 5  # four acknowledged + the recovered one; the partial is gone
    final = server.wait_for(decided(spec.series_instance_uid))
    assert final.state == SeriesState.SELECTED
