"""FORTE (Feature-Oriented Radiology Task Evaluation): keyword precision/recall/F1 in four categories.

FORTE is the clinical score of BrainGPT (Li et al., Nature Communications 16:2258, 2025); its code is
github.com/charlierabea/FORTE (MIT). Three modes (docs/forte.md describes every rule):

* ``compat-head`` and ``compat-paper`` reproduce the original per-row keyword sets and precision/recall
  exactly, as the code at d707480 (HEAD) and at 4546e72 (as published) computes them, including
  its negation filter (a row is removed when "no" is a degree keyword on either side);
* ``strict`` keeps the four categories and the synonym groups but matches whole words with plurals,
  inflections and British spellings, lets the longest term win, drops negated findings by scope,
  and uses a corrected copy of the keyword list (``data/forte_brain_strict.json``).

The original stops at per-row precision and recall; the dataset aggregation is ours and is named in
every result (:data:`AGGREGATIONS`). The unit is a whole report pair (``report``) or, as in the
original pipeline, a reference sentence paired with its most similar candidate sentence
(``sentence``, see :mod:`neuroscribe.training.metrics.sentences`).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cache, cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from neuroscribe.errors import NeuroScribeError
from neuroscribe.training.metrics.sentences import (
    SentenceEncoder,
    get_encoder,
    pair_sentences,
    split_compat,
    split_strict,
)

#: The four FORTE categories, in output order.
CATEGORIES = ("degree", "landmark", "feature", "impression")

#: Keyword files shipped in ``neuroscribe/training/metrics/data`` (MIT, see LICENSE-FORTE.txt).
KEYWORD_FILES = {
    "compat-head": "FORTE_brain.json",
    "compat-paper": "FORTE_brain_paper_era.json",
    "strict": "forte_brain_strict.json",
}

#: Aggregation names and what they mean; the one used is named in every result.
AGGREGATIONS = {
    "pooled_rows_mean_pr_then_f1": (
        "per category, rows of all pairs pooled; precision = mean of the per-row precisions that are "
        "defined, recall = mean of the per-row recalls that are defined, F1 = 2PR/(P+R) (0 when P+R = 0, "
        "null when P or R is undefined); rows removed by the negation filter are left out; mean_f1 = "
        "mean of the category F1s that are defined"
    ),
    "micro_pooled_tp_fp_fn": (
        "per category, keyword-group counts TP, FP, FN summed over all rows of all pairs; precision = "
        "TP/(TP+FP), recall = TP/(TP+FN), F1 = 2TP/(2TP+FP+FN), each null when its denominator is 0; "
        "mean_f1 = mean of the category F1s that are defined"
    ),
}

#: Regex of the original Negation_removal.py, applied to each degree keyword of a row.
_COMPAT_NEGATION = re.compile(r"(^|\s|\>|\-)(no)(\s|$|[.,;!?])")


class ForteError(NeuroScribeError, ValueError):
    """FORTE cannot be computed: bad pairs file, unknown mode/unit/encoder, no pairs."""


class PairsFileError(ForteError):
    """A pairs JSONL file is unreadable or a line is invalid; the message names the line."""


class Mode(StrEnum):
    """How keywords are found and scored.

    ``COMPAT_HEAD``: the original code and keywords at d707480 (text padded with spaces, degree key
    ``" no "``). ``COMPAT_PAPER``: the original at 4546e72, as published (no padding, key ``" no"``).
    ``STRICT``: whole-word matching with the corrected list and scoped negation (docs/forte.md).
    """

    COMPAT_HEAD = "compat-head"
    COMPAT_PAPER = "compat-paper"
    STRICT = "strict"


class Unit(StrEnum):
    """What one FORTE row is.

    ``REPORT``: one row per report pair. ``SENTENCE``: one row per reference sentence, paired with
    its most similar candidate sentence (the original pipeline).
    """

    REPORT = "report"
    SENTENCE = "sentence"


@dataclass(frozen=True)
class Pair:
    """A reference report and the candidate (generated) report for the same study."""

    id: str
    reference: str
    candidate: str

    def __post_init__(self) -> None:
        for name in ("id", "reference", "candidate"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ForteError(f"Pair {name} must be a string, got {type(value).__name__} {value!r:.40}")
        if not self.id.strip():
            raise ForteError("Pair id must not be empty")

    @property
    def pair_id(self) -> str:
        """The pair's identifier (same as :attr:`id`; the name the captioning metrics read)."""
        return self.id


def load_pairs(path: str | Path) -> list[Pair]:
    """Read pairs from JSONL, one ``{"id", "reference", "candidate"}`` object per line.

    Other keys are ignored and blank lines skipped. ``id`` must be a non-empty string unique in the
    file; the texts must be strings (may be empty). Raises :class:`PairsFileError` naming the file
    and line of the first problem.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PairsFileError(f"{path}: cannot read pairs file: {exc}") from exc
    pairs: list[Pair] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PairsFileError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(record, dict):
            raise PairsFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for key in ("id", "reference", "candidate"):
            if key not in record:
                raise PairsFileError(f"{where}: missing key {key!r}")
            if not isinstance(record[key], str):
                raise PairsFileError(
                    f"{where}: {key!r} must be a string, got {json.dumps(record[key])[:40]}"
                )
        if not record["id"].strip():
            raise PairsFileError(f"{where}: 'id' must not be empty")
        if record["id"] in seen:
            raise PairsFileError(f"{where}: id {record['id']!r} already used on line {seen[record['id']]}")
        seen[record["id"]] = number
        pairs.append(Pair(record["id"], record["reference"], record["candidate"]))
    if not pairs:
        raise PairsFileError(f"{path}: no pairs in file")
    return pairs


# -- keyword lists --------------------------------------------------------------------------------


def _read_data(name: str) -> Any:
    """A JSON file from the package's data folder."""
    source = resources.files("neuroscribe.training.metrics").joinpath("data", name)
    return json.loads(source.read_text(encoding="utf-8"))


@cache
def compat_keywords(mode: Mode) -> Mapping[str, Mapping[str, tuple[str, ...]]]:
    """The original keyword dict of a compat mode, ``{category: {key: synonyms}}``, file order kept."""
    if mode is Mode.STRICT:
        raise ForteError("compat_keywords() is for the compat modes; strict uses strict_lexicon()")
    raw = _read_data(KEYWORD_FILES[mode.value])
    return {category: {key: tuple(synonyms) for key, synonyms in table.items()}
            for category, table in raw.items()}


# -- per-row results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CategoryScore:
    """Keywords and scores of one category in one row.

    ``precision``/``recall``/``f1`` are ``None`` where undefined. ``tp``/``fp``/``fn`` count keyword
    groups (synonyms collapsed). ``*_negated`` are strict mode's negated mentions (not scored).
    ``matched``/``missed``/``extra`` are the group-level outcome behind the counts, as sorted keywords
    of ``reference_keywords`` (matched: its group is also on the candidate side; missed: it is not)
    and of ``candidate_keywords`` (extra: its group is not on the reference side); they are filled by
    the row scorers (:func:`score_row`) and left empty when a score is built by hand.
    """

    reference_keywords: tuple[str, ...]
    candidate_keywords: tuple[str, ...]
    precision: float | None
    recall: float | None
    f1: float | None
    tp: int = 0
    fp: int = 0
    fn: int = 0
    reference_negated: tuple[str, ...] = ()
    candidate_negated: tuple[str, ...] = ()
    matched: tuple[str, ...] = ()
    missed: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()

    @property
    def defined(self) -> bool:
        """Whether either side has a keyword (rows with none are left out of this category)."""
        return bool(self.reference_keywords or self.candidate_keywords)

    def to_json(self, strict: bool) -> dict[str, Any]:
        """JSON form: sorted keyword lists and floats or null."""
        data: dict[str, Any] = {
            "reference_keywords": list(self.reference_keywords),
            "candidate_keywords": list(self.candidate_keywords),
            "precision": _float(self.precision),
            "recall": _float(self.recall),
            "f1": _float(self.f1),
            "matched": list(self.matched),
            "missed": list(self.missed),
            "extra": list(self.extra),
        }
        if strict:
            data |= {"tp": self.tp, "fp": self.fp, "fn": self.fn,
                     "reference_negated": list(self.reference_negated),
                     "candidate_negated": list(self.candidate_negated)}
        return data


@dataclass(frozen=True)
class ForteRow:
    """One FORTE row: a report pair, or a reference sentence with its chosen candidate sentence."""

    pair_id: str
    reference: str
    candidate: str
    categories: Mapping[str, CategoryScore]
    similarity: float | None = None
    #: compat modes: the original negation filter removes this row ("no" in a degree keyword set).
    negation_removed: bool = False


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _row_f1(precision: float | None, recall: float | None) -> float | None:
    """2PR/(P+R) when both are defined (0 when both are 0), else None."""
    if precision is None or recall is None:
        return None
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


# -- compat modes ---------------------------------------------------------------------------------


def _compat_extract(text: str, table: Mapping[str, Sequence[str]], mode: Mode) -> frozenset[str]:
    """The original ``extract_keywords_from_text``: raw substring test of every key, stripped."""
    lowered = str(text).lower()
    if mode is Mode.COMPAT_HEAD:
        lowered = f" {lowered} "
    return frozenset(key.strip() for key in table if key in lowered)


def _compat_representative(key: str, table: Mapping[str, Sequence[str]]) -> str:
    """First dict key whose synonym list contains ``key``, else ``key`` itself."""
    return next((main for main, synonyms in table.items() if key in synonyms), key)


def _compat_synonyms(key: str, table: Mapping[str, Sequence[str]]) -> frozenset[str]:
    """Synonym list of the first dict key whose list contains ``key``, else ``{key}``."""
    return next((frozenset(synonyms) for synonyms in table.values() if key in synonyms), frozenset({key}))


def _compat_score(reference: frozenset[str], candidate: frozenset[str],
                  table: Mapping[str, Sequence[str]]) -> CategoryScore:
    """The original ``calculate_precision_recall`` on one category, plus F1, counts and outcomes.

    A reference representative is a true positive when it is in the synonym list of a candidate
    representative (the original's test); the same test, read from the candidate side, tells which
    candidate keywords are extra.
    """
    reference_sorted, candidate_sorted = tuple(sorted(reference)), tuple(sorted(candidate))
    gt_of = {keyword: _compat_representative(" " + keyword, table) for keyword in reference_sorted}
    out_of = {keyword: _compat_representative(" " + keyword, table) for keyword in candidate_sorted}
    gt, out = set(gt_of.values()), set(out_of.values())
    found = {key for key in gt if any(key in _compat_synonyms(other, table) for other in out)}
    answered = {other for other in out if any(key in _compat_synonyms(other, table) for key in gt)}
    matched = tuple(keyword for keyword in reference_sorted if gt_of[keyword] in found)
    missed = tuple(keyword for keyword in reference_sorted if gt_of[keyword] not in found)
    extra = tuple(keyword for keyword in candidate_sorted if out_of[keyword] not in answered)
    if not reference and not candidate:
        return CategoryScore(reference_sorted, candidate_sorted, None, None, None)
    if not reference:
        return CategoryScore(reference_sorted, candidate_sorted, 0.0, None, None, fp=len(out), extra=extra)
    if not candidate:
        return CategoryScore(reference_sorted, candidate_sorted, None, 0.0, None, fn=len(gt), missed=missed)
    tp = len(found)
    fp = len(out) - tp
    fn = len(gt) - tp
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / len(gt)
    return CategoryScore(reference_sorted, candidate_sorted, precision, recall, _row_f1(precision, recall),
                         tp=tp, fp=fp, fn=fn, matched=matched, missed=missed, extra=extra)


def _compat_row(pair_id: str, reference: str, candidate: str, mode: Mode,
                similarity: float | None) -> ForteRow:
    tables = compat_keywords(mode)
    categories = {
        category: _compat_score(_compat_extract(reference, tables[category], mode),
                                _compat_extract(candidate, tables[category], mode), tables[category])
        for category in CATEGORIES
    }
    degree = categories["degree"]
    removed = any(_COMPAT_NEGATION.search(keyword.lower())
                  for keyword in (*degree.reference_keywords, *degree.candidate_keywords))
    return ForteRow(pair_id, reference, candidate, categories, similarity, removed)


# -- strict mode: lexicon -------------------------------------------------------------------------

#: British → American spellings, applied to each word before matching (text and keyword list alike).
_BRITISH = (
    (re.compile(r"^haem"), "hem"),            # haemorrhage, haematoma, haemorrhagic
    (re.compile(r"aem"), "em"),               # ischaemic, anaemia
    (re.compile(r"^oedem"), "edem"),          # oedema
    (re.compile(r"^leuco"), "leuko"),         # leucoencephalopathy
    (re.compile(r"^grey$"), "gray"),
    (re.compile(r"(?<=[a-z]{3})is(ed|ing|ation)$"), r"iz\1"),  # localised, generalised
)


def _singular(word: str, irregular: Mapping[str, str]) -> str:
    """Regular English plural → singular; both text and keyword list go through it.

    >>> [_singular(w, {}) for w in ("arteries", "patches", "sinuses", "infarcts", "sulcus", "thalami")]
    ['artery', 'patch', 'sinus', 'infarct', 'sulcus', 'thalami']
    """
    if word in irregular:
        return irregular[word]
    if len(word) <= 3:
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses", "zes", "uses")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


@dataclass(frozen=True)
class _Term:
    """A keyword of the strict list as a sequence of normalised words."""

    words: tuple[str, ...]
    term: str
    group: str  # the group's representative (first term)


@dataclass(frozen=True)
class TextKeywords:
    """Keywords found in one text by strict matching: positive mentions and negated-only ones."""

    positive: Mapping[str, frozenset[str]]
    negated: Mapping[str, frozenset[str]]
    #: category → representative of each term in ``positive``/``negated``.
    groups: Mapping[str, Mapping[str, str]]


#: Sentence/clause ends for negation scope (punctuation tokens; "." between digits is not one).
_CLAUSE_PUNCTUATION = frozenset(".;:!?>\n")
#: Words that end a negation scope ("no hemorrhage but mild atrophy").
_TERMINATOR_WORDS = frozenset({"but", "however", "although", "though", "except", "whereas"})
#: Phrases that look like negations but are not (they suppress the cue words inside them).
_PSEUDO_NEGATIONS = tuple(sorted((
    ("no", "change"), ("no", "interval", "change"), ("no", "significant", "change"),
    ("no", "significant", "interval", "change"), ("no", "increase"), ("not", "only"),
    ("without", "change"), ("not", "excluded"), ("not", "be", "excluded"), ("not", "ruled", "out"),
    ("not", "be", "ruled", "out"), ("cannot", "be", "excluded"), ("cannot", "be", "ruled", "out"),
), key=len, reverse=True))
#: Cues that negate what follows them, up to the end of the clause.
_FORWARD_CUES = tuple(sorted((
    ("no",), ("not",), ("cannot",), ("without",), ("nor",), ("neither",), ("negative", "for"),
    ("free", "of"), ("absence", "of"), ("no", "evidence", "of"), ("no", "sign", "of"),
), key=len, reverse=True))
#: "not"/"cannot" followed by one of these (optionally "be"/"been") negates the clause *before* it.
_BACKWARD_PARTICIPLES = frozenset({
    "seen", "identified", "detected", "visualized", "visualised", "evident", "demonstrated", "found",
    "present", "noted", "observed", "appreciated", "shown",
})
#: Single words that negate the clause before them ("... is excluded", "flow voids are absent").
_BACKWARD_WORDS = frozenset({"excluded", "absent"})
#: Words that negate both directions within the clause.
_BOTH_WORDS = frozenset({"absent"})


class StrictLexicon:
    """The strict keyword list compiled for whole-word, longest-match, negation-aware matching.

    Parameters
    ----------
    data
        The parsed ``forte_brain_strict.json``: ``categories`` (lists of synonym groups),
        ``variants`` (word → lemma), ``combining_forms`` (``fronto`` → ``frontal``) and
        ``irregular_plurals``.
    """

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.variants: Mapping[str, str] = dict(data["variants"])
        self.combining_forms: Mapping[str, str] = dict(data["combining_forms"])
        self.irregular_plurals: Mapping[str, str] = dict(data["irregular_plurals"])
        self.groups: dict[str, list[tuple[str, ...]]] = {}
        self._index: dict[str, dict[str, list[_Term]]] = {}
        for category in CATEGORIES:
            groups = [tuple(group) for group in data["categories"][category]]
            self.groups[category] = groups
            seen: dict[tuple[str, ...], _Term] = {}
            index: dict[str, list[_Term]] = defaultdict(list)
            for group in groups:
                for term in group:
                    words = tuple(self.normalise(term))
                    if not words:
                        raise ForteError(f"strict keyword {term!r} ({category}) has no words")
                    if words in seen and seen[words].group != group[0]:
                        raise ForteError(
                            f"strict keywords {term!r} and {seen[words].term!r} ({category}) match the same "
                            f"words {' '.join(words)!r} but belong to different groups"
                        )
                    # the term spelt as its normalised words is the one reported ("hypodensity", not
                    # "hypodensities", when both are in the group)
                    if words not in seen or term == " ".join(words):
                        seen[words] = _Term(words, term, group[0])
            for term_words, compiled in seen.items():
                index[term_words[0]].append(compiled)
            for terms in index.values():
                terms.sort(key=lambda term: len(term.words), reverse=True)
            self._index[category] = dict(index)

    # words -----------------------------------------------------------------------------------

    def normalise_word(self, word: str) -> list[str]:
        """One lower-case word → its normalised word(s): spelling, combining forms, plural, variant.

        >>> lexicon = strict_lexicon()
        >>> lexicon.normalise_word("haemorrhagic"), lexicon.normalise_word("frontoparietal")
        (['hemorrhage'], ['frontal', 'parietal'])
        """
        for pattern, replacement in _BRITISH:
            word = pattern.sub(replacement, word)
        parts: list[str] = []
        while True:
            prefix = next((form for form in self.combining_forms
                           if word.startswith(form) and len(word) - len(form) >= 4), None)
            if prefix is None:
                break
            parts.append(prefix)
            word = word[len(prefix):]
        parts.append(word)
        return [self._lemma(part) for part in parts]

    def _lemma(self, word: str) -> str:
        word = _singular(word, self.irregular_plurals)
        return self.combining_forms.get(word) or self.variants.get(word, word)

    def normalise(self, text: str) -> list[str]:
        """All normalised words of a text (for keyword terms: their match sequence)."""
        return [norm for word in _WORD.findall(text.lower()) for norm in self.normalise_word(word)]

    # matching --------------------------------------------------------------------------------

    def analyse(self, text: str) -> TextKeywords:
        """Positive and negated keywords of every category in a text."""
        lowered = str(text).lower()
        tokens = [(match.group(), match.start(), match.end()) for match in _TOKEN.finditer(lowered)]
        words = [index for index, (token, _, _) in enumerate(tokens) if _is_word(token)]
        units: list[tuple[str, int]] = [  # (normalised word, token index)
            (norm, index) for index in words for norm in self.normalise_word(tokens[index][0])
        ]
        joined = [self._joined(tokens, units[k][1], units[k + 1][1]) for k in range(len(units) - 1)]
        negated_tokens = _negated_tokens(lowered, tokens)
        consumed_elsewhere: set[int] = set()
        matches: dict[str, list[tuple[_Term, int, int]]] = {}
        for category in ("landmark", "feature", "impression", "degree"):
            masked = consumed_elsewhere if category == "degree" else set()
            found = self._match(category, units, joined, masked)
            matches[category] = found
            if category != "degree":
                consumed_elsewhere.update(k for term, start, end in found if end > start
                                          for k in range(start, end + 1))
        positive: dict[str, frozenset[str]] = {}
        negated: dict[str, frozenset[str]] = {}
        groups: dict[str, dict[str, str]] = {}
        for category in CATEGORIES:
            plus = {term for term, start, _ in matches[category] if units[start][1] not in negated_tokens}
            minus = {term for term, start, _ in matches[category] if units[start][1] in negated_tokens}
            plus_groups = {term.group for term in plus}
            minus = {term for term in minus if term.group not in plus_groups}
            positive[category] = frozenset(term.term for term in plus)
            negated[category] = frozenset(term.term for term in minus)
            groups[category] = {term.term: term.group for term in plus | minus}
        return TextKeywords(positive, negated, groups)

    @staticmethod
    def _joined(tokens: Sequence[tuple[str, int, int]], first: int, second: int) -> bool:
        """Whether two word tokens may be parts of one term: adjacent, or only hyphens between."""
        return all(tokens[index][0] == "-" for index in range(first + 1, second))

    def _match(self, category: str, units: Sequence[tuple[str, int]], joined: Sequence[bool],
               masked: set[int]) -> list[tuple[_Term, int, int]]:
        """Leftmost-longest matching; a matched word cannot be part of another match."""
        found: list[tuple[_Term, int, int]] = []
        index = self._index[category]
        position = 0
        while position < len(units):
            best = None
            if position not in masked:
                for term in index.get(units[position][0], ()):
                    end = position + len(term.words) - 1
                    if end < len(units) and all(
                        units[position + offset][0] == word and (position + offset) not in masked
                        and (offset == 0 or joined[position + offset - 1])
                        for offset, word in enumerate(term.words)
                    ):
                        best = (term, position, end)
                        break
            if best is None:
                position += 1
            else:
                found.append(best)
                position = best[2] + 1
        return found


_WORD = re.compile(r"[^\W_]+")
_TOKEN = re.compile(r"[^\W_]+|\n|[^\w\s]|_")


def _is_word(token: str) -> bool:
    return bool(_WORD.fullmatch(token))


def _cue_at(words: Sequence[str], position: int,
            cues: Sequence[tuple[str, ...]]) -> tuple[str, ...] | None:
    """The longest cue of ``cues`` (sorted longest first) starting at ``words[position]``."""
    return next((cue for cue in cues if tuple(words[position:position + len(cue)]) == cue), None)


def _negated_tokens(text: str, tokens: Sequence[tuple[str, int, int]]) -> set[int]:
    """Indices of word tokens inside a negation scope (cue to clause end, or clause start to cue)."""
    clauses: list[list[int]] = [[]]
    for index, (token, start, end) in enumerate(tokens):
        decimal_point = (token == "." and start > 0 and end < len(text)  # noqa: S105 - a full stop
                         and text[start - 1].isdigit() and text[end].isdigit())
        if (token in _CLAUSE_PUNCTUATION and not decimal_point) or token in _TERMINATOR_WORDS:
            clauses.append([])
        elif _is_word(token):
            clauses[-1].append(index)
    negated: set[int] = set()
    for clause in clauses:
        words = [tokens[index][0] for index in clause]
        position = 0
        while position < len(words):
            pseudo = _cue_at(words, position, _PSEUDO_NEGATIONS)
            if pseudo is not None:
                position += len(pseudo)
                continue
            word = words[position]
            backward = word in _BACKWARD_WORDS
            length = 1
            if word in ("not", "cannot"):
                after = words[position + 1:position + 3]
                if after and after[0] in ("be", "been"):
                    after = after[1:]
                    length += 1
                if after and after[0] in _BACKWARD_PARTICIPLES:
                    backward, length = True, length + 1
                else:
                    length = 1
            if backward:
                negated.update(clause[:position])
                if word in _BOTH_WORDS:
                    negated.update(clause[position + 1:])
                position += length
                continue
            forward = _cue_at(words, position, _FORWARD_CUES)
            if forward is not None:
                negated.update(clause[position + len(forward):])
                position += len(forward)
                continue
            position += 1
    return negated


@cache
def strict_lexicon() -> StrictLexicon:
    """The shipped strict keyword list (``data/forte_brain_strict.json``), compiled once."""
    return StrictLexicon(_read_data(KEYWORD_FILES["strict"]))


def extract_keywords(text: str, mode: Mode | str = Mode.STRICT) -> dict[str, tuple[str, ...]]:
    """Sorted keywords per category of one text as the mode finds them (strict: positive only)."""
    mode = _mode(mode)
    if mode is Mode.STRICT:
        found = strict_lexicon().analyse(text)
        return {category: tuple(sorted(found.positive[category])) for category in CATEGORIES}
    tables = compat_keywords(mode)
    return {category: tuple(sorted(_compat_extract(text, tables[category], mode))) for category in CATEGORIES}


def _strict_score(reference: TextKeywords, candidate: TextKeywords, category: str) -> CategoryScore:
    reference_sorted = tuple(sorted(reference.positive[category]))
    candidate_sorted = tuple(sorted(candidate.positive[category]))
    gt_of, out_of = reference.groups[category], candidate.groups[category]
    gt = {gt_of[term] for term in reference_sorted}
    out = {out_of[term] for term in candidate_sorted}
    tp, fp, fn = len(gt & out), len(out - gt), len(gt - out)
    precision = tp / len(out) if out else None
    recall = tp / len(gt) if gt else None
    f1 = 2 * tp / (2 * tp + fp + fn) if gt or out else None
    return CategoryScore(
        reference_sorted, candidate_sorted, precision, recall, f1, tp, fp, fn,
        tuple(sorted(reference.negated[category])), tuple(sorted(candidate.negated[category])),
        matched=tuple(term for term in reference_sorted if gt_of[term] in out),
        missed=tuple(term for term in reference_sorted if gt_of[term] not in out),
        extra=tuple(term for term in candidate_sorted if out_of[term] not in gt),
    )


def _strict_row(pair_id: str, reference: str, candidate: str, similarity: float | None) -> ForteRow:
    lexicon = strict_lexicon()
    gt, out = lexicon.analyse(reference), lexicon.analyse(candidate)
    return ForteRow(pair_id, reference, candidate,
                    {category: _strict_score(gt, out, category) for category in CATEGORIES}, similarity)


def score_row(reference: str, candidate: str, mode: Mode | str = Mode.STRICT, *, pair_id: str = "",
              similarity: float | None = None) -> ForteRow:
    """Score one row (a report pair or a sentence pair) in every category.

    compat modes: the original's keyword sets and precision/recall, F1 = 2PR/(P+R) where both are
    defined, and the negation-filter flag. strict: positive keyword groups, P = TP/|O|,
    R = TP/|G|, F1 = 2TP/(2TP+FP+FN); a category with no keyword on either side is undefined.
    """
    mode = _mode(mode)
    if mode is Mode.STRICT:
        return _strict_row(pair_id, reference, candidate, similarity)
    return _compat_row(pair_id, reference, candidate, mode, similarity)


# -- aggregation ----------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _aggregate_pooled(rows: Sequence[ForteRow]) -> dict[str, dict[str, Any]]:
    """``pooled_rows_mean_pr_then_f1`` per category."""
    result: dict[str, dict[str, Any]] = {}
    for category in CATEGORIES:
        scores = [row.categories[category] for row in rows]
        precisions = [score.precision for score in scores if score.precision is not None]
        recalls = [score.recall for score in scores if score.recall is not None]
        precision, recall = _mean(precisions), _mean(recalls)
        result[category] = {
            "precision": precision, "recall": recall, "f1": _row_f1(precision, recall),
            "n_rows": sum(score.defined for score in scores),
            "n_precision_defined": len(precisions), "n_recall_defined": len(recalls),
        }
    return result


def _micro(tp: int, fp: int, fn: int) -> dict[str, Any]:
    return {
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
    }


def _aggregate_micro(rows: Sequence[ForteRow]) -> dict[str, dict[str, Any]]:
    """``micro_pooled_tp_fp_fn`` per category."""
    result: dict[str, dict[str, Any]] = {}
    for category in CATEGORIES:
        scores = [row.categories[category] for row in rows]
        tp, fp, fn = (sum(getattr(score, name) for score in scores) for name in ("tp", "fp", "fn"))
        result[category] = _micro(tp, fp, fn) | {
            "n_rows": sum(score.defined for score in scores), "tp": tp, "fp": fp, "fn": fn,
        }
    return result


def _mean_f1(categories: Mapping[str, Mapping[str, Any]]) -> tuple[float | None, list[str]]:
    used = [category for category in CATEGORIES if categories[category]["f1"] is not None]
    return _mean([categories[category]["f1"] for category in used]), used


def _macro_over_pairs(rows: Sequence[ForteRow]) -> dict[str, Any]:
    """Strict secondary figure: per pair micro F1, then the mean over pairs where it is defined."""
    by_pair: dict[str, list[ForteRow]] = defaultdict(list)
    for row in rows:
        by_pair[row.pair_id].append(row)
    categories: dict[str, dict[str, Any]] = {}
    for category in CATEGORIES:
        values = [value for pair_rows in by_pair.values()
                  if (value := _aggregate_micro(pair_rows)[category]["f1"]) is not None]
        categories[category] = {"f1": _mean(values), "n_pairs": len(values)}
    mean_f1, _ = _mean_f1(categories)
    return {"description": "per pair, micro F1 per category over that pair's rows; then the mean over the "
                           "pairs where it is defined (every report weighs the same)",
            "categories": categories, "mean_f1": mean_f1}


@dataclass(frozen=True)
class UnpairedSentence:
    """A candidate sentence that no reference sentence chose (sentence unit only)."""

    pair_id: str
    candidate: str
    keywords: Mapping[str, tuple[str, ...]]
    groups: Mapping[str, int]  # category → number of keyword groups (false positives)
    negation_removed: bool = False


@dataclass(frozen=True)
class ForteResult:
    """Rows and dataset aggregates of one FORTE evaluation; :meth:`to_json` is the stable output."""

    mode: Mode
    unit: Unit
    encoder: str | None
    n_pairs: int
    rows: tuple[ForteRow, ...]
    unpaired: tuple[UnpairedSentence, ...] = ()

    @property
    def aggregation(self) -> str:
        """Name of the aggregation (a key of :data:`AGGREGATIONS`)."""
        return "micro_pooled_tp_fp_fn" if self.mode is Mode.STRICT else "pooled_rows_mean_pr_then_f1"

    @property
    def scored_rows(self) -> tuple[ForteRow, ...]:
        """Rows that enter the aggregates (compat: those the negation filter keeps)."""
        return tuple(row for row in self.rows if not row.negation_removed)

    def _aggregate(self, rows: Sequence[ForteRow]) -> dict[str, dict[str, Any]]:
        if self.mode is Mode.STRICT:
            return _aggregate_micro(rows)
        return _aggregate_pooled(rows)

    @cached_property
    def categories(self) -> dict[str, dict[str, Any]]:
        """Per category aggregate: precision, recall, f1, n_rows and the aggregation's counts."""
        return self._aggregate(self.scored_rows)

    @property
    def mean_f1(self) -> float | None:
        """Mean of the category F1s that are defined."""
        return _mean_f1(self.categories)[0]

    def _unpaired_json(self, rows: bool) -> dict[str, Any]:
        kept = [sentence for sentence in self.unpaired if not sentence.negation_removed]
        categories: dict[str, Any] = {}
        for category in CATEGORIES:
            keywords = Counter(keyword for sentence in kept for keyword in sentence.keywords[category])
            false_positives = sum(sentence.groups[category] for sentence in kept)
            if self.mode is Mode.STRICT:
                main = self.categories[category]
                recomputed = _micro(main["tp"], main["fp"] + false_positives, main["fn"])
                precision, f1 = recomputed["precision"], recomputed["f1"]
            else:
                extra = [0.0 for sentence in kept if sentence.keywords[category]]
                precisions = [score.precision for row in self.scored_rows
                              if (score := row.categories[category]).precision is not None]
                precision = _mean(precisions + extra)
                f1 = _row_f1(precision, self.categories[category]["recall"])
            categories[category] = {
                "false_positives": false_positives,
                "keywords": dict(sorted(keywords.items())),
                "precision_with_unpaired": _float(precision),
                "f1_with_unpaired": _float(f1),
            }
        data: dict[str, Any] = {
            "description": ("candidate sentences that no reference sentence chose (the original drops them); "
                            "their keyword groups count as false positives in *_with_unpaired only"),
            "count": len(self.unpaired),
            "categories": categories,
        }
        if self.mode is not Mode.STRICT:
            data["n_removed_by_negation"] = len(self.unpaired) - len(kept)
        if rows:
            data["sentences"] = [
                {"pair_id": sentence.pair_id, "candidate": sentence.candidate,
                 "keywords": {category: list(sentence.keywords[category]) for category in CATEGORIES}}
                | ({"negation_removed": sentence.negation_removed} if self.mode is not Mode.STRICT else {})
                for sentence in self.unpaired
            ]
        return data

    def to_json(self, rows: bool = False) -> dict[str, Any]:
        """The result as JSON-ready data; per-row details only with ``rows=True``."""
        strict = self.mode is Mode.STRICT
        mean_f1, used = _mean_f1(self.categories)
        data: dict[str, Any] = {"mode": self.mode.value, "unit": self.unit.value}
        if self.unit is Unit.SENTENCE:
            data["encoder"] = self.encoder
            data["sentence_splitter"] = "strict" if strict else "compat (split on every '.')"
            data["pairing"] = ("each reference sentence with its most similar candidate sentence "
                               "(many-to-one, ties to the last index)")
        data |= {
            "aggregation": self.aggregation,
            "aggregation_description": AGGREGATIONS[self.aggregation],
            "categories": {category: {key: _float(value) if key in ("precision", "recall", "f1") else value
                                      for key, value in values.items()}
                           for category, values in self.categories.items()},
            "mean_f1": _float(mean_f1),
            "mean_f1_categories": used,
            "n_pairs": self.n_pairs,
            "n_rows": len(self.scored_rows),
        }
        if strict:
            data["negation"] = "negated mentions are dropped from the keyword sets (rules: docs/forte.md)"
            data["macro_over_pairs"] = _macro_over_pairs(self.rows)
        else:
            before = _aggregate_pooled(self.rows)
            before_mean, before_used = _mean_f1(before)
            data["negation"] = ("original negation filter: rows whose degree keywords include 'no' on either "
                                "side are removed before aggregation")
            data["n_rows_before_negation_removal"] = len(self.rows)
            data["n_rows_removed_by_negation"] = len(self.rows) - len(self.scored_rows)
            data["before_negation_removal"] = {"categories": before, "mean_f1": before_mean,
                                               "mean_f1_categories": before_used}
        if rows:
            data["rows"] = [self._row_json(row) for row in self.rows]
        if self.unit is Unit.SENTENCE:
            data["unpaired_candidates"] = self._unpaired_json(rows)
        return data

    def _row_json(self, row: ForteRow) -> dict[str, Any]:
        strict = self.mode is Mode.STRICT
        data: dict[str, Any] = {"pair_id": row.pair_id, "reference": row.reference,
                                "candidate": row.candidate}
        if self.unit is Unit.SENTENCE:
            data["similarity"] = _float(row.similarity)
        if not strict:
            data["negation_removed"] = row.negation_removed
        data["categories"] = {category: row.categories[category].to_json(strict) for category in CATEGORIES}
        return data


def aggregate_rows(rows: Iterable[ForteRow], mode: Mode | str = Mode.STRICT, unit: Unit | str = Unit.REPORT,
                   *, encoder: str | None = None, n_pairs: int | None = None,
                   unpaired: Iterable[UnpairedSentence] = ()) -> ForteResult:
    """A :class:`ForteResult` over rows scored elsewhere (e.g. sentence pairs made by another tool)."""
    rows = tuple(rows)
    count = n_pairs if n_pairs is not None else len({row.pair_id for row in rows})
    return ForteResult(_mode(mode), _unit(unit), encoder, count, rows, tuple(unpaired))


# -- evaluation -----------------------------------------------------------------------------------


def _mode(mode: Mode | str) -> Mode:
    try:
        return Mode(mode)
    except ValueError:
        choices = ", ".join(member.value for member in Mode)
        raise ForteError(f"mode {mode!r} is unknown; choose one of {choices}") from None


def _unit(unit: Unit | str) -> Unit:
    try:
        return Unit(unit)
    except ValueError:
        choices = ", ".join(member.value for member in Unit)
        raise ForteError(f"unit {unit!r} is unknown; choose one of {choices}") from None


def _unpaired_sentence(pair_id: str, text: str, mode: Mode) -> UnpairedSentence:
    if mode is Mode.STRICT:
        found = strict_lexicon().analyse(text)
        keywords = {category: tuple(sorted(found.positive[category])) for category in CATEGORIES}
        groups = {category: len({found.groups[category][term] for term in found.positive[category]})
                  for category in CATEGORIES}
        return UnpairedSentence(pair_id, text, keywords, groups)
    row = _compat_row(pair_id, "", text, mode, None)
    keywords = {category: row.categories[category].candidate_keywords for category in CATEGORIES}
    groups = {category: row.categories[category].fp for category in CATEGORIES}
    return UnpairedSentence(pair_id, text, keywords, groups, row.negation_removed)


def evaluate_forte(pairs: Iterable[Pair], mode: Mode | str = Mode.STRICT, unit: Unit | str = Unit.REPORT,
                   encoder: str | SentenceEncoder = "lexical") -> ForteResult:
    """Score report pairs with FORTE.

    Parameters
    ----------
    pairs
        Reference/candidate report pairs (:func:`load_pairs`).
    mode
        ``compat-head``, ``compat-paper`` or ``strict`` (:class:`Mode`).
    unit
        ``report``: one row per pair. ``sentence``: reports split (compat: on every "."; strict:
        :func:`~neuroscribe.training.metrics.sentences.split_strict`) and one row per reference
        sentence with its most similar candidate sentence. A pair with no reference sentence gives
        no row; one with no candidate sentence gives none in compat mode (as the original) and, in
        strict mode, rows with an empty candidate (its reference findings count as missed). In
        strict mode a reference sentence with no similarity above 0 to any candidate sentence is
        likewise paired with an empty candidate, not with an arbitrary sentence.
    encoder
        Sentence unit only: ``"lexical"`` (default, no model) or ``"mpnet"`` (the original's
        all-mpnet-base-v2; raises :class:`~neuroscribe.training.metrics.sentences.EncoderUnavailableError`
        when it is not installed), or an encoder object.
    """
    mode, unit = _mode(mode), _unit(unit)
    pairs = list(pairs)
    if not pairs:
        raise ForteError("no pairs to score")
    if isinstance(encoder, str) and encoder not in ("lexical", "mpnet"):
        raise ForteError(f"encoder {encoder!r} is unknown; choose one of lexical, mpnet")
    if unit is Unit.REPORT:
        rows = [score_row(pair.reference, pair.candidate, mode, pair_id=pair.id) for pair in pairs]
        return ForteResult(mode, unit, None, len(pairs), tuple(rows))
    sentence_encoder = get_encoder(encoder)
    strict = mode is Mode.STRICT
    split = split_strict if strict else split_compat
    rows, unpaired = [], []
    for pair in pairs:
        pairing = pair_sentences(split(pair.reference), split(pair.candidate), sentence_encoder,
                                 min_similarity=0.0 if strict else None)
        for reference, (index, similarity) in zip(pairing.references, pairing.matches, strict=False):
            candidate = "" if index is None else pairing.candidates[index]
            rows.append(score_row(reference, candidate, mode, pair_id=pair.id, similarity=similarity))
        if strict and pairing.references and not pairing.candidates:
            rows.extend(score_row(reference, "", mode, pair_id=pair.id) for reference in pairing.references)
        unpaired.extend(_unpaired_sentence(pair.id, pairing.candidates[index], mode)
                        for index in pairing.unpaired)
    return ForteResult(mode, unit, sentence_encoder.name, len(pairs), tuple(rows), tuple(unpaired))
