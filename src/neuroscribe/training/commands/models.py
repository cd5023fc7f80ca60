"""``neuroscribe models list|promote|rollback``: the site's model registry and its promotion gate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neuroscribe.config import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-commands list, promote, rollback."""
    parser.add_argument("--dir", type=Path, help="registry folder (default: [models] dir)")
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="stored bundles, their held-out scores, and which one is current")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    promote = sub.add_parser("promote", help="add a bundle and make it current if it passes the FORTE gate")
    promote.add_argument("bundle", type=Path, help="bundle folder (e.g. RUN_DIR/bundle)")
    promote.add_argument("--data", type=Path,
                         help="site dataset: score candidate and current now on its held-out split")
    promote.add_argument("--margin", type=float, help="override [models] promotion_margin")
    promote.add_argument("--workers", type=int, default=1, help="processes decoding series (with --data)")
    sub.add_parser("rollback", help="make the model that was current before the last promotion current again")


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Do the action; a refused promotion exits 1 with both figures."""
    from neuroscribe.training.registry import PromotionRefused, Registry

    registry = Registry(args.dir or settings.models.dir or settings.storage.models_dir)
    if args.action == "list":
        rows = registry.entries()
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        if not rows:
            print(f"no bundles in {registry.root}")
            return 0
        print(f"{'':2}{'id':<48} {'held-out F1':>11}  {'created':<25} data")
        for row in rows:
            if "error" in row:
                print(f"{'*' if row['current'] else ' '} {row['id']:<48} unreadable: {row['error']}")
                continue
            f1 = "n/a" if row["heldout_f1"] is None else f"{row['heldout_f1']:.4f}"
            data = "synthetic phantoms" if row["synthetic"] else "site data"
            mark = "*" if row["current"] else " "
            print(f"{mark} {row['id']:<48} {f1:>11}  {row['created'] or '':<25} {data}")
        return 0
    if args.action == "promote":
        margin = settings.models.promotion_margin if args.margin is None else args.margin
        try:
            decision = registry.promote(args.bundle, margin, data=args.data, workers=args.workers)
        except PromotionRefused as refused:
            print(f"refused: {refused.decision.message}")
            return 1
        print(f"promoted: {decision.message}; current is now {registry.current_id()}")
        return 0
    ident = registry.rollback()
    print(f"rolled back: current is now {ident}")
    return 0
