"""DICOM in and out: the Storage SCP, the spool, series assembly and selection, volume building.

Knows nothing about models or HL7.
"""
