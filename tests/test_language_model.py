"""The causal-LM loader (pipeline/models/language_model.py), its prefix interface, and decoding from a
prefix (pipeline/nn/decoding.generate_from_prefix)."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.models.language_model import CausalLM, load_causal_lm
from pipeline.nn.decoding import generate_from_prefix

NAME = "synthcap-tiny-gpt2"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm() -> CausalLM:
    return load_causal_lm(NAME, seed=0)


def test_built_from_config_is_seeded_and_matches_its_clip_bpe_tokenizer(lm):
    again, other = load_causal_lm(NAME, seed=0), load_causal_lm(NAME, seed=1)
    assert again.identity == lm.identity
    assert other.identity["weights_sha256"] != lm.identity["weights_sha256"]
    assert lm.identity["kind"] == "language_model" and lm.identity["pretrained"] is None and lm.identity["seed"] == 0
    assert type(lm.model).__name__ == "GPT2LMHeadModel"
    cfg, tok = lm.model.config, lm.tokenizer
    assert (cfg.vocab_size, len(tok)) == (49408, 49408)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
    for a, b in zip(again.model.parameters(), lm.model.parameters()):
        assert torch.equal(a, b)


def test_save_pretrained_folder_loads_through_the_pretrained_path_with_the_same_logits(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    loaded = load_causal_lm("my-gpt2", pretrained=str(tmp_path))
    assert loaded.identity["pretrained"] == str(tmp_path) and loaded.identity["seed"] is None
    assert loaded.identity["weights_sha256"] == lm.identity["weights_sha256"]
    texts = ["A brown dog runs through the grass .", "two children play"]
    ids, lengths = lm.encode(texts, 12)
    ids2, lengths2 = loaded.encode(texts, 12)
    assert torch.equal(ids, ids2) and torch.equal(lengths, lengths2)
    with torch.no_grad():
        assert torch.allclose(lm.model(ids).logits, loaded.model(ids).logits, atol=1e-6)


def test_a_missing_model_fails_with_a_message_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"(?s)language_model model 'gpt2-somewhere'.*no-such-folder.*HF_HUB_OFFLINE"):
        load_causal_lm("gpt2-somewhere", pretrained=str(tmp_path / "no-such-folder"))
    with pytest.raises(FileNotFoundError, match="no-such-config"):
        load_causal_lm("no-such-config")


def test_encode_appends_eos_pads_and_truncates(lm):
    ids, lengths = lm.encode(["A dog runs on the grass .", "two men", "one two three four five six seven"], 5)
    assert ids.shape == (3, 5)
    assert lengths.tolist() == [5, 3, 5]
    assert ids[1, 2].item() == lm.eos_id and (ids[1, 3:] == lm.pad_id).all()
    assert ids[0, 4].item() == lm.eos_id                        # cut to max_len - 1 tokens, then eos
    assert lm.decode(ids[1]) == "two men"
    full, _ = lm.encode(["A dog runs on the grass ."], 20)
    assert lm.decode(full[0]) == "a dog runs on the grass ."  # CLIP BPE lower-cases


def test_prefix_loss_ignores_padding_and_counts_eos(lm):
    torch.manual_seed(0)
    lm.model.eval()
    prefix = torch.randn(2, 3, lm.width)
    ids, lengths = lm.encode(["a dog runs on the grass", "two men"], 10)
    batch_loss = lm.prefix_loss(prefix, ids, lengths)
    total, count = 0.0, 0
    for b in range(2):
        n = int(lengths[b])
        x = torch.cat([prefix[b:b + 1], lm.embed(ids[b:b + 1, :n])], dim=1)   # no padding at all
        logits = lm.model(inputs_embeds=x).logits[0, 2:2 + n]
        total += F.cross_entropy(logits, ids[b, :n], reduction="sum").item()
        count += n
    assert batch_loss.item() == pytest.approx(total / count, rel=1e-5)


def test_greedy_generate_equals_a_manual_argmax_loop_and_beams_are_deterministic(lm):
    torch.manual_seed(1)
    lm.model.eval()
    prefix = torch.randn(2, 2, lm.width) * 3
    generate = lambda beam_size: generate_from_prefix(lm.model, prefix, lm.eos_id, lm.pad_id, 6, beam_size)  # noqa: E731
    got = generate(1)
    with torch.no_grad():
        for b in range(2):
            x, manual = prefix[b:b + 1], []
            for _ in range(6):
                nxt = int(lm.model(inputs_embeds=x).logits[0, -1].argmax())
                if nxt == lm.eos_id:
                    break
                manual.append(nxt)
                x = torch.cat([x, lm.embed(torch.tensor([[nxt]]))], dim=1)
            assert got[b] == manual
    beams = generate(3)
    assert beams == generate(3)
    assert all(len(seq) <= 6 and lm.eos_id not in seq for seq in beams)
    lm.model.train()                                            # decoding is in eval mode and restores the mode
    assert generate(1) == got and lm.model.training
    lm.model.eval()
    with pytest.raises(ValueError, match="beam_size"):
        generate(0)
