"""The inference engine: a verified bundle, its ONNX Runtime sessions, and reports from CT series.

::

    engine = Engine.load("models/bundles/demo", device="auto")
    results = engine.generate(images)    # images (B, S, C, H, W) float32 on engine.input_shape

The images come from ``dicom_io.model_input.series_to_input`` on the bundle's grid
(``engine.input_spec``); that module sits above this package, so the callers (the ``infer``
command, the service's worker) build them.

Load: :func:`~neuroscribe.inference.bundle.load_bundle` checks every file's sha256; the prompt's
text must match its recorded sha256; the vision and decoder sessions are created on the device
(:mod:`~neuroscribe.inference.providers`), a silent CUDA fallback is detected, logged once and kept
in :attr:`Engine.fallback_reason`; then one short warm-up run, so the first study is not slow.

Generate: ``vision.onnx`` turns the images into visual tokens, the manifest's prompt ids are embedded
with ``embed_tokens.npy``, and :mod:`~neuroscribe.inference.decode` runs greedy or beam search over
``decoder.onnx`` with its KV cache. On CUDA the decoder is driven through IOBinding: the cache stays
on the GPU from step to step, and only the embeddings go up and the last logits come down. Reports
are decoded with the bundle's ``tokenizer.json`` (special tokens skipped).

fp16 bundles (``graphs.precision == "fp16"``, see ``training.export``) are made for CUDA. On the CPU
the engine refuses them unless ``allow_fp16_on_cpu=True``: ONNX Runtime runs them there, but the fp32
bundle is the reference the parity tests check, so a CPU host should load that one.

This module never imports torch.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from neuroscribe.errors import NeuroScribeError
from neuroscribe.inference.bundle import Bundle, BundleError, load_bundle
from neuroscribe.inference.decode import DecodeSettings, Hypothesis, decode
from neuroscribe.inference.providers import (
    CUDA,
    ProviderError,
    ProviderPlan,
    available_providers,
    fallback_reason,
    plan_providers,
)
from neuroscribe.log import get_logger, hash_uid

__all__ = ["DEFAULT_REPEAT_GUARD", "Engine", "EngineError", "GenerationResult"]

LOG = get_logger(__name__)

#: A span repeated this many times in a row ends a report (``decode`` module docstring).
DEFAULT_REPEAT_GUARD = 4
_KV_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class EngineError(NeuroScribeError):
    """The engine cannot load a bundle or run as asked; the message names the bundle and the rule."""


@dataclass(frozen=True)
class GenerationResult:
    """The draft report of one series."""

    text: str  # decoded report, special tokens skipped, stripped
    token_ids: tuple[int, ...]  # the report's tokens (no stop token; repeats of a loop cut)
    n_tokens: int  # tokens generated for it (stop token and cut repeats included)
    stopped_by: Literal["eos", "length", "repetition"]
    seconds: float  # from the start of the generate call until this series was done
    logprob: float  # sum of the model's log-probabilities of the n_tokens generated tokens


# -- decoder backends (decode.StepDecoder) ---------------------------------------------------------

class _SessionDecoder:
    """``session.run`` with numpy in and out; the cache is a dict of numpy arrays (CPU)."""

    def __init__(self, session: Any, past: Sequence[str], kv_dtype: type, kv_shape: tuple[int, int]) -> None:
        self.session = session
        self.past_names = list(past)
        self.present_names = [n.replace("past_key_values.", "present.", 1) for n in past]
        self.kv_dtype, self.kv_shape = kv_dtype, kv_shape
        self.cache: dict[str, np.ndarray] = {}

    def _run(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        feed = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, **self.cache}
        logits, *present = self.session.run(["logits", *self.present_names], feed)
        self.cache = dict(zip(self.past_names, present, strict=True))
        return np.ascontiguousarray(logits[:, -1], dtype=np.float32)  # (n, V)

    def start(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        heads, dim = self.kv_shape
        self.cache = {n: np.zeros((embeds.shape[0], heads, 0, dim), self.kv_dtype) for n in self.past_names}
        return self._run(embeds, mask, positions)

    step = _run

    def select(self, rows: np.ndarray) -> None:
        self.cache = {n: v[rows] for n, v in self.cache.items()}


class _BoundDecoder(_SessionDecoder):
    """IOBinding: the cache stays where the session runs (GPU memory on CUDA) between steps.

    Row selection (beam reorder, finished rows out) runs a one-node ``Gather`` graph on the same
    device when the ``onnx`` package can build it, else it goes through host memory.
    """

    def __init__(self, session: Any, past: Sequence[str], kv_dtype: type, kv_shape: tuple[int, int],
                 device: tuple[str, int], gather: Any | None) -> None:
        super().__init__(session, past, kv_dtype, kv_shape)
        self.device = device
        self.gather = gather
        self.values: dict[str, Any] = {}  # name -> OrtValue (past KV, on the device)
        self._hold: list[np.ndarray] = []  # host buffers that OrtValues on the CPU point into

    def _run(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        io = self.session.io_binding()
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(mask))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(positions))
        for name in self.past_names:
            value = self.values.get(name)
            if value is None:
                io.bind_cpu_input(name, self.cache[name])  # the empty past of the prefill
            else:
                io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu")
        for name in self.present_names:
            io.bind_output(name, *self.device)
        self.session.run_with_iobinding(io)
        logits, *present = io.get_outputs()
        self.values = dict(zip(self.past_names, present, strict=True))
        self._hold = []
        return np.ascontiguousarray(logits.numpy()[:, -1], dtype=np.float32)  # (n, V)

    def start(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        self.values = {}
        return super().start(embeds, mask, positions)

    step = _run

    def select(self, rows: np.ndarray) -> None:
        import onnxruntime as ort

        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if self.gather is not None:
            selected = {}
            for name, value in self.values.items():
                io = self.gather.io_binding()
                io.bind_ortvalue_input("x", value)
                io.bind_cpu_input("rows", rows)
                io.bind_output("y", *self.device)
                self.gather.run_with_iobinding(io)
                selected[name] = io.get_outputs()[0]
            self.values = selected
            return
        hold = [np.ascontiguousarray(v.numpy()[rows]) for v in self.values.values()]
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(h, *self.device)
                       for name, h in zip(self.values, hold, strict=True)}
        self._hold = hold


def _gather_session(kv_dtype: type, providers: Sequence[Any], options: Any) -> Any | None:
    """A session running ``y = Gather(x, rows, axis=0)``, or None when ``onnx`` is not installed."""
    try:
        from onnx import TensorProto, helper
    except ImportError:
        return None
    import onnxruntime as ort

    elem = TensorProto.FLOAT16 if kv_dtype == np.float16 else TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Gather", ["x", "rows"], ["y"], axis=0)], "kv_select",
        [helper.make_tensor_value_info("x", elem, None),
         helper.make_tensor_value_info("rows", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", elem, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=list(providers))


# -- the engine -------------------------------------------------------------------------------------

def _graph_file(bundle: Bundle, decoder: str) -> tuple[str, Path]:
    """``(key, path)`` of the decoder named by key (``decoder_int8``) or file name (``decoder_int8.onnx``)."""
    files = bundle.manifest["graphs"].get("files", {})
    for key, name in files.items():
        if key.startswith("decoder") and decoder in (key, name):
            return key, bundle.path / name
    choices = sorted(k for k in files if k.startswith("decoder"))
    raise EngineError(f"bundle {bundle.label}: no decoder {decoder!r} (it has {choices})")


def _check_prompt(bundle: Bundle) -> list[int]:
    """The manifest's prompt ids, once its text is shown to match its recorded sha256."""
    prompt = bundle.manifest["prompt"]
    text, expected = prompt.get("text"), prompt.get("prompt_sha256")
    if not isinstance(text, str) or not isinstance(expected, str):
        raise BundleError(f"bundle {bundle.label}: manifest prompt lacks text or prompt_sha256")
    got = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if got != expected:
        raise BundleError(f"bundle {bundle.label}: prompt text sha256 {got[:12]}... does not match "
                          f"prompt_sha256 {expected[:12]}...")
    ids = prompt.get("input_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise BundleError(f"bundle {bundle.label}: manifest prompt input_ids must be a non-empty int list")
    return ids


class Engine:
    """A loaded bundle ready to write reports; build it with :meth:`load`."""

    def __init__(self, bundle: Bundle, *, vision: Any, decoder: Any, decoder_key: str, plan: ProviderPlan,
                 fallback: str | None, io_binding: bool, gather: Any | None) -> None:
        """Use :meth:`load`; this only wires parts that it has checked."""
        from tokenizers import Tokenizer

        self.bundle = bundle
        manifest = bundle.manifest
        graphs = manifest["graphs"]
        self.input_spec: dict[str, Any] = dict(manifest["input"])  # ModelGrid.to_dict() of the bundle
        self.input_shape: tuple[int, int, int, int] = (  # (S, C, H, W)
            int(self.input_spec["slices"]), len(self.input_spec["windows"]), int(self.input_spec["height"]),
            int(self.input_spec["width"]))
        self.precision: str = graphs.get("precision", "fp32")
        self.decoder_key = decoder_key
        self.plan = plan
        self.fallback_reason = fallback
        self.io_binding = io_binding
        self._vision, self._decoder, self._gather = vision, decoder, gather
        self.prompt_ids = _check_prompt(bundle)
        self.num_visual_tokens = int(graphs["num_visual_tokens"])
        generation = manifest["generation"]
        self.default_max_new_tokens = int(generation["max_new_tokens"])
        max_positions = generation.get("max_positions")
        self.max_positions = None if max_positions is None else int(max_positions)
        self.stop_ids = frozenset(int(i) for i in generation.get("stop_ids", []) if i is not None)
        self._tokenizer = Tokenizer.from_file(str(bundle.path / manifest["tokenizer"]["file"]))
        self.table = np.load(bundle.path / graphs["files"]["embed_tokens"], mmap_mode="r")  # (V, d_lm)
        inputs = {i.name: i for i in decoder.get_inputs()}
        self._past = [n for n in inputs if n.startswith("past_key_values.")]
        kv = inputs[self._past[0]]
        self._kv_dtype = _KV_DTYPES[kv.type]
        self._kv_shape = (int(kv.shape[1]), int(kv.shape[3]))  # (kv heads, head dim)
        self._embeds_dtype = _KV_DTYPES[inputs["inputs_embeds"].type]
        self.warmup_seconds = 0.0

    # -- loading

    @classmethod
    def load(cls, bundle_dir: str | os.PathLike[str] | Bundle, *, device: str = "auto",
             decoder: str = "decoder", threads: int | None = None, io_binding: bool | None = None,
             warmup: bool = True, allow_fp16_on_cpu: bool = False) -> Engine:
        """Verify the bundle, create its sessions on ``device`` and warm them up.

        Parameters
        ----------
        bundle_dir
            A bundle folder (a :class:`Bundle` is re-verified from its folder).
        device
            ``auto`` (CUDA when it starts, else CPU, with :attr:`fallback_reason` set), ``cpu``,
            ``cuda`` or ``cuda:N`` (CUDA or :class:`EngineError`).
        decoder
            ``decoder`` or ``decoder_int8`` (key or file name in ``manifest.graphs.files``).
        threads
            Intra-op threads of each session; None lets ONNX Runtime use every core.
        io_binding
            Drive the decoder through IOBinding; None: on CUDA only.
        warmup
            Run a two-token generation on a blank study before returning.
        allow_fp16_on_cpu
            Run an fp16 bundle on the CPU instead of refusing it.

        Raises
        ------
        BundleError
            A file or the prompt does not match its checksum, or the manifest is malformed.
        EngineError
            The device cannot be used, the decoder is not in the bundle, or fp16 would run on the CPU.
        """
        import onnxruntime as ort

        started = time.perf_counter()
        path = bundle_dir.path if isinstance(bundle_dir, Bundle) else Path(bundle_dir)
        bundle = load_bundle(path)
        key, decoder_path = _graph_file(bundle, decoder)
        try:
            plan = plan_providers(device, available_providers())
        except ProviderError as exc:
            raise EngineError(f"bundle {bundle.label}: {exc}") from exc
        if threads is not None and threads < 1:
            raise EngineError(f"threads must be >= 1 or None, got {threads}")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # ORT warnings (node placement) are noise; errors still show
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.inter_op_num_threads = 1
        if threads is not None:
            options.intra_op_num_threads = threads
        providers = list(plan.providers)
        vision = ort.InferenceSession(str(bundle.file("vision")), sess_options=options, providers=providers)
        dec = ort.InferenceSession(str(decoder_path), sess_options=options, providers=providers)
        active = dec.get_providers()
        fallback = fallback_reason(plan, active) or fallback_reason(plan, vision.get_providers())
        if fallback and plan.strict:
            raise EngineError(f"bundle {bundle.label}: device {device!r}: {fallback}")
        on_cuda = CUDA in active
        precision = bundle.manifest["graphs"].get("precision", "fp32")
        if precision == "fp16" and not on_cuda and not allow_fp16_on_cpu:
            why = f" ({fallback})" if fallback else ""
            raise EngineError(f"bundle {bundle.label} has fp16 graphs, made for CUDA, and would run on the "
                              f"CPU{why}: load the fp32 bundle on a CPU host (or pass allow_fp16_on_cpu)")
        use_binding = on_cuda if io_binding is None else bool(io_binding)
        kv_type = next(i.type for i in dec.get_inputs() if i.name.startswith("past_key_values."))
        gather = _gather_session(_KV_DTYPES[kv_type], providers, options) if use_binding else None
        engine = cls(bundle, vision=vision, decoder=dec, decoder_key=key, plan=plan, fallback=fallback,
                     io_binding=use_binding, gather=gather)
        if fallback:
            LOG.warning("inference fell back to the CPU", model=bundle.label, reason=fallback)
        if warmup:
            engine.warmup()
        LOG.info("inference engine loaded", model=bundle.label,
                 model_uid=hash_uid(bundle.manifest["model_uid"]), decoder=decoder_path.name,
                 precision=precision, providers=list(active), fallback=bool(fallback),
                 io_binding=use_binding, device_gather=gather is not None, threads=threads,
                 load_seconds=round(time.perf_counter() - started, 3),
                 warmup_seconds=round(engine.warmup_seconds, 3))
        return engine

    def warmup(self) -> float:
        """One two-token generation on a blank study (allocations, kernel choice); returns seconds."""
        started = time.perf_counter()
        self.generate(np.zeros((1, *self.input_shape), np.float32), max_new_tokens=2)
        self.warmup_seconds = time.perf_counter() - started
        return self.warmup_seconds

    # -- facts

    @property
    def providers(self) -> list[str]:
        """The decoder session's active providers, best first (``CPUExecutionProvider`` on a fallback)."""
        return list(self._decoder.get_providers())

    @property
    def device(self) -> str:
        """``cuda`` or ``cpu``: where the decoder really runs."""
        return "cuda" if CUDA in self.providers else "cpu"

    @property
    def synthetic(self) -> bool:
        """True when the model learned only from synthetic phantoms (``manifest.synthetic_training_data``)."""
        return bool(self.bundle.manifest.get("synthetic_training_data", False))

    def max_new_tokens_limit(self, prompt_length: int | None = None) -> int:
        """The most tokens that fit: ``max_positions - visual tokens - prompt length``."""
        used = self.num_visual_tokens + (len(self.prompt_ids) if prompt_length is None else prompt_length)
        return (self.max_positions - used) if self.max_positions is not None else 1 << 30

    # -- running

    def step_decoder(self) -> Any:
        """A fresh :class:`~neuroscribe.inference.decode.StepDecoder` over this engine's decoder session."""
        if self.io_binding:
            device = ("cuda", self.plan.device_id) if self.device == "cuda" else ("cpu", 0)
            return _BoundDecoder(self._decoder, self._past, self._kv_dtype, self._kv_shape, device,
                                 self._gather)
        return _SessionDecoder(self._decoder, self._past, self._kv_dtype, self._kv_shape)

    def prefix(self, images: np.ndarray, prompt_ids: Sequence[int] | None = None) -> np.ndarray:
        """Visual tokens then embedded prompt: (B, K + T, d_lm) in the decoder's input dtype."""
        images = np.asarray(images, dtype=np.float32)
        expected = self.input_shape
        if images.ndim != 5 or tuple(images.shape[1:]) != expected:
            raise EngineError(f"images must be (B, {', '.join(map(str, expected))}) for bundle "
                              f"{self.bundle.label}, got {images.shape}")
        ids = np.asarray(self.prompt_ids if prompt_ids is None else list(prompt_ids), dtype=np.int64)
        visual = self._vision.run(["visual_tokens"], {"images": images})[0]  # (B, K, d_lm)
        embedded = np.asarray(self.table[ids])  # (T, d_lm)
        prompt = np.broadcast_to(embedded, (images.shape[0], *embedded.shape))  # (B, T, d_lm)
        return np.concatenate([visual, prompt], axis=1).astype(self._embeds_dtype)

    def generate(self, images: np.ndarray, *, max_new_tokens: int | None = None, num_beams: int = 1,
                 length_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                 repeat_guard: int = DEFAULT_REPEAT_GUARD, stop_ids: Iterable[int] | None = None,
                 prompt_ids: Sequence[int] | None = None) -> list[GenerationResult]:
        """Draft reports for a batch of series, one :class:`GenerationResult` each, in order.

        Parameters
        ----------
        images
            (B, S, C, H, W) float32 in [0, 1] on the bundle's grid (``dicom_io.model_input.series_to_input``).
        max_new_tokens
            Default ``manifest.generation.max_new_tokens``; never more than fits in
            ``manifest.generation.max_positions`` after the visual tokens and the prompt (clipped).
        num_beams, length_penalty
            1: greedy; more: beam search ranked by ``logprob / n ** length_penalty``.
        no_repeat_ngram_size, repeat_guard
            The two repetition guards (``decode`` module docstring); ``repeat_guard=0`` turns the
            loop stop off, as plain greedy decoding has none.
        stop_ids
            Default ``manifest.generation.stop_ids``.
        prompt_ids
            Another prompt's ids (benchmarks of other instruction styles); default the manifest's.
        """
        started = time.perf_counter()
        prompt_length = len(self.prompt_ids) if prompt_ids is None else len(prompt_ids)
        room = self.max_new_tokens_limit(prompt_length)
        if room < 1:
            raise EngineError(f"bundle {self.bundle.label}: {self.num_visual_tokens} visual tokens and a "
                              f"{prompt_length}-token prompt leave no room in max_positions "
                              f"{self.max_positions}")
        wanted = self.default_max_new_tokens if max_new_tokens is None else max_new_tokens
        if wanted < 1:
            raise EngineError(f"max_new_tokens must be >= 1, got {wanted}")
        settings = DecodeSettings(
            max_new_tokens=min(wanted, room), num_beams=num_beams, length_penalty=length_penalty,
            stop_ids=self.stop_ids if stop_ids is None else frozenset(stop_ids),
            no_repeat_ngram_size=no_repeat_ngram_size, repeat_guard=repeat_guard)
        prefix = self.prefix(images, prompt_ids)  # (B, K + T, d_lm)
        hyps = decode(self.step_decoder(), self.table, prefix, settings)
        results = [self._result(h, started) for h in hyps]
        LOG.debug("reports generated", model=self.bundle.label, batch=len(results), beams=num_beams,
                  tokens=sum(r.n_tokens for r in results), seconds=round(time.perf_counter() - started, 3))
        return results

    def _result(self, hyp: Hypothesis, started: float) -> GenerationResult:
        text = self._tokenizer.decode(hyp.tokens, skip_special_tokens=True).strip()
        return GenerationResult(text=text, token_ids=tuple(hyp.tokens), n_tokens=hyp.n_tokens,
                                stopped_by=hyp.stopped_by, seconds=max(hyp.finished - started, 0.0),
                                logprob=hyp.logprob)
