"""The CVIT report model (after BrainGPT), sized to a site: the whole model in one file.

Data flow, for a batch of B studies on the model grid (``ModelGrid``: S slices x C windows x H x W)::

    images (B, S, C, H, W)
      -> SliceEncoder: one small 2D CNN shared by all slices -> (B, S, d_vision)
      -> + learned slice-position embedding                  -> (B, S, d_vision)
      -> PerceiverResampler: K learned latents cross-attend to the slice tokens -> (B, K, d_vision)
      -> projector MLP                                        -> (B, K, d_lm)   visual tokens
    inputs_embeds = [visual tokens] + embed([<bos> prompt-without-<image>-line] + [report <eos>])
      -> causal LM (scratch GPT-2 / Llama from transformers, or a local pretrained one) -> logits

BrainGPT puts the visual tokens where ``<image>`` is in the prompt. The placeholder is the prompt's
first line, so "visual tokens first, then the rest of the prompt" is the same thing and needs no
splicing. Only the report tokens carry labels; prompt, visual and padding positions are -100.

``generate`` is greedy decoding with the HF KV cache (``past_key_values``): the torch reference that
the ONNX export is checked against. Checkpoints are self-describing (model args, the LM's HF config,
optimizer, step, run config) and written atomically.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from torch import nn

from neuroscribe.durable import atomic_file

__all__ = [
    "CHECKPOINT_FORMAT",
    "CvitConfig",
    "CvitModel",
    "CvitOutput",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "neuroscribe-cvit-checkpoint/1"
IGNORE_INDEX = -100


@dataclass
class CvitConfig:
    """Everything needed to rebuild a :class:`CvitModel` (stored in every checkpoint)."""

    # --- image grid: must equal the ModelGrid the series are resampled to (see from_grid)
    slices: int = 24
    channels: int = 3  # one per window: brain, subdural, bone
    height: int = 128
    width: int = 128
    # --- slice encoder: a small 2D CNN shared across slices
    vision_width: int = 32  # channels of the first stride-2 conv; doubled each stage up to 8x
    vision_depth: int = 4  # stride-2 stages: 128 px -> 8 px before global pooling
    d_vision: int = 256  # width of slice tokens and of the resampler
    # Spatial grid kept per slice before the head: 1 = global average pooling (position-blind, so
    # left and right look alike); 4 keeps a 4 x 4 map, enough to tell sides and lobes apart.
    vision_pool: int = 1
    # Standardise each slice feature across the studies of a batch, per slice position (a BatchNorm
    # over B on (S x d_vision) features; running statistics at inference). It removes what every
    # head shares at that level (normal anatomy) and leaves what differs between studies, which is
    # otherwise a few percent of the signal and easy for the language model to ignore.
    feature_norm: bool = False
    max_slices: int = 64  # size of the learned slice-position table; grids may use fewer slices
    # --- perceiver resampler
    num_latents: int = 32  # K visual tokens handed to the LM, whatever the slice count
    resampler_layers: int = 2
    resampler_heads: int = 4
    # --- language model
    lm: str = "scratch"  # "scratch" (random init, our BPE vocab) or "pretrained" (lm_path)
    lm_arch: str = "gpt2"  # scratch only: "gpt2" or "llama"
    lm_path: str | None = None  # pretrained only: a local HF directory; never downloaded
    vocab_size: int = 4096  # scratch only: the tokenizer's vocab size (specials included)
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_positions: int = 1024  # K visual tokens + prompt + report must fit (the in-context prompt is long)
    pad_id: int = 0  # ids of tokenizer.SPECIAL_TOKENS for a scratch LM
    bos_id: int = 1
    eos_id: int = 2
    dropout: float = 0.0  # a site has a few thousand reports at best; raise it when overfitting
    # Training only: each report token the LM reads (not the labels) is replaced by a random token
    # with this probability, so the next word cannot be read off the report so far and must come
    # from the image; otherwise a small LM learns the site's template first and the visual tokens
    # collapse to a constant (seen with the demo data: identical tokens for every study).
    token_dropout: float = 0.0
    # --- freezing: frozen parts get requires_grad=False (an optimizer built after sees none of them)
    freeze_lm: bool = False  # the whole LM, embeddings and head included (pretrained LM + adapter)
    freeze_vision: bool = False  # slice encoder + slice positions; resampler and projector still train
    # Training only: outputs of a keyword head on the visual tokens (0 = no head). The trainer sets it
    # from its keyword vocabulary when aux_keyword_weight > 0 (TrainConfig); the head never enters
    # the ONNX export (only encode_image and the LM do), so bundles do not carry it.
    aux_keywords: int = 0

    def __post_init__(self) -> None:
        """Reject settings that could only fail later, naming the field."""
        if not 0.0 <= self.token_dropout < 1.0:
            raise ValueError(f"CvitConfig.token_dropout must be in [0, 1), got {self.token_dropout!r}")
        n_aux = self.aux_keywords
        if isinstance(n_aux, bool) or not isinstance(n_aux, int) or n_aux < 0:
            raise ValueError(f"CvitConfig.aux_keywords must be an int >= 0, got {self.aux_keywords!r}")
        for name in ("slices", "channels", "height", "width", "vision_width", "vision_depth", "d_vision",
                     "vision_pool",
                     "max_slices", "num_latents", "resampler_layers", "resampler_heads", "vocab_size",
                     "n_layer", "n_embd", "n_head", "n_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CvitConfig.{name} must be a positive int, got {value!r}")
        if self.slices > self.max_slices:
            raise ValueError(f"CvitConfig.slices ({self.slices}) exceeds max_slices ({self.max_slices})")
        side = min(self.height, self.width)
        for _ in range(self.vision_depth):
            side = (side + 1) // 2
        if self.vision_pool > 1 and (self.height != self.width or side % self.vision_pool):
            raise ValueError(f"CvitConfig.vision_pool ({self.vision_pool}) must divide the slice encoder's "
                             f"{side} x {side} map (square images, side / 2**vision_depth)")
        if self.d_vision % self.resampler_heads:
            raise ValueError(f"CvitConfig.d_vision ({self.d_vision}) must be divisible by "
                             f"resampler_heads ({self.resampler_heads})")
        if self.lm not in ("scratch", "pretrained"):
            raise ValueError(f"CvitConfig.lm must be 'scratch' or 'pretrained', got {self.lm!r}")
        if self.lm == "scratch":
            if self.lm_arch not in ("gpt2", "llama"):
                raise ValueError(f"CvitConfig.lm_arch must be 'gpt2' or 'llama', got {self.lm_arch!r}")
            if self.n_embd % self.n_head:
                raise ValueError(f"CvitConfig.n_embd ({self.n_embd}) must be divisible by "
                                 f"n_head ({self.n_head})")
        elif not self.lm_path:
            raise ValueError("CvitConfig.lm_path is required when lm='pretrained'")

    @property
    def grid_shape(self) -> tuple[int, int, int, int]:
        """``(slices, channels, height, width)`` of one study, the layout of ``ModelGrid``."""
        return (self.slices, self.channels, self.height, self.width)

    @classmethod
    def from_grid(cls, grid: Any, **kwargs: Any) -> CvitConfig:
        """A config whose image shape is that of a ``ModelGrid`` (``kwargs`` set the rest)."""
        return cls(slices=grid.slices, channels=len(grid.windows), height=grid.height, width=grid.width,
                   **kwargs)


class CvitOutput(NamedTuple):
    """What :meth:`CvitModel.forward` returns."""

    loss: torch.Tensor | None  # mean cross-entropy over report tokens; None without labels
    logits: torch.Tensor  # (B, K + T, vocab): visual positions first
    keyword_logits: torch.Tensor | None = None  # (B, aux_keywords) from the visual tokens; None: no head


class SliceEncoder(nn.Module):
    """A small 2D CNN applied to every slice: (N, C, H, W) -> (N, d_vision)."""

    def __init__(self, cfg: CvitConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = cfg.channels
        for i in range(cfg.vision_depth):
            c_out = cfg.vision_width * 2 ** min(i, 3)
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1),
                       nn.GroupNorm(1, c_out),  # batch-size independent (a study is one sample)
                       nn.GELU()]
            c_in = c_out
        self.convs = nn.Sequential(*layers)
        side = min(cfg.height, cfg.width)
        for _ in range(cfg.vision_depth):
            side = (side + 1) // 2  # each stride-2 conv (kernel 3, padding 1) halves, rounding up
        # a fixed average pooling to a vision_pool x vision_pool map (the ONNX exporter cannot trace
        # adaptive pooling of a symbolic size); 1 means global average pooling
        self.pool = nn.AvgPool2d(side // cfg.vision_pool) if cfg.vision_pool > 1 else None
        self.head = nn.Linear(c_in * cfg.vision_pool ** 2, cfg.d_vision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode slices ``x`` (N, C, H, W) into (N, d_vision)."""
        x = self.convs(x)  # (N, c, H / 2**depth, W / 2**depth)
        # (N, c) global average pooling, or (N, c * pool * pool): a coarse map keeps where things are
        x = x.mean(dim=(2, 3)) if self.pool is None else self.pool(x).flatten(1)
        return self.head(x)  # (N, d_vision)


class ResamplerLayer(nn.Module):
    """One perceiver step: latents cross-attend to the slice tokens, then a feed-forward block."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_x = nn.LayerNorm(d)
        self.norm_latents = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Update ``latents`` (B, K, d) from slice tokens ``x`` (B, S, d)."""
        q = self.norm_latents(latents)  # (B, K, d)
        # keys/values are the slice tokens only (Flamingo also appends the latents to them)
        kv = self.norm_x(x)  # (B, S, d)
        latents = latents + self.attn(q, kv, kv, need_weights=False)[0]  # (B, K, d)
        return latents + self.ff(latents)  # (B, K, d)


class PerceiverResampler(nn.Module):
    """K learned latents read any number of slice tokens: (B, S, d) -> (B, K, d)."""

    def __init__(self, cfg: CvitConfig) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, cfg.d_vision) * 0.02)
        self.layers = nn.ModuleList(ResamplerLayer(cfg.d_vision, cfg.resampler_heads, cfg.dropout)
                                    for _ in range(cfg.resampler_layers))
        self.norm = nn.LayerNorm(cfg.d_vision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Resample slice tokens ``x`` (B, S, d) to (B, K, d)."""
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, K, d)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.norm(latents)


def _build_lm(cfg: CvitConfig, lm_config: dict[str, Any] | None) -> nn.Module:
    """The causal LM: from a stored HF config dict (checkpoints), a local directory, or scratch."""
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig

    if lm_config is not None:  # rebuilding from a checkpoint: the weights come from its state dict
        fields = dict(lm_config)
        hf_cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
        return AutoModelForCausalLM.from_config(hf_cfg)
    if cfg.lm == "pretrained":
        path = Path(str(cfg.lm_path))
        if not path.is_dir():  # checked here so a typo never turns into a hub download attempt
            raise FileNotFoundError(f"CvitConfig.lm_path {str(path)!r} is not a local directory")
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    if cfg.lm_arch == "gpt2":
        hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                            n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout,
                            embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, bos_token_id=cfg.bos_id,
                            eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id)
    else:
        hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd,
                             intermediate_size=4 * cfg.n_embd, num_hidden_layers=cfg.n_layer,
                             num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
                             max_position_embeddings=cfg.n_positions, attention_dropout=cfg.dropout,
                             tie_word_embeddings=True, bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id,
                             pad_token_id=cfg.pad_id)
    return AutoModelForCausalLM.from_config(hf_cfg)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from an attention mask (B, L): 0, 1, ... over real tokens (left padding safe)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class CvitModel(nn.Module):
    """Image encoder + perceiver resampler + projector in front of a causal LM (layout: module doc)."""

    def __init__(self, config: CvitConfig, lm_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = config
        self.slice_encoder = SliceEncoder(config)
        self.feature_norm = nn.BatchNorm1d(config.slices * config.d_vision) if config.feature_norm else None
        self.slice_pos = nn.Embedding(config.max_slices, config.d_vision)
        nn.init.normal_(self.slice_pos.weight, std=0.02)
        self.resampler = PerceiverResampler(config)
        self.lm = _build_lm(config, lm_config)
        d_lm = self.lm.get_input_embeddings().embedding_dim
        self.projector = nn.Sequential(nn.Linear(config.d_vision, d_lm), nn.GELU(), nn.Linear(d_lm, d_lm))
        self.keyword_head: nn.Module | None = None
        self.set_keyword_head(config.aux_keywords)
        if config.freeze_lm:
            self.lm.requires_grad_(False)
        if config.freeze_vision:
            self.slice_encoder.requires_grad_(False)
            self.slice_pos.requires_grad_(False)

    def set_keyword_head(self, n: int) -> None:
        """Give the model a fresh training-only keyword head with ``n`` outputs (0 removes it).

        The head reads the mean of the K visual tokens and predicts which report keywords occur
        (multi-label logits), so the image path gets a supervised signal of its own. (A linear map of
        all K x d_lm flattened tokens was tried first: with Adam its logits jumped by whole units a
        step and its loss stayed above the keyword-frequency prior.) An existing head of the same
        size is kept.
        """
        if n == self.config.aux_keywords and (self.keyword_head is not None) == (n > 0):
            return
        self.config = dataclasses.replace(self.config, aux_keywords=n)
        self.keyword_head = nn.Sequential(nn.LayerNorm(self.d_lm), nn.Linear(self.d_lm, n)) if n else None
        if self.keyword_head is not None:
            param = next(self.projector.parameters())
            self.keyword_head.to(device=param.device, dtype=param.dtype)

    def keyword_logits(self, visual: torch.Tensor) -> torch.Tensor | None:
        """The keyword head's logits (B, aux_keywords) from visual tokens (B, K, d_lm); None: no head."""
        return None if self.keyword_head is None else self.keyword_head(visual.mean(dim=1))

    @property
    def d_lm(self) -> int:
        """Hidden size of the language model (width of the visual tokens)."""
        return self.lm.get_input_embeddings().embedding_dim

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Visual tokens of ``images`` (B, S, C, H, W) float in [0, 1]: (B, K, d_lm)."""
        assert images.dim() == 5, f"images must be (B, S, C, H, W), got shape {tuple(images.shape)}"
        assert tuple(images.shape[1:]) == self.config.grid_shape, (
            f"images (B, S, C, H, W) must match the model grid {self.config.grid_shape}, "
            f"got {tuple(images.shape[1:])}")
        assert images.is_floating_point(), f"images must be float, got {images.dtype}"
        B, S, C, H, W = images.shape  # noqa: N806 (shape names)
        x = self.slice_encoder(images.reshape(B * S, C, H, W))  # (B*S, d_vision) one CNN for all slices
        x = x.reshape(B, S, -1)  # (B, S, d_vision)
        if self.feature_norm is not None:  # per (slice, feature) over the batch
            norm, flat = self.feature_norm, x.reshape(B, -1)  # (B, S * d_vision)
            if self.training and B == 1:  # one study has no batch statistics: use the running ones
                flat = F.batch_norm(flat, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                                    training=False, eps=norm.eps)
            else:
                flat = norm(flat)
            x = flat.reshape(B, S, -1)  # (B, S, d_vision)
        x = x + self.slice_pos(torch.arange(S, device=images.device))  # (B, S, d_vision)
        x = self.resampler(x)  # (B, K, d_vision)
        return self.projector(x)  # (B, K, d_lm)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> CvitOutput:
        """Logits over [visual tokens, input_ids]; the loss covers labels != -100 (the report tokens).

        ``input_ids`` (B, T) are prompt-without-placeholder + report + eos, right-padded;
        ``labels`` (B, T) are the ids on report tokens and -100 elsewhere (tokenizer.encode_example).
        """
        assert input_ids.dim() == 2, f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}"
        assert images.shape[0] == input_ids.shape[0], (
            f"batch sizes differ: images {images.shape[0]}, input_ids {input_ids.shape[0]}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        assert attention_mask.shape == input_ids.shape, (
            f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
        assert labels is None or labels.shape == input_ids.shape, (
            f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
        B = input_ids.shape[0]  # noqa: N806
        K = self.config.num_latents  # noqa: N806
        visual = self.encode_image(images)  # (B, K, d_lm)
        if self.training and self.config.token_dropout > 0 and labels is not None:
            table = self.lm.get_input_embeddings()
            noisy = (labels != IGNORE_INDEX) & (torch.rand(input_ids.shape, device=input_ids.device)
                                                < self.config.token_dropout)  # (B, T) report tokens only
            noise = torch.randint_like(input_ids, table.num_embeddings)
            input_ids = torch.where(noisy, noise, input_ids)  # the targets (labels) stay as they are
        tokens = self.lm.get_input_embeddings()(input_ids)  # (B, T, d_lm)
        embeds = torch.cat([visual.to(tokens.dtype), tokens], dim=1)  # (B, K + T, d_lm)
        mask = torch.cat([attention_mask.new_ones(B, K), attention_mask], dim=1)  # (B, K + T)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask),
                      use_cache=False)
        logits = out.logits  # (B, K + T, V)
        keyword_logits = self.keyword_logits(visual)  # (B, n) or None
        loss = None
        if labels is not None:
            full = torch.cat([labels.new_full((B, K), IGNORE_INDEX), labels], dim=1)  # (B, K + T)
            # position i predicts token i + 1
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   full[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
        return CvitOutput(loss, logits, keyword_logits)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompt_ids: torch.Tensor, max_new_tokens: int,
                 eos_id: int | None = None, prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy report ids (B, <= max_new_tokens) with the KV cache; after eos a row repeats eos.

        ``prompt_ids`` (B, T) are left-padded when their lengths differ (``prompt_mask`` 0 on pads).
        Stops early once every row has produced ``eos_id``.
        """
        assert prompt_ids.dim() == 2, f"prompt_ids must be (B, T), got shape {tuple(prompt_ids.shape)}"
        assert images.shape[0] == prompt_ids.shape[0], (
            f"batch sizes differ: images {images.shape[0]}, prompt_ids {prompt_ids.shape[0]}")
        assert max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {max_new_tokens}"
        was_training = self.training
        self.eval()
        try:
            B = prompt_ids.shape[0]  # noqa: N806
            if prompt_mask is None:
                prompt_mask = torch.ones_like(prompt_ids)
            visual = self.encode_image(images)  # (B, K, d_lm)
            tokens = self.lm.get_input_embeddings()(prompt_ids)  # (B, T, d_lm)
            embeds = torch.cat([visual.to(tokens.dtype), tokens], dim=1)  # (B, K + T, d_lm)
            mask = torch.cat([prompt_mask.new_ones(B, visual.shape[1]), prompt_mask], dim=1)  # (B, K + T)
            positions = _positions(mask)  # (B, K + T)
            out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
            next_pos = positions[:, -1:] + 1  # (B, 1)
            done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
            generated = []
            for step in range(max_new_tokens):
                nxt = out.logits[:, -1].argmax(dim=-1)  # (B,)
                if eos_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                    done |= nxt == eos_id
                generated.append(nxt)
                if step == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                    break
                mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # (B, L + 1)
                out = self.lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos,
                              past_key_values=out.past_key_values, use_cache=True)
                next_pos = next_pos + 1
            return torch.stack(generated, dim=1)  # (B, n_new)
        finally:
            self.train(was_training)


def _plain(value: Any) -> Any:
    """``value`` with dataclasses turned into dicts, so ``torch.load(weights_only=True)`` can read it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value


def save_checkpoint(path: str | os.PathLike[str], model: CvitModel,
                    optimizer: torch.optim.Optimizer | None = None, step: int = 0, config: Any = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write a self-describing checkpoint atomically: a temp file in the same folder, then ``os.replace``.

    On any error the temp file is removed and an existing checkpoint at ``path`` stays as it was.
    """
    path = Path(path)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "model_args": asdict(model.config),
        "lm_config": model.lm.config.to_dict(),  # rebuilds the LM without lm_path or the hub
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": int(step),
        "config": _plain(config),
        "extra": _plain(extra) or {},
    }
    with atomic_file(path) as fh:
        torch.save(ckpt, fh)
    return path


def load_checkpoint(path: str | os.PathLike[str],
                    map_location: str | torch.device = "cpu") -> tuple[CvitModel, dict[str, Any]]:
    """Rebuild the model from a checkpoint's stored config and weights; return ``(model, checkpoint)``.

    The checkpoint dict still holds ``optimizer`` (a state dict, to resume), ``step``, ``config`` and
    ``extra``. The model comes back in eval mode.
    """
    ckpt = torch.load(Path(path), map_location=map_location, weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint (format {ckpt.get('format')!r})")
    model = CvitModel(CvitConfig(**ckpt["model_args"]), lm_config=ckpt["lm_config"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt
