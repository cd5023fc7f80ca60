"""Tests for neuroscribe.config.settings: defaults, TOML, environment, precedence and errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest

from neuroscribe.config import SelectionSettings, SeriesSettings, StorageSettings, load_settings
from neuroscribe.errors import ConfigError


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No NEUROSCRIBE_* variable of the calling shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("NEUROSCRIBE_"):
            monkeypatch.delenv(name)


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "neuroscribe.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _error(**overrides: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(**overrides)
    return str(info.value)


# -- defaults --------------------------------------------------------------------------------------


def test_defaults_without_file_or_environment() -> None:
    """With nothing configured the embedded defaults apply."""
    settings = load_settings()
    assert settings.dicom.ae_title == "NEUROSCRIBE"
    assert settings.dicom.bind == "127.0.0.1"
    assert settings.dicom.port == 11112
    assert settings.dicom.allowed_calling_aes == ()
    assert settings.storage.root == Path("./var")
    assert settings.storage.database_url == ""
    assert settings.series.quiet_seconds == 30.0
    assert settings.series.force_complete_seconds == 3600.0
    assert settings.selection.modalities == ("CT",)
    assert settings.selection.prefer_largest is True
    assert settings.logging.level == "INFO"


def test_settings_are_frozen() -> None:
    """A loaded settings object cannot be changed afterwards."""
    settings = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.dicom.port = 104  # type: ignore[misc]


# -- TOML file and environment ---------------------------------------------------------------------


def test_toml_file_sets_values(tmp_path: Path) -> None:
    """Keys in the TOML file replace the defaults and leave the other keys at their defaults."""
    config = _toml(tmp_path, '[dicom]\nport = 104\nae_title = "SITEAE"\n[series]\nquiet_seconds = 12.5\n')
    settings = load_settings(config)
    assert settings.dicom.port == 104
    assert settings.dicom.ae_title == "SITEAE"
    assert settings.dicom.bind == "127.0.0.1"
    assert settings.series.quiet_seconds == 12.5


def test_config_file_accepts_a_string_path(tmp_path: Path) -> None:
    """The config file may be given as a string as well as a Path."""
    config = _toml(tmp_path, "[dicom]\nport = 2104\n")
    assert load_settings(str(config)).dicom.port == 2104  # type: ignore[arg-type]


def test_environment_sets_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """NEUROSCRIBE_<SECTION>__<KEY> sets a key, converted to the key's type."""
    monkeypatch.setenv("NEUROSCRIBE_DICOM__PORT", "4242")
    monkeypatch.setenv("NEUROSCRIBE_SELECTION__PREFER_LARGEST", "false")
    monkeypatch.setenv("NEUROSCRIBE_DICOM__ALLOWED_NETWORKS", '["10.0.0.0/8"]')
    settings = load_settings()
    assert settings.dicom.port == 4242
    assert settings.selection.prefer_largest is False
    assert settings.dicom.allowed_networks == ("10.0.0.0/8",)


def test_environment_overrides_toml_per_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An environment variable wins over the TOML file for its key only; other file keys stay."""
    config = _toml(tmp_path, '[dicom]\nport = 104\nae_title = "FROMFILE"\n')
    monkeypatch.setenv("NEUROSCRIBE_DICOM__PORT", "5104")
    settings = load_settings(config)
    assert settings.dicom.port == 5104
    assert settings.dicom.ae_title == "FROMFILE"


def test_explicit_overrides_win_over_environment_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keyword overrides beat the environment, which beats the file, which beats the defaults."""
    config = _toml(tmp_path, '[dicom]\nport = 104\nae_title = "FROMFILE"\nbind = "0.0.0.0"\n')
    monkeypatch.setenv("NEUROSCRIBE_DICOM__PORT", "5104")
    monkeypatch.setenv("NEUROSCRIBE_DICOM__AE_TITLE", "FROMENV")
    settings = load_settings(config, dicom={"port": 6104})
    assert settings.dicom.port == 6104
    assert settings.dicom.ae_title == "FROMENV"
    assert settings.dicom.bind == "0.0.0.0"  # noqa: S104 - a configured value, nothing binds here
    assert settings.dicom.max_associations == 16


def test_ae_title_is_stripped() -> None:
    """Trailing spaces (DICOM padding) are removed from AE titles."""
    assert load_settings(dicom={"ae_title": "PACS  "}).dicom.ae_title == "PACS"


# -- unknown keys ----------------------------------------------------------------------------------


def test_unknown_key_in_toml_is_rejected_with_its_name(tmp_path: Path) -> None:
    """A typo in the file fails and names the misspelt key and the file."""
    config = _toml(tmp_path, "[dicom]\nprot = 104\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    message = str(info.value)
    assert "dicom.prot" in message
    assert "Extra inputs are not permitted" in message
    assert str(config) in message


def test_unknown_section_in_toml_is_rejected(tmp_path: Path) -> None:
    """A section that does not exist fails and is named."""
    config = _toml(tmp_path, "[dicomm]\nport = 104\n")
    with pytest.raises(ConfigError, match="dicomm"):
        load_settings(config)


def test_unknown_environment_key_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt NEUROSCRIBE_ variable fails with the key and the variable name."""
    monkeypatch.setenv("NEUROSCRIBE_DICOM__PORTT", "104")
    message = _error()
    assert "dicom.portt" in message
    assert "NEUROSCRIBE_DICOM__PORTT" in message


# -- invalid values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "shown", "env"),
    [
        ("dicom", "port", 70000, "70000", "NEUROSCRIBE_DICOM__PORT"),
        ("dicom", "port", 0, "0", "NEUROSCRIBE_DICOM__PORT"),
        ("dicom", "ae_title", "A" * 17, "'" + "A" * 17 + "'", "NEUROSCRIBE_DICOM__AE_TITLE"),
        ("dicom", "ae_title", "AE\\ONE", "AE\\\\ONE", "NEUROSCRIBE_DICOM__AE_TITLE"),
        ("dicom", "ae_title", "    ", "'    '", "NEUROSCRIBE_DICOM__AE_TITLE"),
        ("dicom", "bind", "not-an-ip", "'not-an-ip'", "NEUROSCRIBE_DICOM__BIND"),
        ("dicom", "allowed_networks", ["300.1.1.1/8"], "300.1.1.1/8", "NEUROSCRIBE_DICOM__ALLOWED_NETWORKS"),
        ("dicom", "allowed_calling_aes", ["TOO-LONG-AE-TITLE"], "TOO-LONG-AE-TITLE",
         "NEUROSCRIBE_DICOM__ALLOWED_CALLING_AES"),
        ("selection", "head_pattern", "(", "'('", "NEUROSCRIBE_SELECTION__HEAD_PATTERN"),
        ("selection", "min_slices", 1, "1", "NEUROSCRIBE_SELECTION__MIN_SLICES"),
        ("series", "quiet_seconds", 0, "0", "NEUROSCRIBE_SERIES__QUIET_SECONDS"),
        ("logging", "level", "CHATTY", "'CHATTY'", "NEUROSCRIBE_LOGGING__LEVEL"),
        ("storage", "min_free_bytes", -1, "-1", "NEUROSCRIBE_STORAGE__MIN_FREE_BYTES"),
    ],
)
def test_invalid_value_names_key_value_and_variable(
    section: str, key: str, value: object, shown: str, env: str
) -> None:
    """A bad value fails with a ConfigError naming the dotted key, the value and its variable."""
    message = _error(**{section: {key: value}})
    assert f"{section}.{key} = " in message
    assert shown in message
    assert env in message


def test_invalid_regex_reason_is_given() -> None:
    """An invalid head_pattern says that it is not a regular expression."""
    assert "not a valid regular expression" in _error(selection={"head_pattern": "("})


def test_invalid_environment_value_names_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad value from the environment is reported with the key, the value and the variable."""
    monkeypatch.setenv("NEUROSCRIBE_DICOM__PORT", "abc")
    message = _error()
    assert "dicom.port = 'abc'" in message
    assert "NEUROSCRIBE_DICOM__PORT" in message


def test_invalid_value_from_file_names_the_file(tmp_path: Path) -> None:
    """A bad value in the TOML file is reported with the file's name."""
    config = _toml(tmp_path, "[dicom]\nport = 70000\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert str(config) in str(info.value)
    assert "dicom.port = 70000" in str(info.value)


def test_every_bad_key_is_reported_at_once() -> None:
    """Several bad settings give one error with one line each."""
    message = _error(dicom={"port": 70000, "bind": "nowhere"})
    assert "dicom.port" in message
    assert "dicom.bind" in message
    assert len(message.splitlines()) == 3  # heading plus one line per setting


def test_force_complete_not_above_quiet_is_rejected() -> None:
    """force_complete_seconds <= quiet_seconds fails and names both keys with their values."""
    message = _error(series={"quiet_seconds": 30, "force_complete_seconds": 10})
    assert "series.force_complete_seconds = 10: must exceed quiet_seconds (30.0)" in message
    assert "NEUROSCRIBE_SERIES__FORCE_COMPLETE_SECONDS" in message


def test_force_complete_equal_to_quiet_is_rejected() -> None:
    """A ceiling equal to the quiet period is as invalid as a lower one."""
    with pytest.raises(ConfigError, match="must exceed"):
        load_settings(series={"quiet_seconds": 60, "force_complete_seconds": 60})


def test_force_complete_error_names_the_key_variable() -> None:
    """The cross-field error names the variable an operator would set to fix it."""
    message = _error(series={"quiet_seconds": 30, "force_complete_seconds": 10})
    assert "NEUROSCRIBE_SERIES__FORCE_COMPLETE_SECONDS" in message


def test_slice_thickness_range_must_be_ordered() -> None:
    """slice_thickness_min_mm above slice_thickness_max_mm fails, naming both keys."""
    message = _error(selection={"slice_thickness_min_mm": 5.0, "slice_thickness_max_mm": 1.0})
    assert "slice_thickness_max_mm = 1.0: is below slice_thickness_min_mm (5.0)" in message
    assert "NEUROSCRIBE_SELECTION__SLICE_THICKNESS_MAX_MM" in message


def test_section_models_validate_on_their_own() -> None:
    """The section models enforce their rules when built directly, as tests and tools do."""
    with pytest.raises(ValueError, match="must exceed"):
        SeriesSettings(quiet_seconds=5, force_complete_seconds=5)
    with pytest.raises(ValueError, match="slice_thickness_min_mm"):
        SelectionSettings(slice_thickness_min_mm=3, slice_thickness_max_mm=2)


# -- config file errors ----------------------------------------------------------------------------


def test_missing_config_file_names_the_file(tmp_path: Path) -> None:
    """A config file that does not exist is a ConfigError naming it."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="no such file") as info:
        load_settings(missing)
    assert str(missing) in str(info.value)


def test_directory_as_config_file_is_rejected(tmp_path: Path) -> None:
    """A directory given as the config file is refused like a missing file."""
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    """A file that is not TOML is a ConfigError naming the file and saying why."""
    config = _toml(tmp_path, "[dicom\nport = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_settings(config)
    assert str(config) in str(info.value)


# -- storage paths ---------------------------------------------------------------------------------


def test_storage_derived_paths(tmp_path: Path) -> None:
    """spool, incoming and logs live under storage.root; the database defaults to SQLite there."""
    storage = StorageSettings(root=tmp_path / "data")
    assert storage.spool_dir == tmp_path / "data" / "spool"
    assert storage.incoming_dir == tmp_path / "data" / "incoming"
    assert storage.log_dir == tmp_path / "data" / "logs"
    assert storage.resolved_database_url == f"sqlite:///{tmp_path / 'data' / 'state.sqlite3'}"


def test_relative_root_database_url_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default database URL of a relative root is resolved against the working directory."""
    monkeypatch.chdir(tmp_path)
    url = load_settings().storage.resolved_database_url
    assert url == f"sqlite:///{(tmp_path / 'var' / 'state.sqlite3').resolve()}"


def test_explicit_database_url_is_used() -> None:
    """A configured database_url is used as it is."""
    storage = StorageSettings(database_url="postgresql://ns@db/neuroscribe")
    assert storage.resolved_database_url == "postgresql://ns@db/neuroscribe"


def test_storage_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NEUROSCRIBE_STORAGE__ROOT moves every derived path with it."""
    monkeypatch.setenv("NEUROSCRIBE_STORAGE__ROOT", str(tmp_path))
    storage = load_settings().storage
    assert storage.root == tmp_path
    assert storage.spool_dir == tmp_path / "spool"


REPO = Path(__file__).resolve().parent.parent


def test_example_config_loads() -> None:
    """systemd/neuroscribe.toml, the annotated example for hospital IT, is a valid configuration."""
    settings = load_settings(REPO / "systemd" / "neuroscribe.toml")
    assert settings.dicom.allowed_calling_aes == ("CT_NEURO1", "CT_ER2", "PACS")
    assert settings.storage.min_free_bytes == 10 * 1024**3


def test_every_setting_is_documented() -> None:
    """docs/configuration.md names every key of every section, so the reference cannot drift."""
    from neuroscribe.config import Settings

    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    for section, field in Settings.model_fields.items():
        model = field.annotation
        if get_origin(model) is tuple:  # an array of tables: [[pacs]], [[ris]]
            model = get_args(model)[0]
            assert f"`[[{section}]]`" in text, section
        else:
            assert f"`[{section}]`" in text, section
        for key in model.model_fields:  # type: ignore[union-attr]
            assert f"| `{key}` |" in text, f"{section}.{key}"
