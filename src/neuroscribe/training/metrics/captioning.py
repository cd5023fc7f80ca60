"""Captioning (NLG) metrics of candidate reports against references, as the BrainGPT evaluation did.

BLEU-1..4, METEOR 1.5, ROUGE-L and CIDEr-D come from pycocoevalcap, after its pre-processing: each
report on one line, Stanford PTBTokenizer (CoreNLP 3.4.1, lower-cased), then removal of
pycocoevalcap's punctuation tokens (ALGORITHM.md section 9). SPICE is never run: it downloads
CoreNLP 3.6.0 at first use, and nothing may be downloaded here.

The Python scorers (``Bleu``, ``Rouge``, ``Cider``) are pycocoevalcap's own classes. The two Java
steps run the jars bundled in the pycocoevalcap wheel with the command lines and line protocol of
its wrappers, through small clients of our own, because the wrappers

* write their temporary file into site-packages (read-only for a service user),
* print to stdout (our stdout carries the JSON result),
* hold a lock forever when METEOR dies mid-way, which hangs the interpreter at exit.

The only change to the Java command lines is ``-Dfile.encoding=UTF-8``, so that non-ASCII text
(degree and multiplication signs) is read the same whatever the locale. Scores are identical
to ``COCOEvalCap``'s.

Corpus values versus per-report values:

* BLEU-n (corpus): n-gram matches and lengths summed over all reports, one brevity penalty;
  per report: sentence BLEU of that report (the library's ``tiny``/``small`` smoothing).
* METEOR (corpus): the jar's ``EVAL`` over the statistics of all reports; per report: each
  report's segment score.
* ROUGE-L and CIDEr-D: the corpus value *is* the mean of the per-report values.
* CIDEr-D's IDF comes from the references of the evaluated set, so a per-report CIDEr-D depends
  on which other reports were evaluated with it. With one pair every n-gram's IDF is
  ``log(1) - log(1) = 0`` and CIDEr-D is 0 for any candidate; it is reported as ``None``.

The original evaluation stored per-study scores x100 (BLEU, METEOR, ROUGE-L) and CIDEr-D x1000 in a
column named ``CIDEr_R``; here every value is on the library's own scale, stated in ``"scales"``.
"""

from __future__ import annotations

import contextlib
import io
import math
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol

from neuroscribe.errors import NeuroScribeError

#: Metric names in output order.
METRICS: tuple[str, ...] = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")

#: The scale of each metric as reported (the library's own).
SCALES: dict[str, str] = {
    "BLEU-1": "0-1",
    "BLEU-2": "0-1",
    "BLEU-3": "0-1",
    "BLEU-4": "0-1",
    "METEOR": "0-1",
    "ROUGE-L": "0-1",
    "CIDEr-D": (
        "0-10 (pycocoevalcap's Cider is CIDEr-D: x10, Gaussian length penalty sigma 6, clipped counts; "
        "the BrainGPT paper's 'CIDEr-R' is this x1000, its BLEU/METEOR/ROUGE-L are these x100)"
    ),
}

#: How the corpus value of each metric is formed, and how it relates to the per-report mean.
CORPUS_DEFINITIONS: dict[str, str] = {
    **{
        f"BLEU-{n}": (
            "corpus BLEU: clipped n-gram matches and lengths summed over all reports, one brevity "
            "penalty ('closest' reference length); differs from the mean of per-report sentence BLEU"
        )
        for n in range(1, 5)
    },
    "METEOR": (
        "METEOR 1.5 over the pooled statistics of all reports (the jar's EVAL line); differs from the "
        "mean of per-report segment scores"
    ),
    "ROUGE-L": "mean of per-report ROUGE-L (beta 1.2); equal to per_report_mean by definition",
    "CIDEr-D": (
        "mean of per-report CIDEr-D with IDF from the references of this set; equal to per_report_mean "
        "by definition"
    ),
}

#: What replaces an empty text, as the original evaluation replaced NaN cells ("" after tokenizing).
EMPTY_TEXT_SUBSTITUTE = " "

#: Limit for one PTBTokenizer run (it tokenizes thousands of reports a second).
_TOKENIZER_TIMEOUT_S = 600

#: Debian/Ubuntu package that provides ``java`` for the two jars.
JAVA_PACKAGE = "default-jre-headless"


class CaptioningError(NeuroScribeError):
    """A captioning metric cannot be computed (Java missing, a jar failed, no pairs)."""


class JavaNotFoundError(CaptioningError):
    """``java`` is not on PATH; the PTB tokenizer and METEOR need it."""


class PairLike(Protocol):
    """What the metrics read from a pair (:class:`neuroscribe.training.metrics.forte.Pair`)."""

    @property
    def pair_id(self) -> str:
        """Identifier of the reference/candidate pair."""

    @property
    def reference(self) -> str:
        """Reference report text."""

    @property
    def candidate(self) -> str:
        """Candidate (generated) report text."""


def java_executable() -> str:
    """Path of ``java``; raises :class:`JavaNotFoundError` naming the package to install."""
    path = shutil.which("java")
    if path is None:
        raise JavaNotFoundError(
            "java not found on PATH: the captioning metrics run the Stanford PTBTokenizer and METEOR "
            f"jars bundled with pycocoevalcap. Install a Java runtime (Debian/Ubuntu: "
            f"'apt-get install {JAVA_PACKAGE}'), or pass --no-captioning to score FORTE only"
        )
    return path


def _package_dir() -> Path:
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb_module

    return Path(ptb_module.__file__).resolve().parent.parent


def _one_line(text: str) -> str:
    """The text on one line: every line break and run of whitespace becomes one space.

    pycocoevalcap replaces only ``\\n``; a ``\\r`` or U+2028 would split a report across two lines of
    the tokenizer's input and shift every later report by one.
    """
    return " ".join(text.split())


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """Tokenize like pycocoevalcap's ``PTBTokenizer``: one report per line, lower-cased, punctuation
    tokens removed; returns one space-joined string per input text (``""`` for an empty one)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, STANFORD_CORENLP_3_4_1_JAR

    java = java_executable()
    jar = _package_dir() / "tokenizer" / STANFORD_CORENLP_3_4_1_JAR
    if not texts:
        return []
    with tempfile.TemporaryDirectory(prefix="neuroscribe-ptb-") as tmp:
        source = Path(tmp) / "reports.txt"
        source.write_text("\n".join(_one_line(t) for t in texts), encoding="utf-8")
        cmd = [java, "-Dfile.encoding=UTF-8", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", str(source)]
        try:
            done = subprocess.run(cmd, capture_output=True, check=False, timeout=_TOKENIZER_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise CaptioningError(
                f"PTBTokenizer ({jar.name}) did not finish within {exc.timeout:.0f} s"
            ) from exc
    if done.returncode != 0:
        raise CaptioningError(
            f"PTBTokenizer ({jar.name}) exited with {done.returncode}: "
            f"{done.stderr.decode('utf-8', 'replace').strip()[-2000:]}"
        )
    lines = done.stdout.decode("utf-8", "replace").split("\n")
    if len(lines) != len(texts):
        raise CaptioningError(f"PTBTokenizer returned {len(lines)} lines for {len(texts)} reports")
    punctuation = set(PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in punctuation) for line in lines]


class MeteorScorer:
    """One METEOR 1.5 process (``meteor-1.5.jar -l en -norm``), reusable for many scorings.

    Starting it takes several seconds (it loads the paraphrase table), so hold one for a batch of
    evaluations; use it as a context manager or call :meth:`close`.
    """

    def __init__(self) -> None:
        from pycocoevalcap.meteor.meteor import METEOR_JAR

        java = java_executable()
        meteor_dir = _package_dir() / "meteor"
        # stderr to a file: a pipe nobody reads could fill up and block the JVM; closed in close()
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
            [java, "-Dfile.encoding=UTF-8", "-jar", "-Xmx2G", METEOR_JAR, "-", "-", "-stdio", "-l", "en",
             "-norm"],
            cwd=meteor_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
        )

    def __enter__(self) -> MeteorScorer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop the Java process (idempotent)."""
        process, self._process = getattr(self, "_process", None), None
        if process is not None:
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            process.kill()
            process.wait()
        stderr = getattr(self, "_stderr", None)
        if stderr is not None and not stderr.closed:
            stderr.close()

    def _exchange(self, line: str, n_answers: int) -> list[str]:
        process = self._process
        if process is None:
            raise CaptioningError("METEOR scorer is closed")
        assert process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write(line.encode("utf-8") + b"\n")
            process.stdin.flush()
            answers = [process.stdout.readline().decode("utf-8", "replace").strip()
                       for _ in range(n_answers)]
        except OSError as exc:  # BrokenPipeError: the JVM has gone
            raise self._died() from exc
        if any(not a for a in answers):
            raise self._died()
        return answers

    def _died(self) -> CaptioningError:
        self._stderr.seek(0)
        detail = self._stderr.read().decode("utf-8", "replace").strip()[-2000:]
        self.close()
        return CaptioningError(f"METEOR (meteor-1.5.jar) stopped answering: {detail or 'no message'}")

    def score(self, references: Sequence[str], candidates: Sequence[str]) -> tuple[float, list[float]]:
        """Corpus METEOR and one score per report, for tokenized texts (pycocoevalcap's protocol)."""
        if len(references) != len(candidates):
            raise ValueError(f"{len(references)} references but {len(candidates)} candidates")
        stats = []
        for reference, candidate in zip(references, candidates, strict=True):
            # as pycocoevalcap's Meteor._stat; '|||' is the jar's field separator, on both sides
            hypothesis = candidate.replace("|||", "").replace("  ", " ")
            stats.extend(self._exchange(f"SCORE ||| {reference.replace('|||', '')} ||| {hypothesis}", 1))
        answers = self._exchange(" ||| ".join(["EVAL", *stats]), len(stats) + 1)
        try:
            values = [float(a) for a in answers]
        except ValueError as exc:
            raise CaptioningError(f"METEOR answered something that is not a number: {exc}") from exc
        return values[-1], values[:-1]


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """pycocoevalcap's BLEU prints its totals; stdout is reserved for our JSON."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _finite(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise CaptioningError(f"a captioning metric came out as {number}")
    return number


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def captioning_metrics(pairs: Sequence[PairLike], *, meteor: MeteorScorer | None = None) -> dict[str, Any]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of the candidates against the references.

    Parameters
    ----------
    pairs
        Reference/candidate report pairs (``pair_id``, ``reference``, ``candidate``); order is kept.
    meteor
        A running :class:`MeteorScorer` to reuse; by default one is started and stopped here.

    Returns
    -------
    dict
        JSON-ready: ``corpus`` and ``per_report_mean`` per metric, ``per_report`` (one entry per pair,
        in input order), ``scales``, ``corpus_definitions``, ``empty_candidates``,
        ``empty_references`` and ``warnings``. See docs/evaluation.md.
    """
    if not pairs:
        raise CaptioningError("no pairs to score")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = [str(p.pair_id) for p in pairs]
    empty_candidates = [pid for pid, p in zip(ids, pairs, strict=True) if not (p.candidate or "").strip()]
    empty_references = [pid for pid, p in zip(ids, pairs, strict=True) if not (p.reference or "").strip()]
    references = ptb_tokenize([p.reference or EMPTY_TEXT_SUBSTITUTE for p in pairs])
    candidates = ptb_tokenize([p.candidate or EMPTY_TEXT_SUBSTITUTE for p in pairs])
    # pycocoevalcap's dict shape, keyed by position so that repeated ids cannot collide
    gts = {i: [ref] for i, ref in enumerate(references)}
    res = {i: [cand] for i, cand in enumerate(candidates)}

    per_metric: dict[str, list[float | None]] = {}
    corpus: dict[str, float | None] = {}
    with _quiet_stdout():
        bleu_corpus, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        corpus[f"BLEU-{n + 1}"] = _finite(bleu_corpus[n])
        per_metric[f"BLEU-{n + 1}"] = [_finite(v) for v in bleu_each[n]]

    own_meteor = meteor is None
    scorer = MeteorScorer() if meteor is None else meteor
    try:
        meteor_corpus, meteor_each = scorer.score(references, candidates)
    finally:
        if own_meteor:
            scorer.close()
    corpus["METEOR"] = _finite(meteor_corpus)
    per_metric["METEOR"] = [_finite(v) for v in meteor_each]

    rouge_corpus, rouge_each = Rouge().compute_score(gts, res)
    corpus["ROUGE-L"] = _finite(rouge_corpus)
    per_metric["ROUGE-L"] = [_finite(v) for v in rouge_each]

    warnings: list[str] = []
    if len(pairs) == 1:
        corpus["CIDEr-D"] = None
        per_metric["CIDEr-D"] = [None]
        warnings.append("CIDEr-D is null: with a single pair every n-gram's IDF is log(1) - log(1) = 0, "
                        "so CIDEr-D would be 0 for any candidate; score a set of reports")
    elif not any(references):
        corpus["CIDEr-D"] = None
        per_metric["CIDEr-D"] = [None] * len(pairs)
        warnings.append("CIDEr-D is null: every reference is empty, so there are no n-grams for its IDF")
    else:
        cider_corpus, cider_each = Cider().compute_score(gts, res)
        corpus["CIDEr-D"] = _finite(cider_corpus)
        per_metric["CIDEr-D"] = [_finite(v) for v in cider_each]
    if empty_candidates:
        warnings.append(f"{len(empty_candidates)} empty candidate(s) scored as an empty report "
                        f"(every metric 0 for them): {', '.join(empty_candidates)}")
    if empty_references:
        warnings.append(f"{len(empty_references)} empty reference(s): {', '.join(empty_references)}")

    per_report = [
        {
            "pair_id": pid,
            "reference_tokens": len(references[i].split()),
            "candidate_tokens": len(candidates[i].split()),
            **{metric: per_metric[metric][i] for metric in METRICS},
        }
        for i, pid in enumerate(ids)
    ]
    return {
        "library": "pycocoevalcap 1.2 (SPICE not run)",
        "preprocessing": ("whole reports on one line; Stanford PTBTokenizer (CoreNLP 3.4.1) lower-cased; "
                          "pycocoevalcap's punctuation tokens removed"),
        "n_pairs": len(pairs),
        "metrics": list(METRICS),
        "scales": dict(SCALES),
        "corpus": corpus,
        "per_report_mean": {metric: _mean(per_metric[metric]) for metric in METRICS},
        "corpus_definitions": dict(CORPUS_DEFINITIONS),
        "per_report_mean_definition": "plain mean over reports of the per-report values in per_report",
        "empty_candidates": empty_candidates,
        "empty_references": empty_references,
        "warnings": warnings,
        "per_report": per_report,
    }
