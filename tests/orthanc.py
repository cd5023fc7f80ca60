"""A real Orthanc PACS for tests: foreground process, temporary config and storage, REST helpers.

Orthanc 1.10 (Debian ``orthanc``) has no bind-address option: its DICOM and HTTP ports listen on
0.0.0.0. The config below keeps it as close to loopback-only as the program allows:

* HTTP: ``RemoteAccessAllowed`` false, so the REST API answers 127.0.0.1 clients only;
* DICOM: ``DicomAlwaysAllowEcho``/``DicomAlwaysAllowStore`` false and ``DicomCheckModalityHost``
  true, so only the AE titles listed in ``DicomModalities`` *from 127.0.0.1* may echo or store;
* ports come from :func:`tests.peers.free_port`, never the defaults 4242/8042.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.peers import LOOPBACK, free_port

#: Where the Debian package installs the server; ``./run test`` installs the package.
ORTHANC_BINARY = "/usr/sbin/Orthanc"
ORTHANC_AET = "ORTHANC"


def orthanc_binary() -> str:
    """Path of the Orthanc executable (PATH first, then the Debian location)."""
    path = shutil.which("Orthanc") or (ORTHANC_BINARY if Path(ORTHANC_BINARY).is_file() else None)
    if path is None:
        pytest.fail("Orthanc not installed: run the suite through ./run test, which installs it")
    return path


@dataclass
class Orthanc:
    """One Orthanc process with its own ports, storage and config under ``root``.

    ``modalities`` maps AE titles allowed to echo/store (from 127.0.0.1) to their listening port
    (Orthanc needs one per entry; 0 picks a free port, where nothing listens unless a test starts it).
    """

    root: Path
    aet: str = ORTHANC_AET
    modalities: dict[str, int] = field(default_factory=lambda: {"NEUROSCRIBE": 0})
    check_called_aet: bool = True
    extra_config: dict[str, Any] = field(default_factory=dict)
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    _outputs: list[Path] = field(default_factory=list)

    # -- process -------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The JSON configuration written to ``root/orthanc.json``."""
        storage = self.root / "storage"
        return {
            "Name": f"neuroscribe-test-{self.dicom_port}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "DicomCheckCalledAet": self.check_called_aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {
                title.lower(): {"AET": title, "Host": LOOPBACK, "Port": port or free_port()}
                for title, port in self.modalities.items()
            },
            "OverwriteInstances": False,
            "UnknownSopClassAccepted": False,
            "WebDavEnabled": False,
            "SaveJobs": False,
            "ExecuteLuaEnabled": False,
            "HttpThreadsCount": 4,
            "DicomThreadsCount": 2,
            "StableAge": 3600,  # no "stable" events while a test runs
            "Plugins": [],
            **self.extra_config,
        }

    def start(self, timeout: float = 20) -> Orthanc:
        """Start (or restart, same ports and storage) and wait until REST ``/system`` answers."""
        if self.running:
            raise RuntimeError("Orthanc already running")
        self.root.mkdir(parents=True, exist_ok=True)
        config_path = self.root / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        out = self.root / f"orthanc.{len(self._outputs)}.log"
        self._outputs.append(out)
        with out.open("wb") as sink:
            self.proc = subprocess.Popen(
                [orthanc_binary(), str(config_path)], cwd=self.root, stdout=sink, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"Orthanc exited early ({self.proc.returncode}):\n{self.logs()}")
            with contextlib.suppress(OSError):
                if self.get("/system").get("DicomAet") == self.aet:
                    return self
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"Orthanc REST did not answer within {timeout} s:\n{self.logs()}")

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash, and a fast teardown (a clean stop takes Orthanc ~3 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def restart(self) -> Orthanc:
        """Stop, then start again on the same ports with the same storage (a PACS that came back)."""
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> str:
        """Everything Orthanc printed, across restarts."""
        return "\n".join(p.read_text(errors="replace") for p in self._outputs if p.exists())

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the REST API (loopback)."""
        return f"http://{LOOPBACK}:{self.http_port}"

    def request(self, method: str, path: str, body: Any = None, timeout: float = 10) -> Any:
        """One REST call; returns the decoded JSON (None for an empty body)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)  # noqa: S310 (loopback http)
        with urllib.request.urlopen(req, timeout=timeout) as response:  # noqa: S310
            raw = response.read()
        return json.loads(raw) if raw else None

    def get(self, path: str) -> Any:
        """GET ``path`` as JSON."""
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        """POST a JSON body to ``path``."""
        return self.request("POST", path, body)

    def studies(self) -> list[str]:
        """Orthanc IDs of all studies."""
        return list(self.get("/studies"))

    def instances(self) -> list[str]:
        """Orthanc IDs of all instances."""
        return list(self.get("/instances"))

    def statistics(self) -> dict[str, Any]:
        """``/statistics``: counts of patients, studies, series and instances."""
        return dict(self.get("/statistics"))

    def find_instances(self, sop_instance_uid: str) -> list[str]:
        """Orthanc IDs of the instances with this SOP Instance UID (0 or 1 unless Orthanc breaks)."""
        return list(self.post("/tools/find", {"Level": "Instance",
                                              "Query": {"SOPInstanceUID": sop_instance_uid}}))

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc ID of the instance with this SOP Instance UID, or None."""
        found = self.find_instances(sop_instance_uid)
        return found[0] if found else None

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        """The instance's tags by keyword (``/instances/{id}/simplified-tags``)."""
        return dict(self.get(f"/instances/{orthanc_id}/simplified-tags"))

    def study_of_instance(self, sop_instance_uid: str) -> str | None:
        """StudyInstanceUID of the study that holds the instance, or None if it is not stored."""
        orthanc_id = self.find_instance(sop_instance_uid)
        if orthanc_id is None:
            return None
        study = self.get(f"/instances/{orthanc_id}/study")
        return str(study["MainDicomTags"]["StudyInstanceUID"])

    def find_study(self, study_instance_uid: str) -> str | None:
        """Orthanc ID of the study with this StudyInstanceUID, or None."""
        query = {"Level": "Study", "Query": {"StudyInstanceUID": study_instance_uid}}
        found = self.post("/tools/find", query)
        return found[0] if found else None

    def study_instance_uids(self, study_instance_uid: str) -> list[str]:
        """SOP Instance UIDs stored under the study (empty if the study is unknown)."""
        orthanc_id = self.find_study(study_instance_uid)
        if orthanc_id is None:
            return []
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in self.get(f"/studies/{orthanc_id}/instances")]
