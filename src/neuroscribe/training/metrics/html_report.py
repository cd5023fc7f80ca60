"""One self-contained HTML page for a person: FORTE by category, captioning metrics, the worst rows.

The page holds a bar chart of per-category FORTE precision/recall/F1 (a PNG drawn with matplotlib's
Agg canvas, embedded as a base64 data URI, so the page is one file), the metrics tables, the FORTE
mode/unit/aggregation in force, and the rows with the lowest F1 with their keyword outcome, taken as
is from each row category of ``ForteResult.to_json(rows=True)`` (FORTE compares by synonym group):

* *matched*: reference keywords whose group the candidate also has;
* *missed*: reference keywords whose group the candidate lacks (recall lost);
* *extra*: candidate keywords whose group the reference lacks (precision lost).

Every text from the input is HTML-escaped. The page is written to a temporary name, fsync'd and
moved into place, so a reader never sees half a page.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from neuroscribe.durable import atomic_file

#: File name used when ``write_html`` is given a directory.
DEFAULT_FILE_NAME = "evaluation.html"

#: Default number of worst rows shown.
DEFAULT_WORST_ROWS = 10

FOOTER = ("FORTE: Li et al., Nat Commun 16:2258 (2025); keyword lists MIT, charlierabea/FORTE. "
          "Captioning metrics: pycocoevalcap (BLEU, METEOR 1.5, ROUGE-L, CIDEr-D).")

_COLOURS = {"precision": "#4C72B0", "recall": "#DD8452", "f1": "#55A868"}  # colour-blind safe trio

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { margin-bottom: .2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
.sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.mean td { font-weight: bold; background: #fafafa; }
dl.settings { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; }
dl.settings dt { font-weight: bold; } dl.settings dd { margin: 0; }
.row { border: 1px solid #ddd; border-radius: 4px; padding: .6em 1em; margin: 1em 0; }
.texts { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
.text { white-space: pre-wrap; background: #f8f8f8; padding: .5em; font-size: .92em; border-radius: 3px; }
.missed { color: #b00020; } .extra { color: #8a5a00; } .matched { color: #1b6e20; }
.note { color: #555; font-size: .92em; } .warn { color: #8a5a00; }
footer { margin-top: 3em; color: #666; font-size: .85em; border-top: 1px solid #ddd; padding-top: .5em; }
img.chart { max-width: 100%; height: auto; }
"""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: object, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float):
        return f"{value:.{digits}f}"
    return _esc(value)


@contextlib.contextmanager
def _quiet_matplotlib() -> Iterator[None]:
    """Matplotlib logs (font cache, config dir) to the root logger, which writes to our stdout."""
    logger = logging.getLogger("matplotlib")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def category_chart_png(forte_json: Mapping[str, Any]) -> bytes:
    """PNG bytes: grouped bars of precision, recall and F1 per FORTE category, mean F1 dashed."""
    with _quiet_matplotlib():
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        categories = list(forte_json["categories"])
        figure = Figure(figsize=(8, 3.8), dpi=110)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        width = 0.26
        for k, measure in enumerate(("precision", "recall", "f1")):
            xs = [i + (k - 1) * width for i in range(len(categories))]
            values = [forte_json["categories"][c].get(measure) for c in categories]
            bars = axes.bar(xs, [v or 0.0 for v in values], width, label="F1" if measure == "f1" else measure,
                            color=_COLOURS[measure])
            for bar, value in zip(bars, values, strict=True):
                axes.annotate("n/a" if value is None else f"{value:.2f}",
                              (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                              xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=8)
        mean_f1 = forte_json.get("mean_f1")
        if mean_f1 is not None:
            axes.axhline(mean_f1, color="#333", linestyle="--", linewidth=1, zorder=0,
                         label=f"mean F1 of categories = {mean_f1:.3f}")
        axes.set_xticks(range(len(categories)), categories)
        axes.set_ylim(0, 1.12)
        axes.set_ylabel("score (0-1)")
        axes.set_title(f"FORTE by category: mode {forte_json.get('mode')}, unit {forte_json.get('unit')}, "
                       f"{forte_json.get('n_rows')} rows", fontsize=10)
        axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4, fontsize=8, frameon=False)
        axes.spines[["top", "right"]].set_visible(False)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", metadata={"Software": None})  # no version stamp: deterministic
    return buffer.getvalue()


def row_f1(row: Mapping[str, Any]) -> float | None:
    """Mean of the categories' F1 that are defined for the row (None if none is)."""
    values = [c.get("f1") for c in (row.get("categories") or {}).values()]
    defined = [float(v) for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def worst_rows(forte_json: Mapping[str, Any], n: int = DEFAULT_WORST_ROWS) -> list[Mapping[str, Any]]:
    """The ``n`` scored rows with the lowest :func:`row_f1`, lowest first (ties keep input order).

    Rows deleted by negation removal and rows with no defined F1 are not ranked.
    """
    rows = [r for r in forte_json.get("rows") or [] if not r.get("negation_removed")]
    ranked = [(f1, i, r) for i, r in enumerate(rows) if (f1 := row_f1(r)) is not None]
    ranked.sort(key=lambda item: (item[0], item[1]))
    return [r for _f1, _i, r in ranked[:n]]


def _forte_table(forte_json: Mapping[str, Any]) -> str:
    lines = ["<table><tr><th>Category</th><th>Precision</th><th>Recall</th><th>F1</th><th>Rows</th></tr>"]
    for name, values in forte_json["categories"].items():
        lines.append(
            f"<tr><td>{_esc(name)}</td><td class='num'>{_fmt(values.get('precision'))}</td>"
            f"<td class='num'>{_fmt(values.get('recall'))}</td><td class='num'>{_fmt(values.get('f1'))}</td>"
            f"<td class='num'>{_esc(values.get('n_rows', ''))}</td></tr>"
        )
    lines.append(f"<tr class='mean'><td>mean of the four F1</td><td></td><td></td>"
                 f"<td class='num'>{_fmt(forte_json.get('mean_f1'))}</td><td></td></tr></table>")
    return "\n".join(lines)


def _captioning_section(captioning_json: Mapping[str, Any] | None) -> str:
    if captioning_json is None:
        return "<h2>Captioning metrics</h2>\n<p class='note'>Not computed (--no-captioning).</p>"
    metrics = captioning_json.get("metrics") or list(captioning_json.get("corpus", {}))
    corpus = captioning_json.get("corpus", {})
    means = captioning_json.get("per_report_mean", {})
    scales = captioning_json.get("scales", {})
    definitions = captioning_json.get("corpus_definitions", {})
    lines = [
        "<h2>Captioning metrics</h2>",
        f"<p class='note'>{_esc(captioning_json.get('library', ''))}; "
        f"{_esc(captioning_json.get('preprocessing', ''))}; {_esc(captioning_json.get('n_pairs', ''))} "
        "report pairs. <b>Corpus</b> is the library's set-level value; <b>mean of per-report</b> is the "
        "plain mean of each report's own score (the original evaluation stored only these).</p>",
        "<table><tr><th>Metric</th><th>Corpus</th><th>Mean of per-report</th><th>Scale</th></tr>",
    ]
    for metric in metrics:
        scale = str(scales.get(metric, ""))
        lines.append(
            f"<tr><td>{_esc(metric)}</td><td class='num'>{_fmt(corpus.get(metric), 4)}</td>"
            f"<td class='num'>{_fmt(means.get(metric), 4)}</td><td>{_esc(scale.split(' (')[0])}</td></tr>"
        )
    lines.append("</table>")
    notes: dict[str, list[str]] = {}  # note text -> metrics it applies to (BLEU-1..4 share one)
    for metric in metrics:
        if metric in definitions:
            notes.setdefault(str(definitions[metric]), []).append(metric)
        if " (" in str(scales.get(metric, "")):
            notes.setdefault("scale " + str(scales[metric]), []).append(metric)
    lines.append("<ul class='note'>")
    lines += [f"<li><b>{_esc(', '.join(names))}</b>: {_esc(text)}</li>" for text, names in notes.items()]
    lines.append("</ul>")
    lines += [f"<p class='warn'>{_esc(w)}</p>" for w in captioning_json.get("warnings") or []]
    return "\n".join(lines)


def _settings(forte_json: Mapping[str, Any]) -> str:
    rows = f"{forte_json.get('n_pairs')} report pairs, {forte_json.get('n_rows')} scored rows"
    removed = forte_json.get("n_rows_removed_by_negation")
    if removed is None:
        removed = sum(1 for r in forte_json.get("rows") or [] if r.get("negation_removed"))
    if removed:
        rows += f" ({removed} more removed by the negation filter)"
    items = [
        ("Mode", forte_json.get("mode")),
        ("Unit", forte_json.get("unit")),
        ("Sentence encoder", forte_json.get("encoder")),
        ("Sentence splitter", forte_json.get("sentence_splitter")),
        ("Sentence pairing", forte_json.get("pairing")),
        ("Aggregation", forte_json.get("aggregation")),
        ("How", forte_json.get("aggregation_description")),
        ("Negation", forte_json.get("negation")),
        ("Rows", rows),
    ]
    before = forte_json.get("before_negation_removal")
    if isinstance(before, Mapping) and removed:
        items.append(("Mean F1 before negation removal", _fmt(before.get("mean_f1"))))
    macro = forte_json.get("macro_over_pairs")
    if isinstance(macro, Mapping):
        items.append(("Mean F1, macro over pairs", f"{_fmt(macro.get('mean_f1'))} "
                                                   f"({macro.get('description', '')})"))
    body = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in items if v not in (None, ""))
    return f"<dl class='settings'>{body}</dl>"


def _unpaired_section(forte_json: Mapping[str, Any]) -> str:
    """Sentence unit: candidate sentences no reference sentence chose, and what they would cost."""
    unpaired = forte_json.get("unpaired_candidates")
    if not isinstance(unpaired, Mapping):
        return ""
    lines = [f"<h3>Unpaired candidate sentences: {_esc(unpaired.get('count', 0))}</h3>",
             f"<p class='note'>{_esc(unpaired.get('description', ''))}</p>"]
    categories = unpaired.get("categories")
    if isinstance(categories, Mapping) and categories:
        lines.append("<table><tr><th>Category</th><th>False positives</th><th>Precision with unpaired</th>"
                     "<th>F1 with unpaired</th><th>Their keywords</th></tr>")
        for name, values in categories.items():
            keywords = values.get("keywords") or {}
            listed = ", ".join(f"{k} ({n})" if n != 1 else str(k) for k, n in keywords.items())
            lines.append(
                f"<tr><td>{_esc(name)}</td><td class='num'>{_esc(values.get('false_positives', ''))}</td>"
                f"<td class='num'>{_fmt(values.get('precision_with_unpaired'))}</td>"
                f"<td class='num'>{_fmt(values.get('f1_with_unpaired'))}</td>"
                f"<td>{_esc(listed) or '&mdash;'}</td></tr>"
            )
        lines.append("</table>")
    return "\n".join(lines)


def _text(value: object) -> str:
    text = "" if value is None else str(value)
    return _esc(text) if text.strip() else "<i class='note'>(empty)</i>"


def _keywords(words: Sequence[str], css: str) -> str:
    return f"<span class='{css}'>{_esc(', '.join(words))}</span>" if words else "&mdash;"


def _row_block(rank: int, row: Mapping[str, Any], per_report: Mapping[str, Mapping[str, Any]]) -> str:
    pair_id = row.get("pair_id", "")
    heading = f"{rank}. {_esc(pair_id)} &mdash; row F1 {_fmt(row_f1(row))}"
    if row.get("similarity") is not None:
        heading += f" &middot; sentence similarity {_fmt(row.get('similarity'))}"
    parts = [f"<div class='row'><h3>{heading}</h3>"]
    scores = per_report.get(str(pair_id))
    if scores:
        listed = " &middot; ".join(f"{_esc(m)} {_fmt(v)}" for m, v in scores.items()
                                   if m not in ("pair_id", "reference_tokens", "candidate_tokens"))
        parts.append(f"<p class='note'>Captioning scores of this report pair (whole reports): {listed}</p>")
    parts.append(
        "<div class='texts'>"
        f"<div><b>Reference</b><div class='text'>{_text(row.get('reference'))}</div></div>"
        f"<div><b>Candidate</b><div class='text'>{_text(row.get('candidate'))}</div></div></div>"
    )
    categories = row.get("categories") or {}
    negation = any("reference_negated" in values for values in categories.values())
    parts.append("<table><tr><th>Category</th><th>P</th><th>R</th><th>F1</th><th>Matched</th>"
                 "<th>Missed (in reference, not candidate)</th>"
                 "<th>Extra (in candidate, not reference)</th>"
                 + ("<th>Negated, not scored (reference / candidate)</th>" if negation else "") + "</tr>")
    for name, values in categories.items():
        negated = ""
        if negation:
            negated = (f"<td>{_keywords(values.get('reference_negated') or [], 'note')} / "
                       f"{_keywords(values.get('candidate_negated') or [], 'note')}</td>")
        parts.append(
            f"<tr><td>{_esc(name)}</td><td class='num'>{_fmt(values.get('precision'))}</td>"
            f"<td class='num'>{_fmt(values.get('recall'))}</td><td class='num'>{_fmt(values.get('f1'))}</td>"
            f"<td>{_keywords(values.get('matched') or [], 'matched')}</td>"
            f"<td>{_keywords(values.get('missed') or [], 'missed')}</td>"
            f"<td>{_keywords(values.get('extra') or [], 'extra')}</td>{negated}</tr>"
        )
    parts.append("</table></div>")
    return "\n".join(parts)


def _worst_section(forte_json: Mapping[str, Any], captioning_json: Mapping[str, Any] | None,
                   n: int) -> str:
    if forte_json.get("rows") is None:
        return "<h2>Worst rows</h2>\n<p class='note'>The FORTE result has no rows to show.</p>"
    rows = worst_rows(forte_json, n)
    n_ranked = len(worst_rows(forte_json, len(forte_json["rows"])))
    per_report = {str(r.get("pair_id")): r for r in (captioning_json or {}).get("per_report") or []}
    head = (f"<h2>Worst rows ({len(rows)} of {n_ranked} ranked)</h2>\n<p class='note'>Lowest row F1 first "
            "(mean of the "
            "categories defined for the row; a category is undefined when neither text has a keyword of "
            "it). Keywords are as FORTE extracted them; <span class='missed'>missed</span> ones cost "
            "recall, <span class='extra'>extra</span> ones cost precision.</p>")
    if not rows:
        return head + "\n<p class='note'>No row has a defined F1.</p>"
    return "\n".join([head, *(_row_block(i + 1, r, per_report) for i, r in enumerate(rows))])


def render_html(forte_json: Mapping[str, Any], captioning_json: Mapping[str, Any] | None = None, *,
                title: str = "NeuroScribe evaluation", source: str | None = None,
                worst: int = DEFAULT_WORST_ROWS) -> str:
    """The page as a string (see :func:`write_html`)."""
    png = base64.b64encode(category_chart_png(forte_json)).decode("ascii")
    categories = ", ".join(
        f"{name} F1 {_fmt(values.get('f1'), 2)}" for name, values in forte_json["categories"].items()
    )
    subtitle = f"{forte_json.get('n_pairs')} report pairs"
    if source:
        subtitle = f"{_esc(source)} &middot; {subtitle}"
    return "\n".join([
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        f"<p class='sub'>{subtitle}. FORTE mean F1 of the four categories: "
        f"<b>{_fmt(forte_json.get('mean_f1'))}</b>.</p>",
        "<h2>FORTE</h2>",
        _settings(forte_json),
        f"<img class='chart' src='data:image/png;base64,{png}' "
        f"alt='FORTE precision, recall and F1 per category: {_esc(categories)}'>",
        _forte_table(forte_json),
        _unpaired_section(forte_json),
        _captioning_section(captioning_json),
        _worst_section(forte_json, captioning_json, worst),
        f"<footer>{_esc(FOOTER)}</footer>",
        "</body></html>",
        "",
    ])


def _atomic_write(path: Path, text: str) -> None:
    with atomic_file(path, "w") as handle:
        handle.write(text)


def html_target(out: str | os.PathLike[str]) -> Path:
    """The file :func:`write_html` writes for ``out``: ``out`` itself if it ends in ``.html``/``.htm``,
    else ``out/evaluation.html``."""
    target = Path(out)
    return target if target.suffix.lower() in (".html", ".htm") else target / DEFAULT_FILE_NAME


def write_html(out: str | os.PathLike[str], forte_json: Mapping[str, Any],
               captioning_json: Mapping[str, Any] | None = None, *, title: str = "NeuroScribe evaluation",
               source: str | None = None, worst: int = DEFAULT_WORST_ROWS) -> Path:
    """Write the evaluation page and return its path.

    Parameters
    ----------
    out
        A file ending in ``.html``/``.htm``, or a directory (created if needed) that receives
        ``evaluation.html``.
    forte_json
        ``ForteResult.to_json(rows=True)``; without ``rows`` the worst-rows section says so.
    captioning_json
        The result of :func:`neuroscribe.training.metrics.captioning.captioning_metrics`, or None.
    title
        Page title and heading.
    source
        Shown under the title, e.g. the pairs file name.
    worst
        How many of the lowest-F1 rows to show.
    """
    target = html_target(out)
    _atomic_write(target, render_html(forte_json, captioning_json, title=title, source=source, worst=worst))
    return target
