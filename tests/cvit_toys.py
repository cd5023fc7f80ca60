"""Toy CVIT studies shared by the model and export tests (imported only once torch is present)."""

from __future__ import annotations

from typing import Any

import torch

from neuroscribe.training.model import CvitConfig, CvitModel
from neuroscribe.training.tokenizer import IGNORE_INDEX, encode_example, pad_batch

REPORTS = [
    "No acute intracranial hemorrhage. Ventricles are normal in size.",
    "Acute left subdural hematoma measuring 8 mm with 4 mm midline shift.",
]


def tiny_config(vocab_size: int = 300, **kwargs: Any) -> CvitConfig:
    """Test-sized config: 4 slices x 3 x 32 x 32, K=4, scratch GPT-2 with 2 layers of width 32."""
    base = dict(slices=4, channels=3, height=32, width=32, vision_width=8, vision_depth=3, d_vision=32,
                max_slices=8, num_latents=4, resampler_layers=1, resampler_heads=2, vocab_size=vocab_size,
                n_layer=2, n_embd=32, n_head=2, n_positions=160)
    base.update(kwargs)
    return CvitConfig(**base)


def toy_images() -> torch.Tensor:
    """Two clearly different studies (2, 4, 3, 32, 32): a left-right ramp and a dark top-bottom ramp."""
    ramp = torch.linspace(0, 1, 32)
    a = ramp.view(1, 1, 1, 32).expand(4, 3, 32, 32)
    b = 0.3 * ramp.view(1, 1, 32, 1).expand(4, 3, 32, 32)
    return torch.stack([a, b]).contiguous()


def batch(tokenizer: Any, prompt: str, reports: list[str]) -> tuple[torch.Tensor, ...]:
    """Right-padded ``(input_ids, attention_mask, labels)`` tensors for ``reports`` under ``prompt``."""
    rows = [encode_example(tokenizer, prompt, r) for r in reports]
    ids, mask = pad_batch([r[0] for r in rows], tokenizer.pad_token_id)
    labels, _ = pad_batch([r[1] for r in rows], IGNORE_INDEX)
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(labels)


def overfit_two_studies(tokenizer: Any, prompt: str) -> tuple[CvitModel, float]:
    """Train a tiny model on the two toy studies until it reproduces their reports; (model, last loss).

    lr 1e-2 (or dropout) let the LM fit both reports before the image path learned to separate
    them: the visual tokens then collapsed and greedy output ignored the image.
    """
    torch.manual_seed(0)
    model = CvitModel(tiny_config(len(tokenizer), dropout=0.0))
    images = toy_images()
    ids, mask, labels = batch(tokenizer, prompt, REPORTS)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(150):
        loss = model(images, ids, mask, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), float(loss.item())
