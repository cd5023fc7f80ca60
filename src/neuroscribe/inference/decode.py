"""Decode loops over a KV-cache decoder: greedy and beam search, stop ids, length limit, repetition guard.

The loops know nothing of ONNX Runtime: they drive a :class:`StepDecoder` (prefill, one-token steps,
cache row selection) and embed token ids with a numpy lookup table, so tests can drive them with a
scripted decoder. Positions follow the export contract: a prefix of ``L`` embeddings (visual tokens
then prompt, no padding) sits at positions ``0..L-1``; generated token ``i`` is fed at ``L + i``.

Stopping, per series:

* ``eos``: the token is one of ``stop_ids`` (the stop token is not part of the report);
* ``repetition``: the generated tail is one span of 1..``max_period`` tokens repeated
  ``repeat_guard`` times in a row (a decoding loop). The report keeps the first copy of the span
  and the repeats are cut. This only stops generation; it never changes which token is picked,
  so a report that does not loop is token-for-token the plain greedy one;
* ``length``: ``max_new_tokens`` tokens were generated.

``no_repeat_ngram_size`` (off by default) is the other guard: it bans a token that would repeat an
n-gram already in the generated text (prompt excluded), as Hugging Face's option of that name does.
It changes the output, so it is opt-in.

Beam search keeps ``num_beams`` live beams per series and up to ``num_beams`` finished hypotheses,
ranked by ``sum(log p) / n ** length_penalty`` with ``n`` the generated length, stop token included
(``length_penalty`` 0 ranks by the plain sum). A finished candidate is kept only if it ranks among
the best ``num_beams`` candidates of its step; a series is done once it has ``num_beams``
hypotheses and the best live beam can no longer beat the worst of them (Hugging Face's
``early_stopping=False`` rule). Scores are float64 log-softmax values of the decoder's float32 logits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

__all__ = [
    "DecodeSettings",
    "Hypothesis",
    "StepDecoder",
    "banned_tokens",
    "beam_search",
    "decode",
    "find_loop",
    "greedy",
]

StopReason = Literal["eos", "length", "repetition"]


class StepDecoder(Protocol):
    """A decoder with a KV cache held inside it, one row per sequence."""

    def start(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Drop any cache, run the prefix ``embeds`` (n, L, d); return the last position's logits (n, V)."""
        ...

    def step(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Run ``embeds`` (n, 1, d) after the cache; ``mask`` (n, P + 1); return logits (n, V)."""
        ...

    def select(self, rows: np.ndarray) -> None:
        """Keep cache rows ``rows`` (int64, may repeat), in that order (beam reorder, finished rows out)."""
        ...


@dataclass(frozen=True)
class DecodeSettings:
    """How to decode; see the module docstring for each rule."""

    max_new_tokens: int
    stop_ids: frozenset[int] = frozenset()
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # 0: off
    repeat_guard: int = 4  # a span repeated this many times in a row stops the series; 0: off
    max_period: int = 32  # longest span (tokens) the repetition guard looks for

    def __post_init__(self) -> None:
        """Reject values that cannot decode, naming them."""
        for name, low in (("max_new_tokens", 1), ("num_beams", 1), ("no_repeat_ngram_size", 0),
                          ("repeat_guard", 0), ("max_period", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"DecodeSettings.{name} must be an int >= {low}, got {value!r}")
        if self.repeat_guard == 1:
            raise ValueError("DecodeSettings.repeat_guard must be 0 (off) or >= 2, got 1")
        object.__setattr__(self, "stop_ids", frozenset(int(i) for i in self.stop_ids))


@dataclass
class Hypothesis:
    """One decoded sequence."""

    tokens: list[int]  # the report's tokens: no stop token, repeats of a loop cut
    n_tokens: int  # tokens the decoder generated for it, stop token and cut repeats included
    stopped_by: StopReason
    logprob: float  # sum of the log-probabilities of those n_tokens tokens
    finished: float = field(default=0.0)  # clock() when the series was done

    def score(self, length_penalty: float) -> float:
        """Beam ranking score: ``logprob / n_tokens ** length_penalty``."""
        return self.logprob / max(self.n_tokens, 1) ** length_penalty


def find_loop(tokens: Sequence[int], repeats: int, max_period: int) -> int | None:
    """If ``tokens`` ends with one span repeated ``repeats`` times, the length to keep (one copy).

    Checks spans of 1..``max_period`` tokens, shortest first; None when there is no such loop.
    """
    if repeats < 2:
        return None
    n = len(tokens)
    for period in range(1, max_period + 1):
        span = period * repeats
        if span > n:
            break
        tail = list(tokens[n - period:])
        if all(list(tokens[n - (k + 1) * period:n - k * period]) == tail for k in range(1, repeats)):
            return n - span + period
    return None


def banned_tokens(tokens: Sequence[int], size: int) -> list[int]:
    """Tokens that would complete an n-gram (n = ``size``) already present in ``tokens``."""
    if size <= 0 or len(tokens) < size - 1:
        return []
    if size == 1:
        return sorted(set(tokens))
    head = tuple(tokens[len(tokens) - size + 1:])
    return sorted({tokens[i + size - 1] for i in range(len(tokens) - size + 1)
                   if tuple(tokens[i:i + size - 1]) == head})


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis of float32 logits (n, V)."""
    x = logits.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    return x - (top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True)))


def _prefix_inputs(prefix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, length = prefix.shape[:2]
    mask = np.ones((n, length), np.int64)  # (n, L)
    positions = np.broadcast_to(np.arange(length, dtype=np.int64), (n, length)).copy()  # (n, L)
    return mask, positions


def greedy(dec: StepDecoder, table: np.ndarray, prefix: np.ndarray, settings: DecodeSettings,
           clock: Callable[[], float] = time.perf_counter) -> list[Hypothesis]:
    """Greedy decoding of every row of ``prefix`` (B, L, d); one :class:`Hypothesis` per row.

    The token is the first index of the largest float32 logit, as ``CvitModel.generate`` and
    ``ort_greedy`` pick it. Finished rows leave the batch (``dec.select``), so a long report does
    not make the finished ones pay for its steps.
    """
    batch, length = prefix.shape[:2]
    mask, positions = _prefix_inputs(prefix)
    logits = dec.start(prefix, mask, positions)  # (B, V)
    rows = np.arange(batch)  # series held by each cache row
    history: list[list[int]] = [[] for _ in range(batch)]
    logprob = np.zeros(batch)
    results: list[Hypothesis | None] = [None] * batch
    total = length
    for step in range(settings.max_new_tokens):
        if settings.no_repeat_ngram_size:
            logits = logits.copy()
            for i, r in enumerate(rows):
                logits[i, banned_tokens(history[r], settings.no_repeat_ngram_size)] = -np.inf
        nxt = logits.argmax(axis=-1)  # (n,)
        picked = _log_softmax(logits)[np.arange(len(rows)), nxt]  # (n,)
        keep: list[int] = []
        now = clock()
        for i, r in enumerate(rows):
            token = int(nxt[i])
            history[r].append(token)
            logprob[r] += picked[i]
            done = _stop(history[r], token, step, settings)
            if done is None:
                keep.append(i)
            else:
                reason, cut = done
                results[r] = Hypothesis(history[r][:cut], len(history[r]), reason, float(logprob[r]), now)
        if not keep:
            break
        if len(keep) < len(rows):
            dec.select(np.asarray(keep, dtype=np.int64))
            rows, nxt = rows[keep], nxt[keep]
        total += 1
        n = len(rows)
        logits = dec.step(np.asarray(table[nxt], dtype=prefix.dtype)[:, None],  # (n, 1, d)
                          np.ones((n, total), np.int64), np.full((n, 1), total - 1, np.int64))
    assert all(r is not None for r in results), "every row ends by stop id, repetition or length"
    return [r for r in results if r is not None]


def _stop(history: list[int], token: int, step: int,
          settings: DecodeSettings) -> tuple[StopReason, int] | None:
    """``(reason, tokens to keep)`` if the sequence ends with ``token`` at ``step``, else None."""
    if token in settings.stop_ids:
        return "eos", len(history) - 1
    if settings.repeat_guard:
        cut = find_loop(history, settings.repeat_guard, settings.max_period)
        if cut is not None:
            return "repetition", cut
    if step == settings.max_new_tokens - 1:
        return "length", len(history)
    return None


@dataclass
class _Series:
    """Beam state of one series: finished hypotheses, best first, at most ``num_beams``."""

    finished: list[Hypothesis] = field(default_factory=list)
    done: bool = False

    def add(self, hyp: Hypothesis, beams: int, penalty: float) -> None:
        self.finished.append(hyp)
        self.finished.sort(key=lambda h: -h.score(penalty))
        del self.finished[beams:]

    def worst(self, penalty: float) -> float:
        return self.finished[-1].score(penalty)


def beam_search(dec: StepDecoder, table: np.ndarray, prefix: np.ndarray, settings: DecodeSettings,
                clock: Callable[[], float] = time.perf_counter) -> list[Hypothesis]:
    """Beam search for every row of ``prefix`` (B, L, d); the best hypothesis per row.

    The prefix runs once per series; its cache is then repeated for the beams. Cache rows are
    ``num_beams`` per live series, in series order; finished series leave the batch.
    """
    batch, length = prefix.shape[:2]
    beams, penalty = settings.num_beams, settings.length_penalty
    mask, positions = _prefix_inputs(prefix)
    logp = _log_softmax(dec.start(prefix, mask, positions))  # (B, V)
    vocab = logp.shape[-1]
    dec.select(np.repeat(np.arange(batch), beams))
    logp = np.repeat(logp, beams, axis=0)  # (B * nb, V)
    scores = np.tile(np.r_[0.0, np.full(beams - 1, -np.inf)], batch)  # only beam 0 is live at first
    histories: list[list[int]] = [[] for _ in range(batch * beams)]
    state = [_Series() for _ in range(batch)]
    live = list(range(batch))  # series held by the cache, nb rows each
    top_k = max(2, 1 + len(settings.stop_ids)) * beams
    total = length
    for step in range(settings.max_new_tokens):
        if settings.no_repeat_ngram_size:
            for row, hist in enumerate(histories):
                logp[row, banned_tokens(hist, settings.no_repeat_ngram_size)] = -np.inf
        cand = (scores[:, None] + logp).reshape(len(live), beams * vocab)  # (n_live, nb * V)
        k = min(top_k, cand.shape[1])
        part = np.argpartition(-cand, k - 1, axis=1)[:, :k]  # (n_live, k) unordered
        now = clock()
        next_rows: list[int] = []
        next_tokens: list[int] = []
        next_scores: list[float] = []
        next_hist: list[list[int]] = []
        still: list[int] = []
        for si, series in enumerate(live):
            order = part[si][np.lexsort((part[si], -cand[si, part[si]]))]  # best first, ties by index
            chosen: list[tuple[int, int, float, list[int]]] = []
            for rank, flat in enumerate(order):
                score = float(cand[si, flat])
                if score == -np.inf:
                    break
                row, token = si * beams + int(flat) // vocab, int(flat) % vocab
                hist = [*histories[row], token]
                done = _stop(hist, token, step, settings)
                if done is None:
                    chosen.append((row, token, score, hist))
                elif rank < beams:
                    reason, cut = done
                    state[series].add(Hypothesis(hist[:cut], len(hist), reason, score, now), beams, penalty)
                if len(chosen) == beams:
                    break
            best_live = chosen[0][2] / (step + 1) ** penalty if chosen else -np.inf
            st = state[series]
            if not chosen or (len(st.finished) >= beams and st.worst(penalty) >= best_live):
                st.done = True  # (at the last step every candidate stops, so every series gets here)
                for hyp in st.finished:
                    hyp.finished = now
                continue
            while len(chosen) < beams:  # too few live candidates: pad with dead copies
                row, token, _, hist = chosen[0]
                chosen.append((row, token, -np.inf, hist))
            still.append(series)
            for row, token, score, hist in chosen:
                next_rows.append(row)
                next_tokens.append(token)
                next_scores.append(score)
                next_hist.append(hist)
        if not still:
            break
        dec.select(np.asarray(next_rows, dtype=np.int64))
        live, histories, scores = still, next_hist, np.asarray(next_scores)
        total += 1
        n = len(next_rows)
        tokens = np.asarray(next_tokens, dtype=np.int64)
        logp = _log_softmax(dec.step(np.asarray(table[tokens], dtype=prefix.dtype)[:, None],  # (n, 1, d)
                                     np.ones((n, total), np.int64), np.full((n, 1), total - 1, np.int64)))
    return [max(st.finished, key=lambda h: h.score(penalty)) for st in state]


def decode(dec: StepDecoder, table: np.ndarray, prefix: np.ndarray, settings: DecodeSettings,
           clock: Callable[[], float] = time.perf_counter) -> list[Hypothesis]:
    """Greedy when ``settings.num_beams == 1``, else beam search."""
    run = greedy if settings.num_beams == 1 else beam_search
    return run(dec, table, prefix, settings, clock)
