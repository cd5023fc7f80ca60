"""``neuroscribe evaluate``: score candidate reports against references (FORTE and captioning metrics).

Reads a JSONL file of ``{"id", "reference", "candidate"}`` pairs and prints one JSON object on
stdout: ``{"forte": ..., "captioning": ...}`` (docs/evaluation.md). ``--html OUT`` also writes a page
for a person. Exit codes: 0 done; 1 a tool failed (Java missing, METEOR died, sentence encoder not
installed); 2 bad input or output path (the message names the file and line).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from neuroscribe.config import Settings

#: Choices, duplicated from the metrics modules so that ``--help`` imports nothing heavy.
MODES = ("compat-head", "compat-paper", "strict")
UNITS = ("report", "sentence")
ENCODERS = ("lexical", "mpnet")

#: Exit code for a bad pairs file or output path.
EXIT_BAD_INPUT = 2
#: Exit code for a tool that failed (Java, METEOR, sentence encoder).
EXIT_TOOL_FAILED = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``neuroscribe evaluate``."""
    parser.add_argument("--pairs", type=Path, required=True, metavar="FILE.jsonl",
                        help='one JSON object per line: {"id", "reference", "candidate"}')
    parser.add_argument("--mode", choices=MODES, default="strict",
                        help="FORTE keyword matching: the original code (compat-head, compat-paper) or "
                             "strict (default)")
    parser.add_argument("--unit", choices=UNITS, default="report",
                        help="one FORTE row per report pair (default) or per reference sentence")
    parser.add_argument("--encoder", choices=ENCODERS, default="lexical",
                        help="sentence similarity for --unit sentence: lexical (default, no model) or "
                             "mpnet (all-mpnet-base-v2, installed separately)")
    parser.add_argument("--rows", action="store_true",
                        help="add per-row details: FORTE rows and per-report captioning scores")
    parser.add_argument("--no-captioning", action="store_true",
                        help="skip BLEU/METEOR/ROUGE-L/CIDEr-D (they need Java and take ~10 s to start)")
    parser.add_argument("--html", type=Path, metavar="OUT",
                        help="also write an HTML page: a .html file, or a directory for evaluation.html")
    parser.add_argument("--title", default="NeuroScribe evaluation", help="title of the HTML page")


def _fail(code: int, message: str) -> int:
    print(f"neuroscribe evaluate: {message}", file=sys.stderr)
    return code


def run(_settings: Settings, args: argparse.Namespace) -> int:
    """Score the pairs file and print the JSON result; returns the exit code."""
    from neuroscribe.training.metrics.forte import ForteError, PairsFileError, evaluate_forte, load_pairs
    from neuroscribe.training.metrics.html_report import html_target, write_html
    from neuroscribe.training.metrics.sentences import SentencePairingError

    missing = [f"{module} (for {purpose})" for module, purpose, wanted in (
        ("pycocoevalcap", "the captioning metrics; or pass --no-captioning", not args.no_captioning),
        ("matplotlib", "--html", args.html is not None),
    ) if wanted and importlib.util.find_spec(module) is None]
    if missing:
        return _fail(EXIT_TOOL_FAILED, f"not installed: {', '.join(missing)}; install the extra "
                     "'eval' (pip install -e '.[eval]'; ./run test does)")
    try:
        pairs = load_pairs(args.pairs)
    except PairsFileError as exc:
        return _fail(EXIT_BAD_INPUT, str(exc))
    if args.html is not None:  # refuse a bad output path before minutes of scoring
        target = html_target(args.html)
        if target.is_dir() or (target.parent.exists() and not target.parent.is_dir()):
            return _fail(EXIT_BAD_INPUT, f"--html {args.html}: cannot write {target} there")

    try:
        forte = evaluate_forte(pairs, mode=args.mode, unit=args.unit, encoder=args.encoder)
    except (ForteError, SentencePairingError) as exc:  # e.g. the mpnet encoder is not installed
        return _fail(EXIT_TOOL_FAILED, str(exc))
    want_rows = args.rows or args.html is not None
    forte_full = forte.to_json(rows=want_rows)

    captioning_full: dict[str, Any] | None = None
    if not args.no_captioning:
        from neuroscribe.training.metrics.captioning import CaptioningError, captioning_metrics

        try:
            captioning_full = captioning_metrics(pairs)
        except CaptioningError as exc:
            return _fail(EXIT_TOOL_FAILED, str(exc))

    if args.html is not None:
        try:
            written = write_html(args.html, forte_full, captioning_full, title=args.title,
                                 source=args.pairs.name)
        except OSError as exc:
            return _fail(EXIT_BAD_INPUT, f"cannot write the HTML page to {args.html}: {exc}")
        print(f"neuroscribe evaluate: wrote {written}", file=sys.stderr)

    result: dict[str, Any] = {"forte": forte_full if args.rows else forte.to_json(rows=False)}
    if captioning_full is not None:
        captioning_out = dict(captioning_full)
        if not args.rows:
            captioning_out.pop("per_report")
        result["captioning"] = captioning_out
    sys.stdout.write(json.dumps(result, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return 0
