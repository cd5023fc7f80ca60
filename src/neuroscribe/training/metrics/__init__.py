"""Evaluation metrics of generated reports: FORTE (``forte``, ``sentences``) and captioning metrics.

The FORTE names below are re-exported lazily, so importing a sibling module (the CLI's
``command``) does not load numpy or the keyword lists.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AGGREGATIONS": "forte",
    "CATEGORIES": "forte",
    "ForteError": "forte",
    "ForteResult": "forte",
    "ForteRow": "forte",
    "Mode": "forte",
    "Pair": "forte",
    "PairsFileError": "forte",
    "Unit": "forte",
    "evaluate_forte": "forte",
    "load_pairs": "forte",
    "score_row": "forte",
    "EncoderUnavailableError": "sentences",
    "SentencePairingError": "sentences",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the re-exported name from its module on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
