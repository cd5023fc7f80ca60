"""The one typed settings model: embedded defaults < TOML file (``--config``) < environment.

Environment variables are ``NEUROSCRIBE_<SECTION>__<KEY>``, e.g. ``NEUROSCRIBE_DICOM__PORT=104``.
Every section forbids unknown keys, so a typo fails at start-up instead of being ignored.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from neuroscribe.errors import ConfigError

ENV_PREFIX = "NEUROSCRIBE_"
ENV_NESTED_DELIMITER = "__"

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: 16 chars, no backslash


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError("an AE title is 1 to 16 printable ASCII characters, not all spaces, no '\\'")
    return value.strip()


class DicomSettings(_Section):
    """The Storage SCP: who may send, on which address, with which limits."""

    ae_title: str = "NEUROSCRIBE"
    bind: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    #: Refuse associations whose called AE title is not ours.
    require_called_ae: bool = True
    #: Calling AE titles allowed to connect; empty accepts any (a warning is logged at start).
    allowed_calling_aes: tuple[str, ...] = ()
    #: Source addresses or networks (CIDR) allowed to connect; empty accepts any (with a warning).
    allowed_networks: tuple[str, ...] = ()
    #: Store instances of storage SOP classes other than CT and Enhanced CT (they are kept and then
    #: rejected from reporting with a reason); false refuses their presentation contexts.
    accept_other_storage: bool = True
    max_associations: int = Field(16, ge=1, le=1000)
    acse_timeout_seconds: float = Field(30.0, gt=0)
    dimse_timeout_seconds: float = Field(60.0, gt=0)
    network_timeout_seconds: float = Field(60.0, gt=0)
    #: Largest P-DATA PDU we accept; 0 means unlimited, the fastest for large CT slices.
    max_pdu_size: int = Field(0, ge=0)

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _check_ae_title(value)

    @field_validator("allowed_calling_aes")
    @classmethod
    def _allowed_aes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_ae_title(v) for v in value)

    @field_validator("allowed_networks")
    @classmethod
    def _allowed_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for net in value:
            ipaddress.ip_network(net, strict=False)  # raises ValueError naming the bad value
        return value

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value


class StorageSettings(_Section):
    """Where the spool, the state database and the logs live, and how full the disk may get."""

    root: Path = Path("./var")
    #: C-STORE answers 0xA700 (out of resources) when free space under ``root`` is below this.
    min_free_bytes: int = Field(2 * 1024**3, ge=0)
    #: SQLAlchemy URL of the state database; empty means SQLite at ``<root>/state.sqlite3``.
    database_url: str = ""

    @property
    def spool_dir(self) -> Path:
        """Received instances, one folder per series (``<root>/spool``)."""
        return self.root / "spool"

    @property
    def incoming_dir(self) -> Path:
        """Partial instances while they stream in (``<root>/incoming``), same filesystem."""
        return self.root / "incoming"

    @property
    def log_dir(self) -> Path:
        """JSON-lines logs (``<root>/logs``)."""
        return self.root / "logs"

    @property
    def models_dir(self) -> Path:
        """The default model registry folder (``<root>/models``)."""
        return self.root / "models"

    @property
    def resolved_database_url(self) -> str:
        """The database URL in use."""
        return self.database_url or f"sqlite:///{(self.root / 'state.sqlite3').resolve()}"


class SeriesSettings(_Section):
    """When a series counts as complete."""

    #: A series is COMPLETE after this many seconds without a new instance.
    quiet_seconds: float = Field(30.0, gt=0)
    #: A series still receiving this long after its first instance is completed anyway.
    force_complete_seconds: float = Field(3600.0, gt=0)
    #: How often the assembler looks for quiet series.
    poll_seconds: float = Field(1.0, gt=0)

    @field_validator("force_complete_seconds")
    @classmethod
    def _ceiling_above_quiet(cls, value: float, info: ValidationInfo) -> float:
        quiet = info.data.get("quiet_seconds")
        if quiet is not None and value <= quiet:
            raise ValueError(f"must exceed quiet_seconds ({quiet})")
        return value


class SelectionSettings(_Section):
    """Which completed series are head CTs worth a report (in the spirit of MONAI's selector)."""

    modalities: tuple[str, ...] = ("CT",)
    #: Every one of these values must be in ImageType (case-insensitive).
    image_type_required: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    #: None of these may be in ImageType (localizers, derived reformats).
    image_type_excluded: tuple[str, ...] = ("LOCALIZER", "DERIVED", "SECONDARY")
    slice_thickness_min_mm: float = Field(0.5, ge=0)
    slice_thickness_max_mm: float = Field(6.0, gt=0)
    min_slices: int = Field(16, ge=2)
    #: Searched (case-insensitive) in BodyPartExamined, then Series/Study description, ProtocolName.
    head_pattern: str = r"head|brain|skull|cran|cerebr|neuro|kopf|schaedel|sch\u00e4del|t\u00eate|cabeza"
    #: Of several matching series in one study, report on the one with the most slices.
    prefer_largest: bool = True

    @field_validator("head_pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value

    @field_validator("slice_thickness_max_mm")
    @classmethod
    def _range(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("slice_thickness_min_mm")
        if low is not None and value < low:
            raise ValueError(f"is below slice_thickness_min_mm ({low})")
        return value


class ModelsSettings(_Section):
    """The model registry: where bundles live and what a new one must score to replace the current."""

    #: Registry folder (bundles and ``registry.json``); empty means ``<storage.root>/models``.
    dir: Path | None = None
    #: A candidate's strict FORTE mean F1 on the held-out set must exceed the current model's by this.
    promotion_margin: float = Field(0.01, ge=0.0, le=1.0)


class LoggingSettings(_Section):
    """structlog output: JSON lines to stdout and to ``<storage.root>/logs``."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: ``console`` renders for a terminal; files are always JSON lines.
    format: Literal["json", "console"] = "json"
    to_file: bool = True


class Settings(BaseSettings):
    """All of NeuroScribe's settings. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
        frozen=True,
    )

    dicom: DicomSettings = DicomSettings()
    storage: StorageSettings = StorageSettings()
    series: SeriesSettings = SeriesSettings()
    selection: SelectionSettings = SelectionSettings()
    models: ModelsSettings = ModelsSettings()
    logging: LoggingSettings = LoggingSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Precedence: explicit arguments, then environment, then the TOML file, then defaults."""
        # The TOML source reads ``model_config["toml_file"]``, set by load_settings; None reads nothing.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings, failing with a :class:`ConfigError` that names key, value and reason.

    Parameters
    ----------
    config_file
        A TOML file with ``[dicom]``, ``[storage]``, ``[series]``, ``[selection]``, ``[logging]``.
    overrides
        Section dicts that win over everything (tests use them).
    """
    if config_file is not None:
        config_file = Path(config_file)
        if not config_file.is_file():
            raise ConfigError(f"config file {str(config_file)!r}: no such file")
        try:
            with config_file.open("rb") as fh:
                tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(config_file)!r}: not valid TOML: {exc}") from exc
    from_file = type(
        "Settings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": config_file}}
    )
    try:
        return from_file(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, config_file)) from None


def _describe(exc: ValidationError, config_file: Path | None) -> str:
    """One line per bad setting: ``dicom.port = 70000: Input should be less than or equal to...``."""
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(settings)"
        value = error.get("input")
        shown = "(missing)" if error["type"] == "missing" else repr(value)
        if isinstance(value, dict):
            shown = "(section)"
        reason = error["msg"].removeprefix("Value error, ")
        env = ENV_PREFIX + key.upper().replace(".", ENV_NESTED_DELIMITER)
        lines.append(f"{key} = {shown}: {reason} (file key {key!r} or environment {env})")
    origin = f" in {str(config_file)!r} or the environment" if config_file else ""
    return f"invalid configuration{origin}:\n  " + "\n  ".join(lines)
