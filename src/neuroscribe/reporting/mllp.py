"""MLLP client: one HL7 message per connection, its ACK, and the delivery rules for the outbox.

Framing (MLLP release 1): VT (0x0B) + message + FS (0x1C) + CR (0x0D); the answer is read until
FS CR. :func:`send_message` moves bytes and raises a typed :class:`MllpError`; :func:`deliver`
turns one attempt into a :class:`DeliveryResult`: AA delivered, AE dead, AR / timeout / network /
garbage / MSA-2 mismatch retry later, always with the same message (MSH-10 unchanged, so the RIS
can de-duplicate). Reasons and log lines carry host, port, control ID and ack codes only: never
report text, patient data, or the RIS's free-text MSA-3 (see :mod:`neuroscribe.reporting.hl7`).
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass, field

from neuroscribe.errors import NeuroScribeError
from neuroscribe.log import get_logger
from neuroscribe.reporting.hl7 import (
    Ack,
    Hl7ParseError,
    Outcome,
    classify_ack,
    control_id_of,
    is_control_id,
    parse_ack,
)

__all__ = [
    "END_BLOCK",
    "MAX_ANSWER_BYTES",
    "START_BLOCK",
    "DeliveryResult",
    "MllpConnectionError",
    "MllpError",
    "MllpProtocolError",
    "MllpTimeout",
    "deliver",
    "frame",
    "send_message",
]

LOG = get_logger(__name__)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\r"
#: An answer longer than this is not an ACK: the connection is dropped as a protocol error.
MAX_ANSWER_BYTES = 1024 * 1024


class MllpError(NeuroScribeError):
    """An MLLP exchange failed; the message names the peer, never message content."""


class MllpTimeout(MllpError):  # noqa: N818 - the name the issue and callers use
    """No connection or no complete answer within the timeout."""


class MllpConnectionError(MllpError):
    """The connection was refused, reset or closed before an answer (TLS failures included)."""


class MllpProtocolError(MllpError):
    """The peer answered with something that is not an MLLP frame."""


def frame(er7: str, encoding: str = "utf-8") -> bytes:
    """The MLLP frame of a message; raises UnicodeEncodeError if ``encoding`` cannot carry it."""
    return START_BLOCK + er7.encode(encoding) + END_BLOCK


def send_message(
    host: str,
    port: int,
    er7: str,
    *,
    timeout: float,
    encoding: str = "utf-8",
    ssl_context: ssl.SSLContext | None = None,
    connect_timeout: float | None = None,
) -> str:
    """Send one message over a new connection and return the answer's ER7 (unframed).

    Parameters
    ----------
    timeout
        Seconds from the end of sending to the whole answer (one deadline, not per read).
    encoding
        Python codec for the message and the answer; pass ``OruOptions.charset`` so MSH-18 is true.
    ssl_context
        Wraps the connection in TLS (server name checked against ``host``).
    connect_timeout
        Seconds to connect (and the TLS handshake); defaults to ``timeout``.

    Raises
    ------
    UnicodeEncodeError
        The message has characters ``encoding`` cannot encode (before any connection).
    MllpTimeout, MllpConnectionError, MllpProtocolError
        See the classes.
    """
    if timeout <= 0 or (connect_timeout is not None and connect_timeout <= 0):
        raise ValueError("timeout and connect_timeout must be positive seconds")
    payload = frame(er7, encoding)
    peer = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout or timeout)
    except TimeoutError:
        raise MllpTimeout(f"no connection to {peer} within {connect_timeout or timeout:g} s") from None
    except OSError as exc:
        raise MllpConnectionError(f"cannot connect to {peer}: {_why(exc)}") from None
    try:
        if ssl_context is not None:
            try:
                sock = ssl_context.wrap_socket(sock, server_hostname=host)
            except TimeoutError:
                raise MllpTimeout(f"TLS handshake with {peer} timed out") from None
            except (ssl.SSLError, OSError) as exc:
                raise MllpConnectionError(f"TLS with {peer} failed: {type(exc).__name__}") from None
        try:
            sock.settimeout(timeout)
            sock.sendall(payload)
        except TimeoutError:
            raise MllpTimeout(f"sending to {peer} timed out") from None
        except OSError as exc:
            raise MllpConnectionError(f"sending to {peer} failed: {_why(exc)}") from None
        answer = _read_frame(sock, peer, time.monotonic() + timeout, timeout)
    finally:
        sock.close()
    return answer.decode(encoding, errors="replace")


def _why(exc: OSError) -> str:
    """The OS's reason (e.g. "Connection refused"), or the exception type."""
    return exc.strerror or type(exc).__name__


def _read_frame(sock: socket.socket, peer: str, deadline: float, timeout: float) -> bytes:
    """The body of one MLLP frame, read until FS CR before ``deadline``."""
    buffer = bytearray()
    while not buffer.endswith(END_BLOCK):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise MllpTimeout(f"no complete answer from {peer} within {timeout:g} s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise MllpTimeout(f"no complete answer from {peer} within {timeout:g} s") from None
        except OSError as exc:
            raise MllpConnectionError(f"reading from {peer} failed: {_why(exc)}") from None
        if not chunk:
            if not buffer:
                raise MllpConnectionError(f"{peer} closed the connection without an answer")
            raise MllpProtocolError(f"{peer} closed the connection inside an answer (no FS CR)")
        buffer += chunk
        if not buffer.startswith(START_BLOCK):
            raise MllpProtocolError(f"{peer} answered without an MLLP start block (VT)")
        if len(buffer) > MAX_ANSWER_BYTES:
            raise MllpProtocolError(f"{peer} answered more than {MAX_ANSWER_BYTES} bytes without FS CR")
    body = bytes(buffer[1:-2])
    if START_BLOCK in body or b"\x1c" in body:
        raise MllpProtocolError(f"{peer} answered with a malformed frame (more than one block)")
    return body


@dataclass(frozen=True)
class DeliveryResult:
    """One delivery attempt: what to do with the message next, and why (no patient data)."""

    outcome: Outcome
    reason: str
    #: The parsed ACK, when one came back; its ``text`` may echo patient data (kept out of repr).
    ack: Ack | None = field(default=None, repr=False)


def deliver(
    host: str,
    port: int,
    er7: str,
    control_id: str,
    *,
    timeout: float = 30.0,
    encoding: str = "utf-8",
    ssl_context: ssl.SSLContext | None = None,
    connect_timeout: float | None = None,
) -> DeliveryResult:
    """Send ``er7`` (whose MSH-10 is ``control_id``) and classify the answer; never raises MllpError.

    AA/CA delivered; AE/CE dead (resending unchanged would fail again); AR/CR, timeouts, network
    errors, unreadable answers and an MSA-2 other than ``control_id`` retry later. A message that
    ``encoding`` cannot carry is dead. Raises ValueError if ``er7``'s MSH-10 is not ``control_id``.
    """
    try:
        sent_id = control_id_of(er7)
    except Hl7ParseError:
        raise ValueError("er7 is not an HL7 message (no MSH)") from None
    if sent_id != control_id:
        raise ValueError("control_id is not the MSH-10 of er7")
    log = LOG.bind(control_id=control_id, peer=f"{host}:{port}")
    try:
        answer = send_message(host, port, er7, timeout=timeout, encoding=encoding, ssl_context=ssl_context,
                              connect_timeout=connect_timeout)
    except UnicodeEncodeError:
        result = DeliveryResult(Outcome.DEAD, f"the message has characters {encoding} cannot encode")
    except MllpError as exc:
        result = DeliveryResult(Outcome.RETRY, f"{type(exc).__name__}: {exc}")
    else:
        try:
            ack = parse_ack(answer)
        except Hl7ParseError as exc:
            result = DeliveryResult(Outcome.RETRY, f"unreadable ACK: {exc}")
        else:
            outcome, reason = classify_ack(ack, control_id)
            if ack.control_id != control_id:
                received = ack.control_id if is_control_id(ack.control_id) else "[not a control id]"
                log.warning("hl7 ack control id mismatch", ack_control_id=received)
            result = DeliveryResult(outcome, reason, ack)
    log_method = log.info if result.outcome is Outcome.DELIVERED else log.warning
    log_method("hl7 delivery", outcome=result.outcome.value, reason=result.reason)
    return result
