"""systemd: the unit, sysusers and tmpfiles files under systemd-analyze, and sd_notify from the service.

The sandbox test runs ``neuroscribe serve`` and ONNX Runtime under the seccomp parts of the unit's
sandbox (SystemCallFilter=, SystemCallErrorNumber=, MemoryDenyWriteExecute=,
RestrictAddressFamilies=), rebuilt with libseccomp from the unit file, because the test machine has
no systemd as PID 1 to start the unit itself. The namespace and cgroup parts (ProtectSystem=,
PrivateTmp=, DevicePolicy=, ...) are only checked by ``systemd-analyze``.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from neuroscribe.config import DicomSettings, load_settings
from neuroscribe.daemon import systemd
from neuroscribe.daemon.service import SHUTDOWN_GRACE_SECONDS
from neuroscribe.dicom_io.writer import CtSeriesSpec, write_ct_series
from neuroscribe.store import SeriesState
from tests.conftest import Server, decided, echoscu, make_server, require_tool, storescu

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "neuroscribe.service"
SYSUSERS = REPO / "systemd" / "neuroscribe.sysusers"
TMPFILES = REPO / "systemd" / "neuroscribe.tmpfiles"
EXAMPLE_CONFIG = REPO / "systemd" / "neuroscribe.toml"
#: What ``systemd-analyze security --offline=true`` scored the unit (systemd 252); 0 best, 10 worst.
MEASURED_EXPOSURE = 1.5
#: Room for a future directive before the test asks for a decision (about one medium item).
EXPOSURE_SLACK = 0.2
INSTALLED_BINARY = "/opt/neuroscribe/.venv/bin/neuroscribe"


# -- the unit file ------------------------------------------------------------------------------


def unit_entries(path: Path = UNIT) -> list[tuple[str, str, str]]:
    """(section, key, value) of every assignment, in order (the unit uses no line continuations)."""
    entries, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def values(key: str, section: str = "Service") -> list[str]:
    """Every value assigned to ``key`` in ``section``."""
    return [v for s, k, v in unit_entries() if s == section and k == key]


def value(key: str, section: str = "Service") -> str:
    """The one value of ``key``; fails if it is missing or assigned twice."""
    found = values(key, section)
    assert len(found) == 1, f"{section}.{key} is assigned {len(found)} times, expected once"
    return found[0]


def seconds(text: str) -> float:
    """A systemd time span such as ``90``, ``5s``, ``5min`` or ``10min`` in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m|h)?", text)
    assert match, f"unsupported time span {text!r}"
    return float(match.group(1)) * {None: 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}[match.group(2)]


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``systemd-analyze`` without pager or colours."""
    require_tool("systemd-analyze")
    env = {**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def runnable_unit(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart is this checkout's ``neuroscribe`` (which exists here)."""
    binary = Path(sys.executable).parent / "neuroscribe"
    assert binary.is_file(), f"{binary} missing: install the package into the venv (./run test)"
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(INSTALLED_BINARY, str(binary)))
    return copy


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` says nothing about the unit once its binary exists."""
    result = analyze("verify", str(runnable_unit(tmp_path)))
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "neuroscribe" in line]
    assert ours == []
    assert result.returncode == 0


def test_shipped_unit_only_lacks_the_installed_binary() -> None:
    """The file as shipped differs from the verified copy only in its ExecStart path."""
    result = analyze("verify", str(UNIT))
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "neuroscribe" in line and f"{INSTALLED_BINARY} is not executable" not in line]
    assert complaints == []


def test_exposure_score_stays_at_the_measured_level() -> None:
    """``systemd-analyze security --offline`` keeps the exposure at the measured 1.5 (+ slack)."""
    result = analyze("security", "--offline=true", str(UNIT))
    match = re.search(r"Overall exposure level for neuroscribe\.service: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MEASURED_EXPOSURE + EXPOSURE_SLACK, result.stdout


def test_unit_states_the_lifecycle_the_service_implements() -> None:
    """Type=notify with a watchdog, restarts on failure, and a stop bound the shutdown fits in."""
    assert value("Type") == "notify"
    assert value("NotifyAccess") == "main"
    assert seconds(value("WatchdogSec")) == 60
    assert value("Restart") == "on-failure"
    assert value("KillMode") == "mixed"
    assert value("ExecStart") == f"{INSTALLED_BINARY} --config /etc/neuroscribe/neuroscribe.toml serve"
    assert (value("User"), value("Group")) == ("neuroscribe", "neuroscribe")
    # stop(): one association may take dimse_timeout_seconds to end, then the assembler its grace.
    needed = DicomSettings().dimse_timeout_seconds + SHUTDOWN_GRACE_SECONDS
    assert seconds(value("TimeoutStopSec")) >= needed


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("NoNewPrivileges", "yes"), ("CapabilityBoundingSet", ""), ("ProtectSystem", "strict"),
        ("ReadWritePaths", "/var/lib/neuroscribe"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
        ("PrivateMounts", "yes"), ("ProtectProc", "invisible"), ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"), ("ProtectKernelLogs", "yes"), ("ProtectControlGroups", "yes"),
        ("ProtectClock", "yes"), ("ProtectHostname", "yes"), ("PrivateIPC", "yes"), ("RemoveIPC", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"), ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"), ("RestrictSUIDSGID", "yes"), ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"), ("SystemCallArchitectures", "native"),
        ("SystemCallErrorNumber", "EPERM"), ("UMask", "0027"), ("DevicePolicy", "closed"),
        ("DeviceAllow", "char-nvidia* rw"), ("LimitNOFILE", "65536"),
    ],
)
def test_hardening_directive_is_set(key: str, expected: str) -> None:
    """Each sandbox directive the exposure score was measured with is still there."""
    assert value(key) == expected


def test_syscall_filter_and_devices() -> None:
    """@system-service without @privileged; the GPU stays visible (no PrivateDevices)."""
    assert values("SystemCallFilter") == ["@system-service", "~@privileged"]
    assert values("PrivateDevices") == []
    assert values("AmbientCapabilities") == []  # port 11112 needs none; 104 is a site drop-in


def test_state_folder_matches_the_example_config() -> None:
    """The example config's storage root (and so its logs and models) is the writable folder."""
    settings = load_settings(EXAMPLE_CONFIG)
    writable = Path(value("ReadWritePaths"))
    models = settings.models.dir or settings.storage.models_dir
    for folder in (settings.storage.root, settings.storage.log_dir, models):
        assert folder == writable or writable in folder.parents
    assert value("WorkingDirectory") == str(writable)


def test_sysusers_and_tmpfiles_create_the_user_and_folders(tmp_path: Path) -> None:
    """systemd-sysusers and systemd-tmpfiles accept the files and make the user and 0750 folders."""
    require_tool("systemd-sysusers")
    require_tool("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    sysusers = subprocess.run(["systemd-sysusers", f"--root={root}", str(SYSUSERS)],
                              capture_output=True, text=True, timeout=60, check=False)
    assert sysusers.returncode == 0, sysusers.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    assert passwd["neuroscribe"][5] == "/var/lib/neuroscribe"
    assert passwd["neuroscribe"][6].endswith("nologin")

    tmpfiles = subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", str(TMPFILES)],
                              capture_output=True, text=True, timeout=60, check=False)
    if os.geteuid() == 0:
        assert tmpfiles.returncode == 0, tmpfiles.stderr
    else:  # without root only the ownership changes fail; every line still parsed
        assert all("fchownat()" in line for line in tmpfiles.stderr.splitlines()), tmpfiles.stderr
    uid = int(passwd["neuroscribe"][2])
    for folder in ("var/lib/neuroscribe", "var/lib/neuroscribe/logs", "var/lib/neuroscribe/models",
                   "etc/neuroscribe"):
        stat = (root / folder).stat()
        assert stat.st_mode & 0o777 == 0o750, folder
        if os.geteuid() == 0:
            assert stat.st_uid == (0 if folder.startswith("etc") else uid), folder
            assert stat.st_gid == uid, folder


# -- sd_notify ----------------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket in the abstract namespace, as systemd's; yields ($NOTIFY_SOCKET, socket)."""
    name = f"neuroscribe-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        yield "@" + name, sock
    finally:
        sock.close()


def receive(sock: socket.socket, timeout: float) -> str | None:
    """The next datagram's text, or None after ``timeout`` seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(4096).decode()
    except TimeoutError:
        return None


def test_notify_reaches_path_and_abstract_sockets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, receiver: tuple[str, socket.socket]
) -> None:
    """notify() sends one datagram to a file-system socket and to an ``@`` (abstract) name."""
    address, abstract = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert systemd.notify("READY=1\nSTATUS=up")
    assert receive(abstract, 5) == "READY=1\nSTATUS=up"

    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert systemd.notify("WATCHDOG=1")
        assert receive(sock, 5) == "WATCHDOG=1"


@pytest.mark.parametrize("address", [None, "", "relative/notify.sock", "/nonexistent/notify.sock",
                                     "vsock:2:1234"])
def test_notify_without_a_usable_socket_is_false(
    monkeypatch: pytest.MonkeyPatch, address: str | None
) -> None:
    """No socket, an unsupported address or a send failure: False, never an exception."""
    if address is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert systemd.notify("READY=1") is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [("60000000", None, 60.0), ("2000000", "self", 2.0), ("2000000", "1", None), (None, None, None),
     ("0", None, None), ("soon", None, None), ("2000000", "me", None)],
)
def test_watchdog_interval_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    """$WATCHDOG_USEC in seconds, only for the process $WATCHDOG_PID names (when set)."""
    for name, text in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if text is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if text == "self" else text)
    assert systemd.watchdog_interval() == expected


def test_watchdog_pings_only_while_every_loop_beats() -> None:
    """A stale heartbeat withholds WATCHDOG=1 (one STATUS line says why); a beat or stopping resumes."""
    now = [100.0]
    sent: list[str] = []
    beat = systemd.Heartbeat(stale_after=5, clock=lambda: now[0])
    watchdog = systemd.Watchdog(2.0, {"series assembler": beat}, notify_fn=lambda s: sent.append(s) or True)

    assert watchdog.check()
    now[0] += 6
    assert not watchdog.check()
    assert not watchdog.check()
    assert sent == ["WATCHDOG=1",
                    "STATUS=Unhealthy: no progress in series assembler; systemd will restart"]
    beat.beat()
    assert watchdog.check()
    now[0] += 6
    watchdog.stopping = True
    assert watchdog.check()
    assert sent[2:] == ["WATCHDOG=1", "WATCHDOG=1"]


def test_heartbeat_rejects_a_non_positive_staleness() -> None:
    """Heartbeat(stale_after=0) raises, naming the argument."""
    with pytest.raises(ValueError, match="stale_after"):
        systemd.Heartbeat(stale_after=0)


def start_serve(server: Server, env: dict[str, str], prefix: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """``neuroscribe serve`` with ``env`` (optionally under a launcher ``prefix``); stdout to a file."""
    with server.output.with_suffix(".log").open("wb") as sink:
        return subprocess.Popen([*prefix, sys.executable, "-m", "neuroscribe", "serve"], env=env,
                                stdout=sink, stderr=subprocess.STDOUT)


def output_of(server: Server) -> str:
    """What the process printed."""
    path = server.output.with_suffix(".log")
    return path.read_text(errors="replace") if path.exists() else ""


def notify_env(server: Server, address: str, watchdog_usec: int) -> dict[str, str]:
    """The server's environment plus what systemd sets for a Type=notify unit with a watchdog."""
    env = {**server.env, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": str(watchdog_usec)}
    env.pop("WATCHDOG_PID", None)  # systemd names the main PID; unset means "whoever reads it"
    return env


@pytest.mark.slow
def test_serve_notifies_ready_watchdog_and_stopping(
    tmp_path: Path, receiver: tuple[str, socket.socket]
) -> None:
    """READY=1 once C-ECHO works, WATCHDOG=1 each second for a 2 s watchdog, STOPPING=1 and exit 0."""
    address, sock = receiver
    server = make_server(tmp_path / "server")
    proc = start_serve(server, notify_env(server, address, 2_000_000))
    try:
        before_ready: list[str] = []
        while (message := receive(sock, 30)) is not None and "READY=1" not in message.split("\n"):
            before_ready.append(message)
        assert message is not None, f"no READY=1 within 30 s\n{output_of(server)}"
        assert echoscu(server.port), "READY=1 came before the SCP answered C-ECHO"
        assert not [m for m in before_ready if "WATCHDOG=1" in m]
        assert re.search(r"^STATUS=Receiving as NEUROSCRIBE on 127\.0\.0\.1:\d+; 0 open series",
                         message, re.MULTILINE), message

        pings, deadline = 0, time.monotonic() + 3.2
        while (left := deadline - time.monotonic()) > 0 and (message := receive(sock, left)) is not None:
            pings += message == "WATCHDOG=1"
        assert pings >= 2

        proc.send_signal(signal.SIGTERM)
        messages = []
        while (message := receive(sock, 10)) is not None and "STOPPING=1" not in message.split("\n"):
            messages.append(message)
        assert message is not None, f"no STOPPING=1 after SIGTERM\n{messages}\n{output_of(server)}"
        assert proc.wait(timeout=seconds(value("TimeoutStopSec"))) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the unit's seccomp filters, applied without systemd -----------------------------------------

#: Installs seccomp filters like systemd's from a JSON spec, then execs the command:
#: ``python -c LAUNCHER SPEC -- COMMAND...``. Filters: address families and W+X memory (default
#: allow), then the system call allow-list whose default is SystemCallErrorNumber's errno.
LAUNCHER = r"""
import ctypes, ctypes.util, errno, json, os, sys

spec, command = json.loads(sys.argv[1]), sys.argv[3:]
lib = ctypes.CDLL(ctypes.util.find_library("seccomp"), use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_load.argtypes = [ctypes.c_void_p]

class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                       ctypes.POINTER(Cmp)]
ALLOW, EQ, MASKED_EQ = 0x7FFF0000, 4, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 2, 4, 0o100000

def errno_action(number):
    return 0x00050000 | number

def rule(ctx, action, name, *cmps):
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        return  # not a system call of this architecture
    array = (Cmp * len(cmps))(*[Cmp(*c) for c in cmps]) if cmps else None
    if lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array) < 0:
        raise OSError(f"seccomp_rule_add {name}")

def load(ctx):
    if lib.seccomp_load(ctx) < 0:
        raise OSError("seccomp_load")

ctx = lib.seccomp_init(ALLOW)
for family in range(64):
    if family not in spec["families"]:
        rule(ctx, errno_action(errno.EAFNOSUPPORT), "socket", (0, EQ, family, 0))
if spec["mdwe"]:
    for name in ("mmap", "mmap2"):
        both = PROT_WRITE | PROT_EXEC
        rule(ctx, errno_action(errno.EPERM), name, (2, MASKED_EQ, both, both))
    for name in ("mprotect", "pkey_mprotect"):
        rule(ctx, errno_action(errno.EPERM), name, (2, MASKED_EQ, PROT_EXEC, PROT_EXEC))
    rule(ctx, errno_action(errno.EPERM), "shmat", (2, MASKED_EQ, SHM_EXEC, SHM_EXEC))
load(ctx)
ctx = lib.seccomp_init(errno_action(spec["errno"]))
for name in spec["allow"]:
    rule(ctx, ALLOW, name)
load(ctx)
os.execv(command[0], command)
"""

#: What the inference worker does, in small: decode compressed CT pixel data (pydicom with the
#: pylibjpeg/pyjpegls plug-ins), and run an ONNX graph with ONNX Runtime's default threading (which
#: pins its threads to cores). Prints one line per step.
WORKER_CHECK = r"""
import tempfile
from pathlib import Path
import numpy as np, onnxruntime as ort, pydicom
from onnx import TensorProto, helper, numpy_helper
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless
from neuroscribe.dicom_io.writer import CtSeriesSpec, write_ct_series

folder = Path(tempfile.mkdtemp())
plain = write_ct_series(CtSeriesSpec(rows=64, columns=64, slices=1), folder)[0]
expected = pydicom.dcmread(plain).pixel_array
for syntax in (JPEG2000Lossless, JPEGLSLossless, RLELossless):
    ds = pydicom.dcmread(plain)
    ds.compress(syntax)
    ds.save_as(folder / "c.dcm", enforce_file_format=True)
    assert np.array_equal(pydicom.dcmread(folder / "c.dcm").pixel_array, expected)
    print("decoded", syntax.name)

rng = np.random.default_rng(0)
weight = numpy_helper.from_array(rng.standard_normal((256, 256)).astype(np.float32), "w")
nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
         helper.make_node("Gelu", ["h"], ["g"], domain="com.microsoft"),
         helper.make_node("Softmax", ["g"], ["y"], axis=-1)]
x, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, 256]) for name in "xy")
graph = helper.make_graph(nodes, "check", [x], [y], [weight])
opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
model = helper.make_model(graph, opset_imports=opsets)
session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
y = session.run(None, {"x": rng.standard_normal((64, 256)).astype(np.float32)})[0]
assert np.allclose(y.sum(axis=-1), 1.0, atol=1e-4)
print("onnxruntime ok")
"""


def syscall_groups() -> dict[str, list[str]]:
    """systemd's system call groups (``systemd-analyze syscall-filter``), members unexpanded."""
    result = analyze("syscall-filter")
    assert result.returncode == 0, result.stderr
    groups: dict[str, list[str]] = {}
    current = ""
    for line in result.stdout.splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if not line[0].isspace():
            current = text
            groups[current] = []
        else:
            groups[current].append(text)
    return groups


def expand(item: str, groups: dict[str, list[str]]) -> set[str]:
    """The system calls an item of SystemCallFilter= names (groups expanded)."""
    if not item.startswith("@"):
        return {item}
    return {call for member in groups[item] for call in expand(member, groups)}


def seccomp_spec() -> dict[str, object]:
    """The unit's seccomp settings as the launcher's JSON spec.

    As systemd does: an allow-list starts from @default, ``~`` items remove from it.
    """
    groups = syscall_groups()
    allowed = expand("@default", groups)
    for line in values("SystemCallFilter"):
        deny = line.startswith("~")
        for item in line.lstrip("~").split():
            allowed = allowed - expand(item, groups) if deny else allowed | expand(item, groups)
    families = {"AF_UNIX": socket.AF_UNIX, "AF_INET": socket.AF_INET, "AF_INET6": socket.AF_INET6}
    return {
        "allow": sorted(allowed),
        "errno": {"EPERM": 1}[value("SystemCallErrorNumber")],
        "mdwe": value("MemoryDenyWriteExecute") == "yes",
        "families": [int(families[name]) for name in value("RestrictAddressFamilies").split()],
    }


@pytest.fixture
def sandbox() -> tuple[str, ...]:
    """The command prefix that runs a program under the unit's seccomp filters."""
    if ctypes.util.find_library("seccomp") is None:
        pytest.fail("libseccomp not found: it comes with the systemd package that ./run test needs")
    return (sys.executable, "-c", LAUNCHER, json.dumps(seccomp_spec()), "--")


def test_sandbox_launcher_enforces_the_filters(sandbox: tuple[str, ...]) -> None:
    """Under the launcher W+X memory, chown and netlink sockets fail as they would in the unit."""
    probe = (
        "import mmap, os, socket\n"
        "for name, attempt in [('wx', lambda: mmap.mmap(-1, 4096, prot=7)),"
        " ('chown', lambda: os.chown('/', 0, 0)),"
        " ('netlink', lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW))]:\n"
        "    try:\n        attempt()\n        print(name, 'allowed')\n"
        "    except OSError as exc:\n        print(name, exc.errno)\n"
    )
    result = subprocess.run([*sandbox, sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["wx 1", "chown 1", "netlink 97"]


@pytest.mark.slow
def test_service_and_onnxruntime_run_under_the_units_seccomp_filters(
    tmp_path: Path, sandbox: tuple[str, ...], receiver: tuple[str, socket.socket]
) -> None:
    """Under the filters serve notifies READY, stores and selects a series and exits 0; the
    inference worker's decoders and ONNX Runtime run without errors."""
    address, sock = receiver
    server = make_server(tmp_path / "server")
    proc = start_serve(server, notify_env(server, address, 60_000_000), prefix=sandbox)
    try:
        while (message := receive(sock, 30)) is not None and "READY=1" not in message.split("\n"):
            pass
        assert message is not None, f"no READY=1 under the sandbox\n{output_of(server)}"
        spec = CtSeriesSpec(rows=64, columns=64, slices=6)
        result = storescu(server.port, write_ct_series(spec, tmp_path / "ct"))
        assert result.returncode == 0, result.stderr
        assert server.wait_for(decided(spec.series_instance_uid)).state == SeriesState.SELECTED
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=seconds(value("TimeoutStopSec"))) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Operation not permitted" not in output_of(server) + server.logs()

    check = subprocess.run([*sandbox, sys.executable, "-c", WORKER_CHECK], capture_output=True, text=True,
                           timeout=120, check=False)
    assert check.returncode == 0, check.stderr
    assert check.stdout.count("decoded") == 3
    assert "onnxruntime ok" in check.stdout
    assert "setaffinity" not in check.stderr  # @resources stays allowed for ORT's thread pinning
