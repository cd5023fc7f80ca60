"""Tests for the CVIT report model (training/model.py) and its BPE tokenizer (training/tokenizer.py)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402, N812

from neuroscribe.training.model import CvitModel, load_checkpoint, save_checkpoint  # noqa: E402
from neuroscribe.training.prompts import InstructionStyle, PromptConfig, render_prompt  # noqa: E402
from neuroscribe.training.tokenizer import (  # noqa: E402
    IGNORE_INDEX,
    SPECIAL_TOKENS,
    encode_example,
    encode_prompt,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from tests.cvit_toys import REPORTS, batch, overfit_two_studies, tiny_config, toy_images  # noqa: E402


@pytest.fixture(scope="module")
def prompt() -> str:
    """The default plain prompt text, placeholder line included."""
    return render_prompt(PromptConfig(style=InstructionStyle.PLAIN))


@pytest.fixture(scope="module")
def tokenizer(prompt):
    """A small BPE tokenizer trained on the toy reports and the prompt."""
    return train_tokenizer([*REPORTS, prompt] * 3, vocab_size=400)


def test_tokenizer_round_trip_and_deterministic(tmp_path, prompt, tokenizer):
    """Text survives encode/decode, training twice gives the same file, and save/load keeps ids."""
    text = "Hypodensity 12 × 8 mm at 45° — unchanged.\n" + REPORTS[1]
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    again = train_tokenizer([*REPORTS, prompt] * 3, vocab_size=400)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    path = save_tokenizer(tokenizer, tmp_path)
    assert path.name == "tokenizer.json"
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(text, add_special_tokens=False) == ids
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)


def test_encode_example_masks_prompt(tokenizer, prompt):
    """The placeholder line is dropped, the prompt is labelled -100 and the report ends with eos."""
    ids, labels = encode_example(tokenizer, prompt, REPORTS[0])
    n_prompt = len(encode_prompt(tokenizer, prompt))
    assert ids[0] == tokenizer.bos_token_id
    assert "<image>" not in tokenizer.decode(ids)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n_prompt:-1]) == REPORTS[0]
    with pytest.raises(ValueError, match="<image>"):
        encode_example(tokenizer, "no placeholder\n", REPORTS[0])


def test_shapes_and_loss_over_report_tokens_only(tokenizer, prompt):
    """encode_image gives (B, K, d_lm); the loss equals a manual cross-entropy over report tokens."""
    torch.manual_seed(0)
    model = CvitModel(tiny_config(len(tokenizer)))
    images = toy_images()
    visual = model.encode_image(images)
    assert visual.shape == (2, 4, 32)
    ids, mask, labels = batch(tokenizer, prompt, REPORTS)
    out = model(images, ids, mask, labels)
    B, T = ids.shape  # noqa: N806
    assert out.logits.shape == (B, 4 + T, len(tokenizer))
    # manual: logit at visual offset K + t - 1 predicts token t, for report tokens only
    terms = []
    for b in range(B):
        for t in range(T):
            if labels[b, t] != IGNORE_INDEX:
                terms.append(F.cross_entropy(out.logits[b, 4 + t - 1][None], labels[b, t][None]))
    n_report = int((labels != IGNORE_INDEX).sum())
    assert len(terms) == n_report > 0
    assert torch.allclose(out.loss, torch.stack(terms).mean(), atol=1e-5)
    assert n_report < int(mask.sum())  # prompt tokens really were excluded
    with pytest.raises(AssertionError, match="model grid"):
        model.encode_image(torch.zeros(1, 5, 3, 32, 32))



def test_overfit_two_studies_follows_the_image(tokenizer, prompt):
    """After training, each study's image yields its own report; swapping images swaps them."""
    model, loss = overfit_two_studies(tokenizer, prompt)
    images = toy_images()
    assert loss < 0.05
    p = torch.tensor([encode_prompt(tokenizer, prompt)] * 2)
    eos = tokenizer.eos_token_id

    def texts(imgs):
        out = model.generate(imgs, p, max_new_tokens=40, eos_id=eos)
        return [tokenizer.decode([t for t in row.tolist() if t != eos]) for row in out]

    assert texts(images) == REPORTS
    assert texts(images.flip(0)) == REPORTS[::-1]


def test_generate_kv_cache_matches_full_recompute(tokenizer, prompt):
    """Greedy decoding with the KV cache picks the same tokens as recomputing the whole sequence."""
    torch.manual_seed(1)
    model = CvitModel(tiny_config(len(tokenizer))).eval()
    images = toy_images()
    p = torch.tensor([encode_prompt(tokenizer, prompt)] * 2)
    cached = model.generate(images, p, max_new_tokens=8)
    seq = p
    with torch.no_grad():
        for _ in range(8):
            nxt = model(images, seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq[:, p.shape[1]:])


def test_freeze_options_keep_frozen_parameters(tokenizer, prompt):
    """With freeze_lm and freeze_vision, a step changes only the resampler and projector."""
    torch.manual_seed(0)
    model = CvitModel(tiny_config(len(tokenizer), freeze_lm=True, freeze_vision=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    ids, mask, labels = batch(tokenizer, prompt, REPORTS)
    model(toy_images(), ids, mask, labels).loss.backward()
    opt.step()
    after = model.state_dict()
    frozen = [k for k in before if k.startswith(("lm.", "slice_encoder.", "slice_pos."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    moved = [k for k in before if k.startswith(("resampler.", "projector."))]
    assert any(not torch.equal(before[k], after[k]) for k in moved)
    assert all(not p.requires_grad for p in model.lm.parameters())


def test_checkpoint_round_trip_and_atomic_write(tmp_path, tokenizer, prompt, monkeypatch):
    """A reloaded checkpoint gives identical logits; a failed save leaves the old file and no temp."""
    torch.manual_seed(0)
    model = CvitModel(tiny_config(len(tokenizer), lm_arch="llama")).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, mask, labels = batch(tokenizer, prompt, REPORTS)
    model(toy_images(), ids, mask, labels).loss.backward()
    opt.step()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, opt, step=7, config={"lr": 1e-3}, extra={"note": "x"})
    loaded, ckpt = load_checkpoint(path)
    assert (ckpt["step"], ckpt["config"], ckpt["extra"]) == (7, {"lr": 1e-3}, {"note": "x"})
    assert ckpt["optimizer"]["state"]
    with torch.no_grad():
        assert torch.equal(model(toy_images(), ids, mask).logits, loaded(toy_images(), ids, mask).logits)
    good = path.read_bytes()

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, opt, step=8)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "new.pt", model)
    assert not (tmp_path / "new.pt").exists()


def test_pretrained_lm_from_local_directory(tmp_path, tokenizer, prompt):
    """lm='pretrained' loads a tiny local GPT-2 with local_files_only and keeps its weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=160, n_embd=48, n_layer=1,
                                    n_head=2))
    hf.save_pretrained(tmp_path / "lm")
    model = CvitModel(tiny_config(lm="pretrained", lm_path=str(tmp_path / "lm"), freeze_lm=True))
    assert model.d_lm == 48
    assert torch.equal(model.lm.transformer.wte.weight, hf.transformer.wte.weight)
    ids, mask, labels = batch(tokenizer, prompt, REPORTS)
    out = model(toy_images(), ids, mask, labels)
    assert out.logits.shape == (2, 4 + ids.shape[1], len(tokenizer))
    assert torch.isfinite(out.loss)
    with pytest.raises(FileNotFoundError, match="lm_path"):
        CvitModel(tiny_config(lm="pretrained", lm_path=str(tmp_path / "missing")))


def test_vision_pool_keeps_where_a_lesion_is():
    """With vision_pool=4 the slice encoder sees a bright spot's side; its head reads a 4 x 4 map."""
    torch.manual_seed(0)
    model = CvitModel(tiny_config(300, vision_pool=4)).eval()
    assert model.slice_encoder.head.in_features == 4 * 4 * model.slice_encoder.convs[-3].out_channels
    left = torch.zeros(1, 3, 32, 32)
    left[..., 12:20, 2:10] = 1.0
    right = left.flip(-1)
    with torch.no_grad():
        a, b = model.slice_encoder(left), model.slice_encoder(right)
    assert not torch.allclose(a, b, atol=1e-4)


def test_token_dropout_noises_report_inputs_only_while_training(tokenizer, prompt):
    """Training replaces some report input tokens (never prompt tokens or labels); eval changes nothing."""
    torch.manual_seed(0)
    model = CvitModel(tiny_config(len(tokenizer), token_dropout=0.5))
    ids, mask, labels = batch(tokenizer, prompt, REPORTS)
    seen = []
    hook = model.lm.get_input_embeddings().register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    model.train()(toy_images(), ids, mask, labels)
    model.eval()(toy_images(), ids, mask, labels)
    hook.remove()
    trained, evaluated = seen
    report = labels != -100
    assert torch.equal(trained[~report], ids[~report])
    changed = (trained != ids) & report
    assert 0.2 < changed.sum() / report.sum() < 0.8
    assert torch.equal(evaluated, ids)
    with pytest.raises(ValueError, match="token_dropout"):
        tiny_config(300, token_dropout=1.0)


def test_feature_norm_is_batch_independent_at_inference():
    """feature_norm standardises over the batch while training and uses running statistics after."""
    torch.manual_seed(0)
    model = CvitModel(tiny_config(300, feature_norm=True))
    images = toy_images()
    model.train()
    model.encode_image(images)  # updates the running statistics
    model.encode_image(images[:1])  # one study while training: running statistics, no error
    model.eval()
    with torch.no_grad():
        both = model.encode_image(images)
        alone = model.encode_image(images[1:])
    assert torch.allclose(both[1:], alone, atol=1e-5)
    assert model.feature_norm.num_batches_tracked.item() == 1


def test_keyword_head_trains_the_image_path_and_stays_out_of_the_export(tmp_path, tokenizer, prompt):
    """aux_keywords adds a head on the visual tokens: its BCE reaches the slice encoder; export ignores it."""
    from neuroscribe.training.export import export_onnx

    torch.manual_seed(0)
    assert CvitModel(tiny_config(len(tokenizer))).keyword_head is None
    model = CvitModel(tiny_config(len(tokenizer), aux_keywords=5))
    ids, mask, labels = batch(tokenizer, prompt, REPORTS)
    out = model(toy_images(), ids, mask, labels)
    assert out.keyword_logits is not None and out.keyword_logits.shape == (2, 5)
    targets = torch.tensor([[1.0, 0, 0, 1, 0], [0, 1, 1, 0, 0]])
    F.binary_cross_entropy_with_logits(out.keyword_logits, targets).backward()
    assert model.slice_encoder.convs[0].weight.grad.abs().sum() > 0  # the image path learns from it
    assert all(p.grad is None for p in model.lm.parameters())  # the LM does not
    with pytest.raises(ValueError, match="aux_keywords"):
        tiny_config(aux_keywords=-1)
    export_onnx(model, tmp_path / "with")
    model.set_keyword_head(0)  # same weights without the head
    assert model.keyword_head is None and model.config.aux_keywords == 0
    assert not any(k.startswith("keyword_head") for k in model.state_dict())
    export_onnx(model, tmp_path / "without")
    for name in ("vision.onnx", "decoder.onnx", "embed_tokens.npy"):
        assert (tmp_path / "with" / name).read_bytes() == (tmp_path / "without" / name).read_bytes()
