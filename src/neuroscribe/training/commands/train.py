"""``neuroscribe train --data DIR --out RUN_DIR``: train a CVIT model and write its bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from neuroscribe.argtypes import positive_int
from neuroscribe.config import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Data, run folder, settings file and the overrides people change most."""
    parser.add_argument("--data", type=Path, required=True,
                        help="studies with reports: a `neuroscribe synth` folder or a JSONL/CSV manifest")
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, curves, bundle)")
    parser.add_argument("--train-config", type=Path,
                        help="TOML file of training settings (docs/training.md); flags below override it")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint")
    parser.add_argument("--epochs", type=positive_int)
    parser.add_argument("--batch-size", type=positive_int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-steps", type=positive_int, help="stop after this many optimizer steps")
    parser.add_argument("--workers", type=positive_int, help="processes decoding series into the cache")
    parser.add_argument("--cache-dir", type=Path,
                        help="decoded-series cache to share between runs (default RUN_DIR/cache)")
    parser.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def run(_settings: Settings, args: argparse.Namespace) -> int:
    """Train; print where the bundle is and its held-out scores."""
    from neuroscribe.training.trainer import load_train_config, train

    cfg = load_train_config(args.train_config, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                            max_steps=args.max_steps, workers=args.workers,
                            cache_dir=str(args.cache_dir) if args.cache_dir else None)
    result = train(args.data, args.out, cfg, resume=args.resume, progress=not args.no_progress,
                   device=args.device)
    if result.bundle is None:
        print(f"stopped after step {result.steps}; continue with --resume (checkpoint in {args.out})")
        return 0
    f1 = result.test_scores.get("forte_strict_mean_f1")
    shown = "n/a (no test studies)" if f1 is None else f"{f1:.4f}"
    print(f"trained {result.steps} steps; best epoch {result.best_epoch}; held-out strict FORTE mean F1 "
          f"{shown}; bundle {result.bundle}")
    return 0
