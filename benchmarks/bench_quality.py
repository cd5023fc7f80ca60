"""Quality of a model bundle on held-out synthetic studies: strict FORTE, captioning metrics, styles.

Run by hand (issue 4, item 8)::

    ./run bench bench_quality [--bundle models/demo/bundle] [--train-data DIR] [--studies 200]

* Makes ``--studies`` new ``standard`` and ``shifted`` studies (``neuroscribe synth``, small size,
  seeds the demo's training data never used) under benchmarks/out/quality-data/, once.
* Decodes every study with the bundle through ONNX Runtime, as the service does
  (``training.evaluate_bundle.bundle_reports``), and scores it against its report: strict FORTE
  mean F1 and per category, BLEU-1..4, METEOR, ROUGE-L, CIDEr-D.
* Baseline: the most common report of the training split (``--train-data``, the demo's
  ``neuroscribe synth`` folder; regenerated from its seed when absent), written for every study.
* The four CVIT instruction styles side by side on the standard set: the same weights, prompted
  with each style's prompt from the bundle's recorded training mix.

Figures go to a table and to benchmarks/out/bench_quality.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from neuroscribe.inference.bundle import load_bundle
from neuroscribe.training.dataset import SplitSpec, load_manifest
from neuroscribe.training.evaluate_bundle import (
    bundle_reports,
    heldout_split,
    score_reports,
    training_split_spec,
)
from neuroscribe.training.prompts import PromptMix, render_prompt
from neuroscribe.training.synth import generate_dataset
from neuroscribe.training.tokenizer import encode_prompt, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "benchmarks" / "out"
SEEDS = {"standard": 9001, "shifted": 9002}  # the demo trained on seed 101
ALL_HELDOUT = SplitSpec(train=0.0, val=0.0, test=1.0)
CAPTION_METRICS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


def _dataset(profile: str, studies: int, workers: int) -> Path:
    folder = OUT_DIR / "quality-data" / f"{profile}-{studies}-{SEEDS[profile]}"
    if not (folder / "dataset.jsonl").exists():
        generate_dataset(folder, studies, SEEDS[profile], profile, "small", workers=workers, overwrite=True)
    return folder


def _most_common_report(train_data: Path, spec: SplitSpec) -> str:
    """The most frequent report text among the training split's studies (the baseline's answer)."""
    from neuroscribe.training.dataset import assign_split

    reports = [e.report for e in load_manifest(train_data) if assign_split(e.patient_id, spec) == "train"]
    return Counter(reports).most_common(1)[0][0]


def _row(name: str, scores: dict) -> str:
    cats = scores["forte_strict_categories"]
    cap = scores.get("captioning", {})
    forte = "  ".join(f"{cats[c]:.3f}" for c in ("degree", "landmark", "feature", "impression"))
    captions = "  ".join(f"{cap.get(m, float('nan')):.3f}" for m in CAPTION_METRICS)
    return f"{name:<28} {scores['forte_strict_mean_f1']:.3f}  {forte}  {captions}"


def main() -> int:
    """Score the bundle, the baseline and the four styles; print and save the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "models" / "demo" / "bundle")
    parser.add_argument("--train-data", type=Path, help="the bundle's training data (for the baseline)")
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-styles", action="store_true", help="skip the four-style table")
    args = parser.parse_args()

    bundle = load_bundle(args.bundle)
    manifest = bundle.manifest
    results: dict = {"bundle": bundle.label, "model_uid": manifest["model_uid"],
                     "inference_style": manifest["prompt"]["style"], "studies": args.studies}
    cache = OUT_DIR / "quality-cache"
    splits = {}
    for profile in ("standard", "shifted"):
        data = _dataset(profile, args.studies, args.workers)
        splits[profile] = heldout_split(bundle, data, cache / profile, spec=ALL_HELDOUT, workers=args.workers)

    baseline_text = None
    if args.train_data is not None:
        baseline_text = _most_common_report(args.train_data, training_split_spec(bundle))
        results["baseline_report"] = baseline_text

    header = (f"{'':<28} {'FORTE':>5}  {'deg':>5}  {'land':>5}  {'feat':>5}  {'impr':>5}  {'B-1':>5}  "
              f"{'B-4':>5}  {'MET':>5}  {'R-L':>5}  {'CIDEr':>5}")
    lines = [header]
    for profile, split in splits.items():
        refs = [s.report for s in split.studies]
        ids = [s.study_id for s in split.studies]
        started = time.perf_counter()
        candidates = bundle_reports(bundle, split)
        seconds = time.perf_counter() - started
        scores = score_reports(refs, candidates, ids)
        scores["seconds_to_decode"] = round(seconds, 1)
        # does the report change with the image? (1 / n: one report for every study)
        scores["distinct_report_fraction"] = round(len(set(candidates)) / max(1, len(candidates)), 3)
        scores["examples"] = [{"reference": r, "candidate": c} for r, c in zip(refs[:3], candidates[:3],
                                                                               strict=True)]
        results[profile] = scores
        lines.append(_row(f"model, {profile}", scores))
        if baseline_text is not None:
            base = score_reports(refs, [baseline_text] * len(refs), ids)
            results[f"baseline_{profile}"] = base
            lines.append(_row(f"most-common report, {profile}", base))

    if not args.no_styles:
        mix = PromptMix.from_json(manifest["prompt"]["training_mix"])
        tokenizer = load_tokenizer(bundle.path)
        split = splits["standard"]
        refs = [s.report for s in split.studies]
        ids = [s.study_id for s in split.studies]
        results["styles"] = {}
        lines.append("instruction styles, standard set (same weights, prompt of each style):")
        for config in mix.configs:
            prompt_ids = encode_prompt(tokenizer, render_prompt(config))
            scores = score_reports(refs, bundle_reports(bundle, split, prompt_ids=prompt_ids), ids)
            results["styles"][config.style.value] = scores
            lines.append(_row(f"  {config.style.value}", scores))

    print("\n".join(lines))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "bench_quality.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: results[k]["forte_strict_mean_f1"] for k in results
                      if isinstance(results[k], dict) and "forte_strict_mean_f1" in results[k]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
