"""Real loopback peers for tests: free ports, and hl7apy's MLLPServer as the RIS.

The PACS peer is Orthanc (:mod:`tests.orthanc`); the pytest fixtures for both are in ``conftest.py``.
"""

from __future__ import annotations

import socket
import threading

from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

from neuroscribe.reporting.hl7 import ORU_MESSAGE_TYPE

LOOPBACK = "127.0.0.1"
#: What the RIS writes into MSA-3 when it does not answer AA: it echoes patient data (the name and
#: ID of tests/test_mllp.py's ORU), so it must reach no reason or log.
PHI_TEXT = "Unknown patient DOE, JANE (P-0042)"


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (nothing listens there unless a test starts something)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def build_ack(incoming_er7: str, code: str, ack_number: int, *, control_id: str | None = None,
              text: str | None = None) -> Message:
    """An ACK^R01 built with hl7apy: MSA-1 ``code``, MSA-2 the incoming MSH-10 (or ``control_id``).

    ``text`` goes into MSA-3 when given; MSH-10 is ``ACK<ack_number>``.
    """
    incoming = parse_message(incoming_er7)
    ack = Message("ACK", version="2.5.1")
    ack.msh.msh_3 = "RIS"
    ack.msh.msh_5 = incoming.msh.msh_3.to_er7()
    ack.msh.msh_9 = "ACK^R01^ACK"
    ack.msh.msh_10 = f"ACK{ack_number}"
    ack.msh.msh_11 = "P"
    ack.msa.msa_1 = code
    ack.msa.msa_2 = control_id or incoming.msh.msh_10.to_er7()
    if text is not None:
        ack.msa.msa_3 = text
    return ack


class Ris:
    """hl7apy's MLLPServer on an ephemeral loopback port, routing ORU^R01^ORU_R01 to :class:`OruHandler`.

    ``received`` holds each ER7 message as it arrived. ``script`` holds the answer to each message in
    turn (AA once it runs out): ``"AA"``, ``"AE"`` or ``"AR"``; ``"CODE:ID"`` acknowledges control
    ID ``ID`` instead of the message's own; ``"GARBAGE"`` answers bytes that are not MLLP and
    ``"NOT_HL7"`` one MLLP frame that is not an ACK. Any answer but AA carries ``error_text`` in MSA-3.
    """

    def __init__(self, host: str = LOOPBACK, *, error_text: str = PHI_TEXT, timeout: float = 5) -> None:
        self.host = host
        self.error_text = error_text
        self.timeout = timeout
        self.port = 0
        self.script: list[str] = []
        self.received: list[str] = []
        self._server: MLLPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Ris:
        """Listen and serve in a daemon thread; ``port`` is the port it got."""
        if self._server is not None:
            raise RuntimeError("RIS already running")
        self._server = MLLPServer(self.host, 0, {ORU_MESSAGE_TYPE: (OruHandler, self)}, timeout=self.timeout)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = self._thread = None

    def __enter__(self) -> Ris:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def answer(self, er7: str) -> str:
        """Record ``er7`` and return the next scripted answer, MLLP-framed (unless it is garbage)."""
        self.received.append(er7)
        action = self.script.pop(0) if self.script else "AA"
        if action == "GARBAGE":
            return "HELLO, THIS IS NOT MLLP\r\n"
        if action == "NOT_HL7":
            return "\x0bnot an ack at all\x1c\r"
        code, _, control_id = action.partition(":")
        text = self.error_text if code != "AA" else None
        ack = build_ack(er7, code, len(self.received), control_id=control_id or None, text=text)
        return str(ack.to_mllp())


class OruHandler(AbstractHandler):
    """hl7apy's handler for one incoming ORU: the :class:`Ris` records it and answers."""

    def __init__(self, message: str, ris: Ris) -> None:
        super().__init__(message)
        self.ris = ris

    def reply(self) -> str:
        """The RIS's answer to the incoming message."""
        return self.ris.answer(self.incoming_message)
