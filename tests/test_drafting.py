"""draft_report end to end: a synthetic CT series, a tiny ONNX bundle, Orthanc as PACS, an MLLP RIS."""

from __future__ import annotations

import io
import json
import os
import random
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from neuroscribe.config import Settings, load_settings  # noqa: E402
from neuroscribe.dicom_io import scu  # noqa: E402
from neuroscribe.dicom_io.model_input import ModelGrid, series_to_input  # noqa: E402
from neuroscribe.dicom_io.scu import Outcome  # noqa: E402
from neuroscribe.inference.engine import Engine  # noqa: E402
from neuroscribe.log import configure_logging  # noqa: E402
from neuroscribe.reporting.draft import DISCLAIMER, split_report  # noqa: E402
from neuroscribe.reporting.drafting import DraftError, draft_report, sr_uids_for  # noqa: E402
from neuroscribe.reporting.hl7 import parse_oru, unescape  # noqa: E402
from neuroscribe.reporting.outbox import Outbox  # noqa: E402
from neuroscribe.store import Database, Destination, DestinationKind, OutboxState  # noqa: E402
from neuroscribe.training.bundle import build_bundle  # noqa: E402
from neuroscribe.training.model import CvitModel  # noqa: E402
from neuroscribe.training.prompts import InstructionStyle, PromptConfig, render_prompt  # noqa: E402
from neuroscribe.training.synth import plan_study, write_study  # noqa: E402
from neuroscribe.training.tokenizer import train_tokenizer  # noqa: E402
from tests.conftest import Clock, free_port, logging_restored  # noqa: E402
from tests.cvit_toys import batch, tiny_config, toy_images  # noqa: E402
from tests.orthanc import LOOPBACK, Orthanc  # noqa: E402
from tests.peers import Ris  # noqa: E402

GRID = ModelGrid(slices=4, height=32, width=32)  # tiny_config's grid
DEMO_BUNDLE = Path(__file__).resolve().parents[1] / "models" / "demo" / "bundle"
NOW = datetime(2026, 11, 30, 9, 15, tzinfo=UTC)
POLICY = {"backoff_base_seconds": 60.0, "backoff_factor": 2.0, "backoff_ceiling_seconds": 3600.0,
          "jitter": 0.1, "dead_letter_after_seconds": 86400.0, "poll_seconds": 0.05}
#: What the toy model learns to write: two sections, as the site's radiologists write them.
TOY_REPORTS = [
    "Findings:\nNo acute intracranial hemorrhage.\nVentricles are normal in size.\n"
    "Impression:\nNo acute findings.",
    "Findings:\nAcute left subdural hematoma measuring 8 mm.\nImpression:\nAcute subdural hematoma.",
]
PACS = Destination(DestinationKind.PACS, "main")
RIS = Destination(DestinationKind.RIS, "ris")


# -- peers (Orthanc and the RIS come from conftest.py) ---------------------------------------------


def sr_file(orthanc: Orthanc, orthanc_id: str) -> pydicom.Dataset:
    """The stored instance as Orthanc keeps it (``/instances/{id}/file``)."""
    url = f"{orthanc.url}/instances/{orthanc_id}/file"
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (loopback http)
        return pydicom.dcmread(io.BytesIO(response.read()))


# -- model and series ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """A sealed bundle of a tiny CvitModel that learned TOY_REPORTS (4 x 32 x 32 grid), on the CPU."""
    config = PromptConfig(style=InstructionStyle.PLAIN)
    prompt = render_prompt(config)
    tokenizer = train_tokenizer([*TOY_REPORTS, prompt] * 3, vocab_size=400)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model trains faster on one thread than on two contended ones
    try:
        torch.manual_seed(0)
        model = CvitModel(tiny_config(len(tokenizer), dropout=0.0))
        ids, mask, labels = batch(tokenizer, prompt, TOY_REPORTS)
        images = toy_images()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        for _ in range(120):
            loss = model(images, ids, mask, labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("bundles") / "toy"
    build_bundle(model.eval(), tokenizer, config, out, name="toy-drafter", version="0.1", grid=GRID.to_dict(),
                 synthetic_training_data=True, max_new_tokens=40)
    return Engine.load(out, device="cpu", threads=1)


@dataclass
class Series:
    """A written synthetic series and what its headers say."""

    files: list[Path]
    series_uid: str
    study_uid: str
    sop_uids: list[str]
    accession: str
    patient_id: str
    patient_name: str


def write_series(folder: Path, index: int, *, size: int = 32, slices: int = 8) -> Series:
    """One synthetic head-CT series (seed 11, study ``index``)."""
    plan = plan_study(11, index, "standard", "small", rows=size, columns=size, slices=slices)
    files = write_study(plan, folder)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return Series(files, str(headers[0].SeriesInstanceUID), str(headers[0].StudyInstanceUID),
                  [str(h.SOPInstanceUID) for h in headers], str(headers[0].AccessionNumber),
                  str(headers[0].PatientID), str(headers[0].PatientName))


# -- service side ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No NEUROSCRIBE_* variable of the shell; storage under tmp_path; logging put back afterwards."""
    for name in list(os.environ):
        if name.startswith("NEUROSCRIBE_"):
            monkeypatch.delenv(name)
    with logging_restored():
        yield tmp_path / "root"


def settings_for(root: Path, *, pacs_port: int | None = None, ris_port: int | None = None) -> Settings:
    """One PACS ``main`` and one RIS ``ris`` (ports where nothing listens unless given)."""
    return load_settings(
        storage={"root": str(root)},
        pacs=[{"name": "main", "ae_title": "ORTHANC", "host": LOOPBACK, "port": pacs_port or free_port(),
               "timeout_seconds": 5}],
        ris=[{"name": "ris", "host": LOOPBACK, "port": ris_port or free_port(), "timeout_seconds": 5}],
        outbox=POLICY,
    )


@pytest.fixture
def outbox_for() -> Iterator[Callable[[Settings, Clock], Outbox]]:
    """A new Outbox over the settings' database (one per process start); databases closed at the end."""
    opened: list[Database] = []

    def make(settings: Settings, clock: Clock) -> Outbox:
        opened.append(Database(settings.storage.resolved_database_url))
        return Outbox(settings, opened[-1], clock=clock, rng=random.Random(5))

    yield make
    for db in opened:
        db.close()


def sr_report_lines(sr: pydicom.Dataset) -> list[str]:
    """The TEXT items of the SR's sections (Findings, Impressions), disclaimers left out."""
    return [str(item.TextValue) for section in sr.ContentSequence if "ContentSequence" in section
            for item in section.ContentSequence if "TextValue" in item and item.TextValue != DISCLAIMER]


def oru_fields(er7: str, segment: str) -> list[list[str]]:
    """The fields of every ``segment`` of an ER7 message (plain split, field 0 is the name)."""
    return [s.split("|") for s in er7.split("\r") if s.startswith(f"{segment}|")]


# -- tests -----------------------------------------------------------------------------------------


def test_series_report_reaches_pacs_and_ris_once(
    _isolated: Path, tmp_path: Path, engine: Engine, orthanc: Orthanc, ris: Ris,
    outbox_for: Callable[[Settings, Clock], Outbox], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The SR lands in the study with every slice as evidence, the RIS gets the ORU; a redraft is a no-op."""
    series = write_series(tmp_path / "ct", 0)
    settings = settings_for(_isolated, pacs_port=orthanc.dicom_port, ris_port=ris.port)
    clock = Clock()
    outbox = outbox_for(settings, clock)

    record = draft_report(engine, series.files, settings=settings, outbox=outbox, now=NOW)
    assert (record.series_instance_uid, record.study_instance_uid) == (series.series_uid, series.study_uid)
    assert (record.model_name, record.model_version, record.created_at) == ("toy-drafter", "0.1",
                                                                             NOW.timestamp())
    assert record.sr_sop_instance_uid == sr_uids_for(series.series_uid, series.sop_uids).sop_instance_uid
    assert outbox.store.reports_for_series(series.series_uid) == [record]
    assert {i.destination for i in outbox.store.items(report_id=record.report_id)} == {PACS, RIS}

    results = outbox.deliver_due()
    assert {(r.destination, r.outcome) for r in results} == {(PACS, Outcome.DELIVERED),
                                                            (RIS, Outcome.DELIVERED)}
    orthanc_id = orthanc.find_instance(record.sr_sop_instance_uid)
    assert orthanc_id is not None
    assert orthanc.study_of_instance(record.sr_sop_instance_uid) == series.study_uid
    sr = sr_file(orthanc, orthanc_id)
    assert str(sr.SOPInstanceUID) == record.sr_sop_instance_uid
    assert str(sr.SeriesInstanceUID) == record.sr_series_instance_uid
    (study_ref,) = sr.CurrentRequestedProcedureEvidenceSequence
    (series_ref,) = study_ref.ReferencedSeriesSequence
    assert str(series_ref.SeriesInstanceUID) == series.series_uid
    assert sorted(str(i.ReferencedSOPInstanceUID) for i in series_ref.ReferencedSOPSequence) == sorted(
        series.sop_uids)

    (er7,) = ris.received
    inbound = parse_oru(er7)
    assert (inbound.control_id, inbound.accession, inbound.result_status) == (
        record.control_id, series.accession, "P")
    obx = oru_fields(er7, "OBX")
    assert {o[17] for o in obx} == {"toy-drafter^toy-drafter 0.1^L"}
    assert {o[18].split("^")[0] for o in obx} == {"toy-drafter 0.1"}
    assert engine.bundle.manifest["model_uid"] in obx[0][18]
    expected = engine.generate(series_to_input(series.files, GRID)[None])[0].text  # greedy: same text
    sections = [[ln.strip() for ln in part.splitlines() if ln.strip()] for part in split_report(expected)]
    assert all(sections), f"the toy model should write both sections, wrote {sections}"
    lines = sections[0] + sections[1]
    assert [(o[3].split("^")[0], unescape(o[5])) for o in obx] == [
        ("DISCLAIMER", DISCLAIMER), *(("FINDINGS", line) for line in sections[0]),
        *(("IMPRESSION", line) for line in sections[1])]
    assert sr_report_lines(sr) == lines

    # Again, as after a restart: a new Outbox on the same database; the model must not run.
    monkeypatch.setattr(engine, "generate", lambda *a, **k: pytest.fail("the model ran again"))
    clock.now += 600
    again = outbox_for(settings, clock)
    assert draft_report(engine, list(reversed(series.files)), settings=settings, outbox=again) == record
    assert again.store.reports_for_series(series.series_uid) == [record]
    assert again.deliver_due() == []
    # The stored SR sent again (a crash after the C-STORE, before it was recorded): still one SR.
    resent = scu.store(again.pacs_peer(settings.pacs[0]),
                       [pydicom.dcmread(settings.storage.root / "reports" / record.sr_file)])
    assert resent.outcome is Outcome.DELIVERED
    assert len(orthanc.find_instances(record.sr_sop_instance_uid)) == 1
    stored_uids = orthanc.study_instance_uids(series.study_uid)
    assert sorted(set(stored_uids) - set(series.sop_uids)) == [record.sr_sop_instance_uid]
    assert len(ris.received) == 1


def test_pacs_down_report_is_made_and_stays_pending(
    _isolated: Path, tmp_path: Path, engine: Engine, outbox_for: Callable[[Settings, Clock], Outbox],
) -> None:
    """With no PACS and no RIS answering, the report is still made, and its items wait to be retried."""
    series = write_series(tmp_path / "ct", 1)
    settings = settings_for(_isolated)
    clock = Clock()
    outbox = outbox_for(settings, clock)
    record = draft_report(engine, tmp_path / "ct", settings=settings, outbox=outbox)
    assert (settings.storage.root / "reports" / record.sr_file).is_file()
    results = outbox.deliver_due()
    assert {(r.destination, r.outcome, r.state) for r in results} == {
        (PACS, Outcome.RETRY, OutboxState.PENDING), (RIS, Outcome.RETRY, OutboxState.PENDING)}
    assert all(r.next_attempt_at is not None and r.next_attempt_at > clock.now for r in results)
    assert outbox.store.reports_for_series(series.series_uid) == [record]


def test_two_drafters_racing_make_one_report(
    _isolated: Path, tmp_path: Path, engine: Engine, outbox_for: Callable[[Settings, Clock], Outbox],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A drafter that missed the other's report (both ran the model) gets the stored one; its files go."""
    series = write_series(tmp_path / "ct", 7)
    settings = settings_for(_isolated)
    first = outbox_for(settings, Clock())
    record = draft_report(engine, series.files, settings=settings, outbox=first)
    second = outbox_for(settings, Clock())
    monkeypatch.setattr(second.store, "report_by_sr_uid", lambda _uid: None)  # it looked before the commit
    assert draft_report(engine, series.files, settings=settings, outbox=second) == record
    assert [p.name for p in (settings.storage.root / "reports").iterdir()] == [record.report_id]
    assert len(first.store.items()) == 2


def test_no_accession_means_no_oru_and_pacs_only(
    _isolated: Path, tmp_path: Path, engine: Engine, outbox_for: Callable[[Settings, Clock], Outbox],
) -> None:
    """A series without AccessionNumber gets its SR queued for the PACS and no ORU."""
    series = write_series(tmp_path / "ct", 2)
    for path in series.files:
        ds = pydicom.dcmread(path)
        ds.AccessionNumber = ""
        ds.save_as(path)
    settings = settings_for(_isolated)
    outbox = outbox_for(settings, Clock())
    record = draft_report(engine, series.files, settings=settings, outbox=outbox)
    assert (record.control_id, record.er7_file) == (None, None)
    assert [i.destination for i in outbox.store.items(report_id=record.report_id)] == [PACS]


def test_bad_series_are_refused_before_the_model_runs(
    _isolated: Path, tmp_path: Path, engine: Engine, outbox_for: Callable[[Settings, Clock], Outbox],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No files, two series mixed, a repeated file or a non-DICOM file: DraftError, nothing queued."""
    first, second = write_series(tmp_path / "a", 3), write_series(tmp_path / "b", 4)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    settings = settings_for(_isolated)
    outbox = outbox_for(settings, Clock())
    monkeypatch.setattr(engine, "generate", lambda *a, **k: pytest.fail("the model ran"))
    for files, message in (([], "no files"), ([*first.files, second.files[0]], "not one series"),
                           ([*first.files, first.files[0]], "repeat an instance"),
                           ([*first.files, junk], "file 8 cannot be read")):
        with pytest.raises(DraftError, match=message):
            draft_report(engine, files, settings=settings, outbox=outbox)
    assert outbox.store.report_ids() == set()
    with pytest.raises(ValueError, match="timezone-aware"):
        draft_report(engine, first.files, settings=settings, outbox=outbox, now=datetime(2026, 1, 1))


def test_logs_hold_no_patient_data(
    _isolated: Path, tmp_path: Path, engine: Engine, outbox_for: Callable[[Settings, Clock], Outbox],
) -> None:
    """The drafting log lines carry hashes and figures: no name, patient ID, accession, UID or text."""
    series = write_series(tmp_path / "ct", 5)
    settings = settings_for(_isolated)
    outbox = outbox_for(settings, Clock())
    stream = io.StringIO()
    configure_logging(level="DEBUG", stream=stream)
    record = draft_report(engine, series.files, settings=settings, outbox=outbox)
    draft_report(engine, series.files, settings=settings, outbox=outbox)
    text = stream.getvalue()
    events = [json.loads(line) for line in text.splitlines()]
    drafted = [e for e in events if e["event"] == "report drafted"]
    assert len(drafted) == 1 and drafted[0]["synthetic_model"] is True
    assert drafted[0]["report_id"] == record.report_id
    assert [e["event"] for e in events].count("report already made") == 1
    report_lines = sr_report_lines(pydicom.dcmread(settings.storage.root / "reports" / record.sr_file))
    secrets = [*series.patient_name.split("^"), series.patient_id, series.accession, series.series_uid,
               series.study_uid, record.sr_sop_instance_uid, *report_lines]
    for secret in filter(None, secrets):
        assert secret not in text


@pytest.mark.skipif(not (DEMO_BUNDLE / "manifest.json").is_file(),
                    reason="no demo bundle at models/demo/bundle")
def test_demo_bundle_drafts_a_synthetic_series(
    _isolated: Path, tmp_path: Path, outbox_for: Callable[[Settings, Clock], Outbox],
) -> None:
    """The demo model (trained on synthetic phantoms) drafts a report of a synthetic series on its grid."""
    demo = Engine.load(DEMO_BUNDLE, device="cpu", threads=1)
    grid = ModelGrid.from_dict(demo.input_spec)
    series = write_series(tmp_path / "ct", 6, size=grid.height, slices=grid.slices)
    settings = settings_for(_isolated)
    outbox = outbox_for(settings, Clock())
    record = draft_report(demo, series.files, settings=settings, outbox=outbox)
    assert demo.synthetic
    assert (record.model_name, record.model_version) == (demo.bundle.manifest["name"],
                                                         str(demo.bundle.manifest["version"]))
    assert outbox.store.reports_for_series(series.series_uid) == [record]


