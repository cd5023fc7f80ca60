"""Real loopback peers for tests: free ports, hl7apy's MLLPServer as the RIS (plain or TLS), DCMTK's
storescp as a (TLS) PACS, and a test PKI (a CA with server and client certificates).

The main PACS peer is Orthanc (:mod:`tests.orthanc`); the pytest fixtures are in ``conftest.py``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
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

    def __init__(self, host: str = LOOPBACK, *, error_text: str = PHI_TEXT, timeout: float = 5,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.error_text = error_text
        self.timeout = timeout
        #: A server context makes it an MLLP-over-TLS RIS (the handshake runs on accept).
        self.ssl_context = ssl_context
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
        if self.ssl_context is not None:
            self._server.socket = self.ssl_context.wrap_socket(self._server.socket, server_side=True)
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


# -- TLS: a test PKI, and DCMTK's storescp as a PACS ------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files of a test CA, a server certificate (localhost, 127.0.0.1) and a client certificate."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(folder: Path, name: str = "NeuroScribe Test CA") -> Pki:
    """A fresh CA named ``name`` under ``folder`` that signed one server and one client certificate.

    The server certificate names ``localhost`` and ``IP:127.0.0.1`` (subjectAltName) for host-name
    checks; keys are unencrypted RSA 2048 (DCMTK's default BCP 195 profile accepts them).
    """
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = _rsa_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = (
        _builder(ca_name, ca_name, ca_key, now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    files = {"ca_cert": _write_pem(folder / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))}
    for role, usage, alt_names in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH,
         [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("scanner.test")]),
    ):
        key = _rsa_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} {role}")])
        cert = (
            _builder(subject, ca_name, key, now)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM)
        files[f"{role}_cert"] = _write_pem(folder / f"{role}.pem", pem)
        files[f"{role}_key"] = _write_pem(folder / f"{role}.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))
    return Pki(**files)


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _builder(subject: x509.Name, issuer: x509.Name, key: rsa.RSAPrivateKey,
             now: datetime.datetime) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2)))


def _write_pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


class StoreScp:
    """DCMTK's ``storescp`` on a free loopback port, writing what it receives to ``folder``.

    ``tls`` is the pair (key file, certificate file) for ``+tls``; ``extra`` adds options (``+cf CA``,
    ``-ic``). Use as a context manager; :meth:`received` lists the files it stored.
    """

    def __init__(self, folder: Path, *, ae_title: str = "STORESCP", tls: tuple[Path, Path] | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        self.args = ["storescp", "-aet", ae_title, "-od", str(folder),
                     *(("+tls", str(tls[0]), str(tls[1])) if tls else ()), *extra, str(self.port)]
        self.log = folder.parent / f"{folder.name}-storescp.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> StoreScp:
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as sink:
            self._proc = subprocess.Popen(self.args, stdout=sink, stderr=subprocess.STDOUT,
                                          env={**os.environ, "TCP_NODELAY": "1"})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise AssertionError(f"storescp exited: {self.log.read_text(errors='replace')}")
            try:
                # storescp listens before it reads anything; a probe would cost a failed handshake.
                if f":{self.port:04X} 00000000:0000 0A" in Path("/proc/net/tcp").read_text():
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("storescp did not listen within 10 s")

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)

    def received(self) -> list[Path]:
        """The files storescp wrote (one per stored instance)."""
        return sorted(p for p in self.folder.iterdir() if p.is_file())
