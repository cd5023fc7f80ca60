"""Score sealed bundles on a site dataset's held-out split with the ONNX graphs the service runs.

Used by the registry's promotion gate (``neuroscribe models promote --data``) and the quality
benchmark. Series go through the same cache code as training (``dataset.build_cache``, on each
bundle's own input grid) and reports are decoded greedily by the inference engine the service runs
(:class:`neuroscribe.inference.engine.Engine`, ONNX Runtime); no torch.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neuroscribe.inference.bundle import Bundle
from neuroscribe.training.dataset import CachedSplit, ModelGrid, SplitSpec, build_cache, load_manifest

__all__ = ["bundle_reports", "heldout_digest", "heldout_scores", "heldout_split", "score_reports",
           "training_split_spec"]


def score_reports(references: Sequence[str], candidates: Sequence[str], ids: Sequence[str], *,
                  captioning: bool = True) -> dict[str, Any]:
    """Strict FORTE (mean F1 and per category) and, optionally, the captioning metrics' corpus values."""
    from neuroscribe.training.metrics.forte import Pair, evaluate_forte

    pairs = [Pair(i, r, c) for i, r, c in zip(ids, references, candidates, strict=True)]
    forte = evaluate_forte(pairs, mode="strict")
    scores: dict[str, Any] = {
        "n_studies": len(pairs),
        "forte_strict_mean_f1": forte.mean_f1,
        "forte_strict_categories": {k: v["f1"] for k, v in forte.categories.items()},
    }
    if captioning:
        from neuroscribe.training.metrics.captioning import captioning_metrics

        scores["captioning"] = captioning_metrics(pairs)["corpus"]
    return scores


def heldout_digest(split: CachedSplit) -> str:
    """sha256 over the held-out studies' ids and series hashes: two scores compare only if equal."""
    digest = hashlib.sha256()
    for study in split.studies:
        digest.update(f"{study.study_id}:{study.series_sha256}\n".encode())
    return digest.hexdigest()


def bundle_reports(bundle: Bundle, split: CachedSplit, *, prompt_ids: Sequence[int] | None = None,
                   batch_size: int = 16, limit: int | None = None, device: str = "auto") -> list[str]:
    """Greedy reports (the inference engine, ONNX Runtime) for the first ``limit`` studies of ``split``.

    ``prompt_ids`` default to the manifest's inference prompt; the benchmark passes other styles'.
    Decoding is plain greedy with the manifest's length limit and stop ids and no repetition guard,
    as the trainer's validation (``trainer.generate_reports``) decodes, so the scores compare.
    """
    from neuroscribe.inference.engine import Engine

    engine = Engine.load(bundle.path, device=device, warmup=False)
    n = len(split) if limit is None else min(limit, len(split))
    reports: list[str] = []
    for start in range(0, n, batch_size):
        rows = range(start, min(n, start + batch_size))
        images = np.stack([np.asarray(split[i].array, np.float32) for i in rows])  # (b, S, C, H, W)
        results = engine.generate(images, prompt_ids=prompt_ids, repeat_guard=0)
        reports.extend(r.text for r in results)
    return reports


def training_split_spec(bundle: Bundle) -> SplitSpec:
    """The patient split the bundle was trained with (its manifest), or the default one."""
    recorded = (bundle.manifest.get("training") or {}).get("split")
    return SplitSpec.from_dict(recorded) if recorded else SplitSpec()


def heldout_split(bundle: Bundle, data: str | os.PathLike[str], cache_dir: str | os.PathLike[str], *,
                  split: str = "test", spec: SplitSpec | None = None, workers: int = 1) -> CachedSplit:
    """The held-out studies of ``data`` on the bundle's grid (split spec: the bundle's training one)."""
    grid = ModelGrid.from_dict(bundle.manifest["input"])
    spec = training_split_spec(bundle) if spec is None else spec
    index = build_cache(load_manifest(Path(data)), cache_dir, grid, split_spec=spec, workers=workers)
    return index.split(split)


def heldout_scores(bundles: Sequence[Bundle], data: str | os.PathLike[str], *, workers: int = 1,
                   split: str = "test", captioning: bool = False,
                   cache_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Strict FORTE (and optionally captioning) scores of each bundle on the same held-out studies.

    The split spec is the first bundle's (the candidate's), so every bundle is scored on one set.
    """
    spec = training_split_spec(bundles[0])
    results = []
    with tempfile.TemporaryDirectory(prefix="neuroscribe-heldout-") as tmp:
        for i, bundle in enumerate(bundles):
            folder = Path(cache_dir) / f"grid{i}" if cache_dir else Path(tmp) / f"grid{i}"
            held = heldout_split(bundle, data, folder, split=split, spec=spec, workers=workers)
            if len(held) == 0:
                raise ValueError(f"the {split} split of {data} is empty: no held-out studies to score")
            candidates = bundle_reports(bundle, held)
            scores = score_reports([s.report for s in held.studies], candidates,
                                   [s.study_id for s in held.studies], captioning=captioning)
            scores["heldout_digest"] = heldout_digest(held)
            scores["bundle"] = bundle.label
            results.append(scores)
    return results
