"""Prefix decoder (pipeline/nn/prefix_decoder.py): the forward convention, the incremental path (start/step
over a KV cache) against forward, and the Eq. 6 loss. The tokenizer is tested in tests/test_tokenizer.py,
decoding in tests/test_decoding.py."""
import pytest
import torch

from pipeline.nn.prefix_decoder import DecoderConfig, PrefixDecoder, caption_loss


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(prefix_len=2, max_len=16, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return PrefixDecoder(DecoderConfig(width=32, layers=2, heads=2, max_len=max_len,
                                       prefix_len=prefix_len, dropout=dropout))


def test_logits_i_sees_tokens_up_to_i_only():
    model = tiny().eval()
    prefix = torch.randn(1, 2, 32)
    tokens = torch.randint(0, 1000, (1, 10))
    base = model(prefix, tokens)
    assert base.shape == (1, 10, 49408)
    changed = tokens.clone()
    changed[0, 6] = 4242
    out = model(prefix, changed)
    torch.testing.assert_close(out[:, :6], base[:, :6], rtol=0, atol=0)    # causal
    assert (out[:, 6] - base[:, 6]).abs().max() > 1e-4                    # logits[6] sees token 6
    other = model(torch.randn(1, 2, 32), tokens)
    assert (other[:, 0] - base[:, 0]).abs().max() > 1e-4                  # prefix conditions


def test_output_layer_is_tied_and_shapes_are_checked():
    model = tiny()
    assert not any(p.shape == (49408, 32) for name, p in model.named_parameters() if name != "tok_emb.weight")
    with pytest.raises(ValueError, match="prefix length 3 != config prefix_len 2"):
        model(torch.randn(1, 3, 32), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="17 tokens > config max_len 16"):
        model(torch.randn(1, 2, 32), torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("mode", ["eval", "train"])          # train mode with dropout 0: the same numbers
def test_step_gives_forwards_logits_one_or_several_tokens_at_a_time(mode):
    model = getattr(tiny(), mode)()
    prefix = torch.randn(3, 2, 32)
    tokens = torch.randint(0, 49408, (3, 16))
    full = model(prefix, tokens)
    cache = model.start(prefix)
    assert cache.length == 2 and len(cache.keys) == 2
    assert cache.keys[0].shape == (3, 2, 2, 16)                       # [B, heads, S, width/heads]
    for i in range(16):                                   # one token at a time: logits of position i
        logits, cache = model.step(tokens[:, i:i + 1], cache)
        torch.testing.assert_close(logits, full[:, i], atol=1e-5, rtol=1e-5)
    assert cache.length == 18
    cache = model.start(prefix)     # several at a time: causal among the new ones too (the next chunk sees
    for lo, hi in ((0, 5), (5, 6), (6, 16)):                       # their keys and values)
        logits, cache = model.step(tokens[:, lo:hi], cache)
        torch.testing.assert_close(logits, full[:, hi - 1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="17 tokens > config max_len 16"):
        model.step(tokens[:, :1], cache)
    with pytest.raises(ValueError, match="prefix length 3 != config prefix_len 2"):
        model.start(torch.randn(1, 3, 32))


def test_cache_rows_follow_the_batch_rows():
    model = tiny().eval()
    prefix, tokens = torch.randn(3, 2, 32), torch.randint(0, 49408, (3, 6))
    _, cache = model.step(tokens[:, :5], model.start(prefix))
    index = torch.tensor([2, 0, 0])
    logits, moved = model.step(tokens[index, 5:6], cache.rows(index))
    torch.testing.assert_close(logits, model(prefix[index], tokens[index])[:, -1], atol=1e-5, rtol=1e-5)
    assert moved.length == 8 and all(k.shape[0] == 3 for k in moved.keys + moved.values)


def test_caption_loss_matches_manual_eq6():
    torch.manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T))
    lengths = torch.tensor([7, 4, 2])
    per_caption = []
    for b in range(B):
        L = int(lengths[b])
        terms = []
        for i in range(1, L):                 # w_1..w_{|t|}: every real token after sot, eot included
            logp = logits[b, i - 1] - torch.logsumexp(logits[b, i - 1], 0)
            terms.append(-logp[tokens[b, i]])
        per_caption.append(sum(terms) / len(terms))
    expected = sum(per_caption) / B
    got = caption_loss(logits, tokens, lengths)
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-6)
    # padding positions do not matter
    logits2, tokens2 = logits.clone(), tokens.clone()
    logits2[1, 3:] = 100 * torch.randn(T - 3, V, dtype=torch.float64)
    tokens2[2, 2:] = 0
    torch.testing.assert_close(caption_loss(logits2, tokens2, lengths), got)
