"""The caption tokenizer of the decoders trained from scratch (pipeline/nn/tokenizer.py): CLIP BPE with
start/end tokens and 0-padding, over the full BPE vocabulary or a corpus's."""
import json

import pytest
import torch

from pipeline.nn.tokenizer import CaptionTokenizer

CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs playing with a frisbee in the park",
    "a plate of food with broccoli and rice",
    "A red double-decker bus driving down a city street.",
]


@pytest.fixture(scope="module")
def tok():
    return CaptionTokenizer()


def chars(text):
    """The caption's characters, lowercased, without whitespace (CLIP BPE splits digits and
    punctuation into separate words, so spacing is not preserved)."""
    return "".join(text.lower().split())


def test_tokenizer_layout(tok):
    assert (tok.vocab_size, tok.sot_id, tok.eot_id, tok.pad_id) == (49408, 49406, 49407, 0)
    ids, lengths = tok.encode(CAPTIONS, max_len=20)
    assert ids.dtype == torch.long and ids.shape == (4, 20) and lengths.shape == (4,)
    for row, n in zip(ids, lengths):
        assert row[0] == tok.sot_id and row[n - 1] == tok.eot_id
        assert (row[n:] == 0).all() and (row[1:n - 1] < tok.sot_id).all()
    single, n = tok.encode(CAPTIONS[0], max_len=20)                     # one string is a batch of one
    assert torch.equal(single[0], ids[0]) and n.item() == lengths[0].item()
    with pytest.raises(ValueError, match="max_len must be >= 2"):
        tok.encode(CAPTIONS, max_len=1)


def test_tokenizer_truncates_keeping_end_token(tok):
    ids, lengths = tok.encode(["a very long caption " * 10, ""], max_len=8)
    assert lengths.tolist() == [8, 2]
    assert ids[0, 0] == tok.sot_id and ids[0, 7] == tok.eot_id
    assert ids[1, :2].tolist() == [tok.sot_id, tok.eot_id] and (ids[1, 2:] == 0).all()
    assert tok.decode(ids[0]) == "a very long caption a very"
    assert tok.decode(ids[1]) == ""
    assert tok.decode(ids[0].tolist()) == tok.decode(ids[0])             # a list or a tensor


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


def test_corpus_vocabulary_round_trips_and_refuses_unknown_tokens():
    texts = ["a dog runs on the beach", "two cats sleep on a red sofa"]
    full = CaptionTokenizer()
    small = CaptionTokenizer.for_corpus("corpus", texts)
    assert small.vocab_size == len(set(full.corpus_vocabulary(texts)) | {0, full.sot_id, full.eot_id}) < 30
    assert (small.sot_id, small.eot_id, small.pad_id) == (small.vocab_size - 2, small.vocab_size - 1, 0)
    ids, lengths = small.encode(texts, max_len=12)
    assert int(ids.max()) < small.vocab_size and ids[0, 0] == small.sot_id
    assert [small.decode(row) for row in ids] == [full.decode(row) for row in full.encode(texts, 12)[0]]
    torch.testing.assert_close(lengths, full.encode(texts, 12)[1])
    with pytest.raises(KeyError, match="'horse'"):
        small.encode(["a horse"], max_len=8)
    assert CaptionTokenizer.for_corpus("full", texts).vocab_size == 49408
    assert CaptionTokenizer.for_corpus("full", texts).vocabulary is None
    with pytest.raises(ValueError, match="'full' or 'corpus'"):
        CaptionTokenizer.for_corpus("tiny", texts)
    # a decoder rebuilt from the saved vocabulary (a checkpoint's facts) has the same ids
    again = CaptionTokenizer(small.vocabulary)
    assert again.vocabulary == small.vocabulary and torch.equal(again.encode(texts, 12)[0], ids)


def test_a_caption_encoded_again_is_read_from_the_memo_and_cut_to_each_max_len():
    """CaptionTokenizer.text_ids keeps each text's ids (a training encodes every caption every epoch);
    the memo holds the whole caption, so a later shorter max_len still cuts it and keeps the end token,
    and an unknown token still raises on every call."""
    texts = ["a very long caption " * 6, "two cats sleep on a red sofa"]
    tok, fresh = CaptionTokenizer(), CaptionTokenizer()
    first = tok.encode(texts, max_len=40)
    assert set(tok._ids) == set(texts)
    tok.bpe = None                                 # a second encode must not run the BPE again
    for max_len in (40, 6, 2):
        ids, lengths = tok.encode(texts, max_len)
        want_ids, want_lengths = fresh.encode(texts, max_len)
        assert torch.equal(ids, want_ids) and torch.equal(lengths, want_lengths), max_len
    assert torch.equal(first[0], fresh.encode(texts, 40)[0])
    small = CaptionTokenizer.for_corpus("corpus", texts)
    for _ in range(2):
        with pytest.raises(KeyError, match="'horse'"):
            small.encode(["a horse"], max_len=8)
