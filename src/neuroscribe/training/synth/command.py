"""``neuroscribe synth``: write synthetic head-CT studies with reports (phantoms, no patient data)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from neuroscribe.argtypes import non_negative_int, positive_int
from neuroscribe.config import Settings

#: Names accepted by --profile and --size (kept here so --help needs no heavy import).
PROFILE_NAMES = ("standard", "shifted")
SIZE_NAMES = ("small", "clinical")




def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Output folder, count, seed, profile and size."""
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; must be empty)")
    parser.add_argument("--studies", type=positive_int, default=10, help="number of studies (default 10)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed; same seed, same data (default 0)")
    parser.add_argument("--profile", choices=PROFILE_NAMES, default="standard",
                        help="site profile: standard (training site) or shifted (other scanner and case mix)")
    parser.add_argument("--size", choices=SIZE_NAMES, default="clinical",
                        help="clinical: 512x512, ~5 mm slices; small: 128x128, ~24 slices (default clinical)")
    parser.add_argument("--rows", type=positive_int, help="matrix rows (overrides --size)")
    parser.add_argument("--columns", type=positive_int, help="matrix columns (overrides --size)")
    parser.add_argument("--slices", type=positive_int,
                        help="slice count covering the head (overrides the profile's slice thickness)")
    parser.add_argument("--workers", type=positive_int, default=1, help="parallel processes (default 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the study folders and dataset.jsonl of a previous run in --out")


def run(_settings: Settings, args: argparse.Namespace) -> int:
    """Generate the studies and dataset.jsonl; print one summary line."""
    from neuroscribe.training.synth.generate import DATASET_FILE, generate_dataset

    started = time.monotonic()
    records = generate_dataset(
        args.out, args.studies, args.seed, args.profile, args.size, rows=args.rows,
        columns=args.columns, slices=args.slices, workers=args.workers, overwrite=args.overwrite,
    )
    elapsed = time.monotonic() - started
    normal = sum(1 for r in records if r["normal"])
    print(f"wrote {len(records)} studies ({normal} normal, profile {args.profile}) to {args.out} "
          f"and {args.out / DATASET_FILE} in {elapsed:.1f} s")
    return 0
