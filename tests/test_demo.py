"""``neuroscribe demo`` against a real ``neuroscribe serve``: phantom -> SR in Orthanc, ORU at the RIS.

The demo runs as a subprocess with the server's environment, as ``./run demo`` would beside
``./run serve``; Orthanc is the PACS and hl7apy's MLLP server the RIS (:mod:`tests.test_service`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from neuroscribe.daemon.commands.infer import NOTICE, SYNTHETIC_NOTICE
from neuroscribe.store import JobState, JobStore, OutboxStore
from neuroscribe.training.synth import plan_study
from tests.conftest import Server, ServerFactory
from tests.orthanc import Orthanc
from tests.peers import Ris, free_port
from tests.test_service import peer_env

#: TID 2000 section headings as the SR tree prints them.
SR_HEADINGS = ('"Diagnostic Imaging Report"', '"Findings"', '"Impressions"')


def run_demo(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``neuroscribe demo ARGS`` in a subprocess with ``env``."""
    return subprocess.run([sys.executable, "-m", "neuroscribe", "demo", "--timeout", "120", *args],
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)


def series_uid(seed: int, scenario: str = "trauma") -> str:
    """The Series Instance UID of the demo's phantom for ``seed`` (UIDs follow the seed)."""
    return plan_study(seed, 0, "standard", "small", scenario=scenario).series_instance_uid


def only_report(server: Server, seed: int) -> Any:
    """The one report of the seed's series, after checking its job was delivered."""
    store = server.state()
    try:
        uid = series_uid(seed)
        jobs = JobStore(store.db).jobs(series_instance_uid=uid)
        reports = OutboxStore(store.db).reports_for_series(uid)
    finally:
        store.db.close()
    assert [j.state for j in jobs] == [JobState.DELIVERED]
    assert len(reports) == 1
    return reports[0]


def assert_shows_a_report(stdout: str) -> None:
    """The notices, the ground truth, the SR tree and the ORU segments are all printed."""
    assert NOTICE in stdout
    assert SYNTHETIC_NOTICE in stdout
    assert "Ground truth of the phantom" in stdout
    for heading in SR_HEADINGS:
        assert heading in stdout
    assert '"Finding")=' in stdout and '"Impression")=' in stdout
    segments = stdout.split("(ER7, one segment per line) ---\n", 1)[1].splitlines()
    assert segments[0].startswith("MSH|") and "|ORU^R01" in segments[0]
    assert any(line.startswith("OBX|") for line in segments)
    assert "report made" in stdout


def test_demo_delivers_to_orthanc_and_the_ris_and_prints_sr_and_oru(
    server_factory: ServerFactory, orthanc_factory: Any, ris: Ris
) -> None:
    """storescu push -> delivered job; stdout shows notices, SR tree, ORU and both deliveries."""
    orthanc: Orthanc = orthanc_factory(modalities={"NEUROSCRIBE": 0}).start()
    server = server_factory(**peer_env(orthanc, ris)).start()

    done = run_demo(server.env, "--seed", "11")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "with DCMTK storescu" in done.stdout
    assert "(dsrdump)" in done.stdout
    assert_shows_a_report(done.stdout)
    assert "pacs:orthanc" in done.stdout and "ris:ris" in done.stdout
    deliveries = done.stdout.split("--- Delivery (outbox) ---\n", 1)[1].splitlines()
    assert [line.split()[:2] for line in deliveries] == [["pacs:orthanc", "delivered"],
                                                        ["ris:ris", "delivered"]]
    report = only_report(server, 11)
    orthanc_id = orthanc.find_instance(report.sr_sop_instance_uid)
    assert orthanc_id is not None
    assert orthanc.instance_tags(orthanc_id)["Modality"] == "SR"
    assert len(ris.received) == 1 and "ORU^R01" in ris.received[0]
    assert report.control_id in done.stdout  # the ORU printed is the one the RIS acknowledged


def test_demo_without_a_service_exits_1_and_says_how_to_start_it(tmp_path: Path) -> None:
    """Nothing answers C-ECHO: exit 1, "start it with ./run serve", no state database made."""
    root = tmp_path / "root"
    env = {**os.environ, "NEUROSCRIBE_STORAGE__ROOT": str(root), "NEUROSCRIBE_DICOM__PORT": str(free_port())}

    done = run_demo(env, timeout=60)

    assert done.returncode == 1
    assert "start it with ./run serve" in done.stderr.lower()
    assert "C-ECHO" in done.stderr
    assert "Traceback" not in done.stderr
    assert not root.exists()


def test_demo_with_pynetdicom_and_without_dcmtk_tools(server_factory: ServerFactory,
                                                      tmp_path: Path) -> None:
    """``--no-dcmtk`` pushes with pynetdicom; with no DCMTK on PATH the SR tree comes from pydicom."""
    server = server_factory().start()  # no destinations: delivered at once

    forced = run_demo(server.env, "--no-dcmtk", "--seed", "12")

    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "with pynetdicom" in forced.stdout
    assert_shows_a_report(forced.stdout)
    assert "no destinations configured" in forced.stdout
    only_report(server, 12)

    no_tools = tmp_path / "bin"
    no_tools.mkdir()
    bare = run_demo({**server.env, "PATH": str(no_tools)}, "--seed", "13", "--scenario", "trauma")

    assert bare.returncode == 0, bare.stdout + bare.stderr
    assert "with pynetdicom" in bare.stdout
    assert "(pydicom)" in bare.stdout and "(dsrdump)" not in bare.stdout
    assert '(59776-5,LN,"Findings")=SEPARATE' in bare.stdout
    assert_shows_a_report(bare.stdout)
    only_report(server, 13)



def test_demo_offers_every_synthetic_scenario_but_custom() -> None:
    """``--scenario`` choices are the synth scenarios (custom needs findings from code)."""
    from neuroscribe.daemon.commands.demo import SCENARIO_NAMES
    from neuroscribe.training.synth import Scenario

    assert {s.value for s in Scenario} - {"custom"} == set(SCENARIO_NAMES)
