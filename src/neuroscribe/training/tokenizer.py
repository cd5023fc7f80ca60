"""Byte-level BPE tokenizer for the report model, trained on the site's report and prompt texts.

The scratch language model of :mod:`neuroscribe.training.model` reads and writes this vocabulary.
Byte-level BPE (GPT-2's scheme, HF ``tokenizers``) never needs an unknown token: every UTF-8 byte
is in the base alphabet, so any report text round-trips exactly. Training is deterministic for the
same texts and settings (one thread of merges, ties broken by the library's fixed order), and the
whole tokenizer is one ``tokenizer.json``, which the checkpoint and the ONNX bundle ship.

Layout of one training example (see :func:`encode_example`)::

    [visual tokens (model.py)] [prompt without the <image> line] [report] <eos>
                                labels -100                       labels = ids

The ``<image>`` placeholder line is dropped here: the model puts its visual tokens first, so the
text after the placeholder is all the language model reads as tokens.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from neuroscribe.training.prompts import IMAGE_PLACEHOLDER

__all__ = [
    "BOS",
    "EOS",
    "IGNORE_INDEX",
    "PAD",
    "SPECIAL_TOKENS",
    "TOKENIZER_FILE",
    "encode_example",
    "encode_prompt",
    "load_tokenizer",
    "pad_batch",
    "save_tokenizer",
    "strip_image_placeholder",
    "train_tokenizer",
]

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
#: Special tokens, in id order: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2.
SPECIAL_TOKENS = (PAD, BOS, EOS)
TOKENIZER_FILE = "tokenizer.json"
#: Label value that cross-entropy skips (torch's default ``ignore_index``).
IGNORE_INDEX = -100


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """``tok`` as a transformers tokenizer with our special tokens named."""
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 4096,
                    min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (reports and prompts); deterministic.

    ``vocab_size`` counts the 3 special tokens and the 256 byte symbols, so it must exceed 259;
    a small site corpus may stop below it when no pair reaches ``min_frequency``.
    """
    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS) + 256} (specials + bytes), "
                         f"got {vocab_size}")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_tokenizer needs at least one non-empty text")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: the prompt and the report are encoded separately and then
    # concatenated, so the same text must encode the same way wherever it starts.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, f"special token {name} must have id {i}"
    return _wrap(tok)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | os.PathLike[str]) -> Path:
    """Write ``directory/tokenizer.json`` atomically (temp file + rename); return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TOKENIZER_FILE
    tmp = directory / f".{TOKENIZER_FILE}.tmp-{os.getpid()}"
    try:
        tmp.write_text(tokenizer.backend_tokenizer.to_str(pretty=True), encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`save_tokenizer`: the ``tokenizer.json`` file or its directory."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    return _wrap(Tokenizer.from_file(str(path)))


def strip_image_placeholder(prompt: str) -> str:
    """The rendered prompt without its first line, the ``<image>`` placeholder (visual tokens go first)."""
    head = IMAGE_PLACEHOLDER + "\n"
    if not prompt.startswith(head):
        raise ValueError(f"a rendered prompt starts with the line {IMAGE_PLACEHOLDER!r}, got {prompt[:40]!r}")
    rest = prompt[len(head):]
    if IMAGE_PLACEHOLDER in rest:
        raise ValueError(f"{IMAGE_PLACEHOLDER!r} may appear only on the first line of a prompt")
    return rest


def encode_prompt(tokenizer: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    """Token ids of a rendered prompt, placeholder line dropped, ``<bos>`` first."""
    text = strip_image_placeholder(prompt)
    return [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]


def encode_example(tokenizer: PreTrainedTokenizerFast, prompt: str,
                   report: str) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for one study: prompt then report + ``<eos>``; labels -100 on the prompt."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    report_ids = [*tokenizer.encode(report, add_special_tokens=False), tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * len(prompt_ids) + report_ids
    return prompt_ids + report_ids, labels


def pad_batch(rows: Sequence[Sequence[int]], value: int) -> tuple[list[list[int]], list[list[int]]]:
    """Right-pad ``rows`` to one length with ``value``; return ``(padded, attention_mask)``."""
    width = max(len(r) for r in rows)
    padded = [list(r) + [value] * (width - len(r)) for r in rows]
    mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    return padded, mask
