"""TLS: the contexts of neuroscribe.tls, DICOM TLS on the SCP and the SCU, MLLP over TLS, with real
loopback peers (DCMTK storescu/storescp with ``+tls``, hl7apy's MLLPServer wrapped in TLS) and a
test PKI made per module (tests.peers.make_pki).
"""

from __future__ import annotations

import random
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from neuroscribe.config import TlsSettings, load_settings
from neuroscribe.dicom_io.scu import Outcome, PacsPeer, Timeouts, store
from neuroscribe.dicom_io.writer import CtSeriesSpec, write_ct_series
from neuroscribe.errors import ConfigError
from neuroscribe.log import hash_uid
from neuroscribe.reporting.hl7 import control_id_of
from neuroscribe.reporting.mllp import deliver
from neuroscribe.reporting.outbox import Outbox
from neuroscribe.store import Database, OutboxState
from neuroscribe.tls import client_context, server_context
from tests.conftest import (
    SERVER_AE,
    AuditTrail,
    InProcessScp,
    ScpFactory,
    ServerFactory,
    queue_report,
    require_tool,
    small_report,
    storescu,
)
from tests.peers import LOOPBACK, Pki, Ris, StoreScp, make_pki
from tests.test_scu import minimal_sr

FAST = Timeouts(connect=2, acse=3, dimse=5, network=5)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The site's CA, with a server certificate (localhost, 127.0.0.1) and a client certificate."""
    return make_pki(tmp_path_factory.mktemp("pki"), "Site CA")


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Another CA: its certificates must not be trusted where the site CA is."""
    return make_pki(tmp_path_factory.mktemp("other-pki"), "Other CA")


def listener_tls(pki: Pki, *, require_peer_cert: bool = True) -> dict[str, Any]:
    """``[dicom.tls]`` for the SCP, with mutual authentication unless told otherwise."""
    return {"enabled": True, "cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
            "ca_file": str(pki.ca_cert), "require_peer_cert": require_peer_cert}


def client_tls(pki: Pki, *, present: Pki | None = None) -> TlsSettings:
    """A client trusting ``pki``'s CA and presenting the client certificate of ``present`` (if any)."""
    cert = {} if present is None else {"cert_file": present.client_cert, "key_file": present.client_key}
    return TlsSettings(enabled=True, ca_file=pki.ca_cert, **cert)


def storescu_tls(pki: Pki, trust: Pki) -> tuple[str, ...]:
    """storescu options: present ``pki``'s client certificate, verify the server against ``trust``."""
    return ("+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(trust.ca_cert))


def ct_files(tmp_path: Path, slices: int = 3) -> tuple[CtSeriesSpec, list[Path]]:
    """A small CT series on disk."""
    spec = CtSeriesSpec(rows=16, columns=16, slices=slices)
    return spec, write_ct_series(spec, tmp_path / f"ct-{spec.series_instance_uid[-6:]}")


def nothing_stored(scp: InProcessScp) -> bool:
    """No state row and no spool file."""
    spool = scp.root / "spool"
    return scp.store.instance_count() == 0 and not any(spool.rglob("*.dcm"))


# -- contexts --------------------------------------------------------------------------------------


class TestContexts:
    """server_context and client_context."""

    def test_server_context_with_mutual_authentication(self, pki: Pki) -> None:
        """TLS 1.2 at least; require_peer_cert asks for and verifies a client certificate."""
        context = server_context(TlsSettings(**listener_tls(pki)))
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.get_ca_certs()[0]["subject"] == ((("commonName", "Site CA"),),)
        plain = server_context(TlsSettings(**listener_tls(pki, require_peer_cert=False)))
        assert plain.verify_mode == ssl.CERT_NONE

    def test_client_context_verifies_the_server_and_its_name(self, pki: Pki) -> None:
        """A client always verifies the certificate and the host name, IP addresses included."""
        context = client_context(client_tls(pki, present=pki))
        assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        system = client_context(TlsSettings(enabled=True))  # no ca_file: the system store
        assert system.verify_mode == ssl.CERT_REQUIRED

    @pytest.mark.parametrize("field", ["cert_file", "key_file", "ca_file"])
    def test_missing_file_names_key_and_path(self, pki: Pki, tmp_path: Path, field: str) -> None:
        """A missing file raises ConfigError naming the settings key and the path."""
        missing = tmp_path / f"no-{field}.pem"
        settings = TlsSettings(**{**listener_tls(pki), field: missing})
        with pytest.raises(ConfigError, match=rf"dicom\.tls\.{field} = '{missing}': no such file"):
            server_context(settings, key="dicom.tls")

    def test_unusable_files_name_the_key(self, pki: Pki, tmp_path: Path) -> None:
        """A folder, a file that is not PEM, a key of another certificate: each a ConfigError."""
        with pytest.raises(ConfigError, match=r"pacs\[0\]\.tls\.ca_file = .*not a file"):
            client_context(TlsSettings(enabled=True, ca_file=tmp_path), key="pacs[0].tls")
        garbage = tmp_path / "garbage.pem"
        garbage.write_text("not a certificate\n")
        with pytest.raises(ConfigError, match=r"ris\[1\]\.tls\.ca_file = .*garbage\.pem.*no PEM CA"):
            client_context(TlsSettings(enabled=True, ca_file=garbage), key="ris[1].tls")
        mismatched = TlsSettings(**{**listener_tls(pki), "key_file": pki.client_key})
        with pytest.raises(ConfigError, match=r"dicom\.tls\.cert_file = .*matching private key"):
            server_context(mismatched, key="dicom.tls")

    def test_encrypted_key_is_refused_without_a_prompt(self, pki: Pki, tmp_path: Path) -> None:
        """A passphrase-protected key is a ConfigError, not a password prompt on the terminal."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        encrypted = tmp_path / "encrypted.key"
        encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.BestAvailableEncryption(b"secret")))
        settings = TlsSettings(**{**listener_tls(pki), "key_file": encrypted})
        with pytest.raises(ConfigError, match=r"dicom\.tls\.key_file = .*encrypted"):
            server_context(settings, key="dicom.tls")

    @pytest.mark.parametrize(
        ("overrides", "message"),
        [
            ({"dicom": {"tls": {"enabled": True}}}, r"dicom\.tls = .*needs cert_file and key_file"),
            ({"dicom": {"tls": {"cert_file": "/a.pem"}}}, r"dicom\.tls = .*key_file is not set"),
            ({"dicom": {"tls": {"require_peer_cert": True, "cert_file": "/a", "key_file": "/b"}}},
             r"dicom\.tls = .*require_peer_cert needs ca_file"),
            ({"ris": [{"name": "r", "host": "h", "port": 1, "tls": {"require_peer_cert": True,
                                                                    "ca_file": "/c"}}]},
             r"ris\[0\]\.tls = .*require_peer_cert is for listeners"),
        ],
    )
    def test_inconsistent_settings_fail_at_load(self, overrides: dict[str, Any], message: str) -> None:
        """Incomplete [dicom.tls] or a client asking to verify clients fails when settings load."""
        with pytest.raises(ConfigError, match=message):
            load_settings(None, **overrides)

    def test_serve_with_a_missing_certificate_says_so_without_traceback(
        self, server_factory: ServerFactory, pki: Pki, tmp_path: Path
    ) -> None:
        """``neuroscribe serve`` stops with the key and the path, and no traceback."""
        missing = tmp_path / "gone" / "server.pem"
        server = server_factory(NEUROSCRIBE_DICOM__TLS__ENABLED="true",
                                NEUROSCRIBE_DICOM__TLS__CERT_FILE=str(missing),
                                NEUROSCRIBE_DICOM__TLS__KEY_FILE=str(pki.server_key))
        with pytest.raises(AssertionError, match="exited early"):
            server.start(timeout=30)
        assert server.proc is not None and server.proc.wait(10) != 0
        logs = server.logs()
        assert f"dicom.tls.cert_file = '{missing}': no such file" in logs
        # No traceback of the error itself (it would name the class and the module raising it).
        assert "ConfigError" not in logs and "neuroscribe/tls.py" not in logs


# -- DICOM TLS: our SCP ----------------------------------------------------------------------------


class TestScp:
    """The Storage SCP with [dicom.tls], against DCMTK storescu +tls and our own SCU."""

    def test_storescu_tls_with_client_certificate_stores(
        self, scp_factory: ScpFactory, pki: Pki, tmp_path: Path, audit_trail: AuditTrail
    ) -> None:
        """storescu +tls with the site's client certificate stores every instance; audited with TLS."""
        require_tool("storescu")
        scp = scp_factory(tls=listener_tls(pki))
        spec, files = ct_files(tmp_path)
        result = storescu(scp.port, files, extra=storescu_tls(pki, trust=pki))
        assert result.returncode == 0, result.stderr
        assert result.stderr.count("Received Store Response (Success)") == 3
        assert scp.store.instance_count() == 3
        accepted = audit_trail.wait_for("association")[0]
        assert accepted["outcome"] == "success"
        assert accepted["tls"] in ("TLSv1.2", "TLSv1.3")
        assert accepted["peer_cert"] == "Site CA client"
        received = audit_trail.wait_for("instances_received")[0]
        assert (received["count"], received["study_uid_hashes"]) == (3, [hash_uid(spec.study_instance_uid)])

    @pytest.mark.parametrize(
        "client",
        ["no certificate", "certificate of another CA", "plain TCP"],
    )
    def test_mutual_authentication_refuses_other_clients(
        self, scp_factory: ScpFactory, pki: Pki, other_pki: Pki, tmp_path: Path, audit_trail: AuditTrail,
        client: str,
    ) -> None:
        """No certificate, one from another CA, or no TLS at all: handshake fails, nothing stored."""
        scp = scp_factory(tls=listener_tls(pki))
        _, files = ct_files(tmp_path, slices=1)
        extra = {
            "no certificate": ("+tla", "+cf", str(pki.ca_cert)),
            "certificate of another CA": storescu_tls(other_pki, trust=pki),
            "plain TCP": (),
        }[client]
        result = storescu(scp.port, files, extra=extra)
        assert result.returncode != 0
        assert "Received Store Response" not in result.stderr
        refused = audit_trail.wait_for("association")
        assert [(e["outcome"], e["reason"], e["peer"]) for e in refused] == [
            ("refused", "TLS handshake failed", LOOPBACK)]
        assert set(refused[0]) == {"time", "event", "outcome", "pid", "reason", "peer"}
        assert nothing_stored(scp)
        assert audit_trail.events("instances_received") == []

    def test_large_instances_over_tls_and_prompt_release(
        self, scp_factory: ScpFactory, pki: Pki, tmp_path: Path
    ) -> None:
        """Multi-PDU instances (TLS-buffered reads) all arrive, and the association ends at release."""
        scp = scp_factory(tls=listener_tls(pki))
        spec = CtSeriesSpec(rows=256, columns=256, slices=12)
        files = write_ct_series(spec, tmp_path / "big")
        result = storescu(scp.port, files, extra=(*storescu_tls(pki, trust=pki), "-pdu", "16384"))
        assert result.returncode == 0, result.stderr
        assert scp.store.instance_count() == 12
        deadline = time.monotonic() + 2
        while scp.scp.active_associations and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scp.scp.active_associations == 0

    def test_a_silent_client_does_not_stall_the_others(
        self, scp_factory: ScpFactory, pki: Pki, tmp_path: Path, audit_trail: AuditTrail
    ) -> None:
        """A connection that never starts its handshake waits on its own thread, not the listener's."""
        scp = scp_factory(tls=listener_tls(pki))
        _, files = ct_files(tmp_path, slices=1)
        with socket.create_connection((LOOPBACK, scp.port)):
            started = time.monotonic()
            result = storescu(scp.port, files, extra=storescu_tls(pki, trust=pki))
            assert result.returncode == 0, result.stderr
            assert time.monotonic() - started < 10
        refused = audit_trail.wait_for("association", count=2)
        assert sorted(e["outcome"] for e in refused) == ["refused", "success"]

    def test_our_scu_over_tls_to_our_scp(self, scp_factory: ScpFactory, pki: Pki, other_pki: Pki) -> None:
        """Our SCU with the site client certificate delivers; with another CA's it is RETRY."""
        scp = scp_factory(tls=listener_tls(pki))
        trusted = client_context(client_tls(pki, present=pki))
        good = PacsPeer(SERVER_AE, LOOPBACK, scp.port, ssl_context=trusted)
        assert store(good, [minimal_sr()], timeout=FAST).outcome is Outcome.DELIVERED
        assert scp.store.instance_count() == 1
        stranger = PacsPeer(SERVER_AE, LOOPBACK, scp.port,
                            ssl_context=client_context(client_tls(pki, present=other_pki)))
        refused = store(stranger, [minimal_sr()], timeout=FAST)
        assert refused.outcome is Outcome.RETRY
        assert "TLS handshake" in refused.reason
        assert scp.store.instance_count() == 1

    def test_tls_without_client_certificates(self, scp_factory: ScpFactory, pki: Pki, tmp_path: Path) -> None:
        """Without require_peer_cert a client with no certificate stores over TLS."""
        scp = scp_factory(tls=listener_tls(pki, require_peer_cert=False))
        _, files = ct_files(tmp_path, slices=2)
        result = storescu(scp.port, files, extra=("+tla", "+cf", str(pki.ca_cert)))
        assert result.returncode == 0, result.stderr
        assert scp.store.instance_count() == 2

    def test_bad_certificate_path_stops_the_scp(
        self, scp_factory: ScpFactory, pki: Pki, tmp_path: Path
    ) -> None:
        """A missing certificate is a ConfigError naming dicom.tls.cert_file before anything listens."""
        missing = tmp_path / "missing.pem"
        with pytest.raises(ConfigError, match=rf"dicom\.tls\.cert_file = '{missing}'"):
            scp_factory(tls={**listener_tls(pki), "cert_file": str(missing)})


# -- DICOM TLS: our SCU to DCMTK storescp +tls ------------------------------------------------------


class TestScu:
    """The Storage SCU and the outbox's [[pacs]].tls against DCMTK storescp +tls (client certs required)."""

    @pytest.fixture
    def tls_storescp(self, pki: Pki, tmp_path: Path) -> Any:
        """storescp +tls with the site's server certificate, requiring a client certificate of the site CA."""
        require_tool("storescp")
        with StoreScp(tmp_path / "storescp", tls=(pki.server_key, pki.server_cert),
                      extra=("+cf", str(pki.ca_cert), "-rc")) as peer:
            yield peer

    def test_store_over_tls_delivers(self, tls_storescp: StoreScp, pki: Pki) -> None:
        """An SR sent over TLS with the site client certificate arrives."""
        context = client_context(client_tls(pki, present=pki))
        for host in (LOOPBACK, "localhost"):  # the IP and the DNS name of the certificate
            peer = PacsPeer(tls_storescp.ae_title, host, tls_storescp.port, ssl_context=context)
            assert store(peer, [minimal_sr()], timeout=FAST).outcome is Outcome.DELIVERED
        assert len(tls_storescp.received()) == 2

    def test_wrong_ca_or_host_name_is_retry(self, tls_storescp: StoreScp, pki: Pki, other_pki: Pki) -> None:
        """Trusting another CA, or reaching the peer by a name its certificate lacks, sends nothing."""
        distrust = client_context(client_tls(other_pki, present=pki))
        trusted = client_context(client_tls(pki, present=pki))
        for host, context in ((LOOPBACK, distrust), ("127.0.0.2", trusted)):
            peer = PacsPeer(tls_storescp.ae_title, host, tls_storescp.port, ssl_context=context)
            assert store(peer, [minimal_sr()], timeout=FAST).outcome is Outcome.RETRY
        assert tls_storescp.received() == []


# -- MLLP over TLS, and the outbox over TLS ---------------------------------------------------------


class TestMllpAndOutbox:
    """MLLP over TLS to a TLS RIS; the outbox delivering to a TLS PACS and a TLS RIS."""

    @pytest.fixture
    def tls_ris(self, pki: Pki) -> Any:
        """hl7apy's MLLPServer behind TLS with the site's server certificate."""
        tls = TlsSettings(enabled=True, cert_file=pki.server_cert, key_file=pki.server_key)
        context = server_context(tls)
        with Ris(ssl_context=context) as ris:
            yield ris

    def test_mllp_over_tls_gets_the_ack(self, tls_ris: Ris, pki: Pki) -> None:
        """The ORU arrives through TLS and the AA comes back."""
        er7 = _oru()
        control_id = control_id_of(er7)
        result = deliver(LOOPBACK, tls_ris.port, er7, control_id, timeout=5,
                         ssl_context=client_context(client_tls(pki)))
        assert result.outcome.value == "delivered", result.reason
        assert result.ack is not None and result.ack.code == "AA"
        assert [control_id_of(m) for m in tls_ris.received] == [control_id]

    def test_mllp_tls_to_an_untrusted_ris_is_retry(self, tls_ris: Ris, other_pki: Pki) -> None:
        """A RIS whose certificate does not chain to ca_file gets nothing: RETRY naming TLS."""
        er7 = _oru()
        result = deliver(LOOPBACK, tls_ris.port, er7, control_id_of(er7), timeout=5,
                         ssl_context=client_context(client_tls(other_pki)))
        assert result.outcome.value == "retry"
        assert "TLS" in result.reason
        assert tls_ris.received == []

    def test_outbox_delivers_over_tls_and_audits(
        self, tls_ris: Ris, pki: Pki, tmp_path: Path, audit_trail: AuditTrail
    ) -> None:
        """[[pacs]].tls and [[ris]].tls reach storescp +tls and the TLS RIS; each delivery is audited."""
        require_tool("storescp")
        tls = {"enabled": True, "ca_file": str(pki.ca_cert), "cert_file": str(pki.client_cert),
               "key_file": str(pki.client_key)}
        with StoreScp(tmp_path / "pacs", tls=(pki.server_key, pki.server_cert),
                      extra=("+cf", str(pki.ca_cert))) as pacs:
            settings = load_settings(
                None, storage={"root": str(tmp_path / "root")},
                pacs=[{"name": "main", "ae_title": pacs.ae_title, "host": LOOPBACK, "port": pacs.port,
                       "timeout_seconds": 5, "tls": tls}],
                ris=[{"name": "ris", "host": "localhost", "port": tls_ris.port, "timeout_seconds": 5,
                      "tls": {"enabled": True, "ca_file": str(pki.ca_cert)}}],
            )
            db = Database(settings.storage.resolved_database_url)
            try:
                outbox = Outbox(settings, db, rng=random.Random(1))
                outbox.check_tls()
                assert outbox.pacs_peer(settings.pacs[0]).ssl_context is outbox.tls_context(settings.pacs[0])
                sr = minimal_sr()
                report_id = queue_report(outbox, sr)
                results = outbox.deliver_due()
                assert {(str(r.destination), r.state) for r in results} == {
                    ("pacs:main", OutboxState.DELIVERED), ("ris:ris", OutboxState.DELIVERED)}, results
                assert [h.ok for h in outbox.check_health(timeout=5)] == [True, True]
            finally:
                db.close()
            assert len(pacs.received()) == 1
        assert len(tls_ris.received) == 1
        sent = audit_trail.events("report_sent")
        assert sorted((e["destination_kind"], e["destination"]) for e in sent) == [
            ("pacs", "main"), ("ris", "ris")]
        assert {e["report_id"] for e in sent} == {report_id}
        assert {e["sr_uid_hash"] for e in sent} == {hash_uid(sr.SOPInstanceUID)}

    def test_outbox_tls_with_a_missing_file_is_a_retry_naming_the_key(self, tmp_path: Path) -> None:
        """A missing [[pacs]].tls.ca_file fails check_tls, and an attempt is RETRY naming the key."""
        missing = tmp_path / "no-ca.pem"
        settings = load_settings(
            None, storage={"root": str(tmp_path / "root")},
            pacs=[{"name": "main", "ae_title": "PACS", "host": LOOPBACK, "port": 104,
                   "tls": {"enabled": True, "ca_file": str(missing)}}],
        )
        db = Database(settings.storage.resolved_database_url)
        try:
            outbox = Outbox(settings, db)
            with pytest.raises(ConfigError, match=rf"pacs\[0\]\.tls\.ca_file = '{missing}'"):
                outbox.check_tls()
            queue_report(outbox, minimal_sr(), with_oru=False)
            attempt = outbox.deliver_due()[0]
            assert attempt.outcome is Outcome.RETRY
            assert "pacs[0].tls.ca_file" in attempt.reason
        finally:
            db.close()


def _oru() -> str:
    """An ORU^R01 of a small SR (tests.conftest.small_report)."""
    return small_report(minimal_sr())[1]


def test_dcmtk_has_tls() -> None:
    """The installed DCMTK was built with OpenSSL (these tests need storescu/storescp +tls)."""
    require_tool("storescu")
    help_text = subprocess.run(["storescu", "--help"], capture_output=True, text=True, check=False).stdout
    assert "+tls" in help_text
