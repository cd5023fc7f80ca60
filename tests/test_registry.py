"""The model registry: list, promote through the FORTE gate, refuse with both figures, roll back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from neuroscribe.dicom_io.model_input import ModelGrid  # noqa: E402
from neuroscribe.inference.bundle import BundleError  # noqa: E402
from neuroscribe.training.bundle import build_bundle  # noqa: E402
from neuroscribe.training.model import CvitModel  # noqa: E402
from neuroscribe.training.prompts import InstructionStyle, PromptConfig  # noqa: E402
from neuroscribe.training.registry import PromotionRefused, Registry, RegistryError  # noqa: E402
from neuroscribe.training.synth import generate_dataset  # noqa: E402
from neuroscribe.training.tokenizer import train_tokenizer  # noqa: E402
from tests.cvit_toys import REPORTS, tiny_config  # noqa: E402

GRID = ModelGrid(slices=4, height=32, width=32)
HELDOUT = "a" * 64


@pytest.fixture(scope="module")
def make_bundle(tmp_path_factory: pytest.TempPathFactory):
    """Factory: a sealed bundle of a tiny random model with the given recorded held-out scores."""
    tokenizer = train_tokenizer(REPORTS * 4, vocab_size=300)
    root = tmp_path_factory.mktemp("bundles")

    def make(version: str, f1: float | None, digest: str = HELDOUT, seed: int = 0) -> Path:
        torch.manual_seed(seed)
        model = CvitModel(tiny_config(len(tokenizer))).eval()
        scores = {} if f1 is None else {"forte_strict_mean_f1": f1, "heldout_digest": digest}
        out = root / f"{version}-{seed}"
        build_bundle(model, tokenizer, PromptConfig(InstructionStyle.PLAIN), out, name="toy", version=version,
                     grid=GRID.to_dict(), scores=scores, max_new_tokens=8,
                     training={"split": {"train": 0.5, "val": 0.0, "test": 0.5, "salt": "s"}})
        return out

    return make


def test_first_promotion_then_gate_refuses_a_worse_model_and_accepts_a_better(
        make_bundle, tmp_path: Path) -> None:
    """No current model: promoted. Worse or within the margin: refused with both figures. Better: current."""
    registry = Registry(tmp_path / "models")
    first = make_bundle("1.0", 0.60, seed=1)
    decision = registry.promote(first, 0.01)
    assert decision.passed and decision.current_f1 is None
    first_id = registry.current_id()
    assert first_id is not None and first_id.startswith("toy-1.0-")

    with pytest.raises(PromotionRefused) as refused:
        registry.promote(make_bundle("1.1", 0.605, seed=2), 0.01)
    assert refused.value.decision.candidate_f1 == 0.605 and refused.value.decision.current_f1 == 0.60
    assert "0.6050" in str(refused.value) and "0.6000" in str(refused.value)
    assert registry.current_id() == first_id

    registry.promote(make_bundle("1.2", 0.70, seed=3), 0.01)
    assert registry.current_id() != first_id
    assert registry.current().version == "1.2"
    actions = [event["action"] for event in registry.history()]
    assert actions == ["promote", "refuse", "promote"]
    rows = {row["version"]: row for row in registry.entries()}
    assert set(rows) == {"1.0", "1.1", "1.2"} and rows["1.2"]["current"] and not rows["1.0"]["current"]


def test_rollback_walks_back_through_promotions(make_bundle, tmp_path: Path) -> None:
    """Each rollback returns to the model current before the last promotion; none left is an error."""
    registry = Registry(tmp_path / "models")
    ids = []
    for i, f1 in enumerate((0.5, 0.6, 0.7)):
        registry.promote(make_bundle(f"2.{i}", f1, seed=10 + i), 0.0)
        ids.append(registry.current_id())
    assert registry.rollback() == ids[1]
    assert registry.rollback() == ids[0]
    assert registry.current_id() == ids[0]
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback()


def test_scores_on_different_heldout_sets_are_not_compared(make_bundle, tmp_path: Path) -> None:
    """Recorded scores from other held-out studies (or none) refuse to decide without --data."""
    registry = Registry(tmp_path / "models")
    registry.promote(make_bundle("3.0", 0.5, seed=20), 0.01)
    with pytest.raises(RegistryError, match="not on the same held-out studies"):
        registry.promote(make_bundle("3.1", 0.9, digest="b" * 64, seed=21), 0.01)
    with pytest.raises(RegistryError, match="with --data"):
        registry.promote(make_bundle("3.2", None, seed=22), 0.01)


def test_an_altered_bundle_is_never_added_or_served(make_bundle, tmp_path: Path) -> None:
    """A bundle whose file changed is refused on promotion, and the current one is verified on load."""
    registry = Registry(tmp_path / "models")
    source = make_bundle("4.0", 0.5, seed=30)
    registry.promote(source, 0.0)
    stored = registry.bundles_dir / str(registry.current_id())
    (stored / "tokenizer.json").write_text("{}", encoding="utf-8")
    with pytest.raises(BundleError, match=r"tokenizer\.json does not match"):
        registry.current()
    bad = make_bundle("4.1", 0.9, seed=31)
    (bad / "vision.onnx").write_bytes(b"not a graph")
    with pytest.raises(BundleError, match=r"vision\.onnx"):
        registry.promote(bad, 0.0)


def test_gate_scores_both_bundles_now_on_the_site_heldout_split(make_bundle, tmp_path: Path) -> None:
    """With --data the gate decodes the held-out studies with both bundles (ONNX) and compares them."""
    data = tmp_path / "site"
    generate_dataset(data, 8, 3, "standard", "small", rows=32, columns=32, slices=8)
    registry = Registry(tmp_path / "models")
    registry.promote(make_bundle("5.0", None, seed=40), 0.0)
    candidate = make_bundle("5.1", None, seed=41)
    try:
        decision = registry.promote(candidate, 0.0, data=data)
    except PromotionRefused as refused:
        decision = refused.decision
    assert decision.heldout.startswith("data:")
    assert 0.0 <= decision.candidate_f1 <= 1.0 and 0.0 <= decision.current_f1 <= 1.0
    assert decision.passed == (decision.candidate_f1 > decision.current_f1)
    assert registry.history()[-1]["heldout"] == decision.heldout


def test_models_command_line(make_bundle, tmp_path: Path) -> None:
    """`neuroscribe models` lists, promotes (exit 1 with both figures when refused) and rolls back."""
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "neuroscribe", "models", "--dir", str(tmp_path / "m"), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    assert "no bundles" in cli("list").stdout
    assert cli("promote", str(make_bundle("6.0", 0.5, seed=50))).returncode == 0
    refused = cli("promote", str(make_bundle("6.1", 0.4, seed=51)))
    assert refused.returncode == 1 and "0.4000" in refused.stdout and "0.5000" in refused.stdout
    assert cli("promote", str(make_bundle("6.2", 0.8, seed=52)), "--margin", "0.1").returncode == 0
    rows = json.loads(cli("list", "--json").stdout)
    assert [r["version"] for r in rows if r["current"]] == ["6.2"]
    assert cli("rollback").returncode == 0
    rows = json.loads(cli("list", "--json").stdout)
    assert [r["version"] for r in rows if r["current"]] == ["6.0"]
    listing = cli("list").stdout
    assert "6.1" in listing and "0.4000" in listing
