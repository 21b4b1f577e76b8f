"""Decoding (pipeline/nn/decoding.py) of a decoder trained from scratch: greedy, beam search (beam 1 =
greedy, length-normalised scores), sampling with its log-probs, the max_len bound; the incremental path
(PrefixDecoder.start/step, a KV cache) against the full re-run (decoding.FullRerun). Decoding a pretrained
causal LM from a prefix (generate_from_prefix) is tested in tests/test_language_model.py."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.nn import decoding
from pipeline.nn.prefix_decoder import DecoderConfig, PrefixDecoder, caption_loss
from pipeline.nn.tokenizer import CaptionTokenizer

CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs playing with a frisbee in the park",
    "a plate of food with broccoli and rice",
    "A red double-decker bus driving down a city street.",
]
# the decoders are trained over the BPE ids the captions use (a corpus vocabulary): the same decoding code
# as over all 49,408 ids, and overfitting takes a fraction of the time
TOK = CaptionTokenizer.for_corpus("corpus", CAPTIONS)
SOT, EOT, V = TOK.sot_id, TOK.eot_id, TOK.vocab_size


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return TOK


def tiny(prefix_len=2, max_len=16, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return PrefixDecoder(DecoderConfig(vocab_size=V, width=32, layers=2, heads=2, max_len=max_len,
                                       prefix_len=prefix_len, dropout=dropout))


def greedy(model, prefix, max_len):
    return decoding.greedy(model, prefix, SOT, EOT, max_len)


def beam(model, prefix, beam_size, max_len, **kw):
    return decoding.beam(model, prefix, SOT, EOT, max_len, beam_size, **kw)


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
    out = greedy(model, prefix, max_len=16)
    for row, ref, n in zip(out, ids, lengths):
        assert row == ref[1:n - 1].tolist()          # no sot, no eot
    assert [tok.decode(r) for r in out] == [tok.decode(r) for r in ids]
    assert decoding.decode(model, prefix, SOT, EOT, 16, beam_size=1) == out      # decode: greedy at beam 1


def test_beam_one_equals_greedy_and_beams_decode(tok, trained):
    model, prefix, ids, lengths, _ = trained
    noisy = prefix + 0.8 * torch.randn_like(prefix)          # off the training points too
    for p in (prefix, noisy):
        assert beam(model, p, beam_size=1, max_len=16) == greedy(model, p, max_len=16)
    out3 = beam(model, prefix, beam_size=3, max_len=16)
    assert [tok.decode(r) for r in out3] == [tok.decode(r) for r in ids]
    assert beam(model, noisy, 3, 16) == beam(model, noisy, 3, 16)   # deterministic
    assert decoding.decode(model, noisy, SOT, EOT, 16, beam_size=3) == beam(model, noisy, 3, 16)
    with pytest.raises(ValueError, match="beam_size"):
        beam(model, prefix, 0, 16)


def test_decode_respects_max_len():
    model = tiny(max_len=16).eval()
    prefix = torch.randn(3, 2, 32)
    for out in (greedy(model, prefix, max_len=5), beam(model, prefix, 2, max_len=5)):
        assert len(out) == 3 and all(len(r) <= 4 for r in out)
    # decoding takes max_len as given (the captioners check it against their decoder, tests/test_syntic.py);
    # a sequence the decoder has no positions for is refused by the decoder itself
    with pytest.raises(ValueError, match="17 tokens > config max_len 16"):
        greedy(model, prefix, max_len=18)


def _sequence_logprob(model, prefix, ids, eot):
    seq = torch.tensor([[SOT] + ids + [eot]])
    logp = F.log_softmax(model(prefix, seq)[0, :-1], -1)
    return logp.gather(1, seq[0, 1:, None]).sum().item(), len(ids) + 1


def test_beam_score_is_length_normalised_and_not_worse_than_greedy(trained):
    model, prefix, _, _, _ = trained
    differs = 0
    for seed in range(16):
        torch.manual_seed(seed)
        p = prefix + 3.0 * torch.randn_like(prefix)
        g = greedy(model, p, max_len=16)
        b4 = beam(model, p, beam_size=4, max_len=16)
        for b in range(p.shape[0]):
            if len(g[b]) == 15 or len(b4[b]) == 15:       # truncated: no eot to score
                continue
            sg, ng = _sequence_logprob(model, p[b:b + 1], g[b], EOT)
            sb, nb = _sequence_logprob(model, p[b:b + 1], b4[b], EOT)
            assert sb / nb >= sg / ng - 1e-5
            differs += g[b] != b4[b]
    assert differs >= 1          # the comparison is not vacuous


def test_beam_without_length_normalisation_returns_its_best_summed_log_prob(trained):
    model, prefix, _, _, _ = trained
    torch.manual_seed(3)
    p = prefix + 1.0 * torch.randn_like(prefix)
    summed = beam(model, p, 4, 16, length_normalize=False)
    for b in range(p.shape[0]):
        if len(summed[b]) == 15:
            continue
        s_best, _ = _sequence_logprob(model, p[b:b + 1], summed[b], EOT)
        for other in beam(model, p[b:b + 1], 4, 16) + greedy(model, p[b:b + 1], 16):   # candidates it also saw
            if len(other) < 15:
                assert s_best >= _sequence_logprob(model, p[b:b + 1], other, EOT)[0] - 1e-4


def test_sample_draws_from_the_model_and_returns_its_log_probs(trained):
    model, prefix, _, _, _ = trained
    noisy = prefix + 1.5 * torch.randn(prefix.shape, generator=torch.Generator().manual_seed(0))
    tokens, logps = decoding.sample(model, noisy, SOT, EOT, 16, generator=torch.Generator().manual_seed(5))
    assert tokens.shape[0] == 4 and logps.shape == (4, tokens.shape[1] - 1) and (tokens[:, 0] == SOT).all()
    assert logps.requires_grad                                                 # the graph is kept (policy gradients)
    full = F.log_softmax(model(noisy, tokens[:, :-1]), -1).gather(-1, tokens[:, 1:, None])[..., 0]
    ids = decoding.ids_of(tokens, EOT)
    for b, row in enumerate(ids):
        n = len(row) + 1 if len(row) < tokens.shape[1] - 1 else len(row)     # generated tokens incl. eot
        torch.testing.assert_close(logps[b, :n], full[b, :n], atol=1e-5, rtol=1e-5)
        assert (logps[b, n:] == 0).all() and (tokens[b, 1 + n:] == EOT).all()  # after eot: eot, log-prob 0
        assert tokens[b, 1:1 + len(row)].tolist() == row and EOT not in row
    again, _ = decoding.sample(model, noisy, SOT, EOT, 16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again, tokens)                                          # seeded
    # a cold temperature samples the argmax: greedy's captions
    cold, _ = decoding.sample(model, noisy, SOT, EOT, 16, generator=torch.Generator().manual_seed(1),
                              temperature=1e-4)
    assert decoding.ids_of(cold, EOT) == greedy(model, noisy, 16)


# ---- the incremental path (PrefixDecoder.start/step, a KV cache) against the full re-run --------------------
class CountingDecoder(PrefixDecoder):
    """A PrefixDecoder that counts its forward and step calls and the rows of each step: the test of which
    path decoding took, and that beam search shrank the cache."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.forwards, self.step_rows = 0, []

    def forward(self, prefix, tokens):
        self.forwards += 1
        return super().forward(prefix, tokens)

    def step(self, tokens, cache):
        self.step_rows.append(tokens.shape[0])
        return super().step(tokens, cache)

    def reset(self):
        self.forwards, self.step_rows = 0, []


def counting(model):
    copy = CountingDecoder(model.cfg)
    copy.load_state_dict(model.state_dict())
    return copy.train(model.training)


def random_decoder(seed=0, eot_lift=0.0):
    """A small random decoder (a CountingDecoder), its weights drawn wider than the init (peakier distributions),
    the logit of <end_of_text> lifted by ``eot_lift`` through the final LayerNorm's bias (captions end sooner)."""
    model = counting(tiny(seed=seed))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        e = model.tok_emb.weight[EOT]
        model.ln_f.bias.add_(eot_lift * e / e.norm() ** 2)
    return model.eval()


def cached_and_full(model, fn):
    """fn(decoder) by the cached path (model) and the full re-run (FullRerun(model)), checking which ran."""
    model.reset()
    cached = fn(model)
    assert model.forwards == 0 and model.step_rows, "decoding did not take the incremental path"
    steps = list(model.step_rows)
    model.reset()
    full = fn(decoding.FullRerun(model))
    assert model.step_rows == [] and model.forwards > 0, "FullRerun did not take the full re-run"
    return cached, full, steps


def test_cached_greedy_and_beam_give_the_full_reruns_ids(trained):
    torch.manual_seed(0)
    random_prefix = torch.randn(16, 2, 32)
    trained_model, trained_prefix = counting(trained[0]), trained[1]
    noisy = torch.cat([trained_prefix + s * torch.randn_like(trained_prefix) for s in (0.0, 0.8, 1.5, 3.0)])
    shrank = ended = 0
    for model, prefix in ((random_decoder(0), random_prefix), (random_decoder(1, eot_lift=2.0), random_prefix),
                          (trained_model, noisy)):
        cached, full, _ = cached_and_full(model, lambda m: greedy(m, prefix, max_len=16))
        assert cached == full
        ended += sum(len(r) < 15 for r in cached)
        for k in (1, 3):
            for norm in (True, False):
                cached, full, rows = cached_and_full(model, lambda m: beam(m, prefix, k, 16, length_normalize=norm))
                assert cached == full, (k, norm)
                # the cache follows the beam: one row (sot), then k, then fewer as beams finish
                shrank += k == 3 and any(0 < b < a for a, b in zip(rows, rows[1:]))
    assert shrank and ended                      # finished beams left the cache; greedy rows ended with eot


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_cached_sample_gives_the_full_reruns_draws_log_probs_and_gradients(mode):
    """Same generator seed: the same tokens, log-probs to 1e-5, and d(sum of weighted log-probs)/d(parameters)
    to 1e-5. Train mode with dropout 0 is CMSA's sampling without its dropout (with dropout the two paths
    differ by design: the module docstring of pipeline/nn/decoding.py)."""
    model = getattr(random_decoder(0, eot_lift=1.0), mode)()
    prefix = torch.randn(12, 2, 32, generator=torch.Generator().manual_seed(3)).requires_grad_()
    weights = torch.randn(12, 15, generator=torch.Generator().manual_seed(4))        # an advantage per token

    def run(m):
        model.zero_grad(set_to_none=True)
        prefix.grad = None
        tokens, logps = decoding.sample(m, prefix, SOT, EOT, 16, generator=torch.Generator().manual_seed(7))
        (logps * weights[:, :logps.shape[1]]).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        return tokens, logps.detach(), grads, prefix.grad.clone()

    (tokens, logps, grads, dprefix), (tokens_f, logps_f, grads_f, dprefix_f), _ = cached_and_full(model, run)
    lengths = [len(r) for r in decoding.ids_of(tokens, EOT)]
    assert len(set(lengths)) > 3 and min(lengths) < 15                   # varied lengths, some ended with eot
    assert torch.equal(tokens, tokens_f)
    torch.testing.assert_close(logps, logps_f, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_f.keys()
    for name in grads:
        assert grads[name].abs().max() > 0, name                          # every parameter gets a gradient
        torch.testing.assert_close(grads[name], grads_f[name], atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(dprefix, dprefix_f, atol=1e-5, rtol=1e-5)


def test_a_decoder_without_step_is_re_run():
    """The full re-run stays the path of a decoder with forward only (PCM-Net's SentenceDecoder): every step
    runs the whole sequence so far."""
    model = random_decoder()
    prefix = torch.randn(3, 2, 32)
    model.reset()
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(args[1].shape[1]))
    try:
        out = greedy(decoding.FullRerun(model), prefix, max_len=6)
    finally:
        handle.remove()
    assert seen == [1, 2, 3, 4, 5][:len(seen)] and len(seen) >= 1 and model.step_rows == []
    assert out == greedy(model, prefix, max_len=6)
