"""Logging: structlog JSON lines to stdout (systemd takes them there) and to ``<root>/logs``.

Rules that keep patient data out of every line, at every level:

* our code logs UIDs only through :func:`hash_uid`, and never names, IDs, dates of birth or report
  text (they are not passed to the logger at all);
* pynetdicom's identifier logging is switched off and its chatty loggers are held at WARNING;
* Python warnings (pydicom warns with element *values*) are logged by category and origin only;
* :func:`_drop_patient_keys` removes any event key that names patient data, as a last guard.
"""

from __future__ import annotations

import hashlib
import logging
import logging.handlers
import sys
import warnings
from pathlib import Path
from typing import Any

import structlog

#: Event keys that would carry patient data; removed from any log event that has them.
PATIENT_KEYS = frozenset(
    {
        "patient_name",
        "patient_id",
        "patient_birth_date",
        "birth_date",
        "patient_sex",
        "accession_number",
        "report",
        "report_text",
        "other_patient_ids",
    }
)

LOG_FILE_NAME = "neuroscribe.jsonl"
_LOG_FILE_BYTES = 50 * 1024**2
_LOG_FILE_BACKUPS = 10


def hash_uid(uid: object) -> str:
    """A short, stable, non-reversible tag for a DICOM UID, fit for logs and metrics labels."""
    return hashlib.sha256(str(uid).encode()).hexdigest()[:12]


def exception_fields(exc: BaseException) -> dict[str, str]:
    """An unexpected exception as log fields without its message (which may quote patient data).

    ``error`` is the type; ``at`` the innermost frame, ``file:line in function``.
    """
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = "" if tb is None else (f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno} "
                                   f"in {tb.tb_frame.f_code.co_name}")
    return {"error": type(exc).__name__, "at": where}


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """The logger of a module: ``LOG = get_logger(__name__)``."""
    return structlog.stdlib.get_logger(name)


def _drop_patient_keys(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in PATIENT_KEYS.intersection(event):
        event[key] = "[withheld]"
    return event


def _withhold_warning_text(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """Python warnings can quote element values (names, IDs); keep only where they came from."""
    record = event.get("_record")
    if record is not None and record.name == "py.warnings":
        text = str(event.get("event", ""))
        origin = text.split(":", 2)[:2]
        event["event"] = "python warning (text withheld: it may quote patient data)"
        event["origin"] = ":".join(origin).strip()
    return event


_SHARED_PROCESSORS: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    _drop_patient_keys,
]


def configure_logging(
    level: str = "INFO",
    fmt: str = "json",
    log_dir: Path | None = None,
    stream: Any = None,
    file_name: str = LOG_FILE_NAME,
) -> None:
    """Route structlog and the standard library through one JSON renderer.

    Parameters
    ----------
    level
        Minimum level for our loggers.
    fmt
        ``json`` or ``console`` for the stream; the file under ``log_dir`` is always JSON.
    log_dir
        Where the JSON-lines file is written (rotated); None logs to the stream only.
    stream
        Defaults to stdout.
    file_name
        The file under ``log_dir`` (each process writes and rotates its own).
    """
    _silence_identifier_logging()
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_SHARED_PROCESSORS,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )

    def formatter(renderer: Any) -> logging.Formatter:
        return structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_SHARED_PROCESSORS,
            processors=[
                _withhold_warning_text,
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )

    json_renderer = structlog.processors.JSONRenderer(sort_keys=False)
    stream_handler = logging.StreamHandler(stream or sys.stdout)
    stream_handler.setFormatter(
        formatter(json_renderer if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False))
    )
    handlers: list[logging.Handler] = [stream_handler]
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.handlers.RotatingFileHandler(
            log_dir / file_name, maxBytes=_LOG_FILE_BYTES, backupCount=_LOG_FILE_BACKUPS
        )
        file_handler.setFormatter(formatter(json_renderer))
        handlers.append(file_handler)

    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    warnings.simplefilter("default")


def _silence_identifier_logging() -> None:
    """pynetdicom logs request/response identifiers (patient data) by default: turn that off."""
    from pynetdicom import _config as pynetdicom_config

    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    # Association-level INFO lines are replaced by our own, PHI-free events.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # logs raw SOP Instance UIDs at INFO
