"""Benchmark build_volume against a bare pydicom decode, and its peak memory.

Run by hand::

    .venv/bin/python benchmarks/bench_volume.py

Writes (once, cached under benchmarks/out/) 300- and 600-slice 512x512 16-bit CT series with the
project's writer, then reports:

* the median of ``--repeats`` runs of a bare decode (``dcmread(p).pixel_array`` for every file,
  discarded) and of ``build_volume``, and their ratio (target <= 1.3);
* peak RSS (VmHWM) of ``build_volume`` in a fresh subprocess per measurement, next to the RSS
  after imports and the size of the output array, for both series, and for a build at a reduced
  in-plane size.

The numbers go to a table, to benchmarks/out/bench_volume.json and, as JSON, to the last line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pydicom

from neuroscribe.dicom_io.volume import build_volume
from neuroscribe.dicom_io.writer import CtSeriesSpec, write_ct_series

OUT_DIR = Path(__file__).resolve().parent / "out"
MATRIX = 512
TIMED_SLICES = 300
BIG_SLICES = 600
REDUCED_SHAPE = (256, 256)
TARGET_RATIO = 1.3
MIB = 1024 * 1024
_MARKER = "complete.json"


def series_paths(slices: int) -> list[Path]:
    """The cached series of ``slices`` slices, written first if absent or incomplete."""
    directory = OUT_DIR / f"ct_{slices}x{MATRIX}"
    spec = CtSeriesSpec(rows=MATRIX, columns=MATRIX, slices=slices, slice_step_mm=0.625,
                        slice_thickness_mm=0.625)
    marker = directory / _MARKER
    if not marker.exists():
        partial = directory.with_name(directory.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_ct_series(spec, partial)
        (partial / _MARKER).write_text(json.dumps({"slices": slices, "matrix": MATRIX}))
        shutil.rmtree(directory, ignore_errors=True)
        partial.rename(directory)
    return sorted(directory.glob("IMG*.dcm"))


def bare_decode(paths: list[Path]) -> None:
    """Decode every file's pixel data with pydicom and throw it away."""
    for path in paths:
        pydicom.dcmread(path).pixel_array  # noqa: B018  (the decode is the point)


def _timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def compare_times(paths: list[Path], repeats: int) -> dict[str, object]:
    """Median wall times of the bare decode and of build_volume, interleaved, after a warm-up."""
    bare_decode(paths)  # warm the page cache and the allocator before timing
    build_volume(paths)
    bare, built = [], []
    for _ in range(repeats):
        bare.append(_timed(lambda: bare_decode(paths)))
        built.append(_timed(lambda: build_volume(paths)))
    bare_s, build_s = statistics.median(bare), statistics.median(built)
    return {
        "slices": len(paths),
        "bare_decode_s": round(bare_s, 4),
        "build_volume_s": round(build_s, 4),
        "ratio": round(build_s / bare_s, 3),
        "bare_runs_s": [round(t, 4) for t in bare],
        "build_runs_s": [round(t, 4) for t in built],
    }


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_measure(directory: Path, reduced: bool) -> dict[str, float]:
    """In this (fresh) process: RSS after imports, build, then the peak RSS."""
    paths = sorted(directory.glob("IMG*.dcm"))
    baseline = _status_mib("VmRSS")
    volume = build_volume(paths, in_plane_shape=REDUCED_SHAPE if reduced else None)
    return {
        "baseline_rss_mib": round(baseline, 1),
        "peak_rss_mib": round(_status_mib("VmHWM"), 1),
        "output_mib": round(volume.hu.nbytes / MIB, 1),
    }


def measure_peak(paths: list[Path], reduced: bool = False) -> dict[str, object]:
    """Run child_measure in a fresh interpreter and add the derived figures."""
    command = [sys.executable, __file__, "--child", str(paths[0].parent)]
    if reduced:
        command.append("--reduced")
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    figures: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    peak, baseline, output = (float(figures[k]) for k in  # type: ignore[arg-type]
                              ("peak_rss_mib", "baseline_rss_mib", "output_mib"))
    slice_mib = MATRIX * MATRIX * 4 / MIB
    figures.update({
        "slices": len(paths),
        "in_plane": list(REDUCED_SHAPE) if reduced else [MATRIX, MATRIX],
        "over_output_mib": round(peak - baseline - output, 1),
        "over_output_slices": round((peak - baseline - output) / slice_mib, 1),
    })
    return figures


def main() -> None:
    """Parse arguments, run the benchmark (or one child measurement) and report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reduced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        sys.stdout.write(json.dumps(child_measure(args.child, args.reduced)) + "\n")
        return

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    timed = series_paths(TIMED_SLICES)
    big = series_paths(BIG_SLICES)
    times = compare_times(timed, args.repeats)
    reduced_s = statistics.median(
        _timed(lambda: build_volume(timed, in_plane_shape=REDUCED_SHAPE))
        for _ in range(args.repeats))
    times["build_volume_256_s"] = round(reduced_s, 4)
    memory = [measure_peak(timed), measure_peak(big), measure_peak(big, reduced=True)]
    report = {"times": times, "memory": memory, "target_ratio": TARGET_RATIO}

    lines = [
        f"timing ({times['slices']} slices {MATRIX}x{MATRIX}, median of {args.repeats})",
        f"  bare pydicom decode      {times['bare_decode_s']:8.3f} s",
        f"  build_volume             {times['build_volume_s']:8.3f} s   "
        f"ratio {times['ratio']:.2f} (target <= {TARGET_RATIO})",
        f"  build_volume -> 256x256  {times['build_volume_256_s']:8.3f} s",
        "",
        "peak RSS of build_volume in a fresh process (MiB)",
        f"  {'slices':>6} {'in-plane':>9} {'output':>8} {'baseline':>9} {'peak':>8} "
        f"{'over output':>12} {'(slices)':>9}",
    ]
    for m in memory:
        in_plane = "x".join(str(n) for n in m["in_plane"])  # type: ignore[attr-defined]
        lines.append(
            f"  {m['slices']:>6} {in_plane:>9} {m['output_mib']:>8} {m['baseline_rss_mib']:>9} "
            f"{m['peak_rss_mib']:>8} {m['over_output_mib']:>12} {m['over_output_slices']:>9}")
    sys.stdout.write("\n".join(lines) + "\n")
    (OUT_DIR / "bench_volume.json").write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
