"""``neuroscribe infer``: draft the report of one CT series with a model bundle (ONNX Runtime, no torch).

stdout holds the report and nothing else: a one-line notice (an AI draft, never a diagnosis, and,
for a bundle trained on ``neuroscribe synth`` data, no clinical validity), a blank line, the report.
Log lines and the run's figures (model, device, tokens, timings) go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from neuroscribe.argtypes import non_negative_int, positive_int
from neuroscribe.config import Settings

#: First line of every report the command prints.
NOTICE = "AI-GENERATED DRAFT - NOT A DIAGNOSIS: preliminary text for review by a radiologist."
#: Added to the notice when ``manifest.synthetic_training_data`` is true.
SYNTHETIC_NOTICE = "This model learned only from synthetic phantoms and has no clinical validity."


def notice(synthetic: bool) -> str:
    """The one-line notice printed above a report."""
    return f"{NOTICE} {SYNTHETIC_NOTICE}" if synthetic else NOTICE




def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bundle, series and decoding options."""
    parser.add_argument("series", type=Path, metavar="SERIES_DIR",
                        help="folder holding one CT series (one DICOM file per slice)")
    parser.add_argument("--model", type=Path, required=True, metavar="BUNDLE", help="model bundle folder")
    parser.add_argument("--beams", type=positive_int, default=1, help="beam width; 1 is greedy (default 1)")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="beam ranking: logprob / length ** this (default 1.0)")
    parser.add_argument("--max-new-tokens", type=positive_int,
                        help="length limit (default: the bundle's; never past its max_positions)")
    parser.add_argument("--no-repeat-ngram", type=non_negative_int, default=0, metavar="N",
                        help="ban repeating any N-gram of the report (default 0: off)")
    parser.add_argument("--device", default="auto",
                        help="auto (GPU if it starts, else CPU), cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--decoder", default="decoder",
                        help="decoder graph: decoder or decoder_int8 (default decoder)")
    parser.add_argument("--threads", type=positive_int, help="ONNX Runtime intra-op threads (default: all)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (notice, report, figures) instead of text")


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Load the bundle, build the series' model input, generate and print the report."""
    from neuroscribe.dicom_io.model_input import ModelGrid, series_to_input
    from neuroscribe.inference.engine import Engine
    from neuroscribe.log import configure_logging

    # stdout is for the report: this command logs to stderr.
    configure_logging(level=settings.logging.level, fmt=settings.logging.format, stream=sys.stderr)
    if not args.series.exists():
        print(f"neuroscribe infer: no series at {args.series}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    engine = Engine.load(args.model, device=args.device, decoder=args.decoder, threads=args.threads)
    loaded = time.perf_counter()
    images = series_to_input(args.series, ModelGrid.from_dict(engine.input_spec))[None]  # (1, S, C, H, W)
    result = engine.generate(images, num_beams=args.beams, max_new_tokens=args.max_new_tokens,
                             length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram)[0]
    done = time.perf_counter()
    figures = {
        "model": engine.bundle.label,
        "model_uid": engine.bundle.manifest["model_uid"],
        "device": engine.device,
        "providers": engine.providers,
        "fallback_reason": engine.fallback_reason,
        "precision": engine.precision,
        "decoder": engine.decoder_key,
        "beams": args.beams,
        "tokens": result.n_tokens,
        "stopped_by": result.stopped_by,
        "load_seconds": round(loaded - started, 3),
        "series_and_generate_seconds": round(done - loaded, 3),
        "generate_seconds": round(result.seconds, 3),
    }
    if args.json:
        print(json.dumps({"notice": notice(engine.synthetic), "report": result.text, **figures}, indent=2))
        return 0
    print(notice(engine.synthetic))
    print()
    print(result.text)
    print(f"[{figures['model']} on {figures['device']} ({figures['precision']}, {figures['decoder']}): "
          f"{result.n_tokens} tokens, stopped by {result.stopped_by}; load {figures['load_seconds']} s, "
          f"series + generate {figures['series_and_generate_seconds']} s]", file=sys.stderr)
    return 0
