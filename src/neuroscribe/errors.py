"""The small exception hierarchy: stages catch these at their boundaries, never bare Exception."""


class NeuroScribeError(Exception):
    """Base of every error NeuroScribe raises on purpose."""


class ConfigError(NeuroScribeError):
    """A setting is missing or invalid; the message names the key, the value and the rule."""


class StoreError(NeuroScribeError):
    """The state database cannot be opened, migrated or written."""


class DicomInputError(NeuroScribeError):
    """A received DICOM object cannot be accepted; the message is free of patient data."""


class VolumeError(NeuroScribeError):
    """A series cannot become a consistent volume (geometry, pixel data, orientation)."""
