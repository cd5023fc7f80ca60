"""TLS contexts for DICOM (SCP and SCU) and MLLP, built from one :class:`~neuroscribe.config.TlsSettings`.

::

    scp_context = server_context(settings.dicom.tls, key="dicom.tls")
    pacs_context = client_context(settings.pacs[0].tls, key="pacs[0].tls")

Both contexts speak TLS 1.2 or 1.3 only, with forward-secret AEAD cipher suites for TLS 1.2 (the
spirit of BCP 195 and DICOM PS3.15 B.9, the Non-Downgrading BCP 195 TLS Secure Transport
Connection Profile); TLS 1.3 suites are OpenSSL's defaults, all of which qualify.

* A **server** presents ``cert_file``/``key_file``. With ``require_peer_cert`` it asks every client
  for a certificate and refuses the handshake unless one chains to ``ca_file`` (mutual
  authentication); without it, clients are not asked.
* A **client** verifies the server against ``ca_file`` (the system store when empty) and presents
  ``cert_file``/``key_file`` when set. The host name is always checked against the server's
  certificate, IP addresses too: a peer configured as ``10.0.0.5`` needs ``IP:10.0.0.5`` in its
  subjectAltName, as one configured as ``pacs.example.org`` needs that DNS name. There is no switch
  to turn the check off: a certificate any CA member could present would authenticate nobody.

Every problem with the files (not set, missing, unreadable, not PEM, key not matching, encrypted key)
raises :class:`~neuroscribe.errors.ConfigError` naming the settings key and the path, never a
traceback. Private keys must be unencrypted PEM (protect them with file permissions): a service
cannot type a passphrase.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from neuroscribe.config import TlsSettings
from neuroscribe.errors import ConfigError

__all__ = ["MINIMUM_VERSION", "TLS12_CIPHERS", "client_context", "server_context"]

#: The oldest protocol either side accepts (PS3.15 B.9 forbids anything older).
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
#: TLS 1.2 suites (OpenSSL names): ephemeral key exchange and AEAD only (BCP 195 section 4.2).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!PSK:!SRP"


def server_context(tls: TlsSettings, *, key: str = "tls") -> ssl.SSLContext:
    """A context for a listener (``server_side``): our certificate, and client checks if required.

    Parameters
    ----------
    tls
        ``cert_file`` and ``key_file`` are required; ``ca_file`` too with ``require_peer_cert``.
    key
        The settings key of ``tls`` for error messages, e.g. ``"dicom.tls"``.

    Raises
    ------
    ConfigError
        A required file is not set, missing, unreadable or not what it should be.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context, key)
    cert_file = _required(tls.cert_file, f"{key}.cert_file", "a listener presents a certificate")
    key_file = _required(tls.key_file, f"{key}.key_file", "a listener needs its private key")
    _load_chain(context, cert_file, key_file, key)
    if tls.require_peer_cert:
        ca_file = _required(tls.ca_file, f"{key}.ca_file", "require_peer_cert verifies clients against it")
        _load_ca(context, ca_file, f"{key}.ca_file")
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(tls: TlsSettings, *, key: str = "tls") -> ssl.SSLContext:
    """A context for an outgoing connection: verifies the server and its host name.

    Parameters
    ----------
    tls
        ``ca_file`` (empty: the system store); ``cert_file`` and ``key_file`` together, or neither.
    key
        The settings key of ``tls`` for error messages, e.g. ``"pacs[0].tls"``.

    Raises
    ------
    ConfigError
        A file is missing, unreadable or not what it should be, or only one of cert and key is set.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    _harden(context, key)
    if tls.ca_file is not None:
        _load_ca(context, _readable(tls.ca_file, f"{key}.ca_file"), f"{key}.ca_file")
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if (tls.cert_file is None) != (tls.key_file is None):
        missing = "key_file" if tls.key_file is None else "cert_file"
        raise ConfigError(f"{key}.{missing} is not set: cert_file and key_file go together "
                          "(a client certificate needs its private key)")
    if tls.cert_file is not None and tls.key_file is not None:
        _load_chain(context, _readable(tls.cert_file, f"{key}.cert_file"),
                    _readable(tls.key_file, f"{key}.key_file"), key)
    return context


def _harden(context: ssl.SSLContext, key: str) -> None:
    context.minimum_version = MINIMUM_VERSION
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        context.set_ciphers(TLS12_CIPHERS)
    except ssl.SSLError:  # an OpenSSL build without any of them
        raise ConfigError(f"{key}: this OpenSSL ({ssl.OPENSSL_VERSION}) offers none of the TLS 1.2 "
                          f"cipher suites {TLS12_CIPHERS!r}") from None


def _required(path: Path | None, name: str, why: str) -> Path:
    if path is None:
        raise ConfigError(f"{name} is not set: {why}")
    return _readable(path, name)


def _readable(path: Path, name: str) -> Path:
    """``path`` if it is a file this process can read; else a ConfigError naming key and path."""
    if not path.exists():
        raise ConfigError(f"{name} = {str(path)!r}: no such file")
    if not path.is_file():
        raise ConfigError(f"{name} = {str(path)!r}: not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{name} = {str(path)!r}: not readable by this user (uid {os.getuid()})")
    return path


def _encrypted_key(name: str, path: Path) -> bytes:
    """The password callback: a service cannot prompt, so an encrypted key is a configuration error."""
    raise ConfigError(f"{name} = {str(path)!r}: the private key is encrypted; give an unencrypted "
                      "PEM key and protect it with file permissions")


def _load_chain(context: ssl.SSLContext, cert_file: Path, key_file: Path, key: str) -> None:
    try:
        context.load_cert_chain(cert_file, key_file,
                                password=lambda: _encrypted_key(f"{key}.key_file", key_file))
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{key}.cert_file = {str(cert_file)!r} with {key}.key_file = {str(key_file)!r}: not a PEM "
            f"certificate (chain) and its matching private key ({exc.reason or exc.strerror})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{key}.cert_file/key_file ({str(cert_file)!r}, {str(key_file)!r}) cannot "
                          f"be read: {exc.strerror or type(exc).__name__}") from None


def _load_ca(context: ssl.SSLContext, ca_file: Path, name: str) -> None:
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise ConfigError(f"{name} = {str(ca_file)!r}: no PEM CA certificate in it "
                          f"({exc.reason or exc.strerror})") from None
    except OSError as exc:
        raise ConfigError(f"{name} = {str(ca_file)!r} cannot be read: "
                          f"{exc.strerror or type(exc).__name__}") from None
