"""The audit trail: one JSON line per security-relevant event, in the spirit of DICOM PS3.15 A.5.

::

    audit.configure(settings.storage.log_dir / "audit.jsonl")
    audit.record("association", "success", calling_ae="CT1", peer="10.0.0.5")

Separate from the application log (``log.py``) because its readers differ: a privacy officer asks
"who sent what, what left the building, who changed the configuration". Each line holds ``time``
(UTC, ISO 8601), ``event``, ``outcome`` (``success``, ``refused``, ``failure``) and the event's
fields. Like every log here it holds no patient data: UIDs hashed (:func:`neuroscribe.log.hash_uid`),
never names, IDs, accession numbers or report text. Lines are appended and flushed one by one under
a lock, so threads of one process never interleave; an unconfigured trail drops events (tests,
one-shot commands).

Events (see docs/operations.md): ``association``, ``instances_received``, ``report_sent``,
``report_dead``, ``export_for_training``, ``configuration``, ``model_promoted``,
``final_report_received``. A line that cannot be written (disk full) is reported in the application
log and does not stop the caller: reception and delivery go on.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuroscribe.durable import atomic_file
from neuroscribe.log import PATIENT_KEYS, get_logger

if TYPE_CHECKING:
    from neuroscribe.config import Settings

LOG = get_logger(__name__)

AUDIT_FILE_NAME = "audit.jsonl"
#: Under ``storage.root``: the digest of the settings at the last start, per key (no values).
CONFIG_STATE_FILE_NAME = "config-digest.json"

_lock = threading.Lock()
_path: Path | None = None


def configure(path: Path | None) -> None:
    """Append events to ``path`` from now on (its folder is created); None stops recording."""
    global _path
    with _lock:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        _path = path


def path() -> Path | None:
    """The file events go to, or None."""
    return _path


def record(event: str, outcome: str = "success", **fields: Any) -> None:
    """Append one event. Keys that name patient data are refused loudly (a programming error)."""
    bad = PATIENT_KEYS.intersection(fields)
    if bad:
        raise ValueError(f"audit fields {sorted(bad)} would hold patient data")
    line = json.dumps(
        {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event,
         "outcome": outcome, "pid": os.getpid(), **fields},
        separators=(",", ":"), default=str,
    )
    with _lock:
        if _path is None:
            return
        try:
            with _path.open("a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        except OSError as exc:
            LOG.error("audit event not written", audit_event=event, error=exc.strerror or type(exc).__name__)


def audit_configuration(settings: Settings, state_path: Path) -> bool:
    """Record ``configuration`` at service start; returns True if the settings changed since the last.

    The event holds ``sha256`` (of ``settings.model_dump_json()``), ``changed``, and when changed
    ``changed_keys``: the dotted keys whose values differ (``dicom.port``, ``pacs[0].tls.ca_file``),
    added or removed, never the values. ``state_path`` keeps the digest and one short hash per key
    for the next start (written atomically); without it (first start) ``changed`` is false and
    ``first_start`` true. An unreadable state file counts as a first start.
    """
    dumped = settings.model_dump_json()
    digest = hashlib.sha256(dumped.encode()).hexdigest()
    keys = {key: _value_hash(value) for key, value in _flatten(json.loads(dumped)).items()}
    previous: dict[str, Any] | None = None
    try:
        previous = json.loads(state_path.read_text(encoding="utf-8"))
        if not isinstance(previous, dict) or not isinstance(previous.get("keys"), dict):
            previous = None
    except (OSError, ValueError):
        previous = None
    fields: dict[str, Any] = {"sha256": digest}
    if previous is None:
        fields.update(changed=False, first_start=True)
    else:
        old_keys: dict[str, str] = previous["keys"]
        changed_keys = sorted(k for k in keys.keys() | old_keys.keys() if keys.get(k) != old_keys.get(k))
        fields.update(changed=previous.get("sha256") != digest, changed_keys=changed_keys)
    record("configuration", "success", **fields)
    if previous is None or previous.get("sha256") != digest:
        try:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(state_path, "w", encoding="utf-8") as fh:
                json.dump({"sha256": digest, "keys": keys}, fh, indent=1, sort_keys=True)
        except OSError as exc:
            LOG.error("configuration digest not saved", error=exc.strerror or type(exc).__name__)
    return bool(fields["changed"])


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Leaf values by dotted key; tables of arrays as ``pacs[0].host`` (as config errors name them)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        out = {}
        for index, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{index}]"))
        return out
    return {prefix: value}


def _value_hash(value: Any) -> str:
    """A short hash of one setting's value: enough to see a change, not to keep the value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
