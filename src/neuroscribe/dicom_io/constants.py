"""DICOM names in one place: SOP classes, transfer syntaxes and the C-STORE statuses we answer."""

from __future__ import annotations

from enum import IntEnum

from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)


class StoreStatus(IntEnum):
    """C-STORE response statuses (PS3.4 Table B.2-1 and PS3.7 Annex C)."""

    #: The instance is fsync'd in the spool and recorded in the state database.
    SUCCESS = 0x0000
    #: Refused: out of resources (free disk below the configured floor, or the store failed).
    OUT_OF_RESOURCES = 0xA700
    #: Error: the data set does not match the SOP class (missing UIDs, pixel data, lengths).
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: Error: cannot understand (the data set could not be parsed).
    CANNOT_UNDERSTAND = 0xC000


#: The SOP classes NeuroScribe reports on.
CT_SOP_CLASSES: frozenset[str] = frozenset({CTImageStorage, EnhancedCTImageStorage})
ENHANCED_CT_SOP_CLASSES: frozenset[str] = frozenset({EnhancedCTImageStorage})

#: Transfer syntaxes accepted and stored as received: uncompressed and the common compressed ones.
ACCEPTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)

#: Verification SOP class (C-ECHO).
VERIFICATION_SOP_CLASS = UID("1.2.840.10008.1.1")
