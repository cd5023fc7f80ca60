"""``neuroscribe doctor``: checks an operator runs before (or instead of) starting the service."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from neuroscribe.config import Settings
from neuroscribe.dicom_io.scp import port_is_free
from neuroscribe.errors import StoreError
from neuroscribe.store import LATEST_VERSION, Database

#: Debian tools NeuroScribe uses when present: DCMTK for the demo and tests, dicom3tools to judge SRs.
TOOLS = ("storescu", "echoscu", "dcmdump", "dsrdump", "dciodvfy")


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report."""

    name: str
    ok: bool
    detail: str
    required: bool = True


def run_checks(settings: Settings, model: Path | None = None) -> list[Check]:
    """Every check, in the order an operator would fix them; ``model``: also load that bundle."""
    checks = [Check("config", True, "settings loaded and valid")]
    root = Path(settings.storage.root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".doctor-write-probe"
        probe.write_bytes(b"ok")
        probe.unlink()
        checks.append(Check("storage.root", True, f"{root.resolve()} is writable"))
    except OSError as exc:
        checks.append(Check("storage.root", False, f"{root}: {exc.strerror}"))
        return checks
    stats = os.statvfs(root)
    free = stats.f_bavail * stats.f_frsize
    floor = settings.storage.min_free_bytes
    checks.append(Check("disk", free >= floor,
                        f"{free / 1024**3:.1f} GiB free, floor {floor / 1024**3:.1f} GiB "
                        "(storage.min_free_bytes)"))
    try:
        db = Database(settings.storage.resolved_database_url)
        checks.append(Check("database", db.schema_version == LATEST_VERSION,
                            f"schema version {db.schema_version} of {LATEST_VERSION}"))
        db.close()
    except StoreError as exc:
        checks.append(Check("database", False, str(exc)))
    listeners = [("dicom.port", settings.dicom.bind, settings.dicom.port)]
    if settings.http.enabled and settings.http.port:
        listeners.append(("http.port", settings.http.bind, settings.http.port))
    if settings.learning.enabled and settings.learning.port:
        listeners.append(("learning.port", settings.learning.bind, settings.learning.port))
    for name, bind, port in listeners:
        free_port = port_is_free(bind, port)
        checks.append(Check(name, free_port, f"{bind}:{port} "
                            + ("is free" if free_port else "is in use (is NeuroScribe already running?)")))
    checks.append(_tls_check(settings))
    for tool in TOOLS:
        path = shutil.which(tool)
        checks.append(Check(f"tool {tool}", path is not None, path or "not on PATH", required=False))
    checks.append(_onnxruntime_check())
    if model is not None:
        checks.append(_model_check(model))
    else:  # the bundle the service would serve
        from neuroscribe.daemon.worker import resolve_bundle

        choice = resolve_bundle(settings)
        if choice is None:
            checks.append(Check("model", False, "no model: set [models] bundle or promote one into the "
                                "registry (neuroscribe models promote)"))
        else:
            check = _model_check(choice.path)
            checks.append(Check(check.name, check.ok, f"{choice.source}: {check.detail}", check.required))
    return checks


def _tls_check(settings: Settings) -> Check:
    """Every enabled TLS setting builds its context (files exist, key matches certificate)."""
    from neuroscribe.errors import ConfigError
    from neuroscribe.tls import client_context, server_context

    enabled = []
    try:
        for key, tls in (("dicom.tls", settings.dicom.tls), ("learning.tls", settings.learning.tls)):
            if tls.enabled:
                server_context(tls, key=key)
                enabled.append(key)
        for kind, destinations in (("pacs", settings.pacs), ("ris", settings.ris)):
            for index, destination in enumerate(destinations):
                if destination.tls.enabled:
                    client_context(destination.tls, key=f"{kind}[{index}].tls")
                    enabled.append(f"{kind}[{index}].tls")
    except ConfigError as exc:
        return Check("tls", False, str(exc))
    return Check("tls", True, ", ".join(enabled) + " load" if enabled else "not enabled anywhere",
                 required=bool(enabled))


def _onnxruntime_check() -> Check:
    from neuroscribe.inference.providers import describe

    info = describe()
    return Check("onnxruntime", bool(info["installed"]), str(info["detail"]), required=False)


def _model_check(bundle: Path) -> Check:
    """Load the bundle as the service would (checksums, sessions, warm-up) and say where it runs."""
    from neuroscribe.errors import NeuroScribeError
    from neuroscribe.inference.engine import Engine

    try:
        engine = Engine.load(bundle)
    except (NeuroScribeError, OSError, ImportError) as exc:
        return Check("model", False, f"{bundle}: {exc}")
    where = f"{engine.device} {engine.providers}"
    if engine.fallback_reason:
        return Check("model", False, f"{engine.bundle.label} runs on the CPU: {engine.fallback_reason}",
                     required=False)
    return Check("model", True, f"{engine.bundle.label} ({engine.precision}) loads and runs on {where}, "
                 f"warm-up {engine.warmup_seconds:.2f} s")
