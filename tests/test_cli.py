"""Tests for neuroscribe.cli: doctor, configuration errors at start-up and --version."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from sqlalchemy import text

from neuroscribe import __version__
from neuroscribe.cli import main
from neuroscribe.store import Database
from tests.conftest import free_port


@pytest.fixture(autouse=True)
def _isolated(isolated_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Storage under tmp_path (conftest's isolated_root), a free port, no disk floor."""
    monkeypatch.setenv("NEUROSCRIBE_DICOM__PORT", str(free_port()))
    monkeypatch.setenv("NEUROSCRIBE_HTTP__PORT", str(free_port()))
    monkeypatch.setenv("NEUROSCRIBE_STORAGE__MIN_FREE_BYTES", "0")
    return isolated_root


def _lines(out: str) -> dict[str, str]:
    """Doctor's lines by check name: '[ok  ] name   detail' -> {name: '[ok  ] ... detail'}."""
    found = {}
    for line in out.splitlines():
        if line.startswith("["):
            name = line[7:].split("  ")[0].strip()
            found[name] = line
    return found


def test_doctor_passes_on_a_fresh_root(capsys: pytest.CaptureFixture[str], _isolated: Path) -> None:
    """doctor on an empty storage root with a free port returns 0 and reports each required check."""
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    lines = _lines(out)
    for name in ("config", "storage.root", "disk", "database", "dicom.port", "http.port", "tls", "model"):
        assert lines[name].startswith("[ok  ]"), out
    assert "demo: neuroscribe-demo-cvit" in lines["model"]  # what serve would run, loaded once
    assert str(_isolated.resolve()) in lines["storage.root"]
    assert "schema version" in lines["database"]
    assert "is free" in lines["dicom.port"]
    assert "all required checks passed" in out
    assert (_isolated / "state.sqlite3").is_file()


def test_doctor_fails_when_the_port_is_in_use(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port something already listens on makes doctor return 1 and say 'in use'."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        monkeypatch.setenv("NEUROSCRIBE_DICOM__PORT", str(busy.getsockname()[1]))
        assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    line = _lines(out)["dicom.port"]
    assert line.startswith("[FAIL]")
    assert "in use" in line
    assert "1 required check(s) failed" in out


def test_doctor_fails_below_the_disk_floor(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A min_free_bytes larger than any disk makes the 'disk' check FAIL and doctor return 1."""
    monkeypatch.setenv("NEUROSCRIBE_STORAGE__MIN_FREE_BYTES", str(2**62))
    assert main(["doctor"]) == 1
    line = _lines(capsys.readouterr().out)["disk"]
    assert line.startswith("[FAIL]")
    assert "storage.min_free_bytes" in line


def test_doctor_fails_on_an_unwritable_root(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A storage root that is a file fails 'storage.root' and stops the remaining checks."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("NEUROSCRIBE_STORAGE__ROOT", str(blocker / "root"))
    assert main(["doctor"]) == 1
    lines = _lines(capsys.readouterr().out)
    assert lines["storage.root"].startswith("[FAIL]")
    assert "database" not in lines


def test_doctor_reports_a_newer_database_schema(
    capsys: pytest.CaptureFixture[str], _isolated: Path
) -> None:
    """A state database from a newer NeuroScribe is a failed 'database' check, not a traceback."""
    db = Database(f"sqlite:///{_isolated / 'state.sqlite3'}")
    with db.write() as conn:
        conn.execute(text("INSERT INTO schema_version (version, description, applied_at) "
                          "VALUES (999, 'future', 0)"))
    db.close()
    assert main(["doctor"]) == 1
    assert _lines(capsys.readouterr().out)["database"].startswith("[FAIL]")


def test_bad_environment_value_exits_2_naming_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve with NEUROSCRIBE_DICOM__PORT=abc returns 2 and names the key, value and variable."""
    monkeypatch.setenv("NEUROSCRIBE_DICOM__PORT", "abc")
    assert main(["serve"]) == 2
    captured = capsys.readouterr()
    assert "dicom.port" in captured.err
    assert "'abc'" in captured.err
    assert "NEUROSCRIBE_DICOM__PORT" in captured.err
    assert captured.out == ""


def test_missing_config_file_exits_2_naming_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--config with a file that does not exist returns 2 and names the file."""
    missing = tmp_path / "missing.toml"
    assert main(["--config", str(missing), "doctor"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err
    assert "no such file" in err


def test_config_file_is_used(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """--config reads the TOML file: its bad value is reported with the file's name."""
    monkeypatch.delenv("NEUROSCRIBE_DICOM__PORT")
    config = tmp_path / "site.toml"
    config.write_text("[dicom]\nport = 70000\n")
    assert main(["--config", str(config), "doctor"]) == 2
    err = capsys.readouterr().err
    assert "dicom.port = 70000" in err
    assert str(config) in err


def test_version_prints_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the package version and exits with status 0."""
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"neuroscribe {__version__}"


def test_missing_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a sub-command argparse exits with status 2 and a usage line."""
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage: neuroscribe" in capsys.readouterr().err


def test_doctor_fails_on_an_unusable_tls_file(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An enabled [dicom.tls] whose certificate is missing fails the 'tls' check, naming the key."""
    monkeypatch.setenv("NEUROSCRIBE_DICOM__TLS", f'{{"enabled": true, "cert_file": "{tmp_path}/no.pem", '
                                                f'"key_file": "{tmp_path}/no.key"}}')
    assert main(["doctor"]) == 1
    line = _lines(capsys.readouterr().out)["tls"]
    assert line.startswith("[FAIL]") and "dicom.tls.cert_file" in line
