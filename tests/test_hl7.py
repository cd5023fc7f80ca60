"""ORU^R01 building, HL7 escaping, ACK and inbound ORU parsing (neuroscribe.reporting.hl7)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydantic import ValidationError
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from neuroscribe.reporting.draft import DISCLAIMER, DraftReport, ModelIdentity
from neuroscribe.reporting.hl7 import (
    AccessionField,
    AckCode,
    Code,
    Delimiters,
    Hl7BuildError,
    Hl7ParseError,
    OruOptions,
    Outcome,
    ProcedureSource,
    build_oru,
    classify_ack,
    control_id_of,
    escape,
    parse_ack,
    parse_oru,
    unescape,
)

#: A report line with all five HL7 delimiters, and a literal escape sequence that must stay literal.
NASTY = r"Shift 3|4 mm ^ left & right ~ both \ slash \F\ literal"
NOW = datetime(2026, 11, 29, 11, 0, 0, tzinfo=timezone(timedelta(hours=1)))
CREATED = datetime(2026, 11, 29, 10, 20, 5, tzinfo=UTC)


@pytest.fixture
def model() -> ModelIdentity:
    """The model named in OBX-17/18."""
    return ModelIdentity("neuroscribe-demo-cvit", "2026.11.29", "1.2.826.0.1.3680043.8.498.77")


@pytest.fixture
def report(model: ModelIdentity) -> DraftReport:
    """Two findings lines (one with every delimiter) and one impression line."""
    return DraftReport(f"No intracranial haemorrhage.\n\n{NASTY}\n", "No acute abnormality.", model, CREATED)


@pytest.fixture
def source() -> Dataset:
    """A CT instance header with everything build_oru reads."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID = "P-0042"
    ds.IssuerOfPatientID = "HOSP"
    ds.PatientName = "Doe^Jane^Q^Dr^PhD"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC123"
    ds.StudyDescription = "CT HEAD WO CONTRAST"
    ds.StudyDate = "20261129"
    ds.StudyTime = "101500.123456"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    return ds


def segments(er7: str) -> list[list[str]]:
    """The message split by a plain CR / '|' split; MSH gets MSH-1 inserted so index n is SEG-n."""
    out = []
    for line in er7.split("\r"):
        parts = line.split("|")
        out.append(["MSH", "|", *parts[1:]] if parts[0] == "MSH" else parts)
    return out


def seg(er7: str, name: str) -> list[list[str]]:
    """Every segment called ``name``."""
    return [s for s in segments(er7) if s[0] == name]


def field(segment: list[str], index: int) -> str:
    """SEG-index, or empty."""
    return segment[index] if index < len(segment) else ""


class TestEscape:
    """escape() and unescape()."""

    def test_each_delimiter(self) -> None:
        """Each of the five characters becomes its own sequence."""
        assert escape("|^&~\\") == "".join(f"\\{c}\\" for c in "FSTRE")

    def test_round_trip(self) -> None:
        """unescape(escape(x)) is x, even for text that looks like an escape sequence."""
        for text in (NASTY, "", "plain", "\\", "\\\\E\\", "Müller ~ 山田", r"\.br\ \X41\ \H\ "):
            assert text == unescape(escape(text))

    def test_escaped_text_has_no_raw_delimiters(self) -> None:
        """After escaping, only escape sequences use the escape character."""
        escaped = escape(NASTY)
        assert not set("|^&~") & set(escaped)
        assert "\\" not in re.sub(r"\\[FSTRE]\\", "", escaped)

    def test_control_characters_become_spaces(self) -> None:
        """CR, LF, VT and FS would end a segment or an MLLP frame."""
        assert escape("a\rb\nc\x0bd\x1ce\tf") == "a b c d e\tf"

    def test_unescape_formatting_and_hex(self) -> None:
        """Line breaks, highlighting and hex data from other senders are read; unknowns are kept."""
        assert unescape(r"one\.br\two \H\bold\N\ \X4869\ \Zfoo\ \E") == "one\ntwo bold Hi \\Zfoo\\ \\E"

    def test_other_delimiters(self) -> None:
        """A sender's own encoding characters are honoured."""
        d = Delimiters("#", "@", "*", "$", "%")
        assert escape("a#b@c%d*e$f", d) == "a$F$b$S$c$T$d$R$e$E$f"
        assert unescape("a$F$b$S$c$T$d$R$e$E$f", d) == "a#b@c%d*e$f"

    def test_from_msh_rejects_garbage(self) -> None:
        """An MSH without encoding characters is not readable."""
        with pytest.raises(Hl7ParseError):
            Delimiters.from_msh("MSH|")
        with pytest.raises(Hl7ParseError):
            Delimiters.from_msh("PID|^~\\&")


class TestOruOptions:
    """Site options validate at construction."""

    def test_defaults(self) -> None:
        """Defaults: accession in OBR-3 and OBR-18, utf-8, disclaimer as OBX, patient class U."""
        options = OruOptions()
        assert options.accession_fields == (AccessionField.OBR_3, AccessionField.OBR_18)
        assert (options.charset, options.disclaimer_segment, options.patient_class) == ("utf-8", "OBX", "U")

    def test_from_config_mapping(self) -> None:
        """Plain config values (strings, dicts) are coerced."""
        options = OruOptions.model_validate({
            "accession_fields": ["OBR-2", "OBR-3"],
            "findings_code": {"code": "59776-5", "text": "Procedure findings", "system": "LN"},
        })
        assert options.accession_fields == (AccessionField.OBR_2, AccessionField.OBR_3)
        assert options.findings_code.to_er7() == "59776-5^Procedure findings^LN"

    @pytest.mark.parametrize("bad", [
        {"patient_class": "X"},
        {"accession_fields": []},
        {"accession_fields": ["OBR-3", "OBR-3"]},
        {"accession_fields": ["PID-3"]},
        {"processing_id": "Q"},
        {"charset": "utf-16"},
        {"unknown_key": 1},
        {"findings_code": {"code": ""}},
    ])
    def test_rejects(self, bad: dict[str, object]) -> None:
        """Invalid values and unknown keys fail at start-up."""
        with pytest.raises(ValidationError):
            OruOptions.model_validate(bad)

    def test_frozen(self) -> None:
        """Options cannot change after construction."""
        with pytest.raises(ValidationError):
            OruOptions().processing_id = "T"  # type: ignore[misc]


class TestBuildOru:
    """build_oru()."""

    def test_segments_and_header(self, report: DraftReport, source: Dataset) -> None:
        """MSH PID PV1 ORC OBR OBX..., with type, control ID, processing ID, version and charset."""
        er7 = build_oru(report, source, "NS0001", OruOptions(), NOW)
        assert "\n" not in er7
        assert [s[0] for s in segments(er7)] == ["MSH", "PID", "PV1", "ORC", "OBR"] + ["OBX"] * 4
        msh = segments(er7)[0]
        assert er7.startswith(
            "MSH|^~\\&|NEUROSCRIBE||RIS||20261129110000+0100||ORU^R01^ORU_R01|NS0001|P|2.5.1|")
        assert field(msh, 18) == "UNICODE UTF-8"
        assert control_id_of(er7) == "NS0001"

    def test_validates_strictly_with_hl7apy(self, report: DraftReport, source: Dataset) -> None:
        """hl7apy parses the message into ORU_R01 groups at STRICT level and validates it."""
        er7 = build_oru(report, source, "NS0001", OruOptions(), NOW)
        message = parse_message(er7, find_groups=True, validation_level=VALIDATION_LEVEL.STRICT)
        assert message.validate()
        order = message.ORU_R01_PATIENT_RESULT.ORU_R01_ORDER_OBSERVATION
        assert len(order.ORU_R01_OBSERVATION) == 4

    def test_results_order_and_status(self, report: DraftReport, source: Dataset,
                                      model: ModelIdentity) -> None:
        """Disclaimer first, then findings lines, then impression; all P, with the model in OBX-17/18."""
        er7 = build_oru(report, source, "NS0001", OruOptions(), NOW)
        obr = seg(er7, "OBR")[0]
        assert (field(obr, 24), field(obr, 25)) == ("CT", "P")
        assert field(obr, 7) == "20261129101500.1234"
        assert field(obr, 22) == "20261129112005+0100"  # report.created, in now's zone
        obx = seg(er7, "OBX")
        assert [field(o, 1) for o in obx] == ["1", "2", "3", "4"]
        codes = [field(o, 3).split("^")[0] for o in obx]
        assert codes == ["DISCLAIMER", "FINDINGS", "FINDINGS", "IMPRESSION"]
        assert [unescape(field(o, 5)) for o in obx] == [
            DISCLAIMER, "No intracranial haemorrhage.", NASTY, "No acute abnormality."]
        for o in obx:
            assert (field(o, 2), field(o, 11)) == ("TX", "P")
            assert model.name in field(o, 17) and model.version in field(o, 17)
            equipment = [f"{model.name} {model.version}", "NeuroScribe", model.uid, "ISO"]
            assert field(o, 18).split("^") == equipment

    def test_delimiters_round_trip(self, report: DraftReport, source: Dataset) -> None:
        """A line with | ^ & ~ \\ comes back intact via a plain split and via hl7apy."""
        er7 = build_oru(report, source, "NS0001", OruOptions(), NOW)
        assert unescape(field(seg(er7, "OBX")[2], 5)) == NASTY
        message = parse_message(er7, find_groups=True)
        obx = message.ORU_R01_PATIENT_RESULT.ORU_R01_ORDER_OBSERVATION.ORU_R01_OBSERVATION[2].OBX
        assert unescape(obx.obx_5.to_er7()) == NASTY
        assert len(obx.obx_5.children) == 1  # not split into components at ^

    def test_patient(self, report: DraftReport, source: Dataset) -> None:
        """PID-3 id^^^issuer^MR; PN prefix/suffix swap places in XPN; birth date and sex."""
        pid = seg(build_oru(report, source, "NS0001", OruOptions(), NOW), "PID")[0]
        assert field(pid, 3) == "P-0042^^^HOSP^MR"
        assert field(pid, 5) == "Doe^Jane^Q^PhD^Dr"
        assert (field(pid, 7), field(pid, 8)) == ("19700101", "F")

    def test_default_issuer_and_escaped_ids(self, report: DraftReport, source: Dataset) -> None:
        """Without IssuerOfPatientID the configured issuer is used; delimiters in IDs are escaped."""
        del source.IssuerOfPatientID
        source.PatientID = "A&B^1"
        source.PatientName = "O&Brien^Mary"
        pid = seg(build_oru(report, source, "NS0001", OruOptions(patient_id_issuer="SITE"), NOW), "PID")[0]
        assert field(pid, 3) == r"A\T\B\S\1^^^SITE^MR"
        assert field(pid, 5) == r"O\T\Brien^Mary"
        source.PatientName = ""
        assert field(seg(build_oru(report, source, "NS0001", OruOptions(), NOW), "PID")[0], 5) == "^^^^^^U"

    def test_non_ascii_name(self, report: DraftReport, source: Dataset) -> None:
        """UTF-8 names stay text; the alphabetic group wins, the ideographic one is used when alone."""
        source.PatientName = "Müller^Jürgen"
        assert field(seg(build_oru(report, source, "N1", OruOptions(), NOW), "PID")[0], 5) == "Müller^Jürgen"
        source.PatientName = PersonName("=山田^太郎")
        assert field(seg(build_oru(report, source, "N1", OruOptions(), NOW), "PID")[0], 5) == "山田^太郎"

    def test_ascii_charset(self, report: DraftReport, source: Dataset) -> None:
        """ascii leaves MSH-18 empty, and refuses text it cannot carry without quoting it."""
        er7 = build_oru(report, source, "N1", OruOptions(charset="ascii"), NOW)
        assert field(segments(er7)[0], 18) == ""
        source.PatientName = "Müller^Jürgen"
        with pytest.raises(Hl7BuildError) as caught:
            build_oru(report, source, "N1", OruOptions(charset="ascii"), NOW)
        assert "Müller" not in str(caught.value)

    @pytest.mark.parametrize(("fields", "expected"), [
        (("OBR-3", "OBR-18"), {("ORC", 3), ("OBR", 3), ("OBR", 18)}),
        (("OBR-2",), {("ORC", 2), ("OBR", 2)}),
        (("OBR-2", "OBR-3", "OBR-19"), {("ORC", 2), ("ORC", 3), ("OBR", 2), ("OBR", 3), ("OBR", 19)}),
    ])
    def test_accession_placement(self, report: DraftReport, source: Dataset,
                                 fields: tuple[str, ...], expected: set[tuple[str, int]]) -> None:
        """The accession goes exactly where the site says; ORC-2/3 mirror OBR-2/3."""
        options = OruOptions.model_validate({"accession_fields": fields})
        er7 = build_oru(report, source, "NS0001", options, NOW)
        found = {(s[0], i) for s in segments(er7) if s[0] in {"ORC", "OBR"}
                 for i in range(1, len(s)) if s[i] == "ACC123"}
        assert found == expected
        assert parse_oru(er7, options).accession == "ACC123"

    def test_procedure_sources(self, report: DraftReport, source: Dataset) -> None:
        """OBR-4 from ProcedureCodeSequence, else StudyDescription, else the default code."""
        item = Dataset()
        item.CodeValue, item.CodeMeaning, item.CodingSchemeDesignator = "70450", "CT HEAD W/O", "CPT4"
        source.ProcedureCodeSequence = [item]

        def obr4(options: OruOptions) -> str:
            return field(seg(build_oru(report, source, "N1", options, NOW), "OBR")[0], 4)

        assert obr4(OruOptions()) == "70450^CT HEAD W/O^CPT4"
        assert obr4(OruOptions(procedure_source=ProcedureSource.STUDY_DESCRIPTION)) == "^CT HEAD WO CONTRAST"
        assert obr4(OruOptions(procedure_source=ProcedureSource.DEFAULT)) == "CTHEAD^CT HEAD^L"
        del source.ProcedureCodeSequence, source.StudyDescription
        assert obr4(OruOptions()) == "CTHEAD^CT HEAD^L"

    def test_disclaimer_as_nte_and_no_pv1(self, report: DraftReport, source: Dataset) -> None:
        """As an NTE the disclaimer follows the OBR, before every OBX; patient_class None drops PV1."""
        er7 = build_oru(report, source, "N1", OruOptions(disclaimer_segment="NTE", patient_class=None), NOW)
        assert [s[0] for s in segments(er7)] == ["MSH", "PID", "ORC", "OBR", "NTE"] + ["OBX"] * 3
        assert unescape(field(seg(er7, "NTE")[0], 3)) == DISCLAIMER
        assert parse_message(er7, find_groups=True, validation_level=VALIDATION_LEVEL.STRICT).validate()

    def test_loinc_codes_and_study_uid(self, report: DraftReport, source: Dataset) -> None:
        """Configured OBX-3 codes are used; study_uid_code adds a last ST OBX with the Study UID."""
        options = OruOptions(
            findings_code=Code(code="59776-5", text="Procedure findings", system="LN"),
            impression_code=Code(code="19005-8", text="Radiology Imaging study [Impression]", system="LN"),
            study_uid_code=Code(code="110180", text="Study Instance UID", system="DCM"),
        )
        obx = seg(build_oru(report, source, "N1", options, NOW), "OBX")
        assert [field(o, 3).split("^")[0] for o in obx] == ["DISCLAIMER", "59776-5", "59776-5", "19005-8",
                                                            "110180"]
        assert (field(obx[-1], 2), field(obx[-1], 5)) == ("ST", source.StudyInstanceUID)

    def test_long_line(self, model: ModelIdentity, source: Dataset) -> None:
        """Lines longer than hl7apy's strict 199-character OBX-5 limit are still written intact."""
        line = "word " * 120 + "| end"
        er7 = build_oru(DraftReport(line, "", model, CREATED), source, "N1", OruOptions(), NOW)
        assert unescape(field(seg(er7, "OBX")[1], 5)) == line.rstrip()

    def test_deterministic(self, report: DraftReport, source: Dataset) -> None:
        """The same inputs give the same bytes."""
        assert build_oru(report, source, "N1", OruOptions(), NOW) == build_oru(report, source, "N1",
                                                                                OruOptions(), NOW)

    @pytest.mark.parametrize("keyword", ["PatientID", "AccessionNumber"])
    def test_missing_identifiers(self, report: DraftReport, source: Dataset, keyword: str) -> None:
        """No PatientID or AccessionNumber: a build error that names the attribute, not patient data."""
        delattr(source, keyword)
        with pytest.raises(Hl7BuildError, match=keyword) as caught:
            build_oru(report, source, "N1", OruOptions(), NOW)
        assert "Doe" not in str(caught.value)

    @pytest.mark.parametrize("control_id", ["", "x" * 21, "A|B", "A B", "A^B"])
    def test_bad_control_id(self, report: DraftReport, source: Dataset, control_id: str) -> None:
        """MSH-10 must be 1-20 printable characters without delimiters."""
        with pytest.raises(ValueError, match="control_id"):
            build_oru(report, source, control_id, OruOptions(), NOW)

    def test_naive_now(self, report: DraftReport, source: Dataset) -> None:
        """now must be timezone-aware."""
        with pytest.raises(ValueError, match="now"):
            build_oru(report, source, "N1", OruOptions(), datetime(2026, 1, 1))


def ack(code: str, control_id: str = "NS0001", extra: str = "") -> str:
    """An ACK as a RIS would send it."""
    msh = "MSH|^~\\&|RIS|HOSP|NEUROSCRIBE||20261129110001||ACK^R01^ACK|R1|P|2.5.1"
    return f"{msh}\rMSA|{code}|{control_id}{extra}"


class TestParseAck:
    """parse_ack() and classify_ack()."""

    @pytest.mark.parametrize(("raw", "code", "commit"), [
        ("AA", AckCode.AA, False), ("AE", AckCode.AE, False), ("AR", AckCode.AR, False),
        ("CA", AckCode.AA, True), ("CE", AckCode.AE, True), ("CR", AckCode.AR, True),
    ])
    def test_codes(self, raw: str, code: AckCode, commit: bool) -> None:
        """Application and commit codes map to AA/AE/AR."""
        parsed = parse_ack(ack(raw))
        assert (parsed.code, parsed.commit, parsed.control_id) == (code, commit, "NS0001")

    def test_text_and_err(self) -> None:
        """MSA-3 is the text; ERR-2 and ERR-3 give a location and code; text stays out of repr."""
        err = "ERR||PID^1^3^1|204^Unknown key^HL70357|E"
        parsed = parse_ack(ack("AE", extra=f"|Patient DOE\\S\\JANE unknown\r{err}"))
        assert parsed.text == "Patient DOE^JANE unknown"
        assert (parsed.error_code, parsed.error_location) == ("204", "PID-3")
        assert "DOE" not in repr(parsed)
        only_err = parse_ack(ack("AE") + "\rERR|||207^Application internal error^HL70357|E||||Bad OBX")
        assert only_err.text == "Bad OBX"

    def test_classify(self) -> None:
        """AA delivered, AE dead, AR retry, a foreign MSA-2 retry; reasons never quote MSA-3."""
        text = "|Patient DOE^JANE\rERR||OBR^1^3|101^Required field missing^HL70357|E"
        assert classify_ack(parse_ack(ack("AA")), "NS0001")[0] is Outcome.DELIVERED
        outcome, reason = classify_ack(parse_ack(ack("AE", extra=text)), "NS0001")
        assert outcome is Outcome.DEAD
        assert "AE" in reason and "101" in reason and "OBR-3" in reason and "DOE" not in reason
        assert classify_ack(parse_ack(ack("AR", extra=text)), "NS0001")[0] is Outcome.RETRY
        outcome, reason = classify_ack(parse_ack(ack("AA", control_id="OTHER")), "NS0001")
        assert outcome is Outcome.RETRY and "MSA-2" in reason

    @pytest.mark.parametrize("er7", [
        "", "garbage", "MSH|^~\\&|RIS\rPID|||1", ack("XX"), "PID|||1\rMSA|AA|1",
    ])
    def test_unreadable(self, er7: str) -> None:
        """Anything without MSH and a valid MSA is a parse error."""
        with pytest.raises(Hl7ParseError):
            parse_ack(er7)

    def test_line_feeds_tolerated(self) -> None:
        """Some RIS separate segments with CR LF."""
        assert parse_ack(ack("AA").replace("\r", "\r\n")).code is AckCode.AA


FINAL_ORU = "\r".join([
    "MSH|^~\\&|RIS|HOSP|NEUROSCRIBE||20261130090000||ORU^R01^ORU_R01|RIS777|P|2.5.1",
    "PID|||P-0042^^^HOSP^MR||Doe^Jane",
    "OBR|1||ACC123|70450^CT HEAD^CPT4|||20261129101500||||||||||||||||||F",
    "OBX|1|FT|IMP^Impression^L||No bleed.\\.br\\Small \\T\\ old infarct.||||||F",
    "OBX|2|NM|VOL^Volume^L||12||||||F",
    "OBX|3|TX|FIND^Findings^L||Left \\S\\ right.||||||F",
])


class TestParseOru:
    """parse_oru()."""

    def test_final_report(self) -> None:
        """Accession, patient ID, status and text of the text OBXs, unescaped."""
        inbound = parse_oru(FINAL_ORU)
        assert (inbound.control_id, inbound.result_status) == ("RIS777", "F")
        assert (inbound.accession, inbound.patient_id) == ("ACC123", "P-0042")
        assert inbound.text == "No bleed.\nSmall & old infarct.\nLeft ^ right."
        assert "P-0042" not in repr(inbound) and "bleed" not in repr(inbound)

    def test_own_oru(self, report: DraftReport, source: Dataset) -> None:
        """Our preliminary ORU reads back: P, the accession and every line."""
        inbound = parse_oru(build_oru(report, source, "N1", OruOptions(), NOW))
        assert (inbound.result_status, inbound.accession, inbound.patient_id) == ("P", "ACC123", "P-0042")
        assert inbound.text.splitlines()[2] == NASTY

    def test_not_oru(self) -> None:
        """An ACK or an ORU without OBR is refused."""
        with pytest.raises(Hl7ParseError):
            parse_oru(ack("AA"))
        with pytest.raises(Hl7ParseError):
            parse_oru(FINAL_ORU.split("\rOBR")[0])
