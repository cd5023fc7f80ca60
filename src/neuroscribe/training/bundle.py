"""Write a model bundle (the folder the service loads) from a trained :class:`CvitModel`.

The layout and manifest schema are in :mod:`neuroscribe.inference.bundle`; this side fills them:
ONNX graphs via :func:`~neuroscribe.training.export.export_onnx`, ``tokenizer.json``, the inference
prompt (text, sha256 and token ids), and the provenance the registry and the SR need. The bundle
is built in a temporary sibling folder and renamed into place, so ``out_dir`` is either absent or
complete; its manifest is written last and seals every file with a sha256.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from neuroscribe.durable import fsync_dir
from neuroscribe.inference.bundle import Bundle, file_checksums, load_bundle, write_manifest
from neuroscribe.training.export import export_onnx
from neuroscribe.training.prompts import PromptConfig, PromptMix, manifest_record, render_prompt
from neuroscribe.training.tokenizer import TOKENIZER_FILE, encode_prompt, save_tokenizer

__all__ = ["SYNTHETIC_NOTE", "build_bundle"]

#: Said in the manifest of every bundle trained on ``neuroscribe synth`` data.
SYNTHETIC_NOTE = ("Trained only on synthetic head-CT phantoms made by `neuroscribe synth`. It has no "
                  "clinical validity and must not be used on patients.")


def _model_uid(checksums: Mapping[str, Mapping[str, Any]]) -> str:
    """A DICOM UID (2.25 form) derived from the graph files: the same weights, the same UID."""
    digest = hashlib.sha256()
    for name in sorted(checksums):
        digest.update(f"{name}:{checksums[name]['sha256']}\n".encode())
    return str(generate_uid(prefix=None, entropy_srcs=[digest.hexdigest()]))


def build_bundle(model: Any, tokenizer: Any, prompt: PromptConfig | PromptMix,
                 out_dir: str | os.PathLike[str], *, name: str, version: str, grid: Mapping[str, Any],
                 description: str = "",
                 synthetic_training_data: bool = False, training: Mapping[str, Any] | None = None,
                 scores: Mapping[str, Any] | None = None, max_new_tokens: int = 256,
                 quantize: bool = False, precision: str = "fp32") -> Bundle:
    """Export ``model`` and write a sealed bundle folder at ``out_dir`` (which must not exist).

    Parameters
    ----------
    model, tokenizer
        The trained :class:`~neuroscribe.training.model.CvitModel` and its tokenizer.
    prompt
        The inference prompt config, or the training mix (its inference config is used and the
        mix is recorded).
    grid
        ``ModelGrid.to_dict()`` of the inputs the model was trained on.
    training, scores
        Provenance (data digest, split counts, run settings) and held-out scores for the manifest.
    precision
        ``fp32`` or ``fp16`` graphs (``export_onnx``); recorded as ``manifest.graphs.precision``.
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"bundle folder {out} already exists")
    mix = prompt if isinstance(prompt, PromptMix) else None
    config = prompt.inference_config if isinstance(prompt, PromptMix) else prompt
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        graphs = export_onnx(model, staging, quantize=quantize, precision=precision)
        save_tokenizer(tokenizer, staging)
        text = render_prompt(config)
        prompt_record = {**manifest_record(config, training_mix=mix), "text": text,
                         "input_ids": encode_prompt(tokenizer, text)}
        eos = tokenizer.eos_token_id
        manifest = {
            "name": name,
            "version": version,
            "model_uid": _model_uid(file_checksums(staging)),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "description": description or (SYNTHETIC_NOTE if synthetic_training_data else ""),
            "synthetic_training_data": bool(synthetic_training_data),
            "input": dict(grid),
            "graphs": graphs,
            "tokenizer": {"file": TOKENIZER_FILE, "pad_id": tokenizer.pad_token_id,
                          "bos_id": tokenizer.bos_token_id, "eos_id": eos},
            "prompt": prompt_record,
            "generation": {"max_new_tokens": int(max_new_tokens), "stop_ids": [eos],
                           "max_positions": int(model.config.n_positions)},
            "training": dict(training or {}),
            "scores": dict(scores or {}),
        }
        write_manifest(staging, manifest)
        staging.rename(out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_bundle(out)
