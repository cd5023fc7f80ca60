"""The model bundle: a directory the trainer writes and the service loads (no torch here).

Layout (DESIGN.md, "The model bundle is a directory")::

    BUNDLE/
      manifest.json      what the files are and how to use them (schema below); written last
      vision.onnx        images (B, S, C, H, W) float32 in [0, 1] -> visual_tokens (B, K, d_lm)
      decoder.onnx       inputs_embeds + 2D attention_mask + position_ids + past KV -> logits + present KV
      decoder_int8.onnx  optional: int8 dynamic quantization of decoder.onnx
      embed_tokens.npy   (vocab, d_lm) float32: token id -> embedding, looked up in numpy
      tokenizer.json     HF ``tokenizers`` file: decodes the generated ids to text

``manifest.json`` (format ``neuroscribe-bundle/1``) holds: ``name``, ``version``, ``model_uid`` (a
DICOM UID naming this exact model, for the SR's Device observer), ``created``, ``description``,
``synthetic_training_data`` (true when it learned only from phantoms), ``input`` (the ``ModelGrid``
the series are resampled to), ``graphs`` (the export description: visual token count, widths, KV
shapes, every graph input and output), ``tokenizer`` (special token ids), ``prompt`` (the CVIT
instruction style and its exact rendered text, sha256 and token ids, so inference uses the prompt
the model was trained for without rendering it again), ``generation`` (length limit, stop ids),
``training`` (data digest, split counts, run settings), ``scores`` (strict FORTE and captioning
metrics on the held-out split, with the digest of that split) and ``files`` (sha256 and size of
every other file). :func:`load_bundle` refuses a bundle whose files differ from their checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroscribe.durable import atomic_file
from neuroscribe.errors import NeuroScribeError

__all__ = [
    "BUNDLE_FORMAT",
    "MANIFEST_FILE",
    "Bundle",
    "BundleError",
    "file_checksums",
    "load_bundle",
    "write_manifest",
]

BUNDLE_FORMAT = "neuroscribe-bundle/1"
MANIFEST_FILE = "manifest.json"
#: Keys every manifest must have (``files`` is filled by :func:`write_manifest`).
REQUIRED_KEYS = ("format", "name", "version", "model_uid", "input", "graphs", "tokenizer", "prompt",
                 "generation", "files")
_CHUNK = 1 << 20


class BundleError(NeuroScribeError):
    """A bundle is missing, malformed or altered; the message names the bundle and what is wrong."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_checksums(directory: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"sha256", "bytes"}}`` of every regular file in ``directory`` but the manifest."""
    folder = Path(directory)
    return {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size}
            for p in sorted(folder.iterdir())
            if p.is_file() and p.name != MANIFEST_FILE and not p.name.startswith(".")}


def write_manifest(directory: str | os.PathLike[str], manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Add ``format`` and the checksums of the folder's files to ``manifest``; write it atomically.

    Call it last, once every other file of the bundle is in place. Returns the written manifest.
    """
    folder = Path(directory)
    full = {"format": BUNDLE_FORMAT, **manifest, "files": file_checksums(folder)}
    missing = [k for k in REQUIRED_KEYS if k not in full]
    if missing:
        raise BundleError(f"bundle manifest for {folder.name}: missing keys {missing}")
    with atomic_file(folder / MANIFEST_FILE, "w") as fh:
        json.dump(full, fh, indent=2, sort_keys=True)
        fh.write("\n")
    return full


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its folder and its parsed manifest."""

    path: Path
    manifest: Mapping[str, Any]

    @property
    def name(self) -> str:
        """The model's name (``manifest.name``)."""
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        """The model's version (``manifest.version``)."""
        return str(self.manifest["version"])

    @property
    def label(self) -> str:
        """``name version``, as shown to people."""
        return f"{self.name} {self.version}"

    def file(self, key: str) -> Path:
        """Path of a graph file named in ``manifest.graphs.files`` (``vision``, ``decoder``, ...)."""
        files = self.manifest["graphs"].get("files", {})
        if key not in files:
            raise BundleError(f"bundle {self.label}: no {key!r} file (has {sorted(files)})")
        return self.path / files[key]

    @property
    def heldout_f1(self) -> float | None:
        """Strict FORTE mean F1 on the held-out split recorded at training, if any."""
        value = (self.manifest.get("scores") or {}).get("forte_strict_mean_f1")
        return None if value is None else float(value)


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse ``directory/manifest.json`` without checking files (listing, registry)."""
    folder = Path(directory)
    path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(f"bundle {str(folder)!r}: no {MANIFEST_FILE}") from exc
    except (OSError, ValueError) as exc:
        raise BundleError(f"bundle {str(folder)!r}: {MANIFEST_FILE} is unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"bundle {str(folder)!r}: format {got!r} is not {BUNDLE_FORMAT!r}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"bundle {str(folder)!r}: manifest lacks {missing}")
    return manifest


def load_bundle(directory: str | os.PathLike[str], *, verify: bool = True) -> Bundle:
    """Read a bundle's manifest and (by default) check every file's size and sha256 against it.

    Raises
    ------
    BundleError
        No manifest, another format, a missing key, a listed file missing or changed, or an
        unlisted file present (a bundle is sealed once written).
    """
    folder = Path(directory)
    manifest = read_manifest(folder)
    if verify:
        listed = manifest["files"]
        actual = file_checksums(folder)
        for name, expected in sorted(listed.items()):
            got = actual.get(name)
            if got is None:
                raise BundleError(f"bundle {str(folder)!r}: file {name} is missing")
            if got != expected:
                raise BundleError(f"bundle {str(folder)!r}: file {name} does not match its checksum "
                                  f"(sha256 {got['sha256'][:12]}..., manifest {expected['sha256'][:12]}...)")
        extra = sorted(set(actual) - set(listed))
        if extra:
            raise BundleError(f"bundle {str(folder)!r}: files not in the manifest: {extra}")
    return Bundle(folder, manifest)
