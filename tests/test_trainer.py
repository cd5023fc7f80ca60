"""The training run: files it writes, resume, seeds, validation, the bundle, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from neuroscribe.inference.bundle import BundleError, load_bundle  # noqa: E402
from neuroscribe.training.dataset import CacheIndex  # noqa: E402
from neuroscribe.training.evaluate_bundle import bundle_reports  # noqa: E402
from neuroscribe.training.model import load_checkpoint  # noqa: E402
from neuroscribe.training.prompts import inference_prompt  # noqa: E402
from neuroscribe.training.synth import generate_dataset  # noqa: E402
from neuroscribe.training.tokenizer import load_tokenizer  # noqa: E402
from neuroscribe.training.trainer import (  # noqa: E402
    TrainConfig,
    TrainConfigError,
    generate_reports,
    load_train_config,
    train,
)

TINY = dict(slices=8, height=32, width=32, epochs=2, batch_size=4, vocab_size=400, checkpoint_every=2,
            max_new_tokens=40, eval_batch_size=8, captioning=False, threads=1, warmup_steps=2,
            styles={"plain": 1.0, "template": 1.0, "keyword": 1.0, "in-context": 1.0},
            inference_style="template", synthetic=True, name="test-cvit", version="0.0.1",
            model=dict(vision_width=8, vision_depth=3, d_vision=32, max_slices=8, num_latents=4,
                       vision_pool=2, feature_norm=True,
                       resampler_layers=1, resampler_heads=2, n_layer=2, n_embd=32, n_head=2,
                       n_positions=1024))


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 small synthetic studies (32 x 32, 8 slices) with reports."""
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, 24, 7, "standard", "small", rows=32, columns=32, slices=8)
    return out


@pytest.fixture(scope="module")
def finished_run(studies: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """One complete two-epoch run of the tiny config."""
    run_dir = tmp_path_factory.mktemp("run") / "r"
    result = train(studies, run_dir, TrainConfig(**TINY), progress=False)
    return run_dir, result


def test_run_writes_checkpoints_metrics_curves_and_a_sealed_bundle(finished_run: tuple[Path, object]) -> None:
    """A run leaves its config, tokenizer, checkpoints, per-step and per-epoch metrics, a PNG and a bundle."""
    run_dir, result = finished_run
    for name in ("train_config.json", "tokenizer.json", "checkpoints/last.pt", "checkpoints/best.pt",
                 "metrics.jsonl", "curves.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    vals = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in steps] == list(range(1, result.steps + 1))
    assert all(np.isfinite(r["loss"]) and r["lr"] > 0 for r in steps)
    assert [v["epoch"] for v in vals] == [1, 2]
    assert all(0.0 <= v["forte_strict_mean_f1"] <= 1.0 and v["val_loss"] > 0 for v in vals)
    assert set(vals[0]["forte_strict_categories"]) == {"degree", "landmark", "feature", "impression"}
    test = next(r for r in records if r["kind"] == "test")
    assert test["n_studies"] >= 1 and len(test["heldout_digest"]) == 64

    bundle = load_bundle(result.bundle)
    manifest = bundle.manifest
    assert manifest["synthetic_training_data"] is True
    assert "synthetic" in manifest["description"] and "no clinical validity" in manifest["description"]
    assert manifest["input"]["slices"] == 8 and manifest["input"]["height"] == 32
    assert manifest["prompt"]["style"] == "template"
    assert inference_prompt(manifest["prompt"]) == manifest["prompt"]["text"]
    assert manifest["scores"]["heldout_digest"] == test["heldout_digest"]
    assert manifest["training"]["data_digest"] == CacheIndex.load(run_dir / "cache").digest
    assert set(manifest["files"]) == {"vision.onnx", "decoder.onnx", "embed_tokens.npy", "tokenizer.json"}
    assert manifest["model_uid"].startswith("2.25.")


def test_bundle_refuses_altered_or_extra_files(finished_run: tuple[Path, object], tmp_path: Path) -> None:
    """A changed byte or an unlisted file in a bundle makes loading fail, naming the file."""
    import shutil

    _, result = finished_run
    copy = tmp_path / "b"
    shutil.copytree(result.bundle, copy)
    load_bundle(copy)
    with (copy / "embed_tokens.npy").open("r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 1]))
    with pytest.raises(BundleError, match=r"embed_tokens\.npy does not match"):
        load_bundle(copy)
    shutil.rmtree(copy)
    shutil.copytree(result.bundle, copy)
    (copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"extra\.bin"):
        load_bundle(copy)


def test_onnx_bundle_writes_the_same_reports_as_torch(finished_run: tuple[Path, object]) -> None:
    """For every held-out study the ONNX Runtime bundle and the torch checkpoint give identical text."""
    run_dir, result = finished_run
    bundle = load_bundle(result.bundle)
    model, _ = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    tokenizer = load_tokenizer(run_dir)
    split = CacheIndex.load(run_dir / "cache").split("test")
    torch_reports = generate_reports(model, tokenizer, split, bundle.manifest["prompt"]["text"],
                                     max_new_tokens=40, batch_size=8)
    onnx_reports = bundle_reports(bundle, split)
    assert len(split) >= 1
    assert onnx_reports == torch_reports


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_resume_from_a_mid_epoch_checkpoint_ends_with_the_same_weights(
        studies: Path, finished_run: tuple[Path, object], tmp_path: Path) -> None:
    """Stop after 3 steps (mid-epoch), resume: the final weights equal the uninterrupted run's."""
    run_dir, result = finished_run
    cfg = TrainConfig(**TINY)
    stopped = train(studies, tmp_path / "r", TrainConfig(**{**TINY, "max_steps": 3}), progress=False)
    assert stopped.steps == 3 and stopped.bundle is None
    assert torch.load(tmp_path / "r/checkpoints/last.pt", weights_only=True)["step"] == 3
    resumed = train(studies, tmp_path / "r", cfg, resume=True, progress=False)
    assert resumed.steps == result.steps
    a, b = _weights(run_dir / "checkpoints/last.pt"), _weights(tmp_path / "r/checkpoints/last.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_starts_at_an_earlier_runs_best_weights(
        studies: Path, finished_run: tuple[Path, object], tmp_path: Path) -> None:
    """init_from takes the earlier run's best weights and tokenizer (a site fine-tuning its model)."""
    run_dir, _ = finished_run
    cfg = TrainConfig(**{**TINY, "init_from": str(run_dir), "lr": 1e-9, "min_lr": 1e-9, "max_steps": 1})
    train(studies, tmp_path / "b", cfg, progress=False)
    assert (tmp_path / "b/tokenizer.json").read_text() == (run_dir / "tokenizer.json").read_text()
    a, b = _weights(run_dir / "checkpoints/best.pt"), _weights(tmp_path / "b/checkpoints/last.pt")
    learned = [k for k in a if not k.startswith("feature_norm.")]  # batch statistics move without lr
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in learned)
    with pytest.raises(TrainConfigError, match="model grid"):
        train(studies, tmp_path / "c", TrainConfig(**{**TINY, "init_from": str(run_dir), "slices": 6}),
              progress=False)


def test_vision_lr_scale_speeds_up_the_image_path_only(studies: Path, tmp_path: Path) -> None:
    """The image path's parameter groups get vision_lr_scale times the language model's rate."""
    train(studies, tmp_path / "r", TrainConfig(**{**TINY, "vision_lr_scale": 3.0, "max_steps": 1}),
          progress=False)
    groups = torch.load(tmp_path / "r/checkpoints/last.pt", weights_only=True)["optimizer"]["param_groups"]
    lm = {g["lr"] for g in groups if g["lr_scale"] == 1.0}
    vision = {g["lr"] for g in groups if g["lr_scale"] == 3.0}
    assert len(lm) == 1 and len(vision) == 1 and vision.pop() == pytest.approx(3 * lm.pop())


def test_same_seed_same_weights_other_seed_other_weights(studies: Path, tmp_path: Path) -> None:
    """Fixed seeds make runs repeatable; the seed changes the result."""
    short = {**TINY, "max_steps": 2}
    train(studies, tmp_path / "a", TrainConfig(**short), progress=False)
    train(studies, tmp_path / "b", TrainConfig(**short), progress=False)
    train(studies, tmp_path / "c", TrainConfig(**{**short, "seed": 1}), progress=False)
    a, b, c = (_weights(tmp_path / x / "checkpoints/last.pt") for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_a_run_folder_is_not_overwritten_and_resume_needs_the_same_settings(
        studies: Path, tmp_path: Path) -> None:
    """Training into a used folder without --resume, or resuming with other settings, is refused."""
    train(studies, tmp_path / "r", TrainConfig(**{**TINY, "max_steps": 1}), progress=False)
    with pytest.raises(TrainConfigError, match="already holds a run"):
        train(studies, tmp_path / "r", TrainConfig(**TINY), progress=False)
    with pytest.raises(TrainConfigError, match=r"differs in \['lr'\]"):
        train(studies, tmp_path / "r", TrainConfig(**{**TINY, "lr": 0.5}), resume=True, progress=False)
    with pytest.raises(TrainConfigError, match="no checkpoint"):
        train(studies, tmp_path / "empty", TrainConfig(**TINY), resume=True, progress=False)


def test_aux_keyword_loss_trains_the_image_path_first_and_stays_out_of_the_record(
        studies: Path, finished_run: tuple[Path, object], tmp_path: Path) -> None:
    """aux_keyword_weight adds a keyword head and its loss; its warm-up leaves the LM alone; off, no trace."""
    run_dir, result = finished_run  # without the option: nothing of it in the config, weights or bundle
    assert not any(k.startswith("aux_") for k in json.loads((run_dir / "train_config.json").read_text()))
    assert not any(k.startswith("aux_") for k in load_bundle(result.bundle).manifest["training"]["config"])
    assert not any(k.startswith("keyword_head") for k in _weights(run_dir / "checkpoints/last.pt"))
    cfg = TrainConfig(**{**TINY, "aux_keyword_weight": 1.0, "aux_min_count": 2, "aux_warmup_steps": 1,
                         "max_steps": 1})
    train(studies, tmp_path / "a", cfg, progress=False)
    ckpt = torch.load(tmp_path / "a/checkpoints/last.pt", weights_only=True)
    n = ckpt["model_args"]["aux_keywords"]
    assert n > 0 and ckpt["model"]["keyword_head.1.weight"].shape[0] == n
    assert ckpt["config"]["aux_keyword_weight"] == 1.0
    record = json.loads((tmp_path / "a/metrics.jsonl").read_text().splitlines()[0])
    assert record["aux_loss"] > 0 and record["loss"] == pytest.approx(record["aux_loss"])  # warm-up: aux only
    init = train(studies, tmp_path / "b", TrainConfig(**{**TINY, "max_steps": 1, "lr": 1e-9, "min_lr": 1e-9}),
                 progress=False)
    assert init.steps == 1
    # same seed, same initial weights: after one warm-up step the LM is untouched, the image path moved
    before, after = _weights(tmp_path / "b/checkpoints/last.pt"), ckpt["model"]
    assert all(torch.allclose(before[k].float(), after[k].float(), atol=1e-6) for k in before
               if k.startswith("lm."))
    assert not torch.allclose(before["slice_encoder.convs.0.weight"], after["slice_encoder.convs.0.weight"])


@pytest.mark.parametrize(("key", "value", "message"), [
    ("aux_keyword_weight", -1.0, "aux_keyword_weight = -1.0"),
    ("aux_warmup_steps", 5, "needs aux_keyword_weight"),
    ("model", {"aux_keywords": 3}, "set aux_keyword_weight instead"),
    ("epochs", 0, "epochs = 0"),
    ("lr", -1.0, "lr = -1.0"),
    ("styles", {"poetry": 1.0}, "'poetry' is not one of"),
    ("model", {"widht": 3}, r"unknown keys \['widht'\]"),
    ("max_steps", 0, "max_steps = 0"),
])
def test_bad_settings_name_the_key_and_value(key: str, value: object, message: str) -> None:
    """Each invalid setting raises TrainConfigError naming it."""
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig(**{**TINY, key: value})


def test_inference_style_must_be_trained() -> None:
    """The bundle's prompt style must be one of the styles the model was trained with."""
    with pytest.raises(TrainConfigError, match=r"inference_style.*'keyword' is not in the mix"):
        TrainConfig(**{**TINY, "styles": {"plain": 1.0}, "inference_style": "keyword"})


def test_toml_file_and_overrides(tmp_path: Path) -> None:
    """load_train_config reads TOML, applies non-None overrides and rejects unknown keys."""
    path = tmp_path / "t.toml"
    path.write_text('epochs = 3\nbatch_size = 2\n[model]\nn_layer = 1\n', encoding="utf-8")
    cfg = load_train_config(path, epochs=5, seed=None)
    assert (cfg.epochs, cfg.batch_size, cfg.model, cfg.seed) == (5, 2, {"n_layer": 1}, 0)
    path.write_text("epochz = 3\n", encoding="utf-8")
    with pytest.raises(TrainConfigError, match=r"unknown keys \['epochz'\]"):
        load_train_config(path)
    path.write_text("epochs = [\n", encoding="utf-8")
    with pytest.raises(TrainConfigError, match=r"t\.toml"):
        load_train_config(path)


def test_demo_config_is_valid() -> None:
    """The demo model's settings file in the repository loads."""
    cfg = load_train_config(Path(__file__).parents[1] / "models" / "demo" / "train.toml")
    assert cfg.synthetic is True and set(cfg.styles) == {"plain", "in-context", "template", "keyword"}


def test_train_command_line(studies: Path, tmp_path: Path) -> None:
    """`neuroscribe train` runs from the command line with a settings file and flags."""
    settings = {**TINY, "styles": {"plain": 1.0}, "inference_style": "plain"}
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items() if not isinstance(v, dict)]
    lines += ["styles = { plain = 1.0 }", "[model]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings["model"].items()]
    toml = tmp_path / "tiny.toml"
    toml.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "neuroscribe", "train", "--data", str(studies), "--out", str(tmp_path / "run"),
         "--train-config", str(toml), "--epochs", "1", "--no-progress"],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held-out strict FORTE mean F1" in proc.stdout
    assert load_bundle(tmp_path / "run" / "bundle").manifest["prompt"]["style"] == "plain"
