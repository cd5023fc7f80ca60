"""Inference benchmark: ONNX Runtime engine vs PyTorch eager, KV-cache step cost, a 300-slice study.

Run by hand::

    .venv/bin/python benchmarks/bench_inference.py [--run DIR | --checkpoint PT --bundle DIR]

Model (the same weights on both sides):

* ``--checkpoint PT --bundle DIR``: a checkpoint and the bundle exported from it;
* ``--run DIR`` (default ``/work/data/demo_run``, the demo model's training run): its
  ``checkpoints/best.pt`` (copied first, the run may still be writing) and its ``bundle/``, or, while
  the run has no bundle yet, a bundle built here from that checkpoint;
* otherwise the demo architecture (models/demo/train.toml) with random weights. Speed does not
  depend on the weights: every timed run generates exactly ``--tokens`` tokens (no stop id, no
  repetition guard), so both sides do the same work.

Measured:

a. tokens per second, batch 1, greedy, same prompt (the bundle's) and study: ``Engine.generate``
   vs ``CvitModel.generate`` (eager, ``inference_mode``), for each ``--threads`` count (the same on
   both sides); vision encoder and prefill included; median of ``--repeats`` (target: ONNX Runtime
   >= 2x on CPU);
b. per-token decoder latency with the KV cache at generated token ~20 vs ~200 (median of tokens
   15-25 and 195-205 over the repeats; target ratio <= 1.5);
c. a 300-slice 512x512 synthetic study on disk (``neuroscribe synth --size clinical --slices 300``,
   written once under benchmarks/out/) to report text in a fresh subprocess: load, series to model
   input, generation, and peak RSS, default decoding settings. Peak RSS is the child's VmHWM:
   its ``ru_maxrss`` is reported too, but Linux carries the parent's high-water mark over the
   fork and exec into it, so it shows this benchmark's own (torch) footprint.

The machine's core count and load average are recorded: on the 2-core build machine another job
(model training) may hold the CPUs, and every figure is then measured under that contention.
Results: a table, benchmarks/out/bench_inference.json, and the JSON as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path(__file__).resolve().parent / "out"
ROOT = Path(__file__).resolve().parents[1]
DEMO_RUN = Path("/work/data/demo_run")
SERIES_DIR = OUT / "infer-series-300"


def load_pair(args: argparse.Namespace, work: Path) -> tuple[Any, Path, str]:
    """``(torch model, bundle folder, description)`` with the same weights."""
    from neuroscribe.training.model import load_checkpoint

    if args.checkpoint and args.bundle:
        model, _ = load_checkpoint(args.checkpoint)
        return model, args.bundle, f"checkpoint {args.checkpoint} + bundle {args.bundle}"
    run = args.run
    if run and (run / "checkpoints" / "best.pt").is_file():
        ckpt = work / "best.pt"
        shutil.copyfile(run / "checkpoints" / "best.pt", ckpt)
        model, saved = load_checkpoint(ckpt)
        if (run / "bundle" / "manifest.json").is_file():
            return model, run / "bundle", f"{run}: checkpoints/best.pt + bundle/"
        bundle = build_from(model, run, work)
        return model, bundle, f"{run}: checkpoints/best.pt (step {saved.get('step')}), bundle built here"
    return random_demo_model(work)


def build_from(model: Any, run: Path, work: Path) -> Path:
    """A bundle of ``model`` with the run's tokenizer and inference prompt style."""
    from neuroscribe.dicom_io.model_input import ModelGrid
    from neuroscribe.training.bundle import build_bundle
    from neuroscribe.training.prompts import PromptConfig
    from neuroscribe.training.tokenizer import load_tokenizer

    cfg = json.loads((run / "train_config.json").read_text())
    mc = model.config
    grid = ModelGrid(mc.slices, mc.height, mc.width)
    prompt = PromptConfig(style=cfg.get("inference_style", "template"))
    return build_bundle(model, load_tokenizer(run), prompt, work / "bundle", name=cfg.get("name", "bench"),
                        version="bench", grid=grid.to_dict(), synthetic_training_data=True,
                        max_new_tokens=int(cfg.get("max_new_tokens", 200))).path


def random_demo_model(work: Path) -> tuple[Any, Path, str]:
    """The demo architecture with random weights, and its bundle."""
    import torch

    from neuroscribe.dicom_io.model_input import ModelGrid
    from neuroscribe.training.bundle import build_bundle
    from neuroscribe.training.model import CvitConfig, CvitModel
    from neuroscribe.training.prompts import InstructionStyle, PromptConfig, render_prompt
    from neuroscribe.training.synth import generate_dataset
    from neuroscribe.training.tokenizer import train_tokenizer

    demo = tomllib.loads((ROOT / "models" / "demo" / "train.toml").read_text())
    records = generate_dataset(work / "synth", 40, 0, "standard", "small", rows=16, columns=16, slices=4)
    config = PromptConfig(style=InstructionStyle(demo["inference_style"]))
    tok = train_tokenizer([r["report"] for r in records] + [render_prompt(config)],
                          vocab_size=demo["vocab_size"])
    grid = ModelGrid(demo["slices"], demo["height"], demo["width"])
    torch.manual_seed(0)
    model = CvitModel(CvitConfig.from_grid(grid, vocab_size=len(tok), **demo["model"])).eval()
    bundle = build_bundle(model, tok, config, work / "bundle", name="bench-random", version="0",
                          grid=grid.to_dict(), max_new_tokens=demo["max_new_tokens"])
    return model, bundle.path, "demo architecture, random weights (no demo run found)"


def tokens_per_second(model: Any, engine: Any, image: np.ndarray, tokens: int,
                      repeats: int) -> dict[str, Any]:
    """(a) batch-1 greedy generation of exactly ``tokens`` tokens, both runtimes, median seconds."""
    import torch

    prompt = torch.tensor([engine.prompt_ids])
    images = torch.from_numpy(image)
    times: dict[str, list[float]] = {"onnxruntime": [], "torch": []}
    outputs: dict[str, list[int]] = {}
    with torch.inference_mode():
        model.generate(images, prompt, 4)  # warm both
        engine.generate(image, max_new_tokens=4, stop_ids=[], repeat_guard=0)
        for _ in range(repeats):
            start = time.perf_counter()
            result = engine.generate(image, max_new_tokens=tokens, stop_ids=[], repeat_guard=0)[0]
            times["onnxruntime"].append(time.perf_counter() - start)
            outputs["onnxruntime"] = list(result.token_ids)
            start = time.perf_counter()
            out = model.generate(images, prompt, tokens)
            times["torch"].append(time.perf_counter() - start)
            outputs["torch"] = out[0].tolist()
    a, b = outputs["onnxruntime"], outputs["torch"]
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"tokens": tokens, "seconds": med, "runs": times,
            "tokens_per_s": {k: tokens / v for k, v in med.items()},
            "speedup": med["torch"] / med["onnxruntime"],
            "identical_tokens": same is None, "first_difference_at": same}


def step_latency(engine: Any, image: np.ndarray, repeats: int, far: int = 200) -> dict[str, Any]:
    """(b) seconds of each decoder step (one new token, KV cache) at tokens ~20 and ~``far``."""
    prefix = engine.prefix(image)  # (1, L, d)
    length = prefix.shape[1]
    table = engine.table
    near_steps: list[float] = []
    far_steps: list[float] = []
    for _ in range(repeats):
        dec = engine.step_decoder()
        logits = dec.start(prefix, np.ones((1, length), np.int64), np.arange(length, dtype=np.int64)[None])
        for i in range(1, far + 6):
            token = int(logits[0].argmax())
            total = length + i
            start = time.perf_counter()
            logits = dec.step(np.asarray(table[[token]], prefix.dtype)[None], np.ones((1, total), np.int64),
                              np.array([[total - 1]], np.int64))
            seconds = time.perf_counter() - start
            if 15 <= i <= 25:
                near_steps.append(seconds)
            elif far - 5 <= i <= far + 5:
                far_steps.append(seconds)
    near, farv = statistics.median(near_steps), statistics.median(far_steps)
    return {"token_20_ms": 1e3 * near, f"token_{far}_ms": 1e3 * farv, "ratio": farv / near,
            "prefix_tokens": length}


SERIES_SCRIPT = """
import json, resource, sys, time
def peak_mb():  # VmHWM: this process's own high-water mark (ru_maxrss keeps the parent's from the fork)
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
t0 = time.perf_counter()
from neuroscribe.dicom_io.model_input import ModelGrid, series_to_input
from neuroscribe.inference.engine import Engine
rss_imports = peak_mb()
t1 = time.perf_counter()
engine = Engine.load(sys.argv[1], device="cpu", threads=int(sys.argv[3]))
rss_load = peak_mb()
t2 = time.perf_counter()
x = series_to_input(sys.argv[2], ModelGrid.from_dict(engine.input_spec))
t3 = time.perf_counter()
r = engine.generate(x[None])[0]
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "series_to_input_s": t3 - t2,
                  "generate_s": t4 - t3, "total_s": t4 - t0, "tokens": r.n_tokens,
                  "stopped_by": r.stopped_by, "report_chars": len(r.text),
                  "peak_rss_after_imports_mb": rss_imports, "peak_rss_after_load_mb": rss_load,
                  "peak_rss_mb": peak_mb(),
                  "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "torch_imported": "torch" in sys.modules}))
"""


def series_300() -> Path:
    """A 300-slice 512x512 synthetic head CT on disk (written once)."""
    from neuroscribe.training.synth import generate_dataset

    study = SERIES_DIR / "study_00000"
    if len(list(study.glob("*.dcm"))) != 300:
        shutil.rmtree(SERIES_DIR, ignore_errors=True)
        generate_dataset(SERIES_DIR, 1, 0, "standard", "clinical", slices=300)
    return study


def series_to_report(bundle: Path, series: Path, threads: int) -> dict[str, Any]:
    """(c) a fresh process: load the bundle, read the series, write the report; its peak RSS."""
    env = {**os.environ, "NEUROSCRIBE_LOGGING__LEVEL": "WARNING"}
    done = subprocess.run([sys.executable, "-c", SERIES_SCRIPT, str(bundle), str(series), str(threads)],
                          capture_output=True, text=True, env=env, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["series_mb"] = sum(p.stat().st_size for p in series.iterdir()) / 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=DEMO_RUN if DEMO_RUN.is_dir() else None,
                        help="training run folder (checkpoints/best.pt, bundle/)")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint (with --bundle)")
    parser.add_argument("--bundle", type=Path, help="bundle exported from --checkpoint")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per timed generation (default 200)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                        help="thread counts to measure (a) and (b) with, the same for ONNX Runtime and torch "
                             "(default: 1 and all cores)")
    parser.add_argument("--skip-series", action="store_true", help="skip (c), the 300-slice study")
    args = parser.parse_args()
    if bool(args.checkpoint) != bool(args.bundle):
        parser.error("--checkpoint and --bundle go together")

    import onnxruntime
    import torch

    from neuroscribe.inference.engine import Engine

    OUT.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory(dir=OUT, prefix="bench-inference-") as tmp:
        model, bundle_path, source = load_pair(args, Path(tmp))
        for threads in args.threads:
            torch.set_num_threads(threads)
            engine = Engine.load(bundle_path, device="cpu", threads=threads)
            room = engine.max_new_tokens_limit()
            tokens = min(args.tokens, room)
            image = np.random.default_rng(0).random((1, *engine.input_shape), dtype=np.float32)
            runs.append({"threads": threads,
                         "tokens_per_second": tokens_per_second(model, engine, image, tokens, args.repeats),
                         "step_latency": step_latency(engine, image, args.repeats, far=min(200, room - 6))})
        series = None
        if not args.skip_series:
            series = series_to_report(bundle_path, series_300(), max(args.threads))
    load_after = os.getloadavg()
    result = {
        "benchmark": "inference", "model": source, "bundle": engine.bundle.label,
        "grid": list(engine.input_shape), "params": sum(p.numel() for p in model.parameters()),
        "cpus": os.cpu_count(), "loadavg_1min": [load_before[0], load_after[0]],
        "providers": engine.providers, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
        "runs": runs, "series_300": series,
    }
    print(f"model: {source}; {result['params'] / 1e6:.2f} M parameters, grid {engine.input_shape}")
    print(f"machine: {os.cpu_count()} cores, load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after (near or above the core count: another job shared the CPUs, "
          "so every figure is contended)")
    print(f"\n(a) batch 1, greedy, {runs[0]['tokens_per_second']['tokens']} tokens, median of {args.repeats}")
    print(f"{'threads':<9}{'runtime':<14}{'seconds':>10}{'tokens/s':>10}{'speed-up':>10}  identical tokens")
    for run in runs:
        speed = run["tokens_per_second"]
        for name in ("onnxruntime", "torch"):
            ratio = f"{speed['speedup']:.2f}x" if name == "onnxruntime" else ""
            same = str(speed["identical_tokens"]) if name == "onnxruntime" else ""
            print(f"{run['threads']:<9}{name:<14}{speed['seconds'][name]:>10.3f}"
                  f"{speed['tokens_per_s'][name]:>10.1f}{ratio:>10}  {same}")
    print("target: onnxruntime >= 2x torch on CPU")
    print("\n(b) decoder step with the KV cache (ONNX Runtime), median ms")
    for run in runs:
        lat = run["step_latency"]
        far_key = next(k for k in lat if k.startswith("token_") and k != "token_20_ms")
        print(f"threads {run['threads']}: prefix {lat['prefix_tokens']} tokens; token 20 "
              f"{lat['token_20_ms']:.2f} ms, {far_key[:-3].replace('_', ' ')} {lat[far_key]:.2f} ms, "
              f"ratio {lat['ratio']:.2f} (target <= 1.5)")
    if series:
        print(f"\n(c) 300-slice 512x512 study ({series['series_mb']:.0f} MB) to report, fresh process, "
              f"{max(args.threads)} threads:")
        print(f"imports {series['import_s']:.2f} s, load + warm-up {series['load_s']:.2f} s, series to input "
              f"{series['series_to_input_s']:.2f} s, generate {series['generate_s']:.2f} s "
              f"({series['tokens']} tokens, {series['stopped_by']}), total {series['total_s']:.2f} s")
        print(f"peak RSS (VmHWM) {series['peak_rss_mb']:.0f} MB: "
              f"{series['peak_rss_after_imports_mb']:.0f} MB after imports, "
              f"{series['peak_rss_after_load_mb']:.0f} MB after load; "
              f"torch imported: {series['torch_imported']}")
    (OUT / "bench_inference.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
