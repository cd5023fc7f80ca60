"""Export a trained :class:`CvitModel` to ONNX (vision encoder + KV-cache decoder) and decode it with ORT.

Files written by :func:`export_onnx` into ``out_dir``::

    vision.onnx        images (B, S, C, H, W) float32 in [0, 1] -> visual_tokens (B, K, d_lm)
    decoder.onnx       inputs_embeds (B, T, d_lm) float32
                       attention_mask (B, P + T) int64: 1 on real tokens, 0 on (left) padding, covering
                           the past AND the new tokens; the causal + padding 4D additive mask is built
                           inside the graph (plain tensor ops), so callers never build it
                       position_ids (B, T) int64: ``cumsum(attention_mask) - 1`` clipped at 0, last T
                       past_key_values.{i}.key / .value (B, H, P, D) float32; P = 0 on the first step
                    -> logits (B, T, vocab) float32, present.{i}.key / .value (B, H, P + T, D)
    decoder_int8.onnx  only with ``quantize=True``: int8 dynamic quantization of decoder.onnx
    embed_tokens.npy   (vocab, d_lm) float32: the LM's input embedding matrix; token ids are embedded
                       with a numpy lookup, so the runtime needs no torch

``precision="fp16"`` converts both graphs with ``onnxruntime.transformers.float16`` after the fp32
export (for CUDA; the inference engine refuses them on the CPU by default): weights and activations
become float16, ``images``, ``visual_tokens``, ``inputs_embeds`` and ``logits`` stay float32 (so the
embedding table, argmax and log-probabilities stay float32), and the past/present KV tensors become
float16 (half the cache memory, no cast per step). The description records ``precision``.

The exporter is the TorchScript one (``dynamo=False``, opset 17; see STACK.md section 2): the HF cache
is a ``DynamicCache`` of ``DynamicLayer``s whose keys/values are set directly (``cache.update`` would
``torch.cat`` onto a baked-in empty tensor), and the LM gets a ready 4D mask (the 2D-mask path uses
``torch.vmap``, which this exporter cannot trace). The trace uses a non-empty past (P = 4).

:func:`ort_greedy` is the numpy/onnxruntime twin of :meth:`CvitModel.generate` (torch-free body).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PRECISIONS", "export_onnx", "ort_greedy"]

_TRACE_BATCH, _TRACE_NEW, _TRACE_PAST = 2, 3, 4
#: Graph precisions ``export_onnx`` writes.
PRECISIONS = ("fp32", "fp16")


def _decoder_wrapper(model: Any) -> Any:
    """A torch module ``(inputs_embeds, attention_mask, position_ids, *past) -> (logits, *present)``."""
    import torch
    from transformers.cache_utils import DynamicCache, DynamicLayer

    lm = model.lm
    n_layer = lm.config.num_hidden_layers

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
            cache = DynamicCache()
            for i in range(n_layer):
                layer = DynamicLayer()
                layer.keys, layer.values = past[2 * i], past[2 * i + 1]  # (B, H, P, D)
                layer.dtype, layer.device = layer.keys.dtype, layer.keys.device
                layer.is_initialized = True
                cache.layers.append(layer)
            # 4D additive mask (B, 1, T, L) from shapes only via cumsum, so every size stays symbolic
            key_idx = torch.ones_like(attention_mask[0]).cumsum(0) - 1  # (L,) 0..L-1
            new_idx = torch.ones_like(position_ids[0]).cumsum(0) - 1  # (T,) 0..T-1
            query_idx = key_idx[-1] - new_idx[-1] + new_idx  # (T,) absolute positions P..L-1
            causal = key_idx[None, :] <= query_idx[:, None]  # (T, L)
            allowed = causal[None, None] & (attention_mask[:, None, None, :] > 0)  # (B, 1, T, L)
            zero = torch.zeros((), dtype=inputs_embeds.dtype)
            neg = torch.full((), torch.finfo(inputs_embeds.dtype).min, dtype=inputs_embeds.dtype)
            mask4d = torch.where(allowed, zero, neg)
            out = self.lm(inputs_embeds=inputs_embeds, attention_mask=mask4d, position_ids=position_ids,
                          past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return Decoder()


def _kv_shape(lm: Any) -> tuple[int, int, int]:
    """``(n_layer, kv_heads, head_dim)`` of an HF causal LM's cache."""
    c = lm.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, heads, head_dim


def export_onnx(model: Any, out_dir: str | os.PathLike[str], *, opset: int = 17,
                quantize: bool = False, precision: str = "fp32") -> dict[str, Any]:
    """Write vision.onnx, decoder.onnx (+ decoder_int8.onnx) and embed_tokens.npy; describe them.

    The returned dict (for the future manifest) lists every file and each graph's inputs/outputs with
    their shapes, symbolic axes as names. GPT-2 and Llama LMs (scratch or local pretrained) are supported.
    ``precision`` is ``fp32`` or ``fp16`` (module docstring); int8 quantization needs fp32.
    """
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if quantize and precision != "fp32":
        raise ValueError(f"quantize=True needs precision 'fp32' (int8 from fp32 weights), got {precision!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    was_training = model.training
    # the training-only keyword head (TrainConfig.aux_keyword_weight) is no part of any graph; taken off
    # while tracing, so the files are byte for byte those of the same model without it
    keyword_head = getattr(model, "keyword_head", None)
    if keyword_head is not None:
        model.keyword_head = None
    model.eval()
    try:
        d_lm = model.d_lm
        n_layer, heads, head_dim = _kv_shape(model.lm)
        vocab = model.lm.get_input_embeddings().num_embeddings
        grid = cfg.grid_shape
        K = cfg.num_latents  # noqa: N806

        class Vision(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, images: torch.Tensor) -> torch.Tensor:
                return self.model.encode_image(images)

        with torch.no_grad():
            torch.onnx.export(Vision(), (torch.rand(_TRACE_BATCH, *grid),), str(out / "vision.onnx"),
                              input_names=["images"], output_names=["visual_tokens"],
                              dynamic_axes={"images": {0: "batch"}, "visual_tokens": {0: "batch"}},
                              opset_version=opset, dynamo=False)

            B, T, P = _TRACE_BATCH, _TRACE_NEW, _TRACE_PAST  # noqa: N806
            past_names = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
            present_names = [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
            embeds = torch.randn(B, T, d_lm)
            mask = torch.ones(B, P + T, dtype=torch.long)
            mask[1, :2] = 0  # left padding in the trace, so nothing gets specialised to an all-ones mask
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -T:]
            past = [torch.randn(B, heads, P, head_dim) for _ in past_names]
            axes: dict[str, dict[int, str]] = {
                "inputs_embeds": {0: "batch", 1: "new"},
                "attention_mask": {0: "batch", 1: "total"},
                "position_ids": {0: "batch", 1: "new"},
                "logits": {0: "batch", 1: "new"},
            }
            axes.update({n: {0: "batch", 2: "past"} for n in past_names})
            axes.update({n: {0: "batch", 2: "total"} for n in present_names})
            torch.onnx.export(_decoder_wrapper(model), (embeds, mask, positions, *past),
                              str(out / "decoder.onnx"),
                              input_names=["inputs_embeds", "attention_mask", "position_ids", *past_names],
                              output_names=["logits", *present_names], dynamic_axes=axes,
                              opset_version=opset, dynamo=False)
        table = model.lm.get_input_embeddings().weight.detach().float().cpu().numpy()
        np.save(out / "embed_tokens.npy", table)
    finally:
        if keyword_head is not None:
            model.keyword_head = keyword_head
        model.train(was_training)

    kv = ["batch", heads, "past", head_dim]
    info: dict[str, Any] = {
        "opset": opset,
        "precision": precision,
        "lm_type": model.lm.config.model_type,
        "num_visual_tokens": K,
        "d_lm": d_lm,
        "vocab_size": vocab,
        "n_layer": n_layer,
        "kv_heads": heads,
        "head_dim": head_dim,
        "files": {"vision": "vision.onnx", "decoder": "decoder.onnx", "embed_tokens": "embed_tokens.npy"},
        "vision": {
            "inputs": {"images": {"dtype": "float32", "shape": ["batch", *grid]}},
            "outputs": {"visual_tokens": {"dtype": "float32", "shape": ["batch", K, d_lm]}},
        },
        "decoder": {
            "inputs": {
                "inputs_embeds": {"dtype": "float32", "shape": ["batch", "new", d_lm]},
                "attention_mask": {"dtype": "int64", "shape": ["batch", "total"],
                                   "note": "2D padding mask over past + new tokens; total = past + new"},
                "position_ids": {"dtype": "int64", "shape": ["batch", "new"]},
                **{n: {"dtype": "float32", "shape": kv} for n in past_names},
            },
            "outputs": {
                "logits": {"dtype": "float32", "shape": ["batch", "new", vocab]},
                **{n: {"dtype": "float32", "shape": ["batch", heads, "total", head_dim]}
                   for n in present_names},
            },
        },
        "embed_tokens": {"dtype": "float32", "shape": [vocab, d_lm]},
    }
    if precision == "fp16":
        _to_fp16(out, info, present_names)
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(out / "decoder.onnx"), str(out / "decoder_int8.onnx"),
                         weight_type=QuantType.QInt8)
        info["files"]["decoder_int8"] = "decoder_int8.onnx"
    return info


def _to_fp16(out: Path, info: dict[str, Any], present_names: list[str]) -> None:
    """Convert vision.onnx and decoder.onnx in ``out`` to float16 in place; update ``info``'s dtypes."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    keep = {"vision": True, "decoder": ["inputs_embeds", "logits"]}  # float32 at the graph boundary
    for name, keep_io in keep.items():
        path = out / info["files"][name]
        converted = convert_float_to_float16(onnx.load(str(path)), keep_io_types=keep_io)
        onnx.save(converted, str(path))
    for kv_name, spec in [*info["decoder"]["inputs"].items(), *info["decoder"]["outputs"].items()]:
        if kv_name.startswith("past_key_values.") or kv_name in present_names:
            spec["dtype"] = "float16"


def ort_greedy(out_dir: str | os.PathLike[str], images: np.ndarray, prompt_ids: np.ndarray,
               max_new_tokens: int, eos_id: int | None = None, prompt_mask: np.ndarray | None = None,
               decoder: str = "decoder.onnx") -> np.ndarray:
    """Greedy report ids (B, <= max_new_tokens) with onnxruntime + numpy, as ``CvitModel.generate``.

    ``images`` (B, S, C, H, W) float32; ``prompt_ids`` (B, T) left-padded where ``prompt_mask`` is 0.
    After eos a row repeats eos; stops early once every row has produced ``eos_id``.
    """
    import onnxruntime as ort

    folder = Path(out_dir)
    providers = ["CPUExecutionProvider"]
    vision = ort.InferenceSession(str(folder / "vision.onnx"), providers=providers)
    dec = ort.InferenceSession(str(folder / decoder), providers=providers)
    table = np.load(folder / "embed_tokens.npy")  # (V, d_lm)
    prompt_ids = np.asarray(prompt_ids, dtype=np.int64)
    B = prompt_ids.shape[0]  # noqa: N806
    if prompt_mask is None:
        prompt_mask = np.ones_like(prompt_ids)
    visual = vision.run(None, {"images": np.asarray(images, dtype=np.float32)})[0]  # (B, K, d_lm)
    embeds = np.concatenate([visual, table[prompt_ids]], axis=1).astype(np.float32)  # (B, K + T, d_lm)
    mask = np.concatenate([np.ones((B, visual.shape[1]), np.int64),
                           np.asarray(prompt_mask, np.int64)], axis=1)  # (B, K + T)
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)  # (B, K + T)
    past_inputs = [i for i in dec.get_inputs() if i.name.startswith("past_key_values.")]
    feed: dict[str, np.ndarray] = {i.name: np.zeros((B, i.shape[1], 0, i.shape[3]), np.float32)
                                   for i in past_inputs}
    out_names = [o.name for o in dec.get_outputs()]
    next_pos = positions[:, -1:] + 1  # (B, 1)
    done = np.zeros(B, dtype=bool)
    generated = []
    for step in range(max_new_tokens):
        feed.update(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        results = dict(zip(out_names, dec.run(out_names, feed), strict=True))
        nxt = results["logits"][:, -1].argmax(-1).astype(np.int64)  # (B,)
        if eos_id is not None:
            nxt = np.where(done, eos_id, nxt)
            done |= nxt == eos_id
        generated.append(nxt)
        if step == max_new_tokens - 1 or (eos_id is not None and done.all()):
            break
        for i in past_inputs:
            feed[i.name] = results[i.name.replace("past_key_values.", "present.", 1)]
        embeds = table[nxt][:, None].astype(np.float32)  # (B, 1, d_lm)
        mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
        positions = next_pos
        next_pos = next_pos + 1
    return np.stack(generated, axis=1)  # (B, n_new)
