"""Configuration: one typed settings model, a TOML file and ``NEUROSCRIBE_*`` overrides."""

from neuroscribe.config.settings import (
    CodeSetting,
    DicomSettings,
    Hl7Settings,
    LoggingSettings,
    ModelsSettings,
    OutboxSettings,
    PacsDestination,
    RisDestination,
    SelectionSettings,
    SeriesSettings,
    Settings,
    StorageSettings,
    load_settings,
)

__all__ = [
    "CodeSetting",
    "DicomSettings",
    "Hl7Settings",
    "LoggingSettings",
    "ModelsSettings",
    "OutboxSettings",
    "PacsDestination",
    "RisDestination",
    "SelectionSettings",
    "SeriesSettings",
    "Settings",
    "StorageSettings",
    "load_settings",
]
