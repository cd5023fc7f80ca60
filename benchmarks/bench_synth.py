"""Benchmark synthetic study generation: studies per second at small and clinical size.

Run by hand::

    .venv/bin/python benchmarks/bench_synth.py [--small 100] [--clinical 5] [--workers 1]

For each size it times :func:`generate_dataset` end to end (plan, render, DICOM write,
dataset.jsonl) into a temporary folder, and separately the three stages for the same studies
(planning, rendering every slice with kernel and noise, writing the DICOM files), so the table
shows where the time goes. Figures go to a table, to benchmarks/out/bench_synth.json and, as JSON,
to the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from neuroscribe.dicom_io.writer import write_ct_series
from neuroscribe.training.synth import generate_dataset, plan_study

OUT_DIR = Path(__file__).resolve().parent / "out"
SEED = 2024


def measure(size: str, studies: int, workers: int) -> dict[str, float | int | str]:
    """End-to-end and per-stage timings for ``studies`` studies of one size (standard profile)."""
    with tempfile.TemporaryDirectory(prefix="bench_synth_") as tmp:
        started = time.perf_counter()
        records = generate_dataset(Path(tmp) / "data", studies, SEED, "standard", size, workers=workers)
        total = time.perf_counter() - started
        slices = sum(int(r["acquisition"]["slices"]) for r in records)

        plan_s = render_s = write_s = 0.0
        stage_studies = min(studies, 10)
        for index in range(stage_studies):
            t0 = time.perf_counter()
            plan = plan_study(SEED, index, "standard", size)
            t1 = time.perf_counter()
            phantom = plan.phantom()
            volume = [phantom.slice_hu(k) for k in range(plan.acquisition.slices)]
            t2 = time.perf_counter()
            write_ct_series(plan.series_spec(), Path(tmp) / "stage" / str(index),
                            pixels=lambda k, volume=volume: volume[k])
            t3 = time.perf_counter()
            plan_s += t1 - t0
            render_s += t2 - t1
            write_s += t3 - t2
    return {
        "size": size,
        "studies": studies,
        "workers": workers,
        "slices_per_study": round(slices / studies, 1),
        "seconds": round(total, 2),
        "studies_per_s": round(studies / total, 2),
        "ms_plan_per_study": round(1000 * plan_s / stage_studies, 1),
        "ms_render_per_slice": round(1000 * render_s / (slices / studies * stage_studies), 2),
        "ms_write_per_slice": round(1000 * write_s / (slices / studies * stage_studies), 2),
    }


def main() -> None:
    """Measure both sizes and print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=100, help="small studies to generate (default 100)")
    parser.add_argument("--clinical", type=int, default=5, help="clinical studies to generate (default 5)")
    parser.add_argument("--workers", type=int, default=1, help="generation processes (default 1)")
    args = parser.parse_args()

    results = [measure("small", args.small, args.workers), measure("clinical", args.clinical, args.workers)]
    header = (f"{'size':<9}{'studies':>8}{'slices':>8}{'seconds':>9}{'studies/s':>11}"
              f"{'plan ms':>9}{'render ms/sl':>14}{'write ms/sl':>13}")
    print(header)
    for r in results:
        print(f"{r['size']:<9}{r['studies']:>8}{r['slices_per_study']:>8}{r['seconds']:>9}"
              f"{r['studies_per_s']:>11}{r['ms_plan_per_study']:>9}{r['ms_render_per_slice']:>14}"
              f"{r['ms_write_per_slice']:>13}")
    report = {"cpus": os.cpu_count(), "workers": args.workers, "results": results}
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "bench_synth.json").write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
