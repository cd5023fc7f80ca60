"""The model registry: which bundles a site has, which one the service runs, and the promotion gate.

Layout (``[models] dir``, default ``<storage.root>/models``)::

    models/
      bundles/<name>-<version>-<uid12>/   sealed bundles (inference.bundle), copied in by `promote`
      registry.json                       {"current": id | null, "stack": [promoted ids], "history": [...]}
      .lock                               flock held while the registry changes

A candidate replaces the current model only when its strict FORTE mean F1 on the site's held-out
set beats the current model's by more than ``[models] promotion_margin``; otherwise the promotion
is refused and both figures are given. Both figures must come from the same held-out studies:
either both bundles are scored now on the held-out split of a dataset (``--data``; the same ONNX
graphs the service runs), or the scores recorded at training are compared, and only when they name
the same held-out digest. ``rollback`` makes the previously promoted bundle current again. Every
change is appended to ``history`` with its figures. The service reads :meth:`Registry.current`.

This module is torch-free (the running service imports it); scoring with ``--data`` imports the
dataset and metric code lazily.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from neuroscribe.durable import atomic_file, fsync_dir
from neuroscribe.errors import NeuroScribeError
from neuroscribe.inference.bundle import Bundle, BundleError, load_bundle, read_manifest
from neuroscribe.log import get_logger

__all__ = ["GateDecision", "PromotionRefused", "Registry", "RegistryError", "bundle_id"]

LOG = get_logger(__name__)
REGISTRY_FILE = "registry.json"
BUNDLES_DIR = "bundles"


class RegistryError(NeuroScribeError):
    """The registry or a bundle in it cannot be used as asked; the message says why."""


class PromotionRefused(RegistryError):  # noqa: N818 (a refusal, not a crash)
    """The candidate did not pass the gate; ``decision`` holds both figures."""

    def __init__(self, decision: GateDecision) -> None:
        super().__init__(decision.message)
        self.decision = decision


@dataclass(frozen=True)
class GateDecision:
    """The promotion gate's verdict with the figures it compared."""

    passed: bool
    candidate_f1: float | None
    current_f1: float | None
    margin: float
    heldout: str  # "recorded:<digest12>" or "data:<digest12>" or "none" (first model)
    message: str


def bundle_id(manifest: dict[str, Any]) -> str:
    """The registry id of a bundle: ``<name>-<version>-<first 12 digits of the model UID hash>``."""
    import hashlib

    uid_hash = hashlib.sha256(str(manifest["model_uid"]).encode()).hexdigest()[:12]
    label = f"{manifest['name']}-{manifest['version']}"
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)
    return f"{safe}-{uid_hash}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Registry:
    """A model registry folder (created on first use)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.bundles_dir = self.root / BUNDLES_DIR

    # ------------------------------------------------------------------ state
    def _read(self) -> dict[str, Any]:
        path = self.root / REGISTRY_FILE
        if not path.exists():
            return {"format": "neuroscribe-registry/1", "current": None, "stack": [], "history": []}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise RegistryError(f"{path} is not valid JSON: {exc}") from exc

    def _write(self, state: dict[str, Any]) -> None:
        with atomic_file(self.root / REGISTRY_FILE, "w") as fh:
            json.dump(state, fh, indent=2, sort_keys=True)
            fh.write("\n")

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The registry state under an exclusive lock; written back when the body returns."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._read()
            before = json.dumps(state, sort_keys=True)
            yield state
            if json.dumps(state, sort_keys=True) != before:
                self._write(state)

    # ------------------------------------------------------------------ queries
    def current_id(self) -> str | None:
        """Id of the bundle the service should run, or None."""
        return self._read().get("current")

    def current(self, *, verify: bool = True) -> Bundle | None:
        """The current bundle (checksums verified), or None when nothing was promoted."""
        current = self.current_id()
        if current is None:
            return None
        return load_bundle(self.bundles_dir / current, verify=verify)

    def history(self) -> list[dict[str, Any]]:
        """Every promotion, refusal and rollback, oldest first."""
        return list(self._read().get("history", []))

    def entries(self) -> list[dict[str, Any]]:
        """One dict per stored bundle: id, name, version, created, held-out F1 and digest, current."""
        current = self.current_id()
        rows = []
        if not self.bundles_dir.is_dir():
            return rows
        for folder in sorted(self.bundles_dir.iterdir()):
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            try:
                manifest = read_manifest(folder)
            except BundleError as exc:
                rows.append({"id": folder.name, "error": str(exc), "current": folder.name == current})
                continue
            scores = manifest.get("scores") or {}
            rows.append({
                "id": folder.name, "name": manifest["name"], "version": manifest["version"],
                "created": manifest.get("created"), "synthetic": manifest.get("synthetic_training_data"),
                "heldout_f1": scores.get("forte_strict_mean_f1"),
                "heldout_digest": scores.get("heldout_digest"), "current": folder.name == current,
            })
        return rows

    # ------------------------------------------------------------------ changes
    def add(self, source: str | os.PathLike[str]) -> str:
        """Copy a verified bundle into ``bundles/`` (idempotent); return its id."""
        bundle = load_bundle(source)
        ident = bundle_id(dict(bundle.manifest))
        target = self.bundles_dir / ident
        if target.exists():
            load_bundle(target)  # an altered copy must not be trusted
            return ident
        self.bundles_dir.mkdir(parents=True, exist_ok=True)
        staging = self.bundles_dir / f".{ident}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(bundle.path, staging)
        for path in staging.iterdir():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(staging)
        load_bundle(staging)
        staging.rename(target)
        fsync_dir(self.bundles_dir)
        return ident

    def gate(self, candidate: Bundle, margin: float, *, data: str | os.PathLike[str] | None = None,
             workers: int = 1) -> GateDecision:
        """Compare ``candidate`` with the current bundle on one held-out set (see module doc)."""
        current = self.current()
        if current is None:
            return GateDecision(True, candidate.heldout_f1, None, margin, "none",
                                "no current model: the candidate becomes the first")
        if data is not None:
            from neuroscribe.training.evaluate_bundle import heldout_scores

            results = heldout_scores([candidate, current], data, workers=workers)
            cand, curr = (r["forte_strict_mean_f1"] for r in results)
            heldout = f"data:{results[0]['heldout_digest'][:12]}"
        else:
            cs, ks = candidate.manifest.get("scores") or {}, current.manifest.get("scores") or {}
            cand, curr = cs.get("forte_strict_mean_f1"), ks.get("forte_strict_mean_f1")
            if cand is None or curr is None or not cs.get("heldout_digest") or \
                    cs.get("heldout_digest") != ks.get("heldout_digest"):
                raise RegistryError(
                    "the recorded scores of the candidate and the current model are not on the same held-out "
                    "studies; score both now with --data DIR (the site dataset)")
            heldout = f"recorded:{cs['heldout_digest'][:12]}"
        passed = cand is not None and curr is not None and cand > curr + margin
        verdict = "beats" if passed else "does not beat"
        message = (f"candidate {candidate.label} strict FORTE mean F1 {_fmt(cand)} {verdict} current "
                   f"{current.label} {_fmt(curr)} by more than the margin {margin:.3f} ({heldout})")
        return GateDecision(passed, cand, curr, margin, heldout, message)

    def promote(self, source: str | os.PathLike[str], margin: float, *,
                data: str | os.PathLike[str] | None = None, workers: int = 1) -> GateDecision:
        """Add ``source`` and make it current if it passes the gate; :class:`PromotionRefused` if not."""
        ident = self.add(source)
        candidate = load_bundle(self.bundles_dir / ident)
        if ident == self.current_id():
            raise RegistryError(f"{ident} is already the current model")
        decision = self.gate(candidate, margin, data=data, workers=workers)
        event = {"at": _now(), "bundle": ident, "candidate_f1": decision.candidate_f1,
                 "current_f1": decision.current_f1, "margin": margin, "heldout": decision.heldout}
        with self._locked() as state:
            event["previous"] = state.get("current")
            if decision.passed:
                state.setdefault("stack", []).append(ident)
                state["current"] = ident
                state["history"].append({"action": "promote", **event})
            else:
                state["history"].append({"action": "refuse", **event})
        LOG.info("model_promotion", bundle=ident, passed=decision.passed, candidate_f1=decision.candidate_f1,
                 current_f1=decision.current_f1, margin=margin)
        if not decision.passed:
            raise PromotionRefused(decision)
        return decision

    def rollback(self) -> str:
        """Make the model that was current before the last promotion current again; return its id.

        Promotions form a stack: each rollback goes one further back, and a later promotion
        pushes on top of what is current then.
        """
        with self._locked() as state:
            stack = state.setdefault("stack", [])
            current = state.get("current")
            if len(stack) < 2:
                raise RegistryError("nothing to roll back to: no earlier model was current")
            previous = stack[-2]
            load_bundle(self.bundles_dir / previous)  # refuse a damaged bundle before switching
            stack.pop()
            state["current"] = previous
            state["history"].append({"action": "rollback", "at": _now(), "bundle": previous,
                                     "previous": current})
        LOG.info("model_rollback", bundle=previous, previous=current)
        return previous


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
