"""Tests for training.prompts: the four CVIT instruction styles, the training mix and the manifest record."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from neuroscribe.training.prompts import (
    AI_DRAFT_LINE,
    IMAGE_PLACEHOLDER,
    KEYWORD_CATEGORIES,
    KEYWORDS_PER_CATEGORY,
    MANIFEST_FORMAT,
    PLAIN_INSTRUCTION,
    RESPONSE_CUE,
    ExampleReport,
    InstructionStyle,
    PromptConfig,
    PromptError,
    PromptMix,
    default_keywords,
    default_template,
    inference_prompt,
    manifest_record,
    prompt_sha256,
    render_prompt,
)

NORMAL = """Findings:
No extra-axial collection.
No intracranial hemorrhage. Grey-white matter differentiation is preserved.
The ventricles and sulci are normal in size.
No midline shift.
The visualised paranasal sinuses and mastoid air cells are clear.
Impression:
No acute intracranial abnormality."""

SUBDURAL = """Findings:
There is an acute hyperdense subdural hematoma along the left frontoparietal convexity, measuring up to \
9 mm in thickness.
No intraparenchymal hemorrhage.
The ventricles are normal in size.
Midline shift of 4 mm to the right.
The skull is intact.
Impression:
1. Acute left frontoparietal subdural hematoma, 9 mm in thickness."""

ATROPHY = """Findings:
No extra-axial collection.
Periventricular white matter hypodensities in keeping with small-vessel disease.
Generalized prominence of the sulci and ventricles in keeping with atrophy.
No midline shift.
Impression:
1. Chronic small-vessel ischemic change.
2. Generalized cerebral atrophy."""

POOL = (ExampleReport("study-1", NORMAL), ExampleReport("study-2", SUBDURAL),
        ExampleReport("study-3", ATROPHY))


def _config(style: InstructionStyle | str, **kwargs: object) -> PromptConfig:
    if InstructionStyle(style) is InstructionStyle.IN_CONTEXT:
        kwargs.setdefault("examples", POOL)
    return PromptConfig(style, **kwargs)  # type: ignore[arg-type]


ALL_STYLES = list(InstructionStyle)


class TestInstructionStyle:
    """The style enum."""

    def test_values_are_the_json_names(self) -> None:
        """The four members have the documented values and parse from them."""
        assert [style.value for style in InstructionStyle] == ["plain", "in-context", "template", "keyword"]
        assert InstructionStyle.IN_CONTEXT is InstructionStyle("in-context")

    def test_keyword_categories_are_fortes(self) -> None:
        """The local category tuple is FORTE's, so prompts and scoring name the same categories."""
        from neuroscribe.training.metrics.forte import CATEGORIES

        assert CATEGORIES == KEYWORD_CATEGORIES


class TestRenderPrompt:
    """render_prompt for each style."""

    @pytest.mark.parametrize("style", ALL_STYLES)
    def test_layout_and_ai_draft_line(self, style: InstructionStyle) -> None:
        """Every style starts with the image placeholder and the AI-draft line and ends with the cue."""
        prompt = render_prompt(_config(style))
        lines = prompt.split("\n")
        assert lines[:3] == [IMAGE_PLACEHOLDER, AI_DRAFT_LINE, PLAIN_INSTRUCTION]
        assert prompt.endswith(f"\n\n{RESPONSE_CUE}\n")
        assert prompt.count(IMAGE_PLACEHOLDER) == 1
        assert "draft" in lines[1] and "radiologist" in lines[1]

    def test_plain_has_no_style_content(self) -> None:
        """The plain prompt is only the instruction: no examples, skeleton or keyword lists."""
        prompt = render_prompt(_config("plain"))
        expected = f"{IMAGE_PLACEHOLDER}\n{AI_DRAFT_LINE}\n{PLAIN_INSTRUCTION}\n\n{RESPONSE_CUE}\n"
        assert expected == prompt
        for marker in ("Example report:", "Findings:", "Impression:", "[Extra-axial", "- degree:",
                       "- landmark:", "hematoma", "parenchyma"):
            assert marker not in prompt

    def test_in_context_contains_example_text(self) -> None:
        """The in-context prompt shows the first n_examples reports of the pool under their headings."""
        prompt = render_prompt(_config("in-context", n_examples=2))
        assert prompt.count("Example report:\n") == 2
        assert f"Example report:\n{NORMAL}\n\nExample report:\n{SUBDURAL}\n\n{RESPONSE_CUE}\n" in prompt
        assert ATROPHY not in prompt

    def test_template_contains_the_skeleton(self) -> None:
        """The template prompt holds the synthetic site's skeleton with its headings and topics."""
        from neuroscribe.training.synth.report import report_template

        config = _config("template")
        prompt = render_prompt(config)
        assert report_template == config.template == default_template()
        assert f"\n{report_template}\n\n{RESPONSE_CUE}\n" in prompt
        for heading in ("Findings:", "Impression:", "[Extra-axial spaces:", "[Midline:"):
            assert heading in prompt

    def test_template_custom_skeleton(self) -> None:
        """A site's own skeleton replaces the default."""
        prompt = render_prompt(_config("template", template="  FINDINGS:\n[...]\nCONCLUSION:\n[...]  "))
        assert "FINDINGS:\n[...]\nCONCLUSION:\n[...]\n\nReport:" in prompt
        assert "[Extra-axial" not in prompt

    def test_keyword_contains_all_four_categories(self) -> None:
        """The keyword prompt lists FORTE terms of all four categories, one line each."""
        config = _config("keyword")
        prompt = render_prompt(config)
        lists = config.keyword_lists
        assert list(KEYWORD_CATEGORIES) == list(lists)
        for category in KEYWORD_CATEGORIES:
            assert f"- {category}: {', '.join(lists[category])}\n" in prompt
        for term in ("normal", "midline", "hemorrhage", "hydrocephalus"):  # one of each category
            assert term in prompt

    def test_default_keywords_one_per_group(self) -> None:
        """Default keywords are each group's representative in file order, capped per category."""
        from neuroscribe.training.metrics.forte import strict_lexicon

        groups = strict_lexicon().groups
        keywords = default_keywords()
        for category in KEYWORD_CATEGORIES:
            expected = tuple(group[0] for group in groups[category])[:KEYWORDS_PER_CATEGORY]
            assert expected == keywords[category]
        assert {category: 3 for category in KEYWORD_CATEGORIES} == {
            category: len(terms) for category, terms in default_keywords(3).items()}

    def test_keyword_custom_lists_keep_category_order(self) -> None:
        """Custom keyword lists are stored and rendered in FORTE category order."""
        config = _config("keyword", keywords={"impression": ["sdh"], "degree": ["acute", "mild"]})
        assert config.keywords == (("degree", ("acute", "mild")), ("impression", ("sdh",)))
        assert "- degree: acute, mild\n- impression: sdh\n" in render_prompt(config)

    @pytest.mark.parametrize("style", ALL_STYLES)
    def test_deterministic(self, style: InstructionStyle) -> None:
        """Rendering twice, or from an equal config, gives the same text."""
        first = render_prompt(_config(style))
        assert first == render_prompt(_config(style)) == render_prompt(_config(style))

    def test_max_chars(self) -> None:
        """A prompt longer than max_chars raises naming max_chars, at construction or render."""
        plain_length = len(render_prompt(_config("plain")))
        assert plain_length == len(render_prompt(_config("plain", max_chars=plain_length)))
        with pytest.raises(PromptError, match="max_chars"):
            _config("plain", max_chars=plain_length - 1)
        short_first = (ExampleReport("short", "Findings: normal."), ExampleReport("long", ATROPHY))
        fitting = len(render_prompt(_config("in-context", examples=short_first)))
        config = _config("in-context", examples=short_first, max_chars=fitting)
        with pytest.raises(PromptError, match="max_chars"):
            render_prompt(config, exclude_ids=["short"])


class TestExclusion:
    """The target study's own report never appears among its in-context examples."""

    def test_exclude_by_text(self) -> None:
        """The target's report is skipped (up to whitespace and case) and the next example is used."""
        config = _config("in-context", n_examples=2)
        target = "  " + NORMAL.upper().replace("\n", "\n  ") + "\n"
        prompt = render_prompt(config, exclude_report=target)
        assert NORMAL not in prompt
        assert SUBDURAL in prompt and ATROPHY in prompt

    def test_exclude_by_id(self) -> None:
        """Examples with an excluded report id are skipped."""
        prompt = render_prompt(_config("in-context"), exclude_ids=["study-1"])
        assert NORMAL not in prompt and SUBDURAL in prompt
        assert render_prompt(_config("in-context"), exclude_ids="study-1") == prompt

    def test_exclusion_of_another_report_changes_nothing(self) -> None:
        """Excluding a report outside the chosen examples leaves the prompt as it is."""
        config = _config("in-context")
        assert render_prompt(config) == render_prompt(config, exclude_report=ATROPHY, exclude_ids=["x"])

    def test_every_target_of_the_pool(self) -> None:
        """For each report of the pool as the target, the prompt holds n_examples others and not it."""
        config = _config("in-context", n_examples=2)
        for target in POOL:
            prompt = render_prompt(config, exclude_report=target.text)
            assert target.text not in prompt
            assert prompt.count("Example report:") == 2

    def test_too_few_left(self) -> None:
        """When exclusion leaves fewer than n_examples, rendering raises naming examples."""
        config = _config("in-context", n_examples=3)
        with pytest.raises(PromptError, match="examples"):
            render_prompt(config, exclude_report=SUBDURAL)


class TestPromptConfigValidation:
    """Invalid configs raise PromptError naming the field."""

    @pytest.mark.parametrize(("kwargs", "field"), [
        ({"style": "free-text"}, "style"),
        ({"style": None}, "style"),
        ({"style": "in-context", "examples": ()}, "examples"),
        ({"style": "in-context", "examples": POOL, "n_examples": 0}, "n_examples"),
        ({"style": "in-context", "examples": POOL, "n_examples": 4}, "n_examples"),
        ({"style": "in-context", "examples": [("a", NORMAL), ("a", ATROPHY)]}, "examples"),
        ({"style": "in-context", "examples": [("a", "  ")]}, "text"),
        ({"style": "in-context", "examples": [("", NORMAL)]}, "report_id"),
        ({"style": "in-context", "examples": [("a", f"{IMAGE_PLACEHOLDER} {NORMAL}")]}, "text"),
        ({"style": "in-context", "examples": "just one string"}, "examples"),
        ({"style": "template", "template": ""}, "template"),
        ({"style": "template", "template": " \n "}, "template"),
        ({"style": "keyword", "keywords": {}}, "keywords"),
        ({"style": "keyword", "keywords": {"size": ["large"]}}, "keywords"),
        ({"style": "keyword", "keywords": {"degree": []}}, "keywords"),
        ({"style": "keyword", "keywords": {"degree": "acute"}}, "keywords"),
        ({"style": "keyword", "keywords": {"degree": ["a, b"]}}, "keywords"),
        ({"style": "plain", "examples": POOL}, "examples"),
        ({"style": "plain", "n_examples": 2}, "n_examples"),
        ({"style": "plain", "template": "Findings:"}, "template"),
        ({"style": "template", "keywords": {"degree": ["acute"]}}, "keywords"),
        ({"style": "plain", "system": ""}, "system"),
        ({"style": "plain", "system": "Written by a computer."}, "system"),
        ({"style": "plain", "instruction": ""}, "instruction"),
        ({"style": "plain", "instruction": f"{IMAGE_PLACEHOLDER} describe"}, "instruction"),
        ({"style": "plain", "max_chars": 0}, "max_chars"),
        ({"style": "plain", "max_chars": True}, "max_chars"),
    ])
    def test_invalid(self, kwargs: dict[str, object], field: str) -> None:
        """Each bad value raises a PromptError (a ValueError) whose message names its field."""
        with pytest.raises(PromptError, match=field) as caught:
            PromptConfig(**kwargs)  # type: ignore[arg-type]
        assert isinstance(caught.value, ValueError)

    def test_style_string_becomes_enum(self) -> None:
        """A style value is accepted and stored as the enum member; pairs become ExampleReports."""
        config = PromptConfig("in-context", examples=[("a", NORMAL)])  # type: ignore[arg-type]
        assert InstructionStyle.IN_CONTEXT is config.style
        assert (ExampleReport("a", NORMAL),) == config.examples


class TestManifestRecord:
    """manifest_record and inference_prompt."""

    @pytest.mark.parametrize("style", ALL_STYLES)
    def test_round_trip(self, style: InstructionStyle) -> None:
        """The record, through JSON text, rebuilds the identical prompt with the recorded sha256."""
        config = _config(style, n_examples=2) if style is InstructionStyle.IN_CONTEXT else _config(style)
        prompt = render_prompt(config)
        record = manifest_record(config)
        text = json.dumps(record, sort_keys=True)
        rebuilt = inference_prompt(text)
        assert prompt == rebuilt == inference_prompt(json.loads(text))
        assert hashlib.sha256(prompt.encode("utf-8")).hexdigest() == record["prompt_sha256"]
        assert prompt_sha256(rebuilt) == record["prompt_sha256"]
        assert config == PromptConfig.from_json(record["config"])
        assert record["format"] == MANIFEST_FORMAT and style.value == record["style"]
        assert record["image_placeholder"] == IMAGE_PLACEHOLDER and len(prompt) == record["prompt_chars"]

    def test_record_holds_resolved_defaults(self) -> None:
        """Template and keyword records write the skeleton and terms out, not a reference to defaults."""
        assert default_template() == manifest_record(_config("template"))["config"]["template"]
        keywords = manifest_record(_config("keyword"))["config"]["keywords"]
        assert {category: list(terms) for category, terms in default_keywords().items()} == keywords

    def test_inference_needs_neither_synth_nor_forte(self) -> None:
        """A fresh interpreter rebuilds a keyword prompt without loading synth, FORTE, numpy or torch."""
        record = json.dumps(manifest_record(_config("keyword")))
        code = ("import sys; from neuroscribe.training.prompts import inference_prompt; "
                "inference_prompt(sys.stdin.read()); "
                "print(sorted(m for m in ('numpy', 'torch', 'neuroscribe.training.synth', "
                "'neuroscribe.training.metrics.forte') if m in sys.modules))")
        result = subprocess.run([sys.executable, "-c", code], input=record, capture_output=True, text=True,
                                check=True, timeout=60)
        assert result.stdout.strip() == "[]"

    def test_tampered_record_fails_the_sha256(self) -> None:
        """A record whose config no longer gives its prompt raises naming prompt_sha256."""
        record = manifest_record(_config("template"))
        record["config"]["template"] += "\n[Orbits.]"
        with pytest.raises(PromptError, match="prompt_sha256"):
            inference_prompt(record)

    @pytest.mark.parametrize(("change", "field"), [
        ({"format": "neuroscribe-cvit-prompt/0"}, "format"),
        ({"image_placeholder": "<img>"}, "image_placeholder"),
        ({"prompt_sha256": "abc"}, "prompt_sha256"),
        ({"style": "keyword"}, "style"),
    ])
    def test_malformed_record(self, change: dict[str, str], field: str) -> None:
        """A record of another format, placeholder, hash shape or style raises naming the key."""
        record = manifest_record(_config("plain")) | change
        with pytest.raises(PromptError, match=field):
            inference_prompt(record)

    def test_unknown_config_key(self) -> None:
        """A config with an unknown key raises rather than being ignored."""
        record = manifest_record(_config("plain"))
        record["config"]["temperature"] = 0.7
        with pytest.raises(PromptError, match="temperature"):
            inference_prompt(record)
        with pytest.raises(PromptError, match="JSON"):
            inference_prompt("{not json")

    def test_record_with_training_mix(self) -> None:
        """A record may carry the training mix, whose inference config must be the recorded one."""
        mix = PromptMix((_config("plain"), _config("keyword")), (1.0, 3.0))
        record = manifest_record(mix.inference_config, training_mix=mix)
        assert mix == PromptMix.from_json(record["training_mix"])
        assert render_prompt(_config("keyword")) == inference_prompt(record)
        with pytest.raises(PromptError, match="training_mix"):
            manifest_record(_config("plain"), training_mix=mix)


class TestPromptMix:
    """PromptMix: weighted sampling for training and JSON."""

    @staticmethod
    def _mix() -> PromptMix:
        return PromptMix(tuple(_config(style) for style in ALL_STYLES), (1, 2, 3, 4))

    def test_sampling_follows_weights(self) -> None:
        """Over 20,000 seeded draws each style's share is within 0.015 of its weight's share."""
        mix = self._mix()
        rng = random.Random(4)
        counts = Counter(mix.sample(rng).style for _ in range(20_000))
        for style, probability in zip(ALL_STYLES, mix.probabilities(), strict=True):
            assert abs(counts[style] / 20_000 - probability) < 0.015
        assert pytest.approx(mix.probabilities()) == (0.1, 0.2, 0.3, 0.4)

    @pytest.mark.parametrize("make_rng", [random.Random, np.random.default_rng])
    def test_sampling_is_reproducible(self, make_rng: type) -> None:
        """The same seed gives the same sequence with random.Random and numpy generators."""
        mix = self._mix()
        first, second = make_rng(11), make_rng(11)
        draws = [mix.sample(first).style for _ in range(200)]
        assert draws == [mix.sample(second).style for _ in range(200)]
        assert len(set(draws)) == 4

    def test_zero_weight_never_drawn(self) -> None:
        """A style with weight 0 is never sampled, even when the generator returns its edge values."""

        class Edge:
            def __init__(self, values: list[float]) -> None:
                self.values = values

            def random(self) -> float:
                return self.values.pop(0)

        mix = PromptMix((_config("plain"), _config("template"), _config("keyword")), (0, 1, 0))
        edge = Edge([0.0, 0.5, 0.9999999999999999])
        assert {InstructionStyle.TEMPLATE} == {mix.sample(edge).style for _ in range(3)}

    def test_inference_style(self) -> None:
        """The inference style defaults to the heaviest (first on a tie) and can be chosen."""
        assert InstructionStyle.KEYWORD is self._mix().inference_style
        tie = PromptMix((_config("template"), _config("plain")), (2, 2))
        assert InstructionStyle.TEMPLATE is tie.inference_style
        chosen = PromptMix((_config("template"), _config("plain")), (2, 2), "plain")  # type: ignore[arg-type]
        assert _config("plain") == chosen.inference_config

    def test_json_round_trip(self) -> None:
        """to_json/from_json give an equal mix whose configs render the same prompts."""
        mix = self._mix()
        again = PromptMix.from_json(json.dumps(mix.to_json()))
        assert mix == again
        assert [render_prompt(config) for config in mix.configs] == [render_prompt(c) for c in again.configs]
        rng_a, rng_b = random.Random(3), random.Random(3)
        assert [mix.sample(rng_a) for _ in range(50)] == [again.sample(rng_b) for _ in range(50)]

    @pytest.mark.parametrize(("configs", "weights", "field"), [
        ((), (), "configs"),
        (("plain",), (1,), "configs"),
        ((PromptConfig("plain"),) * 2, (1, 1), "configs"),  # type: ignore[arg-type]
        ((PromptConfig("plain"),), (0,), "weights"),  # type: ignore[arg-type]
        ((PromptConfig("plain"), PromptConfig("template")), (0, 0), "weights"),  # type: ignore[arg-type]
        ((PromptConfig("plain"), PromptConfig("template")), (1, -1), "weights"),  # type: ignore[arg-type]
        ((PromptConfig("plain"), PromptConfig("template")), (-1, -2), "weights"),  # type: ignore[arg-type]
        ((PromptConfig("plain"),), (float("nan"),), "weights"),  # type: ignore[arg-type]
        ((PromptConfig("plain"),), (float("inf"),), "weights"),  # type: ignore[arg-type]
        ((PromptConfig("plain"),), (1, 2), "weights"),  # type: ignore[arg-type]
        ((PromptConfig("plain"),), "1", "weights"),  # type: ignore[arg-type]
    ])
    def test_invalid(self, configs: tuple[object, ...], weights: object, field: str) -> None:
        """Empty, duplicate or non-config components and bad weights raise naming the field."""
        with pytest.raises(PromptError, match=field):
            PromptMix(configs, weights)  # type: ignore[arg-type]

    def test_invalid_inference_style(self) -> None:
        """An inference style that is unknown or not in the mix raises naming inference_style."""
        configs = (_config("plain"),)
        for style in ("keyword", "free-text"):
            with pytest.raises(PromptError, match="inference_style"):
                PromptMix(configs, (1,), style)  # type: ignore[arg-type]
        with pytest.raises(PromptError, match="format"):
            PromptMix.from_json(PromptMix(configs, (1,)).to_json() | {"format": "other/1"})


def test_docs_show_the_current_prompts() -> None:
    """docs/cvit-prompts.md shows the prompts the default plain, template and keyword configs render."""
    doc = (Path(__file__).parents[1] / "docs" / "cvit-prompts.md").read_text(encoding="utf-8")
    for style in ("plain", "template", "keyword"):
        assert f"```text\n{render_prompt(_config(style))}```" in doc
