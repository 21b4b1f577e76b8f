"""Training batches are cut after their longest caption (``pipeline.nn.tokenizer.to_longest``): every
decoder's loss on the cut batch equals its loss on the batch padded to ``max_len`` (a direct comparison,
dropout off), and every method's ``batch`` hands the training loop the cut batch."""
import numpy as np
import pytest
import torch

from pipeline.methods import Step, cmsa
from pipeline.models.language_model import load_causal_lm
from pipeline.nn.tokenizer import CaptionTokenizer, to_longest
from test_cmsa import hand_model
from test_pcmnet import tiny_batch, tiny_model
from test_syntic import CAPTIONS, captioner, make_batch

SHORT = ["a dog", "a man rides a red bike down the road", "two cats"]


def cut(batch: dict) -> dict:
    tokens, lengths = to_longest(batch["tokens"], batch["lengths"])
    return {**batch, "tokens": tokens, "lengths": lengths}


def test_to_longest_drops_only_the_columns_of_padding():
    tok = CaptionTokenizer()
    tokens, lengths = tok.encode(SHORT, max_len=24)
    cut_tokens, cut_lengths = to_longest(tokens, lengths)
    assert cut_tokens.shape == (3, int(lengths.max())) and int(lengths.max()) < 24
    assert torch.equal(cut_tokens, tokens[:, :cut_tokens.shape[1]]) and torch.equal(cut_lengths, lengths)
    assert (tokens[:, cut_tokens.shape[1]:] == tok.pad_id).all()                  # what went was padding
    full = tok.encode(["a man rides a red bike down the road and a dog runs after him on the grass"], max_len=8)
    assert to_longest(*full)[0].shape == (1, 8)                                    # a full batch stays whole


def test_the_syntic_and_cmsa_decoder_loss_is_the_same_on_the_cut_batch():
    tok = CaptionTokenizer.for_corpus("corpus", CAPTIONS + SHORT)
    model = captioner(tok).eval()
    batch = make_batch(tok, SHORT)
    assert cut(batch)["tokens"].shape[1] < batch["tokens"].shape[1]
    torch.testing.assert_close(model.loss(cut(batch)), model.loss(batch), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("focal_gamma", [0.0, 2.0])
def test_the_pcmnet_loss_is_the_same_on_the_cut_batch(focal_gamma):
    tok = CaptionTokenizer()
    model = tiny_model(tok=tok)
    model.cfg = type(model.cfg)(**{**model.cfg.__dict__, "focal_gamma": focal_gamma, "clip_w": 4.0})
    batch = tiny_batch(tok, captions=SHORT + ["a red car"])
    assert cut(batch)["tokens"].shape[1] < batch["tokens"].shape[1]
    a, b = model.loss(cut(batch)), model.loss(batch)
    torch.testing.assert_close(a[0] if isinstance(a, tuple) else a, b[0] if isinstance(b, tuple) else b,
                               rtol=1e-6, atol=1e-6)


def test_the_causal_lm_prefix_loss_of_clipcap_and_maccap_is_the_same_on_the_cut_batch():
    lm = load_causal_lm("synthcap-tiny-gpt2", seed=0)
    lm.model.eval()
    tokens, lengths = lm.encode(SHORT, max_len=20)
    prefix = torch.randn(3, 2, lm.model.config.n_embd, generator=torch.Generator().manual_seed(0))
    short, _ = to_longest(tokens, lengths)
    assert short.shape[1] < 20
    torch.testing.assert_close(lm.prefix_loss(prefix, short, lengths), lm.prefix_loss(prefix, tokens, lengths),
                               rtol=1e-6, atol=1e-6)


def test_a_method_batch_hands_the_training_loop_the_cut_batch():
    model, s, data, rows, _ = hand_model()
    batch = cmsa.batch(model, rows, np.arange(len(rows["text"])), s, data, Step(0, 0, 0, 0, "mle"))
    assert batch["tokens"].shape[1] == int(batch["lengths"].max()) < s.decoder.max_len
