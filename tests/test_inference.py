"""The inference engine (neuroscribe.inference): bundles, providers, decoding, the infer command, no torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from structlog.testing import capture_logs  # noqa: E402

from neuroscribe.daemon.commands.infer import notice  # noqa: E402
from neuroscribe.dicom_io.model_input import ModelGrid  # noqa: E402
from neuroscribe.inference import engine as engine_module  # noqa: E402
from neuroscribe.inference.bundle import BundleError, read_manifest, write_manifest  # noqa: E402
from neuroscribe.inference.decode import (  # noqa: E402
    DecodeSettings,
    banned_tokens,
    beam_search,
    find_loop,
    greedy,
)
from neuroscribe.inference.engine import Engine, EngineError  # noqa: E402
from neuroscribe.inference.providers import (  # noqa: E402
    CPU,
    CUDA,
    ProviderError,
    describe,
    fallback_reason,
    plan_providers,
)
from neuroscribe.training.bundle import build_bundle  # noqa: E402
from neuroscribe.training.export import ort_greedy  # noqa: E402
from neuroscribe.training.prompts import InstructionStyle, PromptConfig, render_prompt  # noqa: E402
from neuroscribe.training.synth import generate_dataset  # noqa: E402
from neuroscribe.training.tokenizer import train_tokenizer  # noqa: E402
from tests.cvit_toys import REPORTS, overfit_two_studies, toy_images  # noqa: E402

GRID = ModelGrid(slices=4, height=32, width=32)  # tiny_config's grid: 4 slices x 3 windows x 32 x 32


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The two-study overfit model, its tokenizer and a sealed fp32 bundle of it (synthetic data)."""
    config = PromptConfig(style=InstructionStyle.PLAIN)
    prompt = render_prompt(config)
    tok = train_tokenizer([*REPORTS, prompt] * 3, vocab_size=400)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model trains faster on one thread than on two contended ones
    try:
        model, _ = overfit_two_studies(tok, prompt)
    finally:
        torch.set_num_threads(threads)
    folder = tmp_path_factory.mktemp("bundles")
    bundle = build_bundle(model, tok, config, folder / "fp32", name="toy", version="1", grid=GRID.to_dict(),
                          synthetic_training_data=True, max_new_tokens=40)
    return {"model": model, "tok": tok, "config": config, "bundle": bundle, "folder": folder,
            "engine": Engine.load(bundle.path, device="cpu", threads=1)}


def images_of(*rows: int) -> np.ndarray:
    """Toy studies by index: 0 and 1 are the trained pair, 2 a blend, 3 a darker copy of study 0."""
    a, b = toy_images().numpy()
    studies = [a, b, 0.5 * (a + b), 0.6 * a]
    return np.stack([studies[i] for i in rows]).astype(np.float32)  # (B, 4, 3, 32, 32)


def torch_tokens(toy: dict[str, Any], images: np.ndarray, max_new_tokens: int = 40) -> list[list[int]]:
    """CvitModel.generate's report tokens (cut at eos)."""
    eos = toy["tok"].eos_token_id
    prompt = torch.tensor([toy["engine"].prompt_ids] * len(images))
    out = toy["model"].generate(torch.from_numpy(images), prompt, max_new_tokens, eos_id=eos).tolist()
    return [row[:row.index(eos)] if eos in row else row for row in out]


def sequence_logprob(engine: Engine, image: np.ndarray, tokens: list[int]) -> float:
    """log p(tokens | study) from one teacher-forced pass of decoder.onnx (all positions' logits)."""
    prefix = engine.prefix(image[None])  # (1, L, d)
    embeds = np.concatenate([prefix, np.asarray(engine.table[tokens[:-1]])[None]], axis=1)
    n = embeds.shape[1]
    session = ort.InferenceSession(str(engine.bundle.file("decoder")), providers=[CPU])
    feed = {"inputs_embeds": embeds.astype(np.float32), "attention_mask": np.ones((1, n), np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None]}
    feed.update({i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in session.get_inputs()
                 if i.name.startswith("past_key_values.")})
    logits = session.run(["logits"], feed)[0][0, prefix.shape[1] - 1:].astype(np.float64)  # (len, V)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return float(sum(logp[i, t] for i, t in enumerate(tokens)))


# -- bundle checks ------------------------------------------------------------------------------------

def test_load_refuses_an_altered_graph_or_prompt(toy: dict[str, Any], tmp_path: Path) -> None:
    """A changed graph byte, or a prompt text that no longer matches its sha256, stops Engine.load."""
    copy = tmp_path / "b"
    shutil.copytree(toy["bundle"].path, copy)
    with (copy / "decoder.onnx").open("r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 1]))
    with pytest.raises(BundleError, match=r"decoder\.onnx does not match its checksum"):
        Engine.load(copy, device="cpu")
    shutil.rmtree(copy)
    shutil.copytree(toy["bundle"].path, copy)
    manifest = read_manifest(copy)
    manifest["prompt"]["text"] += " "
    write_manifest(copy, manifest)  # re-sealed files, but the prompt no longer matches its sha256
    with pytest.raises(BundleError, match="prompt text sha256"):
        Engine.load(copy, device="cpu")


def test_unknown_decoder_and_bad_images_are_refused(toy: dict[str, Any]) -> None:
    """A decoder the bundle lacks, and images off the bundle's grid, raise EngineError naming them."""
    with pytest.raises(EngineError, match=r"no decoder 'decoder_int8'.*\['decoder'\]"):
        Engine.load(toy["bundle"].path, device="cpu", decoder="decoder_int8")
    with pytest.raises(EngineError, match=r"images must be \(B, 4, 3, 32, 32\)"):
        toy["engine"].generate(np.zeros((1, 5, 3, 32, 32), np.float32))


# -- greedy parity ------------------------------------------------------------------------------------

def test_greedy_equals_torch_and_ort_greedy(toy: dict[str, Any]) -> None:
    """Batch of 2 (both orders) and batch 1: the engine's tokens equal CvitModel.generate and ort_greedy."""
    engine, eos = toy["engine"], toy["tok"].eos_token_id
    for rows in ((0, 1), (1, 0), (0,), (1,)):
        images = images_of(*rows)
        got = engine.generate(images)
        reference = torch_tokens(toy, images)
        ort_rows = ort_greedy(engine.bundle.path, images, np.array([engine.prompt_ids] * len(rows)), 40,
                              eos_id=eos).tolist()
        assert [list(r.token_ids) for r in got] == reference
        assert [row[:row.index(eos)] if eos in row else row for row in ort_rows] == reference
        assert [r.text for r in got] == [REPORTS[i] for i in rows]
        assert all(r.stopped_by == "eos" and r.n_tokens == len(r.token_ids) + 1 for r in got)
        assert all(0 < r.seconds < 30 and r.logprob < 0 for r in got)


def test_io_binding_path_gives_the_same_tokens(toy: dict[str, Any]) -> None:
    """The IOBinding decoder (cache kept as OrtValues, device-side Gather) equals the plain one on CPU."""
    bound = Engine.load(toy["bundle"].path, device="cpu", io_binding=True, threads=1)
    assert bound.io_binding and bound._gather is not None
    images = images_of(0, 1, 2)
    for options in ({}, {"num_beams": 3}):
        assert ([r.token_ids for r in bound.generate(images, **options)]
                == [r.token_ids for r in toy["engine"].generate(images, **options)])


def test_batch_equals_one_by_one(toy: dict[str, Any]) -> None:
    """Four series in one batch: the same tokens and stop reasons as four single runs (greedy, beam)."""
    engine = toy["engine"]
    images = images_of(0, 1, 2, 3)
    for options in ({}, {"num_beams": 2, "max_new_tokens": 12}):
        batched = engine.generate(images, **options)
        single = [engine.generate(images[i:i + 1], **options)[0] for i in range(4)]
        assert [(r.token_ids, r.stopped_by) for r in batched] == [(r.token_ids, r.stopped_by) for r in single]


# -- beam search ----------------------------------------------------------------------------------------

def test_beam_of_one_is_greedy_and_wider_beams_score_at_least_greedy(toy: dict[str, Any]) -> None:
    """beam_search with 1 beam equals greedy; with 3 beams the report's log-prob (decoder) >= greedy's."""
    engine = toy["engine"]
    images = images_of(0, 1, 2, 3)
    prefix = engine.prefix(images)
    settings = DecodeSettings(max_new_tokens=30, stop_ids=engine.stop_ids)
    one = beam_search(engine.step_decoder(), engine.table, prefix, settings)
    plain = greedy(engine.step_decoder(), engine.table, prefix, settings)
    assert [h.tokens for h in one] == [h.tokens for h in plain]
    assert [h.stopped_by for h in one] == [h.stopped_by for h in plain]
    eos = toy["tok"].eos_token_id
    wide = engine.generate(images, num_beams=3, length_penalty=0.0, max_new_tokens=30)
    base = engine.generate(images, max_new_tokens=30)
    for i, (w, g) in enumerate(zip(wide, base, strict=True)):
        w_tokens = [*w.token_ids, eos] if w.stopped_by == "eos" else list(w.token_ids)
        g_tokens = [*g.token_ids, eos] if g.stopped_by == "eos" else list(g.token_ids)
        w_lp = sequence_logprob(engine, images[i], w_tokens)
        g_lp = sequence_logprob(engine, images[i], g_tokens)
        assert w_lp >= g_lp - 1e-5
        assert w.logprob == pytest.approx(w_lp, abs=1e-3) and g.logprob == pytest.approx(g_lp, abs=1e-3)


class Scripted:
    """A StepDecoder whose logits are ``rule(tokens so far)``; embeddings are one-hot, so ids come back."""

    def __init__(self, rule: Any) -> None:
        self.rule = rule
        self.history: list[list[int]] = []

    def start(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        assert mask.shape == positions.shape == embeds.shape[:2]
        self.history = [[] for _ in range(len(embeds))]
        return self._logits()

    def step(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        assert embeds.shape[1] == 1 and (positions[:, 0] == mask.shape[1] - 1).all()
        for hist, token in zip(self.history, embeds[:, 0].argmax(-1), strict=True):
            hist.append(int(token))
        return self._logits()

    def select(self, rows: np.ndarray) -> None:
        self.history = [list(self.history[r]) for r in rows]

    def _logits(self) -> np.ndarray:
        return np.log(np.stack([self.rule(h) for h in self.history])).astype(np.float32)  # (n, V)


def run_scripted(rule: Any, vocab: int, batch: int = 1, **settings: Any) -> list[Any]:
    """Decode ``batch`` rows with a scripted decoder (greedy or beam by ``num_beams``)."""
    prefix = np.zeros((batch, 3, vocab), np.float32)
    cfg = DecodeSettings(**{"max_new_tokens": 30, "stop_ids": frozenset({0}), **settings})
    run = greedy if cfg.num_beams == 1 else beam_search
    return run(Scripted(rule), np.eye(vocab, dtype=np.float32), prefix, cfg)


def test_beam_finds_the_better_sequence_greedy_misses() -> None:
    """A beats B first (0.6/0.4) but only B is followed by a likely stop: beam finds B<eos>, greedy A<eos>."""
    def rule(hist: list[int]) -> np.ndarray:
        if not hist:
            return np.array([0.001, 0.6, 0.398, 0.001])
        if hist == [2]:
            return np.array([0.9, 0.05, 0.03, 0.02])
        return np.array([0.3, 0.25, 0.25, 0.2])

    g = run_scripted(rule, 4)[0]
    b = run_scripted(rule, 4, num_beams=2, length_penalty=0.0)[0]
    assert (g.tokens, b.tokens) == ([1], [2])
    assert b.logprob == pytest.approx(np.log(0.398) + np.log(0.9))
    assert b.logprob > g.logprob == pytest.approx(np.log(0.6) + np.log(0.3))


# -- stopping -------------------------------------------------------------------------------------------

def test_length_limit_and_the_position_ceiling(toy: dict[str, Any]) -> None:
    """max_new_tokens cuts the report (stopped_by length); no request goes past manifest max_positions."""
    engine = toy["engine"]
    full = engine.generate(images_of(1))[0]
    short = engine.generate(images_of(1), max_new_tokens=5)[0]
    assert (short.stopped_by, short.n_tokens, short.token_ids) == ("length", 5, full.token_ids[:5])
    room = engine.max_positions - engine.num_visual_tokens - len(engine.prompt_ids)
    assert engine.max_new_tokens_limit() == room
    endless = engine.generate(images_of(1), max_new_tokens=10_000, stop_ids=[], repeat_guard=0)[0]
    assert (endless.stopped_by, endless.n_tokens) == ("length", room)
    with pytest.raises(EngineError, match="max_new_tokens must be >= 1"):
        engine.generate(images_of(1), max_new_tokens=0)


def test_stop_ids_end_the_report(toy: dict[str, Any]) -> None:
    """A stop id given at call time ends the report before that token (stopped_by eos)."""
    engine = toy["engine"]
    tokens = list(engine.generate(images_of(0))[0].token_ids)
    stop = tokens[4]
    cut = tokens.index(stop)
    got = engine.generate(images_of(0), stop_ids=[stop])[0]
    assert (got.stopped_by, list(got.token_ids), got.n_tokens) == ("eos", tokens[:cut], cut + 1)


def test_repetition_guard_stops_a_loop_and_keeps_one_copy() -> None:
    """A decoder stuck in 1 2 3 1 2 3 ... stops after four copies (repetition) and keeps one; off: length."""
    def cycle(hist: list[int]) -> np.ndarray:
        probs = np.full(6, 0.02)
        probs[1 + len(hist) % 3] = 0.9
        return probs

    looped = run_scripted(cycle, 6, batch=2)
    assert [(h.tokens, h.n_tokens, h.stopped_by) for h in looped] == [([1, 2, 3], 12, "repetition")] * 2
    assert run_scripted(cycle, 6, repeat_guard=0)[0].stopped_by == "length"
    beam = run_scripted(cycle, 6, num_beams=2)[0]
    assert (beam.tokens, beam.stopped_by) == ([1, 2, 3], "repetition")
    banned = run_scripted(cycle, 6, repeat_guard=0, no_repeat_ngram_size=2, max_new_tokens=8,
                          stop_ids=frozenset())[0]
    pairs = list(zip(banned.tokens, banned.tokens[1:], strict=False))
    assert len(pairs) == len(set(pairs)) == 7


def test_loop_and_ngram_helpers() -> None:
    """find_loop keeps one copy of the repeated span; banned_tokens lists n-gram completions."""
    assert find_loop([9, 1, 2, 1, 2, 1, 2], 3, 8) == 3
    assert find_loop([5, 5, 5, 5], 4, 4) == 1
    assert find_loop([1, 2, 3, 1, 2], 2, 4) is None
    assert banned_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert banned_tokens([4, 4, 7], 1) == [4, 7]
    with pytest.raises(ValueError, match="repeat_guard must be 0"):
        DecodeSettings(max_new_tokens=3, repeat_guard=1)


# -- providers ----------------------------------------------------------------------------------------

def test_provider_plan_and_fallback_decision() -> None:
    """auto asks for CUDA only when built in; a session without it is a fallback; cuda is strict."""
    gpu_build, cpu_build = [CUDA, CPU], ["AzureExecutionProvider", CPU]
    auto = plan_providers("auto", gpu_build)
    assert auto.names == (CUDA, CPU) and auto.wants_cuda and not auto.strict
    assert fallback_reason(auto, [CUDA, CPU]) is None
    assert "runs on ['CPUExecutionProvider']" in (fallback_reason(auto, [CPU]) or "")
    cpu_only = plan_providers("auto", cpu_build)
    assert cpu_only.names == (CPU,) and fallback_reason(cpu_only, [CPU]) is None and cpu_only.note
    assert plan_providers("cpu", gpu_build).names == (CPU,)
    strict = plan_providers("cuda:1", gpu_build)
    assert strict.strict and strict.device_id == 1 and strict.providers[0] == (CUDA, {"device_id": 1})
    with pytest.raises(ProviderError, match="no CUDAExecutionProvider"):
        plan_providers("cuda", cpu_build)
    with pytest.raises(ProviderError, match="not one of auto, cpu, cuda"):
        plan_providers("gpu", gpu_build)
    info = describe()
    assert info["installed"] and CPU in info["available"] and ort.__version__ in info["detail"]


def test_a_silent_cuda_fallback_is_detected(toy: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking ONNX Runtime for CUDA where it cannot start: auto runs on CPU and says why; cuda refuses."""
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the fallback is simulated only on a CPU build")
    monkeypatch.setattr(engine_module, "available_providers", lambda: [CUDA, CPU])
    with capture_logs() as logs:
        # a fresh logger proxy: the module's own may be cached by an earlier test (cache_logger_on_first_use)
        monkeypatch.setattr(engine_module, "LOG", structlog.get_logger(engine_module.__name__))
        engine = Engine.load(toy["bundle"].path, device="auto", warmup=False)
    assert engine.providers == [CPU] and engine.device == "cpu"
    assert engine.fallback_reason and CUDA in engine.fallback_reason
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["inference fell back to the CPU"]
    with pytest.raises(EngineError, match=r"device 'cuda'.*was requested but the session runs on"):
        Engine.load(toy["bundle"].path, device="cuda", warmup=False)


# -- fp16 -----------------------------------------------------------------------------------------------

def test_fp16_bundle_is_refused_on_cpu_unless_allowed(toy: dict[str, Any]) -> None:
    """precision='fp16' is recorded, float32 at the edges, float16 KV; the CPU refuses it by default."""
    bundle = build_bundle(toy["model"], toy["tok"], toy["config"], toy["folder"] / "fp16", name="toy",
                          version="1-fp16", grid=GRID.to_dict(), synthetic_training_data=True,
                          max_new_tokens=40, precision="fp16")
    graphs = bundle.manifest["graphs"]
    assert graphs["precision"] == "fp16"
    assert graphs["decoder"]["inputs"]["past_key_values.0.key"]["dtype"] == "float16"
    with pytest.raises(EngineError, match="fp16 graphs, made for CUDA"):
        Engine.load(bundle.path, device="cpu")
    engine = Engine.load(bundle.path, device="cpu", allow_fp16_on_cpu=True, threads=1)
    kinds = {i.name: i.type for i in engine._decoder.get_inputs()}
    assert kinds["inputs_embeds"] == "tensor(float)" and kinds["past_key_values.0.key"] == "tensor(float16)"
    assert [r.text for r in engine.generate(images_of(0, 1))] == REPORTS


# -- the command and the torch-free promise ---------------------------------------------------------------

def test_infer_command_without_torch(toy: dict[str, Any], tmp_path: Path) -> None:
    """`neuroscribe infer` on a synthetic series prints the notice then a report; torch is never imported."""
    generate_dataset(tmp_path / "synth", 1, 5, "standard", "small", rows=32, columns=32, slices=8)
    series = tmp_path / "synth" / "study_00000"
    script = textwrap.dedent(f"""
        import sys
        from neuroscribe.cli import main
        code = main(["infer", "--model", {str(toy["bundle"].path)!r}, {str(series)!r}, "--device", "cpu",
                     "--threads", "1", "--max-new-tokens", "12"])
        heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
        print("IMPORTED", heavy, file=sys.stderr)
        sys.exit(code)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEUROSCRIBE_")}
    env["NEUROSCRIBE_STORAGE__ROOT"] = str(tmp_path / "root")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "IMPORTED []" in done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == notice(True) and "no clinical validity" in lines[0]
    assert lines[1] == "" and lines[2].strip()
    assert "tokens, stopped by" in done.stderr and '"inference engine loaded"' in done.stderr
    done = subprocess.run([sys.executable, "-m", "neuroscribe", "infer", "--model", str(toy["bundle"].path),
                           str(series), "--device", "cpu", "--threads", "1", "--beams", "2",
                           "--max-new-tokens", "6", "--json"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["notice"] == notice(True) and out["beams"] == 2 and out["tokens"] <= 6
    assert out["providers"] == [CPU] and out["fallback_reason"] is None


def test_doctor_loads_a_model(toy: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """`neuroscribe doctor --model BUNDLE` reports where the model runs, and FAILs on a broken bundle."""
    from neuroscribe.cli import main
    from tests.conftest import free_port, logging_restored

    for name in list(os.environ):
        if name.startswith("NEUROSCRIBE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NEUROSCRIBE_STORAGE__ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("NEUROSCRIBE_DICOM__PORT", str(free_port()))
    monkeypatch.setenv("NEUROSCRIBE_STORAGE__MIN_FREE_BYTES", "0")
    with logging_restored():
        assert main(["doctor", "--model", str(toy["bundle"].path)]) == 0
        out = capsys.readouterr().out
        model_line = next(line for line in out.splitlines() if " model " in line)
        assert model_line.startswith("[ok  ]") and "toy 1 (fp32) loads and runs on" in model_line
        assert f"onnxruntime {ort.__version__}, providers" in out
        assert main(["doctor", "--model", str(tmp_path / "missing")]) == 1
        assert "no manifest.json" in capsys.readouterr().out
