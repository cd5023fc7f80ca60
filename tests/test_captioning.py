"""Tests for neuroscribe.training.metrics.captioning: pycocoevalcap metrics, corpus and per report.

METEOR takes seconds to start (paraphrase table), so one scorer serves the whole module.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from neuroscribe.training.metrics import captioning
from neuroscribe.training.metrics.captioning import (
    METRICS,
    CaptioningError,
    JavaNotFoundError,
    MeteorScorer,
    captioning_metrics,
    ptb_tokenize,
)

EXAMPLE_PAIRS = Path(__file__).parent / "data" / "forte" / "example_pairs.jsonl"

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class _Pair:
    pair_id: str
    reference: str
    candidate: str


def _examples() -> list[_Pair]:
    with EXAMPLE_PAIRS.open(encoding="utf-8") as handle:
        return [_Pair(d["id"], d["reference"], d["candidate"]) for d in map(json.loads, handle)]


@pytest.fixture(scope="module")
def meteor() -> Iterator[MeteorScorer]:
    """One METEOR process for every test of this module."""
    with MeteorScorer() as scorer:
        yield scorer


@pytest.fixture(scope="module")
def identical(meteor: MeteorScorer) -> dict[str, Any]:
    """Every shipped example reference scored against itself."""
    return captioning_metrics([_Pair(p.pair_id, p.reference, p.reference) for p in _examples()],
                              meteor=meteor)


@pytest.fixture(scope="module")
def mixed(meteor: MeteorScorer) -> dict[str, Any]:
    """The shipped examples plus an unrelated candidate and an empty one."""
    examples = _examples()
    pairs = [
        *examples,
        _Pair("unrelated", examples[0].reference, "The quarterly sales figures rose sharply in March."),
        _Pair("empty", examples[1].reference, ""),
    ]
    return captioning_metrics(pairs, meteor=meteor)


def _per_report(result: dict[str, Any], pair_id: str) -> dict[str, Any]:
    (row,) = [r for r in result["per_report"] if r["pair_id"] == pair_id]
    return row


class TestCaptioningMetrics:
    """captioning_metrics on identical, shipped, unrelated and empty candidates."""

    def test_identical_candidates_score_near_one(self, identical: dict[str, Any]) -> None:
        """A candidate equal to its reference gives BLEU, METEOR and ROUGE-L near 1 and a high CIDEr-D."""
        for metric in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
            assert identical["corpus"][metric] == pytest.approx(1.0, abs=1e-6), metric
        assert identical["corpus"]["METEOR"] > 0.95
        assert identical["corpus"]["CIDEr-D"] > 5.0
        for row in identical["per_report"]:
            assert row["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
            assert row["METEOR"] > 0.95

    def test_shipped_examples_match_the_original_numbers(self, mixed: dict[str, Any]) -> None:
        """Per-study means on the 6 examples are the original's: BLEU-1 43.6 and METEOR 27.0 (x100).

        Per-report BLEU and METEOR do not depend on the other reports of the set (CIDEr-D does).
        """
        examples = [r for r in mixed["per_report"] if r["pair_id"].startswith("eval_")]
        assert len(examples) == 6
        assert pytest.approx(0.436, abs=5e-4) == sum(r["BLEU-1"] for r in examples) / 6
        assert pytest.approx(0.270, abs=5e-4) == sum(r["METEOR"] for r in examples) / 6

    def test_unrelated_candidate_scores_low(self, mixed: dict[str, Any]) -> None:
        """A candidate about something else scores near 0 on every metric."""
        row = _per_report(mixed, "unrelated")
        assert row["BLEU-1"] < 0.1
        assert row["BLEU-4"] < 0.01
        assert row["METEOR"] < 0.1
        assert row["ROUGE-L"] < 0.1
        assert row["CIDEr-D"] < 0.1

    def test_empty_candidate_is_scored_zero_and_reported(self, mixed: dict[str, Any]) -> None:
        """An empty candidate does not break pycocoevalcap; it scores 0 and is named."""
        row = _per_report(mixed, "empty")
        assert row["candidate_tokens"] == 0
        assert all(row[metric] == pytest.approx(0.0, abs=1e-9) for metric in METRICS)
        assert mixed["empty_candidates"] == ["empty"]
        assert any("empty" in w for w in mixed["warnings"])

    def test_per_report_for_every_id_in_input_order(self, mixed: dict[str, Any]) -> None:
        """Every pair has one per-report entry with every metric, in input order."""
        ids = [p.pair_id for p in _examples()] + ["unrelated", "empty"]
        assert ids == [r["pair_id"] for r in mixed["per_report"]]
        for row in mixed["per_report"]:
            assert set(METRICS) <= set(row)
            assert all(isinstance(row[m], float) for m in METRICS)

    def test_scales_and_definitions_are_stated(self, mixed: dict[str, Any]) -> None:
        """Each metric states its scale and what its corpus value is; CIDEr-D names the paper's x1000."""
        assert list(METRICS) == mixed["metrics"]
        assert set(METRICS) == set(mixed["scales"]) == set(mixed["corpus_definitions"])
        assert mixed["scales"]["BLEU-1"] == "0-1"
        assert mixed["scales"]["CIDEr-D"].startswith("0-10")
        assert "x1000" in mixed["scales"]["CIDEr-D"]

    def test_corpus_and_mean_of_per_report_both_reported(self, mixed: dict[str, Any]) -> None:
        """BLEU and METEOR corpus values differ from the per-report mean; ROUGE-L and CIDEr-D equal it."""
        corpus, mean = mixed["corpus"], mixed["per_report_mean"]
        assert corpus["BLEU-1"] != pytest.approx(mean["BLEU-1"], abs=1e-3)
        assert corpus["METEOR"] != pytest.approx(mean["METEOR"], abs=1e-4)
        for metric in ("ROUGE-L", "CIDEr-D"):
            assert pytest.approx(corpus[metric]) == mean[metric]
            assert pytest.approx(mean[metric]) == (
                sum(r[metric] for r in mixed["per_report"]) / len(mixed["per_report"])
            )

    def test_single_pair_has_no_cider(self, meteor: MeteorScorer) -> None:
        """With one pair CIDEr-D's IDF is all zeros: it is None with a warning, the rest are scored."""
        text = "Small SDH at left frontal."
        result = captioning_metrics([_Pair("one", text, text)], meteor=meteor)
        assert result["corpus"]["CIDEr-D"] is None
        assert result["per_report"][0]["CIDEr-D"] is None
        assert any("single pair" in w for w in result["warnings"])
        assert result["corpus"]["BLEU-1"] == pytest.approx(1.0, abs=1e-6)

    def test_deterministic(self, meteor: MeteorScorer, mixed: dict[str, Any]) -> None:
        """The same pairs give the same JSON."""
        examples = _examples()
        again = captioning_metrics(
            [*examples,
             _Pair("unrelated", examples[0].reference, "The quarterly sales figures rose sharply in March."),
             _Pair("empty", examples[1].reference, "")],
            meteor=meteor,
        )
        assert json.dumps(mixed, sort_keys=True) == json.dumps(again, sort_keys=True)

    def test_no_pairs_raises(self) -> None:
        """An empty set is an error, not a row of zeros."""
        with pytest.raises(CaptioningError, match="no pairs"):
            captioning_metrics([])


class TestPtbTokenize:
    """ptb_tokenize: pycocoevalcap's pre-processing, one output per input."""

    def test_lower_case_punctuation_and_line_breaks(self) -> None:
        """Lower-cased, punctuation tokens gone, every kind of line break kept inside one report."""
        assert ptb_tokenize(
            ["SDH at left, 2.8 mm.", "", "Conclusion\r\n> ICH\u2028", "last"]
        ) == ["sdh at left 2.8 mm", "", "conclusion > ich", "last"]


class TestMeteorFailure:
    """A METEOR process that dies is an error with its message, never a hang."""

    def test_dead_jvm_raises_with_its_stderr(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The scorer reports what the process printed and closes itself."""
        real_popen = subprocess.Popen

        def dying(_cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
            script = "import sys; sys.stderr.write('OutOfMemoryError: Java heap space'); sys.exit(1)"
            return real_popen([sys.executable, "-c", script], **kwargs)

        monkeypatch.setattr(captioning.subprocess, "Popen", dying)
        scorer = MeteorScorer()
        with pytest.raises(CaptioningError, match="OutOfMemoryError"):
            scorer.score(["a b"], ["a b"])
        with pytest.raises(CaptioningError, match="closed"):
            scorer.score(["a b"], ["a b"])


class TestJavaMissing:
    """Without java on PATH the error names it and the package to install."""

    def test_message_names_java_and_package(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """JavaNotFoundError says what is missing and how to install it."""
        monkeypatch.setattr(captioning.shutil, "which", lambda _name: None)
        with pytest.raises(JavaNotFoundError, match="default-jre-headless"):
            captioning_metrics([_Pair("a", "x y", "x y"), _Pair("b", "y z", "y z")])
