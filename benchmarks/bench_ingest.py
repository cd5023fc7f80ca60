"""Ingest benchmark: DCMTK storescu pushing one 300-slice 512x512 16-bit series.

Receivers, alternating, median of 5 pushes each:

* NeuroScribe (``neuroscribe serve``): streamed to disk, fsync'd, renamed, state row committed;
* DCMTK ``storescp`` on the same machine (writes files, no fsync).

Prints both medians and the ratio (target <= 1.5). ``TCP_NODELAY=1`` is set for the DCMTK tools:
without it both sides stall about 45 ms per image on loopback. Every push after the first sends
instances NeuroScribe already holds, so most pushes measure the re-send path (idempotent rows,
files replaced); storescp likewise rewrites its files. Dirty pages are flushed before each push.

``--idle-cpu SECONDS`` then measures the CPU NeuroScribe's process uses with no association and
with one idle association held open (its threads must not busy-poll).

Run by hand: ``./run bench bench_ingest [--slices 300] [--repeats 5] [--idle-cpu 10]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pynetdicom import AE

from neuroscribe.dicom_io.writer import CtSeriesSpec, write_ct_series

OUT = Path(__file__).parent / "out"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(["echoscu", "-aec", "ANY-SCP", "127.0.0.1", str(port)],
                          capture_output=True, env=dcmtk_env(), check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered C-ECHO on port {port}")


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def series(slices: int) -> list[Path]:
    folder = OUT / f"series-{slices}"
    files = sorted(folder.glob("*.dcm"))
    if len(files) != slices:
        shutil.rmtree(folder, ignore_errors=True)
        files = write_ct_series(CtSeriesSpec(slices=slices), folder)
    return files


def push(port: int, called: str, files: list[Path]) -> float:
    # Flush dirty pages first (untimed), so neither receiver's timing includes the background
    # writeback of what the other just wrote (storescp leaves ~160 MB dirty per push).
    os.sync()
    start = time.perf_counter()
    subprocess.run(["storescu", "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port),
                    *map(str, files)], check=True, env=dcmtk_env(), capture_output=True)
    return time.perf_counter() - start


def start_neuroscribe(root: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "NEUROSCRIBE_STORAGE__ROOT": str(root), "NEUROSCRIBE_DICOM__PORT": str(port),
           "NEUROSCRIBE_STORAGE__MIN_FREE_BYTES": "0", "NEUROSCRIBE_DICOM__REQUIRE_CALLED_AE": "false",
           "NEUROSCRIBE_LOGGING__LEVEL": "WARNING"}
    return subprocess.Popen([sys.executable, "-m", "neuroscribe", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_storescp(out_dir: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(["storescp", "--output-directory", str(out_dir), str(port)],
                            env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(pid: int, port: int, seconds: float) -> tuple[float, float]:
    """Percent of one core used by ``pid`` with no association, then with one idle association."""
    time.sleep(1.0)
    before = cpu_seconds(pid)
    time.sleep(seconds)
    no_association = cpu_seconds(pid) - before
    ae = AE(ae_title="BENCH")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="NEUROSCRIBE")
    if not assoc.is_established:
        raise RuntimeError("idle association was not accepted")
    try:
        time.sleep(1.0)
        before = cpu_seconds(pid)
        time.sleep(seconds)
        one_association = cpu_seconds(pid) - before
    finally:
        assoc.release()
    return 100 * no_association / seconds, 100 * one_association / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--idle-cpu", type=float, default=0.0, metavar="SECONDS",
                        help="also measure NeuroScribe's CPU use while idle for this long")
    args = parser.parse_args()
    files = series(args.slices)
    size_mb = sum(f.stat().st_size for f in files) / 1e6
    times: dict[str, list[float]] = {"neuroscribe": [], "storescp": []}
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        ns_port, dcm_port = free_port(), free_port()
        ns_root, dcm_dir = Path(tmp) / "ns", Path(tmp) / "dcm"
        dcm_dir.mkdir()
        ns, dcm = start_neuroscribe(ns_root, ns_port), start_storescp(dcm_dir, dcm_port)
        try:
            wait_for_port(ns_port)
            wait_for_port(dcm_port)
            push(ns_port, "NEUROSCRIBE", files[:5])  # warm both paths once
            push(dcm_port, "STORESCP", files[:5])
            for _ in range(args.repeats):
                times["neuroscribe"].append(push(ns_port, "NEUROSCRIBE", files))
                times["storescp"].append(push(dcm_port, "STORESCP", files))
            idle = idle_cpu(ns.pid, ns_port, args.idle_cpu) if args.idle_cpu else None
        finally:
            for proc in (ns, dcm):
                proc.terminate()
                proc.wait(timeout=30)
        stored = len(list((ns_root / "spool").rglob("*.dcm")))
    ns_med, dcm_med = statistics.median(times["neuroscribe"]), statistics.median(times["storescp"])
    print(f"series: {args.slices} slices, {size_mb:.0f} MB; {args.repeats} pushes each, alternating")
    print(f"{'receiver':<14}{'median s':>10}{'min s':>10}{'max s':>10}{'MB/s':>10}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:<14}{med:>10.3f}{min(values):>10.3f}{max(values):>10.3f}{size_mb / med:>10.0f}")
    for name, values in times.items():
        print(f"{name} pushes, in order (s): {' '.join(f'{v:.3f}' for v in values)}")
    print(f"ratio neuroscribe/storescp: {ns_med / dcm_med:.2f} (target <= 1.5)")
    print(f"instances in NeuroScribe's spool: {stored} (expected {args.slices})")
    result = {"benchmark": "ingest", "slices": args.slices, "neuroscribe_s": ns_med,
              "storescp_s": dcm_med, "ratio": ns_med / dcm_med, "stored": stored}
    if idle is not None:
        print(f"NeuroScribe idle CPU over {args.idle_cpu:.0f} s: {idle[0]:.1f}% of a core with no "
              f"association, {idle[1]:.1f}% with one idle association open")
        result |= {"idle_cpu_percent": idle[0], "idle_cpu_one_association_percent": idle[1]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
