"""Logs are JSON lines and never carry patient data, at any level, on any path."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import numpy as np
import pytest

from neuroscribe.dicom_io.writer import CtSeriesSpec, ct_slice_dataset, write_ct_series
from neuroscribe.log import configure_logging, get_logger, hash_uid
from tests.conftest import ServerFactory, decided, logging_restored, send_datasets, storescu

PATIENT_NAME = "SENTINELNAME^Ozymandias"
PATIENT_ID = "PID-SENTINEL-4711"
BIRTH_DATE = "19451231"
ACCESSION = "ACCSENTINEL99"


def test_no_patient_data_in_any_log_line(server_factory: ServerFactory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A study with known identifiers, stored, refused and rejected at DEBUG: none of them is logged."""
    server = server_factory(NEUROSCRIBE_LOGGING__LEVEL="DEBUG").start()
    identity = {"patient_name": PATIENT_NAME, "patient_id": PATIENT_ID,
                "patient_birth_date": BIRTH_DATE, "accession_number": ACCESSION}
    head = CtSeriesSpec(rows=32, columns=32, slices=6, **identity)
    chest = CtSeriesSpec(rows=32, columns=32, slices=6, body_part_examined="CHEST",
                         series_description="THORAX", study_description="CT THORAX",
                         protocol_name="CHEST", study_instance_uid=head.study_instance_uid, **identity)
    assert storescu(server.port, write_ct_series(head, tmp_path / "head")).returncode == 0
    assert storescu(server.port, write_ct_series(chest, tmp_path / "chest")).returncode == 0
    broken = ct_slice_dataset(head, 0, np.zeros((32, 32)))
    broken.PixelData = broken.PixelData[:-10]
    assert send_datasets(server.port, [broken]) == [0xA900]
    server.wait_for(decided(head.series_instance_uid))
    assert server.wait_for(decided(chest.series_instance_uid)).reason == "not_head"
    server.stop()

    logs = server.logs()
    assert "series decided" in logs and "instance refused" in logs  # the paths really ran
    for secret in (PATIENT_NAME, "SENTINELNAME", "Ozymandias", PATIENT_ID, BIRTH_DATE, ACCESSION):
        assert secret not in logs, f"{secret!r} leaked into the logs"
    assert head.series_instance_uid not in logs  # UIDs appear hashed only
    assert hash_uid(head.series_instance_uid) in logs
    log_file = server.root / "logs" / "neuroscribe.jsonl"
    lines = log_file.read_text().splitlines()
    assert lines and all(isinstance(json.loads(line), dict) for line in lines)


def test_patient_keys_are_withheld_even_if_passed() -> None:
    """A patient-data key passed to a logger by mistake is replaced before rendering."""
    stream = io.StringIO()
    configure_logging(level="DEBUG", stream=stream)
    get_logger("test").info("oops", patient_name=PATIENT_NAME, patient_id=PATIENT_ID, ok=1)
    event = json.loads(stream.getvalue().splitlines()[-1])
    assert event["patient_name"] == event["patient_id"] == "[withheld]"
    assert event["ok"] == 1
    assert PATIENT_NAME not in stream.getvalue()


def test_python_warnings_are_logged_without_their_text() -> None:
    """pydicom warns with element values; the warning is logged by origin, its text withheld."""
    stream = io.StringIO()
    configure_logging(level="DEBUG", stream=stream)
    # This is the record logging.captureWarnings makes of a pydicom warning.
    logging.getLogger("py.warnings").warning(
        f"/venv/pydicom/valuerep.py:440: UserWarning: Invalid value for VR PN: {PATIENT_NAME!r}"
    )
    text = stream.getvalue()
    assert "python warning" in text
    assert PATIENT_NAME not in text


def test_pynetdicom_identifier_logging_is_off() -> None:
    """configure_logging switches off pynetdicom's request/response identifier logging."""
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = _config.LOG_RESPONSE_IDENTIFIERS = True
    configure_logging()
    assert _config.LOG_REQUEST_IDENTIFIERS is False
    assert _config.LOG_RESPONSE_IDENTIFIERS is False
    assert logging.getLogger("pynetdicom").level >= logging.WARNING


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Leave the process's logging as pytest expects it."""
    with logging_restored():
        yield


def test_exception_fields_name_the_type_and_place_never_the_message() -> None:
    """An unexpected error on an input path is logged without its message, which may quote the input."""
    from neuroscribe.log import exception_fields

    def parse(value: str) -> int:
        return int(value)

    try:
        parse("DOE^JANE")
    except ValueError as exc:
        fields = exception_fields(exc)
    assert fields["error"] == "ValueError"
    assert fields["at"].startswith("test_logging.py:") and fields["at"].endswith("in parse")
    assert "DOE" not in str(fields)
