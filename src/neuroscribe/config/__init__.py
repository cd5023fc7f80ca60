"""Configuration: one typed settings model, a TOML file and ``NEUROSCRIBE_*`` overrides."""

from neuroscribe.config.settings import (
    DicomSettings,
    LoggingSettings,
    ModelsSettings,
    SelectionSettings,
    SeriesSettings,
    Settings,
    StorageSettings,
    load_settings,
)

__all__ = [
    "DicomSettings",
    "LoggingSettings",
    "ModelsSettings",
    "SelectionSettings",
    "SeriesSettings",
    "Settings",
    "StorageSettings",
    "load_settings",
]
