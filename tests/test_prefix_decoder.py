"""Prefix decoder: tokenizer, the forward convention, the Eq. 6 loss, greedy and beam decoding."""
import json
import pytest
import torch
import torch.nn.functional as F

from pipeline.nn.prefix_decoder import (CaptionTokenizer, DecoderConfig, PrefixDecoder,
                                            beam_decode, caption_loss, greedy_decode)

CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs playing with a frisbee in the park",
    "a plate of food with broccoli and rice",
    "A red double-decker bus driving down a city street.",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return CaptionTokenizer()


def chars(text):
    """The caption's characters, lowercased, without whitespace (CLIP BPE splits digits and
    punctuation into separate words, so spacing is not preserved)."""
    return "".join(text.lower().split())


def tiny(prefix_len=2, max_len=16, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return PrefixDecoder(DecoderConfig(width=32, layers=2, heads=2, max_len=max_len,
                                       prefix_len=prefix_len, dropout=dropout))


# ---- tokenizer ------------------------------------------------------------------------------
def test_tokenizer_layout(tok):
    assert (tok.vocab_size, tok.sot_id, tok.eot_id, tok.pad_id) == (49408, 49406, 49407, 0)
    ids, lengths = tok.encode(CAPTIONS, max_len=20)
    assert ids.dtype == torch.long and ids.shape == (4, 20) and lengths.shape == (4,)
    for row, n in zip(ids, lengths):
        assert row[0] == tok.sot_id and row[n - 1] == tok.eot_id
        assert (row[n:] == 0).all() and (row[1:n - 1] < tok.sot_id).all()


def test_tokenizer_truncates_keeping_end_token(tok):
    ids, lengths = tok.encode(["a very long caption " * 10, ""], max_len=8)
    assert lengths.tolist() == [8, 2]
    assert ids[0, 0] == tok.sot_id and ids[0, 7] == tok.eot_id
    assert ids[1, :2].tolist() == [tok.sot_id, tok.eot_id] and (ids[1, 2:] == 0).all()
    assert tok.decode(ids[0]) == "a very long caption a very"
    assert tok.decode(ids[1]) == ""


def check_round_trip(tok, captions):
    ids, lengths = tok.encode(captions, max_len=77)
    for cap, row, n in zip(captions, ids, lengths):
        text = tok.decode(row)
        assert chars(text) == chars(cap), (cap, text)
        again, n2 = tok.encode([text], max_len=77)
        assert again[0].tolist() == row.tolist() and n2.item() == n.item()


def test_tokenizer_round_trip(tok):
    check_round_trip(tok, CAPTIONS)


def test_tokenizer_round_trip_real_captions(tok, shared_data):
    entries = json.loads((shared_data / "coco-karpathy" / "val.json").read_text())
    captions = [c for e in entries[:60] for c in e["captions"]]
    assert len(captions) >= 300
    check_round_trip(tok, captions)


# ---- forward convention and Eq. 6 -----------------------------------------------------------
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


# ---- training and decoding ------------------------------------------------------------------
def overfit(tok, steps=150):
    ids, lengths = tok.encode(CAPTIONS, max_len=16)
    model = tiny(max_len=16)
    torch.manual_seed(1)
    prefix = torch.randn(4, 2, 32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = caption_loss(model(prefix, ids), ids, lengths)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), prefix, ids, lengths, loss.item()


@pytest.fixture(scope="module")
def trained(tok):
    return overfit(tok)


def test_overfits_and_greedy_reproduces(tok, trained):
    model, prefix, ids, lengths, final = trained
    assert final < 0.05
    out = greedy_decode(model, prefix, max_len=16)
    for row, ref, n in zip(out, ids, lengths):
        assert row == ref[1:n - 1].tolist()          # no sot, no eot
    assert [tok.decode(r) for r in out] == [tok.decode(r) for r in ids]


def test_beam_one_equals_greedy_and_beams_decode(tok, trained):
    model, prefix, ids, lengths, _ = trained
    noisy = prefix + 0.8 * torch.randn_like(prefix)          # off the training points too
    for p in (prefix, noisy):
        assert beam_decode(model, p, beam_size=1, max_len=16) == greedy_decode(model, p, max_len=16)
    out3 = beam_decode(model, prefix, beam_size=3, max_len=16)
    assert [tok.decode(r) for r in out3] == [tok.decode(r) for r in ids]
    assert beam_decode(model, noisy, 3, 16) == beam_decode(model, noisy, 3, 16)   # deterministic


def test_decode_respects_max_len():
    model = tiny(max_len=16).eval()
    prefix = torch.randn(3, 2, 32)
    for out in (greedy_decode(model, prefix, max_len=5), beam_decode(model, prefix, 2, max_len=5)):
        assert len(out) == 3 and all(len(r) <= 4 for r in out)
    with pytest.raises(ValueError):
        greedy_decode(model, prefix, max_len=17)


def _sequence_logprob(model, prefix, ids, eot):
    seq = torch.tensor([[49406] + ids + [eot]])
    logp = F.log_softmax(model(prefix, seq)[0, :-1], -1)
    return logp.gather(1, seq[0, 1:, None]).sum().item(), len(ids) + 1


def test_beam_score_is_length_normalised_and_not_worse_than_greedy(trained):
    model, prefix, _, _, _ = trained
    differs = 0
    for seed in range(8):
        torch.manual_seed(seed)
        p = prefix + 1.0 * torch.randn_like(prefix)
        greedy = greedy_decode(model, p, max_len=16)
        beam = beam_decode(model, p, beam_size=4, max_len=16)
        for b in range(p.shape[0]):
            if len(greedy[b]) == 15 or len(beam[b]) == 15:       # truncated: no eot to score
                continue
            sg, ng = _sequence_logprob(model, p[b:b + 1], greedy[b], 49407)
            sb, nb = _sequence_logprob(model, p[b:b + 1], beam[b], 49407)
            assert sb / nb >= sg / ng - 1e-5
            differs += greedy[b] != beam[b]
    assert differs >= 1          # the comparison is not vacuous


def test_corpus_vocabulary_round_trips_and_refuses_unknown_tokens():
    texts = ["a dog runs on the beach", "two cats sleep on a red sofa"]
    full = CaptionTokenizer()
    small = CaptionTokenizer.for_corpus("corpus", texts)
    assert small.vocab_size == len(set(full.corpus_vocabulary(texts)) | {0, full.sot_id, full.eot_id}) < 30
    ids, lengths = small.encode(texts, max_len=12)
    assert int(ids.max()) < small.vocab_size and ids[0, 0] == small.sot_id
    assert [small.decode(row) for row in ids] == [full.decode(row) for row in full.encode(texts, 12)[0]]
    torch.testing.assert_close(lengths, full.encode(texts, 12)[1])
    with pytest.raises(KeyError, match="'horse'"):
        small.encode(["a horse"], max_len=8)
    assert CaptionTokenizer.for_corpus("full", texts).vocab_size == 49408
    with pytest.raises(ValueError, match="'full' or 'corpus'"):
        CaptionTokenizer.for_corpus("tiny", texts)
