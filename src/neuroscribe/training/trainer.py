"""CVIT training, top to bottom: data, tokenizer, model, loop, validation, curves, bundle.

One run lives in one folder (``RUN_DIR``)::

    RUN_DIR/
      train_config.json        the resolved TrainConfig (a resume must use the same one)
      tokenizer.json           scratch LM: BPE trained on the training split's reports and prompts
      checkpoints/last.pt      written atomically every ``checkpoint_every`` steps and at epoch end
      checkpoints/best.pt      the epoch with the best strict FORTE mean F1 on the validation split
      metrics.jsonl            one JSON line per logged step and per validation
      curves.png               training loss, validation loss, FORTE F1 and BLEU-4 by epoch
      bundle/                  the exported, sealed model bundle (inference.bundle) with test scores

Determinism: the epoch's study order comes from ``(seed, epoch)`` and each sample's instruction
style from ``(seed, epoch, position)``, so a resumed run draws the same batches; the torch RNG
state is saved in the checkpoint. With the same thread count on CPU a run resumed from a
mid-epoch checkpoint ends with the same weights as one that never stopped (tests/test_trainer.py).

Several GPUs: start the same command under ``torchrun --nproc_per_node=N``; each rank takes every
N-th study of the epoch's order, gradients are averaged by DistributedDataParallel, and rank 0
alone validates and writes files (docs/training.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuroscribe.durable import atomic_file
from neuroscribe.errors import NeuroScribeError
from neuroscribe.log import get_logger
from neuroscribe.training.dataset import (
    CachedSplit,
    CacheIndex,
    ModelGrid,
    SplitSpec,
    build_cache,
    load_manifest,
)
from neuroscribe.training.evaluate_bundle import heldout_digest, score_reports
from neuroscribe.training.model import CvitConfig, CvitModel, load_checkpoint, save_checkpoint
from neuroscribe.training.prompts import (
    ExampleReport,
    InstructionStyle,
    PromptConfig,
    PromptMix,
    render_prompt,
)
from neuroscribe.training.tokenizer import (
    IGNORE_INDEX,
    encode_example,
    encode_prompt,
    load_tokenizer,
    pad_batch,
    save_tokenizer,
    train_tokenizer,
)

__all__ = ["TrainConfig", "TrainConfigError", "TrainResult", "evaluate_model", "load_train_config", "train"]

LOG = get_logger(__name__)
CHECKPOINTS = "checkpoints"
LAST, BEST = "last.pt", "best.pt"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
CONFIG_FILE = "train_config.json"
BUNDLE_DIR = "bundle"


class TrainConfigError(NeuroScribeError, ValueError):
    """A training setting is invalid; the message names the key and the value."""


@dataclass
class TrainConfig:
    """Every setting of a run; TOML keys have the same names (``neuroscribe train --config``)."""

    # --- data: the model grid and the patient split
    slices: int = 24
    height: int = 128
    width: int = 128
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_salt: str = "neuroscribe-split-v1"
    cache_dir: str | None = None  # default RUN_DIR/cache; share one between runs to skip decoding
    workers: int = 1  # processes decoding series into the cache
    # --- model: CvitConfig fields (image shape and vocab are filled in from the grid and tokenizer)
    model: dict[str, Any] = field(default_factory=dict)
    vocab_size: int = 2048  # scratch BPE vocabulary
    # --- CVIT instruction styles: weight per style; the bundle's prompt is inference_style
    styles: dict[str, float] = field(default_factory=lambda: {"plain": 1.0})
    inference_style: str | None = None  # default: the style with the largest weight
    n_examples: int = 1  # in-context style: example reports in the prompt
    # --- optimisation
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    vision_lr_scale: float = 1.0  # lr multiplier for the image path (encoder, resampler, projector)
    # Auxiliary keyword loss: a training-only head predicts from the visual tokens which strict FORTE
    # keywords the study's report names (labels from the report text); loss = LM + weight x BCE.
    aux_keyword_weight: float = 0.0  # 0: no head, no extra loss (the model and bundle as before)
    aux_min_count: int = 5  # keywords in fewer training reports than this are left out of the head
    aux_warmup_steps: int = 0  # first steps train on the keyword loss alone (the LM gets no gradient)
    seed: int = 0
    checkpoint_every: int = 100  # steps; the epoch end always writes one
    max_steps: int | None = None  # stop early after this many optimizer steps (tests, smoke runs)
    threads: int | None = None  # torch CPU threads; None leaves torch's default
    init_from: str | None = None  # an earlier RUN_DIR: start from its best weights and tokenizer
    # --- validation and the bundle
    max_new_tokens: int = 200
    eval_batch_size: int = 16
    val_limit: int | None = None  # validate on at most this many studies (None: all)
    captioning: bool = True  # BLEU/METEOR/ROUGE-L/CIDEr-D each epoch (needs Java for METEOR)
    name: str = "neuroscribe-cvit"
    version: str = "0.1.0"
    synthetic: bool = False  # the data are `neuroscribe synth` phantoms: said in the bundle manifest
    quantize: bool = False  # also write decoder_int8.onnx

    def __post_init__(self) -> None:
        """Check ranges and names; errors say which key and which value."""
        for key in ("slices", "height", "width", "vocab_size", "epochs", "batch_size", "checkpoint_every",
                    "max_new_tokens", "eval_batch_size", "workers", "n_examples"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrainConfigError(f"train config {key} = {value!r}: must be an integer >= 1")
        for key in ("lr", "min_lr", "vision_lr_scale"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not value > 0:
                raise TrainConfigError(f"train config {key} = {value!r}: must be a number > 0")
        if (isinstance(self.aux_keyword_weight, bool) or not isinstance(self.aux_keyword_weight, (int, float))
                or not self.aux_keyword_weight >= 0):
            raise TrainConfigError(f"train config aux_keyword_weight = {self.aux_keyword_weight!r}: "
                                   f"must be a number >= 0")
        for key, least in (("aux_min_count", 1), ("aux_warmup_steps", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise TrainConfigError(f"train config {key} = {value!r}: must be an integer >= {least}")
        if self.aux_warmup_steps and not self.aux_keyword_weight:
            raise TrainConfigError(f"train config aux_warmup_steps = {self.aux_warmup_steps!r}: needs "
                                   f"aux_keyword_weight > 0")
        if "aux_keywords" in self.model:
            raise TrainConfigError(f"train config model.aux_keywords = {self.model['aux_keywords']!r}: set "
                                   f"aux_keyword_weight instead (the head's size comes from the data)")
        for key in ("max_steps", "val_limit", "threads"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise TrainConfigError(f"train config {key} = {value!r}: must be an integer >= 1 or absent")
        for style in self.styles:
            try:
                InstructionStyle(style)
            except ValueError:
                raise TrainConfigError(f"train config styles: {style!r} is not one of "
                                       f"{[s.value for s in InstructionStyle]}") from None
        try:
            stand_ins = [f"Findings:\nexample {i}\nImpression:\nnone" for i in range(self.n_examples + 1)]
            self.prompt_mix(stand_ins)  # checks styles and inference_style before any data is read
        except NeuroScribeError as exc:
            raise TrainConfigError(f"train config styles/inference_style: {exc}") from exc
        known = {f.name for f in dataclasses.fields(CvitConfig)}
        unknown = sorted(set(self.model) - known)
        if unknown:
            raise TrainConfigError(f"train config model: unknown keys {unknown} (CvitConfig fields: "
                                   f"{sorted(known)})")

    @property
    def grid(self) -> ModelGrid:
        """The model input grid."""
        return ModelGrid(self.slices, self.height, self.width)

    @property
    def split_spec(self) -> SplitSpec:
        """The patient split."""
        return SplitSpec(train=1.0 - self.val_fraction - self.test_fraction, val=self.val_fraction,
                         test=self.test_fraction, salt=self.split_salt)

    def prompt_mix(self, train_reports: Sequence[str]) -> PromptMix:
        """The weighted instruction styles; in-context examples are the first training reports."""
        pool = tuple(ExampleReport(f"example-{i}", text)
                     for i, text in enumerate(dict.fromkeys(r for r in train_reports if r.strip())))
        configs = []
        for style in self.styles:
            if style == InstructionStyle.IN_CONTEXT:
                configs.append(PromptConfig(style, examples=pool[:self.n_examples + 1],
                                            n_examples=self.n_examples))
            else:
                configs.append(PromptConfig(style))
        return PromptMix(tuple(configs), tuple(self.styles.values()), self.inference_style)


def load_train_config(path: str | os.PathLike[str] | None, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a TOML file (optional) with ``overrides`` (None values ignored)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise TrainConfigError(f"train config file {str(path)!r}: {exc}") from exc
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TrainConfigError(f"train config: unknown keys {unknown}")
    return TrainConfig(**data)


_AUX_DEFAULTS = {"aux_keyword_weight": 0.0, "aux_min_count": 5, "aux_warmup_steps": 0}


def config_record(cfg: TrainConfig) -> dict[str, Any]:
    """``asdict(cfg)`` without the aux-keyword keys while they are off.

    Runs without the auxiliary loss record (train_config.json, checkpoints, bundle manifest) exactly
    what they recorded before the option existed, and older run folders can still be resumed.
    """
    record = asdict(cfg)
    if not cfg.aux_keyword_weight:
        for key, default in _AUX_DEFAULTS.items():
            if record.get(key) == default:
                del record[key]
    return record


def keyword_vocabulary(reports: Sequence[str], min_count: int = 1) -> tuple[str, ...]:
    """Sorted ``category:keyword`` labels (strict FORTE, positive mentions) in >= ``min_count`` reports."""
    from collections import Counter

    from neuroscribe.training.metrics.forte import extract_keywords

    counts: Counter[str] = Counter()
    for report in reports:
        counts.update(_report_keywords(report, extract_keywords))
    return tuple(sorted(k for k, n in counts.items() if n >= min_count))


def _report_keywords(report: str, extract: Any) -> set[str]:
    return {f"{category}:{word}" for category, words in extract(report).items() for word in words}


def keyword_targets(reports: Sequence[str], vocabulary: Sequence[str]) -> np.ndarray:
    """(N, len(vocabulary)) float32 multi-hot: which vocabulary keywords each report names."""
    from neuroscribe.training.metrics.forte import extract_keywords

    column = {k: j for j, k in enumerate(vocabulary)}
    out = np.zeros((len(reports), len(vocabulary)), np.float32)
    for i, report in enumerate(reports):
        for k in _report_keywords(report, extract_keywords):
            if k in column:
                out[i, column[k]] = 1.0
    return out


@dataclass(frozen=True)
class TrainResult:
    """What a run produced."""

    run_dir: Path
    steps: int
    best_epoch: int | None
    best_val_f1: float | None
    test_scores: dict[str, Any]
    bundle: Path | None


# ---------------------------------------------------------------------------------------------- helpers

def _distributed() -> tuple[int, int]:
    """``(rank, world_size)`` under torchrun, else ``(0, 1)``; initialises the process group once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _lr(cfg: TrainConfig, step: int, total: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr`` at ``total`` steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def _order(seed: int, epoch: int, n: int) -> list[int]:
    """The epoch's study order: a permutation fixed by ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def _style_rng(seed: int, epoch: int, position: int) -> random.Random:
    return random.Random(f"{seed}:{epoch}:{position}")


def _images(split: CachedSplit, indices: Sequence[int], device: torch.device) -> torch.Tensor:
    """(B, S, C, H, W) float32 from the float16 cache."""
    return torch.from_numpy(np.stack([np.asarray(split[i].array, np.float32) for i in indices])).to(device)


def _check_length(tokens: int, max_positions: int | None) -> None:
    """Refuse an example longer than the LM's position table, naming the setting to raise."""
    if max_positions is not None and tokens > max_positions:
        raise TrainConfigError(f"train config model.n_positions = {max_positions} is too small: an example "
                               f"needs {tokens} positions (visual tokens + prompt + report); raise it")


def _train_batch(split: CachedSplit, indices: Sequence[int], tokenizer: Any, mix: PromptMix,
                 seed: int, epoch: int, first_position: int, device: torch.device,
                 max_positions: int | None) -> tuple[torch.Tensor, ...]:
    rows = []
    for offset, i in enumerate(indices):
        sample = split[i]
        config = mix.sample(_style_rng(seed, epoch, first_position + offset))
        prompt = render_prompt(config, exclude_report=sample.report)
        rows.append(encode_example(tokenizer, prompt, sample.report))
    ids, mask = pad_batch([r[0] for r in rows], tokenizer.pad_token_id)
    labels, _ = pad_batch([r[1] for r in rows], IGNORE_INDEX)
    _check_length(len(ids[0]), max_positions)
    return (_images(split, indices, device), torch.tensor(ids, device=device),
            torch.tensor(mask, device=device), torch.tensor(labels, device=device))


def _append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    eos = tokenizer.eos_token_id
    out = []
    for token in ids:
        if token == eos:
            break
        out.append(int(token))
    return tokenizer.decode(out, skip_special_tokens=True).strip()


@torch.no_grad()
def generate_reports(model: CvitModel, tokenizer: Any, split: CachedSplit, prompt: str, *,
                     max_new_tokens: int, batch_size: int, limit: int | None = None,
                     device: torch.device | None = None) -> list[str]:
    """Greedy reports (torch) for the first ``limit`` studies of ``split`` under one prompt."""
    device = device or next(model.parameters()).device
    prompt_ids = encode_prompt(tokenizer, prompt)
    n = len(split) if limit is None else min(limit, len(split))
    reports: list[str] = []
    for start in range(0, n, batch_size):
        indices = list(range(start, min(n, start + batch_size)))
        ids = torch.tensor([prompt_ids] * len(indices), device=device)
        out = model.generate(_images(split, indices, device), ids, max_new_tokens,
                             eos_id=tokenizer.eos_token_id)
        reports.extend(_decode(tokenizer, row) for row in out.tolist())
    return reports


@torch.no_grad()
def _val_loss(model: CvitModel, tokenizer: Any, split: CachedSplit, prompt: str, batch_size: int,
              limit: int | None, device: torch.device) -> float | None:
    n = len(split) if limit is None else min(limit, len(split))
    if n == 0:
        return None
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        indices = list(range(start, min(n, start + batch_size)))
        rows = [encode_example(tokenizer, prompt, split[i].report) for i in indices]
        ids, mask = pad_batch([r[0] for r in rows], tokenizer.pad_token_id)
        labels, _ = pad_batch([r[1] for r in rows], IGNORE_INDEX)
        out = model(_images(split, indices, device), torch.tensor(ids, device=device),
                    torch.tensor(mask, device=device), torch.tensor(labels, device=device))
        total += float(out.loss) * len(indices)
        count += len(indices)
    return total / count


@torch.no_grad()
def _val_keyword_f1(model: CvitModel, split: CachedSplit, vocabulary: Sequence[str], batch_size: int,
                    limit: int | None, device: torch.device) -> float | None:
    """Micro F1 of the keyword head (logit > 0) against the reports' keywords."""
    n = len(split) if limit is None else min(limit, len(split))
    if n == 0 or model.keyword_head is None:
        return None
    targets = torch.from_numpy(keyword_targets([split[i].report for i in range(n)], vocabulary))
    preds = []
    for start in range(0, n, batch_size):
        indices = list(range(start, min(n, start + batch_size)))
        logits = model.keyword_logits(model.encode_image(_images(split, indices, device)))  # (b, n)
        preds.append(logits.cpu() > 0)
    pred = torch.cat(preds).float()
    tp = float((pred * targets).sum())
    denom = float(pred.sum() + targets.sum())
    return 2 * tp / denom if denom else None


def evaluate_model(model: CvitModel, tokenizer: Any, split: CachedSplit, prompt: str, *,
                   max_new_tokens: int, batch_size: int = 16, limit: int | None = None,
                   captioning: bool = True) -> tuple[dict[str, Any], list[str]]:
    """Scores of greedy reports on ``split`` against its reports; ``(scores, candidates)``."""
    candidates = generate_reports(model, tokenizer, split, prompt, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, limit=limit)
    studies = split.studies[:len(candidates)]
    scores = score_reports([s.report for s in studies], candidates, [s.study_id for s in studies],
                           captioning=captioning)
    return scores, candidates


def plot_curves(metrics_path: Path, out: Path) -> None:
    """Training loss by step, validation loss, FORTE F1 and BLEU-4 by epoch, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, epochs, val_loss, f1, bleu = [], [], [], [], [], []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["kind"] == "step":
            steps.append(record["step"])
            losses.append(record["loss"])
        elif record["kind"] == "val":
            epochs.append(record["epoch"])
            val_loss.append(record.get("val_loss"))
            f1.append(record.get("forte_strict_mean_f1"))
            bleu.append((record.get("captioning") or {}).get("BLEU-4"))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(steps, losses, lw=0.8, label="train loss")
    left.set_xlabel("step")
    left.set_ylabel("cross-entropy")
    left.set_yscale("log")
    left.legend()
    right.plot(epochs, [np.nan if v is None else v for v in f1], "o-", label="FORTE strict mean F1 (val)")
    right.plot(epochs, [np.nan if v is None else v for v in bleu], "s-", label="BLEU-4 (val)")
    right.set_xlabel("epoch")
    right.set_ylim(0, 1)
    if any(v is not None for v in val_loss):
        twin = right.twinx()
        twin.plot(epochs, [np.nan if v is None else v for v in val_loss], "k--", lw=0.8, label="val loss")
        twin.set_ylabel("val loss")
        twin.legend(loc="lower right")
    right.legend(loc="upper left")
    fig.suptitle("NeuroScribe CVIT training")
    fig.tight_layout()
    with atomic_file(out) as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- the run

def _prepare_data(cfg: TrainConfig, data: Path, run_dir: Path, rank: int) -> CacheIndex:
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else run_dir / "cache"
    if rank == 0:
        index = build_cache(load_manifest(data), cache_dir, cfg.grid, split_spec=cfg.split_spec,
                            workers=cfg.workers)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank != 0:
        index = CacheIndex.load(cache_dir)
    return index


def _tokenizer(cfg: TrainConfig, run_dir: Path, index: CacheIndex, mix: PromptMix, resume: bool) -> Any:
    model_cfg = cfg.model
    if model_cfg.get("lm") == "pretrained":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_cfg["lm_path"], local_files_only=True)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok
    path = run_dir / "tokenizer.json"
    if resume and path.exists():
        return load_tokenizer(path)
    if cfg.init_from:  # continue from an earlier run: its vocabulary comes with its weights
        tok = load_tokenizer(Path(cfg.init_from))
        save_tokenizer(tok, run_dir)
        return tok
    texts = [s.report for s in index.split("train").studies]
    texts += [render_prompt(c) for c in mix.configs]
    tok = train_tokenizer(texts, vocab_size=cfg.vocab_size)
    save_tokenizer(tok, run_dir)
    return tok


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, file=sys.stderr, unit="step",
                dynamic_ncols=True, desc="train")


def train(data: str | os.PathLike[str], run_dir: str | os.PathLike[str], cfg: TrainConfig, *,
          resume: bool = False, progress: bool = True, device: str | None = None) -> TrainResult:
    """Train a CVIT model on the studies in ``data``; write checkpoints, curves and a bundle in ``run_dir``.

    ``resume`` continues from ``RUN_DIR/checkpoints/last.pt`` with the saved config (a different
    config is refused); without it ``run_dir`` must not hold a previous run.
    """
    run_dir = Path(run_dir)
    rank, world = _distributed()
    ckpt_dir = run_dir / CHECKPOINTS
    config_path = run_dir / CONFIG_FILE
    if resume:
        if not (ckpt_dir / LAST).exists():
            raise TrainConfigError(f"--resume: no checkpoint at {ckpt_dir / LAST}")
        saved, now = json.loads(config_path.read_text(encoding="utf-8")), config_record(cfg)
        changed = sorted(k for k in saved.keys() | now.keys()
                         if k != "max_steps" and saved.get(k) != now.get(k))
        if changed:
            raise TrainConfigError(f"--resume: the run in {run_dir} used other settings (differs in "
                                   f"{changed})")
    elif ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise TrainConfigError(f"{run_dir} already holds a run; use --resume or another --out")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(config_path, "w") as fh:
            json.dump(config_record(cfg), fh, indent=2, sort_keys=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))

    index = _prepare_data(cfg, Path(data), run_dir, rank)
    train_split, val_split, test_split = index.split("train"), index.split("val"), index.split("test")
    if len(train_split) == 0:
        raise TrainConfigError(f"no training studies in {data} (after the split and skipped series)")
    mix = cfg.prompt_mix([s.report for s in train_split.studies])
    tokenizer = _tokenizer(cfg, run_dir, index, mix, resume)
    inference_prompt_text = render_prompt(mix.inference_config)
    vocabulary: tuple[str, ...] = ()
    targets: torch.Tensor | None = None
    if cfg.aux_keyword_weight:
        train_reports = [s.report for s in train_split.studies]
        vocabulary = keyword_vocabulary(train_reports, cfg.aux_min_count)
        if not vocabulary:
            raise TrainConfigError(f"train config aux_keyword_weight = {cfg.aux_keyword_weight!r}: no strict "
                                   f"FORTE keyword occurs in {cfg.aux_min_count} training reports")
        targets = torch.from_numpy(keyword_targets(train_reports, vocabulary)).to(dev)
        LOG.info("aux_keywords", count=len(vocabulary), weight=cfg.aux_keyword_weight,
                 warmup_steps=cfg.aux_warmup_steps)

    model_args = {"bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id,
                  "pad_id": tokenizer.pad_token_id, **cfg.model, "vocab_size": len(tokenizer),
                  "aux_keywords": len(vocabulary)}
    start_step, start_epoch, start_position, best_f1, best_epoch = 0, 0, 0, None, None
    if resume:
        model, ckpt = load_checkpoint(ckpt_dir / LAST, map_location=dev)
        extra = ckpt["extra"]
        start_step, start_epoch, start_position = ckpt["step"], extra["epoch"], extra["position"]
        best_f1, best_epoch = extra.get("best_f1"), extra.get("best_epoch")
    elif cfg.init_from:
        model, _ = load_checkpoint(Path(cfg.init_from) / CHECKPOINTS / BEST, map_location=dev)
        if model.config.grid_shape != CvitConfig.from_grid(cfg.grid, **model_args).grid_shape:
            raise TrainConfigError(f"train config init_from = {cfg.init_from!r}: its model grid "
                                   f"{model.config.grid_shape} differs from this run's {cfg.grid.shape}")
        model.set_keyword_head(len(vocabulary))  # this run's head (or none), whatever the earlier run had
    else:
        model = CvitModel(CvitConfig.from_grid(cfg.grid, **model_args))
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    lm_ids = {id(p) for p in model.lm.parameters()}
    if model.keyword_head is not None:  # a plain head, not the image path: the base learning rate
        lm_ids |= {id(p) for p in model.keyword_head.parameters()}
    groups = []
    for in_lm, scale in ((True, 1.0), (False, cfg.vision_lr_scale)):
        chosen = [p for p in params if (id(p) in lm_ids) == in_lm]
        groups += [{"params": [p for p in chosen if p.dim() >= 2], "weight_decay": cfg.weight_decay,
                    "lr_scale": scale},
                   {"params": [p for p in chosen if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
    if resume:
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(torch.tensor(extra["torch_rng"], dtype=torch.uint8))
    # GPT-2 has a learned position table: a longer sequence would index past it
    max_positions = model.config.n_positions if model.config.lm == "scratch" else None
    wrapped: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    global_batch = cfg.batch_size * world
    steps_per_epoch = math.ceil(len(train_split) / global_batch)
    total_steps = steps_per_epoch * cfg.epochs
    metrics_path = run_dir / METRICS_FILE
    step = start_step
    LOG.info("train_started", studies_train=len(train_split), studies_val=len(val_split),
             studies_test=len(test_split), steps=total_steps, resume_step=start_step, world=world,
             device=str(dev), digest=index.digest[:16])

    def checkpoint(name: str, epoch: int, position: int) -> None:
        save_checkpoint(ckpt_dir / name, model, optimizer, step=step, config=config_record(cfg),
                        extra={"epoch": epoch, "position": position, "best_f1": best_f1,
                               "best_epoch": best_epoch, "torch_rng": torch.get_rng_state().tolist(),
                               "data_digest": index.digest})

    bar = _progress(total_steps, start_step, progress and rank == 0)
    stopped = False
    try:
        for epoch in range(start_epoch, cfg.epochs):
            order = _order(cfg.seed, epoch, len(train_split))
            position = start_position if epoch == start_epoch else 0
            while position < len(order):
                chunk = order[position:position + global_batch]
                mine = chunk[rank::world]
                # the keyword warm-up has a schedule of its own; the LM's starts after it
                warm = min(cfg.aux_warmup_steps, total_steps - 1)
                rate = (_lr(cfg, step, warm) if step < warm
                        else _lr(cfg, step - warm, total_steps - warm))
                for group in optimizer.param_groups:
                    group["lr"] = rate * group["lr_scale"]
                if mine:
                    batch = _train_batch(train_split, mine, tokenizer, mix, cfg.seed, epoch,
                                         position + rank, dev, max_positions)
                    warmup = step < cfg.aux_warmup_steps
                    if warmup and world == 1:  # the keyword loss alone: the LM is not even run
                        keyword_logits = model.keyword_logits(model.encode_image(batch[0]))
                    else:
                        out = wrapped(*batch)
                        loss, keyword_logits = out.loss, out.keyword_logits
                    if targets is not None:
                        aux = torch.nn.functional.binary_cross_entropy_with_logits(
                            keyword_logits.float(), targets[mine])
                        # warm-up: the keyword loss alone (the LM gets no gradient, AdamW skips it)
                        loss = cfg.aux_keyword_weight * aux if warmup else loss + cfg.aux_keyword_weight * aux
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    optimizer.step()
                position += len(chunk)
                step += 1
                bar.update(1)
                if rank == 0:
                    value = float(loss.detach())
                    bar.set_postfix(epoch=epoch + 1, loss=f"{value:.3f}")
                    step_record = {"kind": "step", "step": step, "epoch": epoch, "loss": value,
                                   "lr": optimizer.param_groups[0]["lr"]}
                    if targets is not None:
                        step_record["aux_loss"] = float(aux.detach())
                    _append_jsonl(metrics_path, step_record)
                    if step % cfg.checkpoint_every == 0:
                        checkpoint(LAST, epoch, position)
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    stopped = True
                    break
            if stopped:
                if rank == 0:
                    checkpoint(LAST, epoch, position)
                break
            if rank == 0:
                model.eval()
                record: dict[str, Any] = {"kind": "val", "epoch": epoch + 1, "step": step}
                # an epoch spent in the keyword warm-up has an untrained LM: only the head is scored
                in_warmup = step <= cfg.aux_warmup_steps
                record["val_loss"] = None if in_warmup else _val_loss(
                    model, tokenizer, val_split, inference_prompt_text, cfg.eval_batch_size, cfg.val_limit,
                    dev)
                if in_warmup:
                    record["val_keyword_f1"] = _val_keyword_f1(model, val_split, vocabulary,
                                                               cfg.eval_batch_size, cfg.val_limit, dev)
                elif len(val_split):
                    scores, candidates = evaluate_model(model, tokenizer, val_split, inference_prompt_text,
                                                        max_new_tokens=cfg.max_new_tokens,
                                                        batch_size=cfg.eval_batch_size, limit=cfg.val_limit,
                                                        captioning=cfg.captioning)
                    record.update(scores)
                    # does the report change with the image? 1 / n: the same report for every study
                    record["distinct_report_fraction"] = len(set(candidates)) / max(1, len(candidates))
                    if vocabulary:
                        record["val_keyword_f1"] = _val_keyword_f1(model, val_split, vocabulary,
                                                                   cfg.eval_batch_size, cfg.val_limit, dev)
                model.train()
                _append_jsonl(metrics_path, record)
                f1 = record.get("forte_strict_mean_f1")
                if best_f1 is None or (f1 is not None and f1 > best_f1):
                    best_f1, best_epoch = f1, epoch + 1
                    checkpoint(BEST, epoch + 1, 0)
                checkpoint(LAST, epoch + 1, 0)
                plot_curves(metrics_path, run_dir / CURVES_FILE)
                LOG.info("train_epoch_done", epoch=epoch + 1, step=step, val_loss=record["val_loss"],
                         forte_strict_mean_f1=f1)
            if world > 1:
                import torch.distributed as dist

                dist.barrier()
    finally:
        bar.close()

    if stopped or rank != 0:
        return TrainResult(run_dir, step, best_epoch, best_f1, {}, None)

    best, _ = load_checkpoint(ckpt_dir / BEST, map_location=dev)
    best.eval()
    test_scores: dict[str, Any] = {}
    if len(test_split):
        test_scores, _ = evaluate_model(best, tokenizer, test_split, inference_prompt_text,
                                        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
                                        captioning=cfg.captioning)
        test_scores["heldout"] = "test"
        test_scores["heldout_digest"] = heldout_digest(test_split)
    _append_jsonl(metrics_path, {"kind": "test", "step": step, **test_scores})
    bundle_dir = run_dir / BUNDLE_DIR
    if bundle_dir.exists():
        import shutil

        shutil.rmtree(bundle_dir)
    from neuroscribe.training.bundle import build_bundle

    counts = index.counts()
    bundle = build_bundle(
        best.cpu(), tokenizer, mix, bundle_dir, name=cfg.name, version=cfg.version, grid=cfg.grid.to_dict(),
        synthetic_training_data=cfg.synthetic, max_new_tokens=cfg.max_new_tokens, quantize=cfg.quantize,
        training={"data_digest": index.digest, "split": cfg.split_spec.to_dict(), "studies": counts,
                  "steps": step, "best_epoch": best_epoch, "best_val_forte_strict_mean_f1": best_f1,
                  "config": config_record(cfg), "trained": time.strftime("%Y-%m-%d")},
        scores=test_scores)
    LOG.info("train_done", steps=step, best_epoch=best_epoch, best_val_f1=best_f1,
             test_f1=test_scores.get("forte_strict_mean_f1"), bundle=str(bundle.path))
    return TrainResult(run_dir, step, best_epoch, best_f1, test_scores, bundle.path)

