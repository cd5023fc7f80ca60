"""NeuroScribe: drafts head-CT radiology reports from DICOM, as an AI draft for a radiologist.

The package is laid out by stage (see ../shared/DESIGN.md and the README): ``config``, ``store``,
``dicom_io``, ``inference``, ``reporting``, ``training`` and ``daemon``.
"""

__version__ = "0.1.0"
