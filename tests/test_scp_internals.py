"""The pynetdicom hooks of dicom_io/scp.py and the fast header path of dicom_io/inspect.py.

They rely on pynetdicom and pydicom internals (pinned to 3.0.x in pyproject.toml): these tests
hold them byte-for-byte to what the libraries themselves produce, so an upgrade that breaks a
hook fails here.
"""
from __future__ import annotations

import copy
import io
import random
import socket
import struct
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta

from neuroscribe.dicom_io import inspect as inspect_module
from neuroscribe.dicom_io import scp
from neuroscribe.dicom_io.inspect import Refusal
from neuroscribe.dicom_io.writer import CtSeriesSpec, write_ct_series
from tests.conftest import free_port


def _uids(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        parts = (str(rng.randrange(10 ** rng.randrange(1, 12))) for _ in range(rng.randrange(1, 8)))
        uid = "1." + ".".join(parts)
        out.append(uid[:64].rstrip("."))
    return out


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless])
def test_file_meta_bytes_equal_pydicoms(ts: UID) -> None:
    """The directly encoded file meta equals pynetdicom's create_file_meta + pydicom's writer."""
    for uid in _uids(random.Random(1), 500):
        expected, actual = io.BytesIO(), io.BytesIO()
        write_file_meta_info(expected, create_file_meta(
            sop_class_uid=UID("1.2.840.10008.5.1.4.1.1.2"), sop_instance_uid=UID(uid), transfer_syntax=ts))
        scp._write_file_meta_info(actual, scp._create_file_meta(
            sop_class_uid=UID("1.2.840.10008.5.1.4.1.1.2"), sop_instance_uid=UID(uid), transfer_syntax=ts))
        assert expected.getvalue() == actual.getvalue()


def test_file_meta_without_instance_uid_fails_as_before() -> None:
    """An empty SOP Instance UID still goes to pydicom, which refuses it."""
    with pytest.raises(AttributeError):
        scp._write_file_meta_info(io.BytesIO(), scp._create_file_meta(
            sop_class_uid="1.2", sop_instance_uid="", transfer_syntax=ExplicitVRLittleEndian))


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xC000, 0xB000])
def test_store_response_bytes_equal_pynetdicoms(status: int) -> None:
    """The directly encoded C-STORE-RSP command set equals pynetdicom's encode_msg output."""
    for message_id, uid in zip([1, 2, 7, 65535], _uids(random.Random(status), 4), strict=True):
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = message_id
        rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        rsp.AffectedSOPInstanceUID = uid
        rsp.Status = status
        message = C_STORE_RSP()
        message.primitive_to_message(rsp)
        (pdata,) = list(message.encode_msg(1, 0))
        assert pdata.presentation_data_value_list == [(1, b"\x03" + scp._encode_store_response(rsp))]


def test_store_response_with_error_comment_is_left_to_pynetdicom() -> None:
    """A response carrying an ErrorComment is not encoded by the fast path."""
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 1
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    rsp.AffectedSOPInstanceUID = "1.2.3"
    rsp.Status = 0xC000
    rsp.ErrorComment = "bad"
    assert scp._encode_store_response(rsp) is None


def _outcome(fn, path: Path):
    try:
        return ("ok", fn(path))
    except Refusal as refusal:
        return ("refused", refusal.reason, int(refusal.status))
    except Exception as exc:
        return ("raised", type(exc).__name__)


def test_fast_header_equals_reference_on_mutated_files(tmp_path: Path) -> None:
    """Fast path accepts only what the reference accepts, with an equal header; refusals match."""
    rng = random.Random(7)
    spec = CtSeriesSpec(rows=64, columns=64, slices=1)
    base = pydicom.dcmread(write_ct_series(spec, tmp_path / "series")[0])
    originals = []
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds = copy.deepcopy(base)
        ds.file_meta.TransferSyntaxUID = ts
        path = tmp_path / f"{ts.name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        originals.append(path.read_bytes())
    fast_accepted = 0
    for n in range(800):
        data = bytearray(rng.choice(originals))
        kind = rng.choice(["trunc", "flip", "len"])
        if kind == "trunc":
            data = data[: rng.randrange(len(data))]
        elif kind == "flip":
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(min(len(data), 2000))] = rng.randrange(256)
        else:
            i = rng.randrange(132, 1996)
            data[i : i + 2] = struct.pack("<H", rng.randrange(65536))
        path = tmp_path / f"m{n}.dcm"
        path.write_bytes(bytes(data))
        reference = _outcome(lambda p: inspect_module._inspect_with_pydicom(p, None), path)
        fast = inspect_module._inspect_fast(path)
        if fast is not None:
            fast_accepted += 1
            assert reference == ("ok", fast)
        assert _outcome(inspect_module.inspect_received, path) == reference
        path.unlink()
    assert fast_accepted > 50


def _server(tmp_path: Path, **dicom: object):
    from neuroscribe.config import load_settings
    from neuroscribe.daemon.service import Service

    port = free_port()
    settings = load_settings(None, storage={"root": str(tmp_path), "min_free_bytes": 0},
                             dicom={"port": port, "require_called_ae": False, **dicom})
    service = Service(settings)
    service.start()
    return service, port


def _wait_idle(service, limit: float) -> float:
    start = time.monotonic()
    while service.scp.active_associations and time.monotonic() - start < limit:
        time.sleep(0.005)
    return time.monotonic() - start


def test_associations_end_promptly(tmp_path: Path) -> None:
    """Release, abort, a dropped connection and the idle timeout all end the association."""
    service, port = _server(tmp_path, network_timeout_seconds=1.0)
    try:
        ae = AE()
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", port)
        start = time.monotonic()
        assoc.release()
        assert time.monotonic() - start < 0.1
        assert _wait_idle(service, 2) < 0.5
        ae.associate("127.0.0.1", port).abort()
        assert _wait_idle(service, 2) < 0.5
        assoc = ae.associate("127.0.0.1", port)
        assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
        assert _wait_idle(service, 2) < 0.5
        ae.associate("127.0.0.1", port)
        assert 0.8 < _wait_idle(service, 4) < 2.0
    finally:
        service.stop()


def test_associations_leave_no_open_descriptors(tmp_path: Path) -> None:
    """Each association's sockets (and the wake-up pair) are closed when it ends, not at GC."""
    import gc
    import subprocess

    service, port = _server(tmp_path)
    try:
        def open_fds() -> int:
            return len(list(Path("/proc/self/fd").iterdir()))

        subprocess.run(["echoscu", "127.0.0.1", str(port)], check=True, capture_output=True)
        _wait_idle(service, 2)
        gc.disable()  # descriptors must be closed by the code, not by the garbage collector
        try:
            before = open_fds()
            for _ in range(5):
                subprocess.run(["echoscu", "127.0.0.1", str(port)], check=True, capture_output=True)
            _wait_idle(service, 2)
            time.sleep(0.3)  # the DUL threads finish just after the association threads
            assert open_fds() == before
        finally:
            gc.enable()
    finally:
        service.stop()


def test_receive_counters_follow_stores_and_refusals(tmp_path: Path) -> None:
    """The SCP's running totals count associations, instances, bytes, re-sends and refusals by reason."""
    import subprocess

    from neuroscribe.dicom_io.writer import ct_slice_dataset
    from tests.conftest import send_datasets

    service, port = _server(tmp_path)
    try:
        spec = CtSeriesSpec(rows=16, columns=16, slices=2)
        files = write_ct_series(spec, tmp_path / "ct")
        for _ in range(2):  # the second push re-sends both instances
            subprocess.run(["storescu", "-aec", "ANY", "127.0.0.1", str(port), *map(str, files)],
                           check=True, capture_output=True)
        broken = ct_slice_dataset(spec, 0, None)
        assert send_datasets(port, [broken]) == [0xA900]
        _wait_idle(service, 2)
        counters = service.scp.counters
        assert (counters.associations, counters.instances, counters.duplicates) == (3, 4, 2)
        stored = sum(p.stat().st_size for p in (tmp_path / "spool").rglob("*.dcm"))
        assert counters.bytes == 2 * stored  # bytes written to the spool, re-sends included
        assert counters.failures == {"no_pixel_data": 1}
    finally:
        service.stop()
