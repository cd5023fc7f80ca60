"""CVIT prompts: the four instruction styles of BrainGPT as deterministic prompt templates.

BrainGPT (Li et al., Nature Communications 16:2258, 2025) fine-tunes one model under four
instruction styles: plain and in-context example (the paper's "regular" visual instruction tuning)
and template and keyword (its "clinical" visual instruction tuning, CVIT). Here each style is a
:class:`PromptConfig`; :func:`render_prompt` turns one into the text the language model reads after
the visual tokens, and :class:`PromptMix` draws configs by weight for training. The bundle manifest
records the config the service must use (:func:`manifest_record`) together with the sha256 of its
rendered text, and :func:`inference_prompt` rebuilds that exact text from the record.

Layout of a rendered prompt (one ``\\n`` between lines; docs/cvit-prompts.md shows each style)::

    <image>                        IMAGE_PLACEHOLDER: the model puts the visual tokens here
    {system}                       the AI-draft line (AI_DRAFT_LINE by default)
    {instruction}                  PLAIN_INSTRUCTION by default
    {style block}                  in-context, template and keyword only, after a blank line
                                   (blank line)
    Report:                        RESPONSE_CUE: the report follows on the next line

This module imports neither torch nor numpy, so the inference package can use it; the defaults
that come from elsewhere (the synthetic site's report skeleton, the FORTE keyword list) are loaded
only when a config asks for them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from neuroscribe.errors import NeuroScribeError

__all__ = [
    "AI_DRAFT_LINE",
    "IMAGE_PLACEHOLDER",
    "KEYWORDS_PER_CATEGORY",
    "KEYWORD_CATEGORIES",
    "MANIFEST_FORMAT",
    "MIX_FORMAT",
    "PLAIN_INSTRUCTION",
    "RESPONSE_CUE",
    "ExampleReport",
    "InstructionStyle",
    "PromptConfig",
    "PromptError",
    "PromptMix",
    "default_keywords",
    "default_template",
    "inference_prompt",
    "manifest_record",
    "prompt_sha256",
    "render_prompt",
]

#: Where the visual tokens go: the first line of every rendered prompt, and nowhere else in it.
IMAGE_PLACEHOLDER = "<image>"
#: The default system line; every output of the model is a draft for a radiologist, never a diagnosis.
AI_DRAFT_LINE = ("This report is an AI-generated draft for review by a radiologist; "
                 "it is not a diagnosis.")
#: The default instruction, shared by every style.
PLAIN_INSTRUCTION = "Write the findings and impression of this non-contrast head CT."
#: The last line of every prompt; the report starts on the line after it.
RESPONSE_CUE = "Report:"
#: FORTE's four keyword categories in output order (the same tuple as
#: ``neuroscribe.training.metrics.forte.CATEGORIES``, kept here so this module loads no keyword list).
KEYWORD_CATEGORIES = ("degree", "landmark", "feature", "impression")
#: How many terms per category :func:`default_keywords` keeps (the strict list has 12 to 61 groups).
KEYWORDS_PER_CATEGORY = 10
#: ``format`` of a :func:`manifest_record`.
MANIFEST_FORMAT = "neuroscribe-cvit-prompt/1"
#: ``format`` of :meth:`PromptMix.to_json`.
MIX_FORMAT = "neuroscribe-cvit-mix/1"
#: Default :attr:`PromptConfig.max_chars`: about 1,500 tokens at ~4 characters per English token.
DEFAULT_MAX_CHARS = 6000

_IN_CONTEXT_LEAD = ("Follow the wording and layout of the example reports below. They describe other "
                    "patients' studies, not this one.")
_TEMPLATE_LEAD = "Fill in this report template. Replace each bracketed topic with what this study shows."
_KEYWORD_LEAD = "Use terms of these FORTE keyword categories where they apply to this study:"
_EXAMPLE_HEADING = "Example report:"


class PromptError(NeuroScribeError, ValueError):
    """A prompt config, mix or manifest record is invalid; the message names the field."""


class InstructionStyle(StrEnum):
    """The four instruction styles of BrainGPT's fine-tuning (Li et al. 2025, Fig. 2); value = JSON name.

    The paper groups plain and in-context example instructions as regular visual instruction tuning
    (RVIT) and template and keyword instructions as clinical visual instruction tuning (CVIT).
    The member docstrings paraphrase the paper's description of each style.
    """

    PLAIN = "plain"
    """Plain instruction: the model is only asked to write the report of the scan (the baseline)."""
    IN_CONTEXT = "in-context"
    """In-context example instruction: the instruction comes with one or more example reports of
    other studies, so the model can copy their style (in-context learning)."""
    TEMPLATE = "template"
    """Template instruction: the instruction comes with the site's report skeleton, the ordered
    topics a radiologist goes through, which the model fills in."""
    KEYWORD = "keyword"
    """Keyword instruction: the instruction comes with FORTE's keyword categories (degree, landmark,
    feature, impression) and their terms, to focus the model on clinically essential words."""


@dataclass(frozen=True)
class ExampleReport:
    """One example report of the in-context style.

    Parameters
    ----------
    report_id
        A stable id (e.g. the site dataset's study id); a study can be excluded by it.
    text
        The report (surrounding whitespace is removed).
    """

    report_id: str
    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.report_id, str) or not self.report_id.strip():
            raise PromptError(f"ExampleReport.report_id: {self.report_id!r} is invalid; it must be a "
                              "non-empty string")
        if not isinstance(self.text, str) or not self.text.strip():
            raise PromptError(f"ExampleReport.text of {self.report_id!r}: must be a non-empty string")
        if IMAGE_PLACEHOLDER in self.text:
            raise PromptError(f"ExampleReport.text of {self.report_id!r}: must not contain the image "
                              f"placeholder {IMAGE_PLACEHOLDER!r}")
        object.__setattr__(self, "text", self.text.strip())


def default_template() -> str:
    """The site's report skeleton: ``neuroscribe.training.synth.report.report_template``."""
    from neuroscribe.training.synth.report import report_template  # loaded on demand (pydicom)

    return report_template


def default_keywords(per_category: int = KEYWORDS_PER_CATEGORY) -> dict[str, tuple[str, ...]]:
    """FORTE keyword lists from the strict lexicon: one term per synonym group, capped per category.

    Each synonym group contributes its representative (its first term, as in
    ``data/forte_brain_strict.json``); groups keep the file's order and the first ``per_category``
    are kept, so the result is the same on every call.
    """
    if isinstance(per_category, bool) or not isinstance(per_category, int) or per_category < 1:
        raise PromptError(f"per_category: {per_category!r} is invalid; it must be an integer >= 1")
    from neuroscribe.training.metrics.forte import strict_lexicon  # loaded on demand (numpy)

    groups = strict_lexicon().groups
    return {category: tuple(group[0] for group in groups[category][:per_category])
            for category in KEYWORD_CATEGORIES}


def _style(value: object) -> InstructionStyle:
    try:
        return InstructionStyle(value)
    except (ValueError, TypeError):
        choices = ", ".join(member.value for member in InstructionStyle)
        raise PromptError(f"PromptConfig.style: {value!r} is unknown; choose one of {choices}") from None


def _text(name: str, value: object) -> str:
    """A non-empty single string field, stripped, without the image placeholder."""
    if not isinstance(value, str) or not value.strip():
        raise PromptError(f"PromptConfig.{name}: {value!r} is invalid; it must be a non-empty string")
    if IMAGE_PLACEHOLDER in value:
        raise PromptError(f"PromptConfig.{name}: must not contain the image placeholder "
                          f"{IMAGE_PLACEHOLDER!r}")
    return value.strip()


def _examples(value: object) -> tuple[ExampleReport, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise PromptError(f"PromptConfig.examples: {type(value).__name__} is invalid; it must be a sequence "
                          "of ExampleReport or (report_id, text) pairs")
    examples: list[ExampleReport] = []
    for item in value:
        if isinstance(item, ExampleReport):
            examples.append(item)
        elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
            examples.append(ExampleReport(item[0], item[1]))
        else:
            raise PromptError(f"PromptConfig.examples: {item!r} is neither an ExampleReport nor a "
                              "(report_id, text) pair")
    ids = [example.report_id for example in examples]
    duplicates = sorted({report_id for report_id in ids if ids.count(report_id) > 1})
    if duplicates:
        raise PromptError(f"PromptConfig.examples: report ids {duplicates} occur more than once")
    return tuple(examples)


def _keywords(value: object) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, Sequence) and not isinstance(value, str):
        items = list(value)
    else:
        raise PromptError(f"PromptConfig.keywords: {type(value).__name__} is invalid; it must map FORTE "
                          "categories to term lists")
    lists: dict[str, tuple[str, ...]] = {}
    for item in items:
        if not (isinstance(item, Sequence) and len(item) == 2):
            raise PromptError(f"PromptConfig.keywords: {item!r} is not a (category, terms) pair")
        category, terms = item
        if category not in KEYWORD_CATEGORIES:
            raise PromptError(f"PromptConfig.keywords: category {category!r} is unknown; choose from "
                              f"{', '.join(KEYWORD_CATEGORIES)}")
        if category in lists:
            raise PromptError(f"PromptConfig.keywords: category {category!r} is given twice")
        if isinstance(terms, str) or not isinstance(terms, Sequence):
            raise PromptError(f"PromptConfig.keywords[{category!r}]: must be a list of terms, not "
                              f"{type(terms).__name__}")
        cleaned = tuple(term.strip() for term in terms if isinstance(term, str))
        if len(cleaned) != len(terms) or not cleaned or not all(cleaned):
            raise PromptError(f"PromptConfig.keywords[{category!r}]: {list(terms)!r} is invalid; it must be "
                              "a non-empty list of non-empty strings")
        if any("," in term or "\n" in term or IMAGE_PLACEHOLDER in term for term in cleaned):
            raise PromptError(f"PromptConfig.keywords[{category!r}]: terms must not contain ',', a newline "
                              f"or {IMAGE_PLACEHOLDER!r}")
        if len(set(cleaned)) != len(cleaned):
            raise PromptError(f"PromptConfig.keywords[{category!r}]: a term occurs more than once")
        lists[category] = cleaned
    if not lists:
        raise PromptError("PromptConfig.keywords: no category given; give at least one FORTE category")
    return tuple((category, lists[category]) for category in KEYWORD_CATEGORIES if category in lists)


@dataclass(frozen=True)
class PromptConfig:
    """One instruction style and what its prompt shows; valid on construction or :class:`PromptError`.

    Parameters
    ----------
    style
        An :class:`InstructionStyle` (or its value: ``plain``, ``in-context``, ``template``,
        ``keyword``).
    examples
        In-context only: the pool of example reports, :class:`ExampleReport` or ``(report_id, text)``
        pairs, in the order they are used. Give one more than ``n_examples`` so that a training study
        whose own report is in the pool can still get ``n_examples`` others.
    n_examples
        In-context only: how many examples the prompt shows (1 to ``len(examples)``).
    template
        Template only: the report skeleton; ``None`` means :func:`default_template`.
    keywords
        Keyword only: FORTE category → terms (a mapping or ``(category, terms)`` pairs); ``None``
        means :func:`default_keywords`. Stored as pairs in :data:`KEYWORD_CATEGORIES` order.
    instruction
        The task sentence, the same in every style.
    system
        The line that says the output is an AI draft for a radiologist; it must contain "draft".
    max_chars
        Upper bound on the rendered prompt in characters (~4 per token for English text).

    Fields of another style must stay at their defaults; after construction ``template`` and
    ``keywords`` hold the resolved values, so :meth:`to_json` records exactly what was rendered.
    """

    style: InstructionStyle
    examples: tuple[ExampleReport, ...] = ()
    n_examples: int = 1
    template: str | None = None
    keywords: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    instruction: str = PLAIN_INSTRUCTION
    system: str = AI_DRAFT_LINE
    max_chars: int = DEFAULT_MAX_CHARS

    def __post_init__(self) -> None:
        set_field = object.__setattr__
        style = _style(self.style)
        set_field(self, "style", style)
        set_field(self, "instruction", _text("instruction", self.instruction))
        system = _text("system", self.system)
        if "draft" not in system.lower():
            raise PromptError(f"PromptConfig.system: {system!r} must say that the output is a draft "
                              "(contain 'draft')")
        set_field(self, "system", system)
        if isinstance(self.max_chars, bool) or not isinstance(self.max_chars, int) or self.max_chars < 1:
            raise PromptError(f"PromptConfig.max_chars: {self.max_chars!r} is invalid; it must be an "
                              "integer >= 1")
        if style is InstructionStyle.IN_CONTEXT:
            examples = _examples(self.examples)
            if not examples:
                raise PromptError("PromptConfig.examples: the in-context style needs at least one example "
                                  "report")
            n = self.n_examples
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(examples):
                raise PromptError(f"PromptConfig.n_examples: {n!r} is invalid; it must be an integer from 1 "
                                  f"to the number of examples ({len(examples)})")
            set_field(self, "examples", examples)
        else:
            if self.examples:
                raise PromptError(f"PromptConfig.examples: only the in-context style uses examples, not "
                                  f"{style.value!r}")
            if self.n_examples != 1:
                raise PromptError(f"PromptConfig.n_examples: only the in-context style uses n_examples, "
                                  f"not {style.value!r}")
        if style is InstructionStyle.TEMPLATE:
            template = default_template() if self.template is None else self.template
            set_field(self, "template", _text("template", template))
        elif self.template is not None:
            raise PromptError(f"PromptConfig.template: only the template style uses a template, not "
                              f"{style.value!r}")
        if style is InstructionStyle.KEYWORD:
            keywords = default_keywords() if self.keywords is None else self.keywords
            set_field(self, "keywords", _keywords(keywords))
        elif self.keywords is not None:
            raise PromptError(f"PromptConfig.keywords: only the keyword style uses keywords, not "
                              f"{style.value!r}")
        render_prompt(self)  # the canonical prompt must fit max_chars

    @property
    def keyword_lists(self) -> dict[str, tuple[str, ...]]:
        """The keyword lists as a dict (empty unless the style is keyword)."""
        return dict(self.keywords or ())

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data: the style, the shared fields and the fields of this style only."""
        data: dict[str, Any] = {"style": self.style.value, "instruction": self.instruction,
                                "system": self.system, "max_chars": self.max_chars}
        if self.style is InstructionStyle.IN_CONTEXT:
            data["examples"] = [{"report_id": example.report_id, "text": example.text}
                                for example in self.examples]
            data["n_examples"] = self.n_examples
        elif self.style is InstructionStyle.TEMPLATE:
            data["template"] = self.template
        elif self.style is InstructionStyle.KEYWORD:
            data["keywords"] = {category: list(terms) for category, terms in self.keywords or ()}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> PromptConfig:
        """The config of :meth:`to_json` (a mapping or its JSON text); unknown keys raise."""
        data = _mapping("PromptConfig", data)
        known = {"style", "instruction", "system", "max_chars", "examples", "n_examples", "template",
                 "keywords"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PromptError(f"PromptConfig: unknown field(s) {unknown}")
        if "style" not in data:
            raise PromptError("PromptConfig.style: missing")
        kwargs = {key: value for key, value in data.items() if key != "examples"}
        if "examples" in data:
            raw = data["examples"]
            if not isinstance(raw, list) or not all(isinstance(item, Mapping) for item in raw):
                raise PromptError("PromptConfig.examples: must be a list of {report_id, text} objects")
            for item in raw:
                if set(item) != {"report_id", "text"}:
                    raise PromptError(f"PromptConfig.examples: each example has exactly the keys report_id "
                                      f"and text, not {sorted(item)}")
            kwargs["examples"] = tuple(ExampleReport(item["report_id"], item["text"]) for item in raw)
        return cls(**kwargs)


def _mapping(what: str, data: Mapping[str, Any] | str) -> Mapping[str, Any]:
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as error:
            raise PromptError(f"{what}: not valid JSON ({error})") from None
    if not isinstance(data, Mapping):
        raise PromptError(f"{what}: must be a JSON object, not {type(data).__name__}")
    return data


def _same_report(first: str, second: str) -> bool:
    """Equal up to whitespace and case."""
    return " ".join(first.split()).casefold() == " ".join(second.split()).casefold()


def _chosen_examples(config: PromptConfig, exclude_report: str | None,
                     exclude_ids: Sequence[str]) -> list[ExampleReport]:
    chosen = [example for example in config.examples
              if example.report_id not in exclude_ids
              and not (exclude_report is not None and _same_report(example.text, exclude_report))]
    if len(chosen) < config.n_examples:
        raise PromptError(f"PromptConfig.examples: {len(chosen)} of {len(config.examples)} examples remain "
                          f"after excluding the target study, fewer than n_examples = {config.n_examples}; "
                          "give a larger pool")
    return chosen[:config.n_examples]


def render_prompt(config: PromptConfig, *, exclude_report: str | None = None,
                  exclude_ids: Sequence[str] = ()) -> str:
    """The prompt text of ``config``, placed after the visual tokens (layout: module docstring).

    Parameters
    ----------
    config
        The style and its content.
    exclude_report
        In-context only: the target study's own report. Examples with the same text (up to
        whitespace and case) are skipped and the next ones of the pool are used, so a study never
        sees its own report. Training passes it; inference has none.
    exclude_ids
        In-context only: report ids to skip in the same way (e.g. the target study's id).

    Raises
    ------
    PromptError
        Too few examples remain after exclusion, or the text exceeds ``config.max_chars``.
    """
    if isinstance(exclude_ids, str):
        exclude_ids = (exclude_ids,)
    lines = [IMAGE_PLACEHOLDER, config.system, config.instruction]
    if config.style is InstructionStyle.IN_CONTEXT:
        lines += ["", _IN_CONTEXT_LEAD]
        for example in _chosen_examples(config, exclude_report, exclude_ids):
            lines += ["", _EXAMPLE_HEADING, example.text]
    elif config.style is InstructionStyle.TEMPLATE:
        lines += ["", _TEMPLATE_LEAD, str(config.template)]
    elif config.style is InstructionStyle.KEYWORD:
        lines += ["", _KEYWORD_LEAD]
        lines += [f"- {category}: {', '.join(terms)}" for category, terms in config.keywords or ()]
    lines += ["", RESPONSE_CUE]
    prompt = "\n".join(lines) + "\n"
    if len(prompt) > config.max_chars:
        raise PromptError(f"PromptConfig.max_chars: the {config.style.value} prompt has {len(prompt)} "
                          f"characters, more than max_chars = {config.max_chars}")
    return prompt


def prompt_sha256(prompt: str) -> str:
    """Hex sha256 of the prompt's UTF-8 bytes."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def manifest_record(config: PromptConfig, *, training_mix: PromptMix | None = None) -> dict[str, Any]:
    """The ``prompt`` entry of a bundle manifest: the inference config and its prompt's sha256.

    The record holds the resolved config (skeleton and keyword lists written out, never "default"),
    so :func:`inference_prompt` needs neither the synthetic module nor the keyword list, and a
    change of either default cannot change a trained bundle's prompt. ``training_mix``, when given,
    is recorded for provenance; its inference config must be ``config``.
    """
    prompt = render_prompt(config)
    record: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "image_placeholder": IMAGE_PLACEHOLDER,
        "style": config.style.value,
        "config": config.to_json(),
        "prompt_sha256": prompt_sha256(prompt),
        "prompt_chars": len(prompt),
    }
    if training_mix is not None:
        if training_mix.inference_config != config:
            raise PromptError("training_mix: its inference config is not the config being recorded")
        record["training_mix"] = training_mix.to_json()
    return record


def inference_prompt(manifest_prompt_json: Mapping[str, Any] | str) -> str:
    """The exact prompt a bundle was trained for, rebuilt from its :func:`manifest_record`.

    Raises
    ------
    PromptError
        The record is malformed, of another format or image placeholder, or the rebuilt prompt's
        sha256 differs from ``prompt_sha256`` (the bundle and this code disagree on the prompt).
    """
    record = _mapping("manifest prompt record", manifest_prompt_json)
    if record.get("format") != MANIFEST_FORMAT:
        raise PromptError(f"manifest prompt record.format: {record.get('format')!r} is not "
                          f"{MANIFEST_FORMAT!r}")
    if record.get("image_placeholder") != IMAGE_PLACEHOLDER:
        raise PromptError(f"manifest prompt record.image_placeholder: {record.get('image_placeholder')!r} is "
                          f"not {IMAGE_PLACEHOLDER!r}")
    expected = record.get("prompt_sha256")
    if not isinstance(expected, str) or len(expected) != 64:
        raise PromptError(f"manifest prompt record.prompt_sha256: {expected!r} is not a hex sha256")
    config = PromptConfig.from_json(record.get("config", {}))
    if record.get("style") != config.style.value:
        raise PromptError(f"manifest prompt record.style: {record.get('style')!r} differs from the config's "
                          f"{config.style.value!r}")
    prompt = render_prompt(config)
    if prompt_sha256(prompt) != expected.lower():
        raise PromptError("manifest prompt record.prompt_sha256: the rebuilt prompt has sha256 "
                          f"{prompt_sha256(prompt)}, the manifest says {expected}")
    return prompt


class _Uniform(Protocol):
    """A seeded source of ``random() -> float`` in [0, 1): ``random.Random``, ``numpy.random.Generator``."""

    def random(self) -> float: ...


@dataclass(frozen=True)
class PromptMix:
    """Instruction styles with weights for training, and the one inference uses.

    Parameters
    ----------
    configs
        One :class:`PromptConfig` per style (each style at most once).
    weights
        Relative weights, one per config: finite, >= 0, and not all 0.
    inference_style
        The style the bundle's inference prompt uses; it must be in the mix. ``None`` means the
        style with the largest weight (the first of them on a tie).
    """

    configs: tuple[PromptConfig, ...]
    weights: tuple[float, ...]
    inference_style: InstructionStyle | None = None

    def __post_init__(self) -> None:
        if isinstance(self.configs, PromptConfig) or not isinstance(self.configs, Sequence) or not all(
                isinstance(config, PromptConfig) for config in self.configs):
            raise PromptError("PromptMix.configs: must be a sequence of PromptConfig")
        configs = tuple(self.configs)
        if not configs:
            raise PromptError("PromptMix.configs: the mix needs at least one config")
        styles = [config.style for config in configs]
        if len(set(styles)) != len(styles):
            raise PromptError(f"PromptMix.configs: each style may occur once, got "
                              f"{[style.value for style in styles]}")
        if isinstance(self.weights, (str, bytes)) or not isinstance(self.weights, Sequence):
            raise PromptError("PromptMix.weights: must be a sequence of numbers")
        weights = tuple(self.weights)
        if len(weights) != len(configs):
            raise PromptError(f"PromptMix.weights: {len(weights)} weights for {len(configs)} configs")
        for weight in weights:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                    or weight < 0:
                raise PromptError(f"PromptMix.weights: {weight!r} is invalid; each weight must be a finite "
                                  "number >= 0")
        if not math.fsum(weights) > 0:
            raise PromptError("PromptMix.weights: all weights are 0; at least one must be positive")
        weights = tuple(float(weight) for weight in weights)
        if self.inference_style is None:
            inference = styles[weights.index(max(weights))]
        else:
            try:
                inference = InstructionStyle(self.inference_style)
            except (ValueError, TypeError):
                raise PromptError(f"PromptMix.inference_style: {self.inference_style!r} is unknown") from None
            if inference not in styles:
                raise PromptError(f"PromptMix.inference_style: {inference.value!r} is not in the mix "
                                  f"{[s.value for s in styles]}")
        object.__setattr__(self, "configs", configs)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "inference_style", inference)

    @property
    def inference_config(self) -> PromptConfig:
        """The config of :attr:`inference_style`: the one the bundle manifest records."""
        return next(config for config in self.configs if config.style is self.inference_style)

    def probabilities(self) -> tuple[float, ...]:
        """The weights normalised to sum to 1."""
        total = math.fsum(self.weights)
        return tuple(weight / total for weight in self.weights)

    def sample(self, rng: _Uniform) -> PromptConfig:
        """One config drawn by weight with one ``rng.random()`` call (the same seed, the same draws)."""
        u = float(rng.random()) * math.fsum(self.weights)
        cumulative = 0.0
        for config, weight in zip(self.configs, self.weights, strict=True):
            cumulative += weight
            if u < cumulative and weight > 0:
                return config
        return next(config for config, weight in zip(self.configs[::-1], self.weights[::-1], strict=True)
                    if weight > 0)  # u rounded up to the total

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data: format, inference style and each config with its weight."""
        return {
            "format": MIX_FORMAT,
            "inference_style": str(self.inference_style),
            "components": [{"weight": weight, "config": config.to_json()}
                           for config, weight in zip(self.configs, self.weights, strict=True)],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> PromptMix:
        """The mix of :meth:`to_json` (a mapping or its JSON text); unknown keys raise."""
        data = _mapping("PromptMix", data)
        if set(data) != {"format", "inference_style", "components"}:
            raise PromptError(f"PromptMix: expected the keys format, inference_style, components; got "
                              f"{sorted(data)}")
        if data["format"] != MIX_FORMAT:
            raise PromptError(f"PromptMix.format: {data['format']!r} is not {MIX_FORMAT!r}")
        components = data["components"]
        if not isinstance(components, list) or not all(
                isinstance(item, Mapping) and set(item) == {"weight", "config"} for item in components):
            raise PromptError("PromptMix.components: must be a list of {weight, config} objects")
        return cls(tuple(PromptConfig.from_json(item["config"]) for item in components),
                   tuple(item["weight"] for item in components), data["inference_style"])
