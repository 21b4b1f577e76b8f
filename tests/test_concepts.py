"""PCM-Net's concept vocabulary (pipeline/extract/concepts.py): the noun rule, the vocabulary of real
captions, and the artifact the concepts stage writes (concept_table), read back by
pipeline/data/vocabularies.py."""
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from pipeline import config as cfg
from pipeline import paths
from pipeline.data.captions import read_captions
from pipeline.data.shards import ModelMismatchError, feature_numpy, read_meta, write_table_atomic
from pipeline.data.vocabularies import read_concepts
from pipeline.extract.concepts import (PROMPT_TEMPLATE, STOPWORDS, concept_prompt, concept_table, concept_vocabulary,
                                       ensemble_features, noun_counts, nouns, ranked_concepts)


# --- the rule, on hand-made captions ------------------------------------------------------------

@pytest.mark.parametrize("caption, expected", [
    ("A dog runs through the grass .", ["dog", "grass"]),                        # rule 4b: -s verb after a noun
    ("Two dogs play in the snow", ["dog", "snow"]),                              # 4b: base verb after a plural
    ("A black and white dog is running", ["dog"]),                               # 3: colours, gerund
    ("A man in a red shirt sits on a wooden bench", ["man", "shirt", "bench"]),
    ("A girl going into a wooden building .", ["girl", "building"]),             # 3: gerund as head
    ("Children jump into a swimming pool", ["child", "pool"]),                   # lemma; "swimming" modifies
    ("The boy tries to catch a ball while he stands in the water", ["boy", "ball", "water"]),  # 4a
    ("A woman sitting in the dark", ["woman", "dark"]),                          # 3: adjective-capable head
    ("The men are at the front of the crowd", ["man", "front", "crowd"]),
])
def test_noun_occurrences(caption, expected):
    assert nouns(caption) == expected


def test_words_outside_the_lexicon_and_function_words_never_count():
    assert nouns("the of and is are zxqv blorf") == []
    assert nouns("") == []


def test_noun_counts_and_vocabulary_order():
    texts = ["a cat and a dog", "the dog on a mat", "two cats", "a mat", "a hat"]
    counts = noun_counts(texts)
    assert counts == {"cat": 2, "dog": 2, "mat": 2, "hat": 1}
    # count descending, then the word; min_count drops the singletons; size cuts
    assert concept_vocabulary(texts, 10) == ["cat", "dog", "mat"]
    assert concept_vocabulary(texts, 10, min_count=1) == ["cat", "dog", "mat", "hat"]
    assert concept_vocabulary(texts, 2) == ["cat", "dog"]
    assert concept_vocabulary(reversed(texts), 10) == ["cat", "dog", "mat"]          # order-free
    assert ranked_concepts(counts, 1) == [("cat", 2)]
    with pytest.raises(ValueError):
        ranked_concepts(counts, -1)


def test_prompt_template():
    assert concept_prompt("dog") == "A photo of dog"


def test_lexicon_loads_without_network():
    """lemminflect's lexicon ships in its wheel: a process whose sockets all fail still reads it."""
    code = ("import socket\n"
            "def refuse(*a, **k): raise OSError('network disabled in this test')\n"
            "socket.socket.connect = refuse; socket.create_connection = refuse\n"
            "from pipeline.extract.concepts import nouns\n"
            "print(nouns('a dog catches a ball in the water'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=paths.REPO)
    assert out.stdout.strip() == "['dog', 'ball', 'water']"


# --- real captions --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flickr8k_texts(shared_data):
    return [r.text for r in read_captions(shared_data / "flickr8k" / "Flickr8k.token.txt").records]


def test_flickr8k_vocabulary_is_its_frequent_nouns(flickr8k_texts):
    vocab = concept_vocabulary(flickr8k_texts, 100)
    assert len(vocab) == 100
    assert {"dog", "man", "water"} <= set(vocab[:10])
    assert {"boy", "girl", "woman", "ball", "grass", "snow", "beach", "street"} <= set(vocab[:30])
    for not_a_noun in ("running", "run", "sitting", "standing", "playing", "wearing", "is", "are",
                       "white", "black", "red", "young", "little", "small"):
        assert not_a_noun not in vocab, not_a_noun
    assert not set(vocab) & STOPWORDS


def test_flickr8k_lemmas_merge_plurals(flickr8k_texts):
    counts = noun_counts(flickr8k_texts)
    assert "dogs" not in counts and "children" not in counts and "men" not in counts
    assert counts["dog"] > 9000 and counts["child"] > 1000


# --- the artifact: concept_table, read back by pipeline/data/vocabularies.py -----------------------

@pytest.fixture(scope="module")
def clip():
    from pipeline.models.clip import clip_for
    return clip_for("synthcap-tiny-vit", None, 0, "fp32", "cpu")


def test_concept_table_holds_the_vocabulary_with_clip_features_and_reads_back(tmp_path, flickr8k_texts, clip):
    """What stages/concepts.py writes: concept_table over the corpus's noun counts, with the CLIP identity
    in the footer; read_concepts reads it back and refuses another CLIP model."""
    counts = noun_counts(flickr8k_texts[:200])
    table = concept_table(counts, clip, 20, 2, "float16", batch_size=7)
    assert table.schema.field("concept").type == pa.string()
    assert table.schema.field("count").type == pa.int64()
    assert pa.types.is_fixed_size_list(table.schema.field("text_feature").type)
    words = table.column("concept").to_pylist()
    assert words == concept_vocabulary(flickr8k_texts[:200], 20, 2)
    assert table.column("count").to_pylist() == [counts[w] for w in words]

    path = tmp_path / "concepts" / "concepts.parquet"
    write_table_atomic(path, table, {"model": clip.identity, "template": PROMPT_TEMPLATE})
    read_words, feats = read_concepts(path, clip.identity)
    assert read_words == words and feats.dtype == np.float32 and feats.shape == (len(words), clip.dim)
    expected = clip.encode_texts([f"A photo of {w}" for w in words])
    np.testing.assert_allclose(feats, expected, atol=2e-3)                 # stored as float16
    assert read_meta(path)["model"] == clip.identity
    with pytest.raises(ModelMismatchError):
        read_concepts(path, {**clip.identity, "seed": 1})


def test_concept_table_refuses_an_empty_vocabulary(clip):
    with pytest.raises(ValueError, match="empty"):
        concept_table(noun_counts(["a dog", "a cat"]), clip, 10, 2, "float16")


# --- a fixed word list and a prompt ensemble (concepts.source, concepts.templates) -------------------

def test_prompt_ensemble_is_the_renormalised_mean_of_the_unit_template_features(clip):
    """Against a direct computation, one sentence at a time: normalize(mean_t f(t(w)))."""
    words, templates = ["dog", "traffic light", "bench"], ["itap of a {}.", "a photo of the small {}.", "art of the {}."]
    got = ensemble_features(clip, words, templates, batch_size=2)
    for i, word in enumerate(words):
        unit = [clip.encode_texts([t.format(word)])[0] for t in templates]
        for u in unit:
            assert np.linalg.norm(u) == pytest.approx(1.0, abs=1e-5)
        mean = np.mean(unit, axis=0)
        np.testing.assert_allclose(got[i], mean / np.linalg.norm(mean), atol=1e-5)
    # one template: that sentence's feature, as before
    np.testing.assert_allclose(ensemble_features(clip, words, [PROMPT_TEMPLATE]),
                               clip.encode_texts([f"A photo of {w}" for w in words]), atol=1e-5)


def test_concept_table_from_a_word_list_keeps_its_order_and_counts_its_nouns(clip):
    counts = noun_counts(["a dog on a bench", "two dogs", "a bench"])
    words = ["zebra", "dog", "bench"]
    table = concept_table(counts, clip, 1, 5, "float32", templates=["a {}.", "the {}."], words=words)
    assert table.column("concept").to_pylist() == words                 # size and min_count do not apply
    assert table.column("count").to_pylist() == [0, 2, 2]
    np.testing.assert_allclose(feature_numpy(table.column("text_feature")),
                               ensemble_features(clip, words, ["a {}.", "the {}."]), atol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        concept_table(counts, clip, 1, 5, "float32", words=[])


@pytest.mark.parametrize("section, message", [
    ({"source": "word_list"}, "concepts.words` is empty"),
    ({"words": ["dog"]}, "read only with `concepts.source: word_list"),
    ({"source": "word_list", "words": ["dog", "cat", "dog"]}, "distinct"),
    ({"templates": []}, "concepts.templates` is empty"),
    ({"templates": ["a photo"]}, "holds {} once"),
    ({"templates": ["a {} of {}"]}, "holds {} once"),
    ({"source": "nouns"}, "concepts.source"),
    ({"word": ["dog"]}, "unknown key `concepts.word`"),
])
def test_concepts_settings_are_validated(section, message):
    with pytest.raises(cfg.ConfigError, match=re.escape(message)):
        cfg.parse(cfg.Concepts, section, "concepts")


def test_concepts_defaults_are_the_papers():
    concepts = cfg.parse(cfg.Concepts, {}, "concepts")
    assert (concepts.source, concepts.templates, concepts.words) == ("corpus_nouns", ["A photo of {}"], [])
    fixed = cfg.parse(cfg.Concepts, {"source": "word_list", "words": ["dog", "cat"], "templates": ["a {}."]}, "concepts")
    assert fixed.words == ["dog", "cat"]
