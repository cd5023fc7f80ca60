"""Tests for the ONNX export of the CVIT model and its onnxruntime greedy decoder (training/export.py)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from neuroscribe.training.export import export_onnx, ort_greedy  # noqa: E402
from neuroscribe.training.model import CvitModel  # noqa: E402
from neuroscribe.training.prompts import InstructionStyle, PromptConfig, render_prompt  # noqa: E402
from neuroscribe.training.tokenizer import (  # noqa: E402
    encode_prompt,
    train_tokenizer,
)
from tests.cvit_toys import REPORTS, overfit_two_studies, tiny_config, toy_images  # noqa: E402

CPU = ["CPUExecutionProvider"]


def random_lm_model(seed: int, lm_arch: str = "gpt2") -> CvitModel:
    """An untrained model whose LM weights have std 0.5, so greedy decoding does not repeat one token."""
    torch.manual_seed(seed)
    model = CvitModel(tiny_config(lm_arch=lm_arch)).eval()
    with torch.no_grad():
        for p in model.lm.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The overfit recipe of test_model.py (two studies, two reports), exported with quantize=True."""
    prompt = render_prompt(PromptConfig(style=InstructionStyle.PLAIN))
    tok = train_tokenizer([*REPORTS, prompt] * 3, vocab_size=400)
    model, _loss = overfit_two_studies(tok, prompt)
    out = tmp_path_factory.mktemp("onnx")
    info = export_onnx(model, out, quantize=True)
    prompt_ids = torch.tensor([encode_prompt(tok, prompt)] * 2)
    return model, out, info, tok, prompt_ids


def test_trained_model_tokens_identical(trained):
    """On both trained studies (and with images swapped) ORT greedy tokens equal torch generate's."""
    model, out, info, tok, p = trained
    eos = tok.eos_token_id
    for images in (toy_images(), toy_images().flip(0)):
        ref = model.generate(images, p, max_new_tokens=40, eos_id=eos).numpy()
        got = ort_greedy(out, images.numpy(), p.numpy(), 40, eos_id=eos)
        assert got.shape == ref.shape and np.array_equal(got, ref)
    texts = [tok.decode([t for t in row.tolist() if t != eos]) for row in got]
    assert texts == REPORTS[::-1]  # the model really follows the image, so the comparison means something
    assert set(info["files"]) == {"vision", "decoder", "embed_tokens", "decoder_int8"}
    assert info["decoder"]["inputs"]["past_key_values.1.value"]["shape"] == ["batch", 2, "past", 16]


def test_vision_and_prefill_logits_close(trained):
    """vision.onnx matches encode_image (atol 1e-4) and the decoder's prefill logits match the LM's."""
    model, out, _, _, p = trained
    images = toy_images()
    vision = ort.InferenceSession(str(out / "vision.onnx"), providers=CPU)
    dec = ort.InferenceSession(str(out / "decoder.onnx"), providers=CPU)
    with torch.no_grad():
        visual = model.encode_image(images)
        embeds = torch.cat([visual, model.lm.get_input_embeddings()(p)], dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ref = model.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    got_visual = vision.run(None, {"images": images.numpy()})[0]
    np.testing.assert_allclose(got_visual, visual.numpy(), atol=1e-4)
    table = np.load(out / "embed_tokens.npy")
    feed = {"inputs_embeds": np.concatenate([got_visual, table[p.numpy()]], axis=1),
            "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    feed.update({i.name: np.zeros((2, 2, 0, 16), np.float32) for i in dec.get_inputs()
                 if i.name.startswith("past_key_values.")})
    logits = dec.run(["logits"], feed)[0]
    np.testing.assert_allclose(logits, ref.numpy(), atol=1e-4)


@pytest.mark.parametrize("lm_arch", ["gpt2", "llama"])
def test_random_model_tokens_identical(tmp_path, lm_arch):
    """An untrained large-init model decodes identically in torch and ORT on 3 random batches."""
    model = random_lm_model(3, lm_arch)
    export_onnx(model, tmp_path)
    gen = torch.Generator().manual_seed(7)
    for k in range(3):
        images = torch.rand(2, 4, 3, 32, 32, generator=gen)
        p = torch.randint(3, 300, (2, 5), generator=gen)
        pm = torch.ones_like(p)
        if k == 2:
            pm[1, :2] = 0  # left padding in the last batch
        ref = model.generate(images, p, max_new_tokens=24, prompt_mask=pm).numpy()
        got = ort_greedy(tmp_path, images.numpy(), p.numpy(), 24, prompt_mask=pm.numpy())
        assert np.array_equal(got, ref)
        if lm_arch == "gpt2":
            assert len(np.unique(ref)) > 3  # not collapsed into one repeated token


def test_graphs_have_dynamic_batch_and_sequence_axes(trained):
    """Both graphs load on CPUExecutionProvider and run with batch 1 and 2 and varying lengths."""
    _, out, _, _, _ = trained
    vision = ort.InferenceSession(str(out / "vision.onnx"), providers=CPU)
    dec = ort.InferenceSession(str(out / "decoder.onnx"), providers=CPU)
    assert isinstance(vision.get_inputs()[0].shape[0], str)
    shapes = {i.name: i.shape for i in dec.get_inputs()}
    assert all(isinstance(d, str) for d in shapes["inputs_embeds"][:2])
    assert isinstance(shapes["past_key_values.0.key"][2], str)
    rng = np.random.default_rng(0)
    for b, t, past in ((1, 5, 0), (2, 1, 3), (2, 3, 7)):
        visual = vision.run(None, {"images": rng.random((b, 4, 3, 32, 32), dtype=np.float32)})[0]
        assert visual.shape == (b, 4, 32)
        feed = {"inputs_embeds": rng.standard_normal((b, t, 32)).astype(np.float32),
                "attention_mask": np.ones((b, past + t), np.int64),
                "position_ids": np.tile(np.arange(past, past + t, dtype=np.int64), (b, 1))}
        feed.update({n: rng.standard_normal((b, 2, past, 16)).astype(np.float32)
                     for n in shapes if n.startswith("past_key_values.")})
        res = dec.run(None, feed)
        assert res[0].shape[:2] == (b, t)
        assert all(r.shape == (b, 2, past + t, 16) for r in res[1:])


def test_quantized_decoder_is_smaller_and_runs(trained):
    """decoder_int8.onnx is smaller than decoder.onnx and greedy decoding with it returns tokens."""
    _, out, _, tok, p = trained
    assert (out / "decoder_int8.onnx").stat().st_size < (out / "decoder.onnx").stat().st_size
    got = ort_greedy(out, toy_images().numpy(), p.numpy(), 12, eos_id=tok.eos_token_id,
                     decoder="decoder_int8.onnx")
    assert got.dtype == np.int64 and got.shape[0] == 2 and 1 <= got.shape[1] <= 12
    assert ((got >= 0) & (got < len(tok))).all()
