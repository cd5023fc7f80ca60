"""The draft report as the model wrote it, and the model that wrote it: the input of SR and HL7.

The report model writes plain text in two sections, as the site's radiologists do::

    Findings:
    <one or more lines>
    Impression:
    <one or more lines>

:func:`split_report` cuts that text into its sections; text with no headings is all findings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

__all__ = ["DISCLAIMER", "DraftReport", "ModelIdentity", "split_report"]

#: First line of every HL7 result and the SR's disclaimer: what this text is and is not.
DISCLAIMER = ("AI-GENERATED DRAFT - NOT A DIAGNOSIS. Preliminary text written by software for review "
              "and editing by a radiologist; it has no validity until a radiologist verifies it.")

_HEADING = re.compile(r"^\s*(findings|impressions?)\s*:\s*", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class ModelIdentity:
    """The report model, as named in the SR (Device observer, TID 4019) and HL7 (OBX-17/18)."""

    name: str  # e.g. "neuroscribe-demo-cvit"
    version: str  # e.g. "2026.11.29"
    uid: str  # DICOM UID naming this exact model (manifest ``model_uid``)
    manufacturer: str = "NeuroScribe"

    def __post_init__(self) -> None:
        """Reject empty fields, naming them."""
        for name in ("name", "version", "uid", "manufacturer"):
            if not getattr(self, name).strip():
                raise ValueError(f"ModelIdentity.{name} must not be empty")


@dataclass(frozen=True)
class DraftReport:
    """One drafted report: its two sections, the model, and when it was made (UTC)."""

    findings: str
    impression: str
    model: ModelIdentity
    created: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        """A report needs some text and an aware timestamp."""
        if not (self.findings.strip() or self.impression.strip()):
            raise ValueError("DraftReport: findings and impression are both empty")
        if self.created.tzinfo is None:
            raise ValueError("DraftReport.created must be timezone-aware")

    @property
    def text(self) -> str:
        """The report as one text, with its headings."""
        return f"Findings:\n{self.findings}\nImpression:\n{self.impression}"

    @classmethod
    def from_text(cls, text: str, model: ModelIdentity, created: datetime | None = None) -> DraftReport:
        """Split model output into sections (see :func:`split_report`)."""
        findings, impression = split_report(text)
        return cls(findings, impression, model, created or datetime.now(UTC))


def split_report(text: str) -> tuple[str, str]:
    """``(findings, impression)`` of a report text; without headings the whole text is findings.

    Repeated headings append to their section; surrounding blank lines are dropped.
    """
    parts = _HEADING.split(text)
    if len(parts) == 1:
        return text.strip(), ""
    sections: dict[str, list[str]] = {"findings": [], "impression": []}
    lead = parts[0].strip()
    if lead:
        sections["findings"].append(lead)
    for heading, body in zip(parts[1::2], parts[2::2], strict=True):
        key = "findings" if heading.lower() == "findings" else "impression"
        if body.strip():
            sections[key].append(body.strip())
    return "\n".join(sections["findings"]), "\n".join(sections["impression"])
