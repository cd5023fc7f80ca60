"""Reporting: the DICOM SR and HL7 ORU documents and the durable outbox to PACS and RIS.

Filled in by the reporting issue.
"""
