"""Tests for ``neuroscribe evaluate`` (metrics/command.py) and its HTML page (metrics/html_report.py).

Only one test starts METEOR (the full run); the others pass --no-captioning or stub the metrics.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from neuroscribe.cli import main
from neuroscribe.training.metrics import captioning
from neuroscribe.training.metrics.forte import CATEGORIES, Pair, evaluate_forte, load_pairs
from neuroscribe.training.metrics.html_report import render_html, worst_rows, write_html
from tests.conftest import logging_restored

EXAMPLE_PAIRS = Path(__file__).parent / "data" / "forte" / "example_pairs.jsonl"
EXAMPLE_IDS = [pair.id for pair in load_pairs(EXAMPLE_PAIRS)]




def _clean_environment(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    for name in list(os.environ):
        if name.startswith("NEUROSCRIBE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NEUROSCRIBE_STORAGE__ROOT", str(root))


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Settings from a tmp storage root; logging as it was afterwards."""
    _clean_environment(monkeypatch, tmp_path / "root")
    with logging_restored():
        yield


def _evaluate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any] | None, str]:
    """Run ``neuroscribe evaluate``; returns exit code, parsed stdout (None if empty) and stderr."""
    code = main(["evaluate", *args])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def _write_pairs(path: Path, records: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One complete run on the shipped examples: captioning, --rows and --html (METEOR starts once).

    Module-scoped, so it captures stdout/stderr itself; log lines would land in the captured stdout.
    """
    html = tmp_path_factory.mktemp("html") / "report.html"
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, logging_restored():
        _clean_environment(monkeypatch, tmp_path_factory.mktemp("root"))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["evaluate", "--pairs", str(EXAMPLE_PAIRS), "--rows", "--html", str(html)])
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "html": html}


class TestEvaluateOutput:
    """The JSON printed on stdout."""

    @pytest.mark.parametrize("mode", ["compat-head", "compat-paper", "strict"])
    def test_each_mode_gives_four_categories_and_mean_f1(self, capsys: pytest.CaptureFixture[str],
                                                         mode: str) -> None:
        """Every mode reports the four categories and the mean F1, and says which mode and aggregation."""
        code, result, _err = _evaluate(capsys, "--pairs", str(EXAMPLE_PAIRS), "--mode", mode,
                                       "--no-captioning")
        assert code == 0
        assert result is not None
        forte = result["forte"]
        assert set(forte["categories"]) == set(CATEGORIES) == {"degree", "landmark", "feature", "impression"}
        assert isinstance(forte["mean_f1"], float)
        assert forte["mode"] == mode
        assert forte["unit"] == "report"
        assert forte["aggregation"]
        assert forte["n_pairs"] == 6
        assert "rows" not in forte
        assert "captioning" not in result

    def test_rows_adds_forte_rows(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--rows adds one FORTE row per pair with texts and per-category keywords."""
        code, result, _err = _evaluate(capsys, "--pairs", str(EXAMPLE_PAIRS), "--rows", "--no-captioning")
        assert code == 0
        assert result is not None
        rows = result["forte"]["rows"]
        assert [row["pair_id"] for row in rows] == EXAMPLE_IDS
        assert set(rows[0]["categories"]) == set(CATEGORIES)
        assert "reference_keywords" in rows[0]["categories"]["landmark"]

    def test_sentence_unit(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--unit sentence scores one row per reference sentence with the lexical encoder."""
        code, result, _err = _evaluate(capsys, "--pairs", str(EXAMPLE_PAIRS), "--unit", "sentence",
                                       "--no-captioning")
        assert code == 0
        assert result is not None
        assert result["forte"]["unit"] == "sentence"
        assert result["forte"]["encoder"] == "lexical"
        assert result["forte"]["n_rows"] > 6

    def test_per_report_captioning_only_with_rows(self, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
        """Without --rows the captioning block keeps corpus values but drops per-report scores."""
        fake = {"corpus": {"BLEU-1": 0.5}, "per_report_mean": {"BLEU-1": 0.4}, "scales": {"BLEU-1": "0-1"},
                "per_report": [{"pair_id": pid, "BLEU-1": 0.4} for pid in EXAMPLE_IDS]}
        monkeypatch.setattr(captioning, "captioning_metrics", lambda _pairs: json.loads(json.dumps(fake)))
        code, result, _err = _evaluate(capsys, "--pairs", str(EXAMPLE_PAIRS))
        assert code == 0
        assert result is not None
        assert "per_report" not in result["captioning"]
        assert result["captioning"]["corpus"] == {"BLEU-1": 0.5}
        code, result, _err = _evaluate(capsys, "--pairs", str(EXAMPLE_PAIRS), "--rows")
        assert result is not None
        assert [r["pair_id"] for r in result["captioning"]["per_report"]] == EXAMPLE_IDS


@pytest.mark.slow
class TestFullRun:
    """One run with captioning metrics, --rows and --html on the shipped examples."""

    def test_stdout_is_json_with_forte_and_captioning(self, full_run: dict[str, Any]) -> None:
        """Exit 0, stdout is one JSON document (no log lines) with both blocks."""
        assert full_run["code"] == 0, full_run["stderr"]
        result = json.loads(full_run["stdout"])
        assert set(result) == {"forte", "captioning"}
        assert [row["pair_id"] for row in result["forte"]["rows"]] == EXAMPLE_IDS

    def test_captioning_matches_the_original_evaluation(self, full_run: dict[str, Any]) -> None:
        """Corpus BLEU-1 49.6 / METEOR 26.4 and per-study means 43.6 / 27.0, as ALGORITHM.md section 9."""
        block = json.loads(full_run["stdout"])["captioning"]
        assert block["corpus"]["BLEU-1"] == pytest.approx(0.496, abs=5e-4)
        assert block["per_report_mean"]["BLEU-1"] == pytest.approx(0.436, abs=5e-4)
        assert block["corpus"]["METEOR"] == pytest.approx(0.264, abs=5e-4)
        assert block["per_report_mean"]["METEOR"] == pytest.approx(0.270, abs=5e-4)
        assert block["corpus"]["CIDEr-D"] == pytest.approx(block["per_report_mean"]["CIDEr-D"])
        assert [r["pair_id"] for r in block["per_report"]] == EXAMPLE_IDS
        assert set(block["scales"]) == set(block["corpus"])

    def test_html_has_table_chart_and_worst_rows(self, full_run: dict[str, Any]) -> None:
        """The page holds the metrics tables, an embedded PNG, the settings and the worst rows."""
        result = json.loads(full_run["stdout"])
        page = full_run["html"].read_text(encoding="utf-8")
        assert f"wrote {full_run['html']}" in full_run["stderr"]
        assert "<table>" in page
        assert "<img class='chart' src='data:image/png;base64,iVBORw0KGgo" in page
        assert "mean of the four F1" in page
        assert "BLEU-4" in page
        assert "CIDEr-D" in page
        assert "micro_pooled_tp_fp_fn" in page
        assert "Worst rows" in page
        assert "Missed (in reference, not candidate)" in page
        worst = worst_rows(result["forte"], 1)[0]
        assert worst["pair_id"] in page
        assert "&gt; Nonspecific low density patches" in page  # the report text, escaped
        assert "Li et al., Nat Commun 16:2258 (2025)" in page


class TestHtmlReport:
    """write_html on its own: escaping, directory output, FORTE's matched/missed/extra keywords."""

    def test_texts_are_escaped(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Markup in a report is shown as text, never run."""
        pairs = _write_pairs(tmp_path / "p.jsonl", [
            {"id": "x<1>", "reference": "Acute SDH at left frontal.",
             "candidate": "<script>alert(1)</script> chronic SDH"},
            {"id": "y", "reference": "Mild brain atrophy.", "candidate": "Mild brain atrophy."},
        ])
        out = tmp_path / "page"
        code, _result, _err = _evaluate(capsys, "--pairs", str(pairs), "--no-captioning", "--html", str(out))
        assert code == 0
        page = (out / "evaluation.html").read_text(encoding="utf-8")
        assert "<script>" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt; chronic SDH" in page
        assert "x&lt;1&gt;" in page
        assert "Not computed (--no-captioning)" in page

    @pytest.mark.parametrize("mode", ["strict", "compat-head"])
    def test_synonyms_are_matched_not_missed(self, mode: str) -> None:
        """'SDH' and 'subdural hematoma' are one group: the page shows 'sdh' matched, not missed + extra."""
        pairs = [Pair("p", "Acute SDH at left frontal.", "Acute subdural hematoma at left frontal lobe.")]
        forte = evaluate_forte(pairs, mode).to_json(rows=True)
        impression = forte["rows"][0]["categories"]["impression"]
        assert (impression["matched"], impression["missed"], impression["extra"]) == (["sdh"], [], [])
        page = render_html(forte)
        assert "<span class='matched'>sdh</span>" in page
        assert "<span class='missed'>sdh" not in page
        assert "<span class='extra'>subdural hematoma" not in page

    def test_page_shows_the_rows_outcome_as_given(self) -> None:
        """The worst-rows table lists the row's own matched/missed/extra lists; it recomputes nothing."""
        category = {"reference_keywords": ["a", "b"], "candidate_keywords": ["c"], "precision": 0.5,
                    "recall": 0.5, "f1": 0.5, "matched": ["b"], "missed": ["a"], "extra": ["c<d"]}
        empty = {"reference_keywords": [], "candidate_keywords": [], "precision": None, "recall": None,
                 "f1": None, "matched": [], "missed": [], "extra": []}
        totals = {"precision": 0.5, "recall": 0.5, "f1": 0.5, "n_rows": 1}
        forte = {"mode": "compat-head", "unit": "report", "n_pairs": 1, "n_rows": 1, "mean_f1": 0.5,
                 "categories": dict.fromkeys(CATEGORIES, totals),
                 "rows": [{"pair_id": "p", "reference": "r", "candidate": "c", "negation_removed": False,
                           "categories": {c: category if c == "feature" else empty for c in CATEGORIES}}]}
        page = render_html(forte)
        assert ("<td><span class='matched'>b</span></td><td><span class='missed'>a</span></td>"
                "<td><span class='extra'>c&lt;d</span></td>") in page

    def test_worst_rows_lowest_f1_first(self) -> None:
        """Rows are ranked by the mean of their defined category F1s; negation-removed rows are skipped."""
        def row(pair_id: str, f1: float | None, removed: bool = False) -> dict[str, Any]:
            return {"pair_id": pair_id, "negation_removed": removed,
                    "categories": {c: {"f1": f1} for c in CATEGORIES}}

        forte = {"rows": [row("a", 0.9), row("b", 0.1), row("c", None), row("d", 0.0, removed=True),
                          row("e", 0.5)]}
        assert [r["pair_id"] for r in worst_rows(forte, 2)] == ["b", "e"]

    def test_file_or_directory_target(self, tmp_path: Path) -> None:
        """A .html path is the file; anything else is a directory that gets evaluation.html."""
        forte = {"mode": "strict", "unit": "report", "categories": {c: {"precision": 1.0, "recall": 0.5,
                                                                     "f1": 0.667, "n_rows": 1}
                                                                 for c in CATEGORIES},
                 "mean_f1": 0.667, "n_pairs": 1, "n_rows": 1}
        assert write_html(tmp_path / "a.html", forte) == tmp_path / "a.html"
        assert write_html(tmp_path / "deep" / "dir", forte) == tmp_path / "deep" / "dir" / "evaluation.html"
        assert "has no rows" in (tmp_path / "a.html").read_text(encoding="utf-8")


class TestBadInput:
    """Bad pairs files and paths: exit 2, a message naming the file (and line), no traceback."""

    def test_missing_file(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A pairs file that does not exist is named."""
        missing = tmp_path / "nope.jsonl"
        code, result, err = _evaluate(capsys, "--pairs", str(missing))
        assert code == 2
        assert result is None
        assert str(missing) in err
        assert "Traceback" not in err

    def test_malformed_line(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A line that is not JSON is named as file:line."""
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"id": "a", "reference": "x", "candidate": "y"}\n{"id": "b", \n', encoding="utf-8")
        code, result, err = _evaluate(capsys, "--pairs", str(bad), "--no-captioning")
        assert code == 2
        assert result is None
        assert f"{bad}:2" in err
        assert "Traceback" not in err

    def test_missing_key(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A record without a candidate is named with its line and the key."""
        bad = _write_pairs(tmp_path / "bad.jsonl", [{"id": "a", "reference": "x"}])
        code, _result, err = _evaluate(capsys, "--pairs", str(bad), "--no-captioning")
        assert code == 2
        assert f"{bad}:1" in err
        assert "candidate" in err

    def test_html_target_is_a_directory(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--html naming an existing directory called *.html is refused before scoring."""
        target = tmp_path / "taken.html"
        target.mkdir()
        code, result, err = _evaluate(capsys, "--pairs", str(EXAMPLE_PAIRS), "--no-captioning",
                                      "--html", str(target))
        assert code == 2
        assert result is None
        assert str(target) in err

    def test_java_missing(self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
        """Without java the captioning metrics fail with exit 1 and say what to install."""
        monkeypatch.setattr(captioning.shutil, "which", lambda _name: None)
        code, result, err = _evaluate(capsys, "--pairs", str(EXAMPLE_PAIRS))
        assert code == 1
        assert result is None
        assert "default-jre-headless" in err
        assert "--no-captioning" in err


def test_missing_eval_extra_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without pycocoevalcap the command exits 1 naming the extra to install, not with a traceback."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pycocoevalcap" else real_find_spec(name, *a))
    with logging_restored():
        code = main(["evaluate", "--pairs", str(EXAMPLE_PAIRS)])
    assert code == 1
    err = capsys.readouterr().err
    assert "pycocoevalcap" in err and "'eval'" in err and "--no-captioning" in err
