"""MLLP client against real loopback peers: hl7apy's MLLPServer as the RIS, and raw misbehaving sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from hl7apy.parser import parse_message
from pydicom.dataset import Dataset
from structlog.testing import capture_logs

from neuroscribe.reporting.draft import DraftReport, ModelIdentity
from neuroscribe.reporting.hl7 import OruOptions, Outcome, build_oru, unescape
from neuroscribe.reporting.mllp import (
    MllpConnectionError,
    MllpProtocolError,
    MllpTimeout,
    deliver,
    frame,
    send_message,
)
from tests.peers import PHI_TEXT, Ris, free_port

CONTROL_ID = "NS0001"
NOW = datetime(2026, 11, 29, 11, 0, tzinfo=UTC)


@pytest.fixture
def er7() -> str:
    """An ORU^R01 with a non-ASCII name and every HL7 delimiter in the text."""
    model = ModelIdentity("neuroscribe-demo-cvit", "2026.11.29", "1.2.826.0.1.3680043.8.498.77")
    report = DraftReport("Midline shift 3|4 mm ^ & ~ \\ noted.", "Mass effect.", model, NOW)
    ds = Dataset()
    ds.PatientID, ds.IssuerOfPatientID, ds.AccessionNumber = "P-0042", "HOSP", "ACC123"
    ds.PatientName = "Müller^Jürgen=山田^太郎"
    ds.StudyDate, ds.StudyTime = "20261129", "101500"
    return build_oru(report, ds, CONTROL_ID, OruOptions(), NOW)


@pytest.fixture
def silent_peer() -> Iterator[int]:
    """A port that accepts connections (kernel backlog) but never reads or answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        yield listener.getsockname()[1]


@pytest.fixture
def raw_peer() -> Iterator[Callable[[bytes], int]]:
    """Start a one-shot peer that reads the message, then sends the given bytes and closes."""
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(answer: bytes) -> int:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listeners.append(listener)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                data = b""
                while not data.endswith(b"\x1c\r"):
                    data += conn.recv(65536)
                conn.sendall(answer)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return int(listener.getsockname()[1])

    yield start
    for thread in threads:
        thread.join(5)
    for listener in listeners:
        listener.close()


class TestSendMessage:
    """send_message() and framing."""

    def test_frame(self) -> None:
        """VT + message + FS CR, encoded."""
        assert frame("MSH|é") == b"\x0bMSH|\xc3\xa9\x1c\r"

    def test_ack_round_trip(self, ris: Ris, er7: str) -> None:
        """The RIS gets exactly our ER7, non-ASCII name included, and its ACK comes back unframed."""
        answer = send_message("127.0.0.1", ris.port, er7, timeout=5)
        assert ris.received == [er7]
        assert "\rMSA|AA|NS0001" in answer and not answer.startswith("\x0b")
        pid = next(s for s in ris.received[0].split("\r") if s.startswith("PID|"))
        assert unescape(pid.split("|")[5]) == "Müller^Jürgen"
        message = parse_message(ris.received[0], find_groups=True)
        assert message.ORU_R01_PATIENT_RESULT.ORU_R01_PATIENT.PID.pid_5.to_er7() == "Müller^Jürgen"

    def test_timeout(self, silent_peer: int, er7: str) -> None:
        """A peer that never answers raises MllpTimeout within the bound."""
        start = time.monotonic()
        with pytest.raises(MllpTimeout):
            send_message("127.0.0.1", silent_peer, er7, timeout=0.3)
        assert time.monotonic() - start < 2

    def test_refused(self, er7: str) -> None:
        """Nobody listening raises MllpConnectionError."""
        with pytest.raises(MllpConnectionError, match="cannot connect"):
            send_message("127.0.0.1", free_port(), er7, timeout=2)

    @pytest.mark.parametrize("answer", [
        b"HTTP/1.1 400 Bad Request\r\n\r\n",
        b"\x0bMSH|^~\\&|RIS\rMSA|AA|NS0001",  # closed before FS CR
        b"\x0bMSA|AA|1\x0bMSA|AA|2\x1c\r",  # a second start block inside the frame
    ])
    def test_garbage(self, raw_peer: Callable[[bytes], int], er7: str, answer: bytes) -> None:
        """Anything but one MLLP frame raises MllpProtocolError."""
        with pytest.raises(MllpProtocolError):
            send_message("127.0.0.1", raw_peer(answer), er7, timeout=2)

    def test_closed_without_answer(self, raw_peer: Callable[[bytes], int], er7: str) -> None:
        """A peer that hangs up without a byte raises MllpConnectionError."""
        with pytest.raises(MllpConnectionError, match="without an answer"):
            send_message("127.0.0.1", raw_peer(b""), er7, timeout=2)

    def test_unencodable(self, er7: str) -> None:
        """A message the charset cannot carry fails before connecting."""
        with pytest.raises(UnicodeEncodeError):
            send_message("127.0.0.1", free_port(), er7, timeout=1, encoding="ascii")


class TestDeliver:
    """deliver(): the outbox's rules over a real exchange."""

    def test_aa_delivered(self, ris: Ris, er7: str) -> None:
        """AA: delivered, and the RIS has the exact message."""
        result = deliver("127.0.0.1", ris.port, er7, CONTROL_ID, timeout=5)
        assert result.outcome is Outcome.DELIVERED
        assert ris.received == [er7]

    def test_ae_dead(self, ris: Ris, er7: str) -> None:
        """AE: dead-lettered with a reason that names the code but not the RIS's free text."""
        ris.script = ["AE"]
        with capture_logs() as logs:
            result = deliver("127.0.0.1", ris.port, er7, CONTROL_ID, timeout=5)
        assert result.outcome is Outcome.DEAD
        assert "AE" in result.reason
        assert any(e["event"] == "hl7 delivery" and e["outcome"] == "dead" for e in logs)
        assert result.ack is not None and result.ack.text == PHI_TEXT
        for text in (result.reason, repr(result), repr(logs)):
            assert "DOE" not in text and "P-0042" not in text and "Müller" not in text

    def test_ar_retry_then_unchanged_resend(self, ris: Ris, er7: str) -> None:
        """AR: retry later; the resend is byte-identical and then delivered."""
        ris.script = ["AR"]
        first = deliver("127.0.0.1", ris.port, er7, CONTROL_ID, timeout=5)
        second = deliver("127.0.0.1", ris.port, er7, CONTROL_ID, timeout=5)
        assert (first.outcome, second.outcome) == (Outcome.RETRY, Outcome.DELIVERED)
        assert "AR" in first.reason
        assert ris.received == [er7, er7]

    def test_msa2_mismatch_retry(self, ris: Ris, er7: str) -> None:
        """An AA for another control ID is not ours: retry later, and the mismatch is logged."""
        ris.script = ["AA:SOMEONE-ELSE"]
        with capture_logs() as logs:
            result = deliver("127.0.0.1", ris.port, er7, CONTROL_ID, timeout=5)
        assert result.outcome is Outcome.RETRY and "MSA-2" in result.reason
        assert any(e["event"] == "hl7 ack control id mismatch" and e["ack_control_id"] == "SOMEONE-ELSE"
                   for e in logs)

    @pytest.mark.parametrize("action", ["GARBAGE", "NOT_HL7"])
    def test_garbage_retry(self, ris: Ris, er7: str, action: str) -> None:
        """An answer that is not an MLLP frame, or not an ACK, is retried later."""
        ris.script = [action]
        result = deliver("127.0.0.1", ris.port, er7, CONTROL_ID, timeout=5)
        assert result.outcome is Outcome.RETRY

    def test_timeout_retry(self, silent_peer: int, er7: str) -> None:
        """No answer within the timeout: retry later, promptly."""
        start = time.monotonic()
        result = deliver("127.0.0.1", silent_peer, er7, CONTROL_ID, timeout=0.3)
        assert result.outcome is Outcome.RETRY and "MllpTimeout" in result.reason
        assert time.monotonic() - start < 2

    def test_refused_retry(self, er7: str) -> None:
        """Connection refused: retry later."""
        result = deliver("127.0.0.1", free_port(), er7, CONTROL_ID, timeout=2)
        assert result.outcome is Outcome.RETRY and "MllpConnectionError" in result.reason

    def test_unencodable_dead(self, er7: str) -> None:
        """A message the charset cannot carry is dead: resending cannot help."""
        result = deliver("127.0.0.1", free_port(), er7, CONTROL_ID, timeout=1, encoding="ascii")
        assert result.outcome is Outcome.DEAD

    def test_control_id_must_match_message(self, er7: str) -> None:
        """The control ID to match must be the message's own MSH-10."""
        with pytest.raises(ValueError, match="MSH-10"):
            deliver("127.0.0.1", free_port(), er7, "OTHER", timeout=1)
