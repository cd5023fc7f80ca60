"""The Storage SCP against DCMTK's storescu/echoscu, over loopback, in a real server process."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless
from pynetdicom import AE

from neuroscribe.dicom_io.writer import CtSeriesSpec, write_ct_series
from neuroscribe.store import SeriesState
from tests.conftest import SERVER_AE, Server, ServerFactory, decided, echoscu, require_tool, storescu


def small(**changes: object) -> CtSeriesSpec:
    """A small CT series spec with fresh UIDs."""
    return CtSeriesSpec(**{"rows": 64, "columns": 64, "slices": 8, **changes})  # type: ignore[arg-type]


def test_echo_answers_and_wrong_called_ae_is_refused(server: Server) -> None:
    """C-ECHO succeeds for our AE title and is refused for another called AE title."""
    assert echoscu(server.port)
    assert not echoscu(server.port, called_ae="SOMEONE_ELSE")


def test_storescu_series_is_stored_as_received_and_selected(server: Server, tmp_path: Path) -> None:
    """Every instance is in the spool byte-for-byte (data set) and the series is selected."""
    spec = small(slices=12)
    files = write_ct_series(spec, tmp_path / "ct")
    result = storescu(server.port, files)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Received Store Response (Success)") == 12

    row = server.wait_for(decided(spec.series_instance_uid))
    assert row.state == SeriesState.SELECTED
    assert row.instance_count == 12
    assert row.completion == "quiet"
    for sent in files:
        original = pydicom.dcmread(sent)
        stored_path = (server.root / "spool" / spec.series_instance_uid
                       / f"{original.SOPInstanceUID}.dcm")
        stored = pydicom.dcmread(stored_path)
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert stored == original  # data set equality, element by element
    assert list((server.root / "incoming").iterdir()) == []


@pytest.mark.parametrize(
    ("syntax", "tool", "propose"),
    [
        (JPEGLosslessSV1, ("dcmcjpeg", "+e1"), "-xs"),
        (JPEGLSLossless, ("dcmcjpls", "+el"), "-xt"),
        (RLELossless, ("dcmcrle",), "-xr"),
        (JPEG2000Lossless, None, "-xv"),
    ],
    ids=["jpeg-lossless", "jpeg-ls", "rle", "jpeg2000"],
)
def test_compressed_transfer_syntaxes_are_stored_as_received(
    server: Server, tmp_path: Path, syntax: str, tool: tuple[str, ...] | None, propose: str
) -> None:
    """Compressed instances keep their transfer syntax and pixel data bytes in the spool."""
    spec = small(slices=4)
    plain = write_ct_series(spec, tmp_path / "plain")
    compressed = []
    for path in plain:
        out = tmp_path / f"{path.stem}-c.dcm"
        if tool is None:
            ds = pydicom.dcmread(path)
            ds.compress(syntax)
            ds.save_as(out, enforce_file_format=True)
        else:
            require_tool(tool[0])
            subprocess.run([*tool, str(path), str(out)], check=True, capture_output=True)
        compressed.append(out)
    assert str(pydicom.dcmread(compressed[0]).file_meta.TransferSyntaxUID) == syntax

    # Propose the files' own compressed syntax (storescu's -x? options), as a scanner would.
    result = storescu(server.port, compressed, extra=(propose, "-R"))
    assert result.returncode == 0, result.stderr
    server.wait_for(decided(spec.series_instance_uid))
    for path in compressed:
        sent = pydicom.dcmread(path)
        stored = pydicom.dcmread(server.root / "spool" / spec.series_instance_uid
                                 / f"{sent.SOPInstanceUID}.dcm")
        assert stored.file_meta.TransferSyntaxUID == syntax
        assert stored.PixelData == sent.PixelData


def test_resent_instances_are_idempotent_and_late_instances_reopen(server: Server, tmp_path: Path) -> None:
    """Re-sending changes nothing; a new instance after the decision opens revision 2."""
    spec = small(slices=6)
    files = write_ct_series(spec, tmp_path / "ct")
    assert storescu(server.port, files[:5]).returncode == 0
    first = server.wait_for(decided(spec.series_instance_uid))
    assert (first.revision, first.instance_count) == (1, 5)

    assert storescu(server.port, files[:5]).returncode == 0  # the same five again
    time.sleep(2.5)  # longer than the quiet period: a reopened series would have completed again
    store = server.state()
    again = store.series_row(spec.series_instance_uid)
    assert (again.state, again.revision, again.instance_count) == (first.state, 1, 5)
    assert store.instance_count() == 5

    assert storescu(server.port, files[5:]).returncode == 0  # a late sixth slice
    late = server.wait_for(lambda s: (r := s.series_row(spec.series_instance_uid))
                           and r.revision == 2 and r.state == SeriesState.SELECTED and r)
    assert late.instance_count == 6


def test_calling_ae_allow_list_refuses_unknown_scanners(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Only listed calling AE titles may associate."""
    allowed = '["CT_ALLOWED","ECHOSCU"]'
    server = server_factory(NEUROSCRIBE_DICOM__ALLOWED_CALLING_AES=allowed).start()
    files = write_ct_series(small(slices=2), tmp_path / "ct")
    refused = storescu(server.port, files, calling_ae="CT_UNKNOWN")
    assert refused.returncode != 0
    assert "Association Rejected" in refused.stderr
    assert storescu(server.port, files, calling_ae="CT_ALLOWED").returncode == 0
    assert server.state().instance_count() == 2


def test_address_allow_list_closes_other_sources(server_factory: ServerFactory) -> None:
    """A source address outside dicom.allowed_networks gets no association at all."""
    server = server_factory(NEUROSCRIBE_DICOM__ALLOWED_NETWORKS='["10.0.0.0/8"]')
    # start() waits for C-ECHO, which this configuration must refuse: start it by hand.
    with pytest.raises(AssertionError, match="did not answer C-ECHO"):
        server.start(timeout=4)
    assert "address not in dicom.allowed_networks" in server.logs()


def test_low_disk_answers_out_of_resources(server_factory: ServerFactory, tmp_path: Path) -> None:
    """Below the free-disk floor every C-STORE gets 0xA700 and nothing is spooled."""
    server = server_factory(NEUROSCRIBE_STORAGE__MIN_FREE_BYTES=str(10**18)).start()
    files = write_ct_series(small(slices=2), tmp_path / "ct")
    result = storescu(server.port, files)
    assert "Received Store Response (Refused: OutOfResources)" in result.stderr
    store = server.state()
    assert store.instance_count() == 0
    failures = store.failures()  # storescu stops after the first refusal
    assert [(f["reason"], f["status"]) for f in failures] == [("disk_full", 0xA700)]
    assert not any((server.root / "spool").iterdir())


def test_other_storage_classes_can_be_refused_by_config(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """With accept_other_storage=false an MR image finds no presentation context."""
    server = server_factory(NEUROSCRIBE_DICOM__ACCEPT_OTHER_STORAGE="false").start()
    mr = write_ct_series(small(slices=1, modality="MR",
                                     sop_class_uid="1.2.840.10008.5.1.4.1.1.4"), tmp_path / "mr")
    result = storescu(server.port, mr)
    assert result.returncode != 0
    assert server.state().instance_count() == 0


def test_association_limit_is_enforced(server_factory: ServerFactory) -> None:
    """With max_associations=1, a second association is rejected while the first is open."""
    server = server_factory(NEUROSCRIBE_DICOM__MAX_ASSOCIATIONS="1").start()
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = ae.associate("127.0.0.1", server.port, ae_title=SERVER_AE)
    assert held.is_established
    try:
        assert not echoscu(server.port)
    finally:
        held.release()
    time.sleep(0.5)
    assert echoscu(server.port)


def test_four_concurrent_scanners_lose_nothing(server: Server, tmp_path: Path) -> None:
    """Four storescu associations of 100 slices each at once: 400 instances, 4 series selected."""
    specs = [small(rows=128, columns=128, slices=100, accession_number=f"ACC{i}")
             for i in range(4)]
    file_sets = [write_ct_series(spec, tmp_path / f"ct{i}") for i, spec in enumerate(specs)]
    results: list[subprocess.CompletedProcess[str]] = []

    def push(files: list[Path], ae: str) -> None:
        results.append(storescu(server.port, files, calling_ae=ae, timeout=300))

    threads = [threading.Thread(target=push, args=(files, f"CT{i}"))
               for i, files in enumerate(file_sets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.returncode for r in results] == [0, 0, 0, 0]
    assert sum(r.stderr.count("Received Store Response (Success)") for r in results) == 400
    for spec in specs:
        row = server.wait_for(decided(spec.series_instance_uid), timeout=60)
        assert (row.state, row.instance_count) == (SeriesState.SELECTED, 100)
        assert len(list((server.root / "spool" / spec.series_instance_uid).iterdir())) == 100


def test_sigterm_stops_the_service_cleanly(server: Server) -> None:
    """SIGTERM ends the process with exit code 0 within the grace period."""
    assert server.stop() == 0
    assert "service stopped" in server.logs()

