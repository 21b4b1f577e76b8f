"""Captions <-> token ids for the decoders trained from scratch (SynTIC, PCM-Net): CLIP's BPE
(open_clip's bundled vocabulary, so it works offline), or whole words over a corpus (PCM-Net's
released recipe), with start and end tokens and 0-padding.

A caption is encoded as ``<start_of_text> w_1 .. w_L <end_of_text>``, right-padded with 0 to
``max_len``; ``lengths[b]`` counts the real tokens including both special tokens.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

OPEN_CLIP_TOKENIZER = "_synthcap_open_clip_tokenizer"


@lru_cache(maxsize=1)
def open_clip_tokenizer() -> ModuleType:
    """open_clip's ``tokenizer`` module (SimpleTokenizer and its bundled BPE vocabulary), loaded from its
    file without running open_clip's package ``__init__``: that imports every model open_clip has
    (torchvision, transformers; about 2.5 s in each stage process) for a tokenizer that needs none of
    them. Where open_clip is imported already, or a release's tokenizer.py cannot load alone, it is
    the regular ``open_clip.tokenizer``: the same file, the same ids."""
    if "open_clip.tokenizer" in sys.modules:
        return sys.modules["open_clip.tokenizer"]
    package = importlib.util.find_spec("open_clip")          # finds the package without importing it
    if package is not None and package.submodule_search_locations:
        path = Path(next(iter(package.submodule_search_locations))) / "tokenizer.py"
        spec = importlib.util.spec_from_file_location(OPEN_CLIP_TOKENIZER, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[OPEN_CLIP_TOKENIZER] = module              # as an import would (pickle finds its classes)
        try:
            spec.loader.exec_module(module)
            return module
        except ImportError:       # e.g. a relative import of another open_clip module
            del sys.modules[OPEN_CLIP_TOKENIZER]
    import open_clip.tokenizer
    return open_clip.tokenizer


def to_longest(tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch of ``encode``'s ids cut after its longest caption: the columns past it hold padding
    only. Every decoder here is causal (a position reads no later one) and every loss masks padding, so
    the loss is the one of the full ``max_len`` batch, in fewer positions (the world's captions average 11
    BPE tokens of max_len 24)."""
    return tokens[:, :max(1, int(lengths.max()))], lengths


class CaptionTokenizer:
    """CLIP BPE with start/end tokens and 0-padding, over the full BPE vocabulary or a corpus's.

    ``vocabulary`` (BPE ids, e.g. from :meth:`corpus_vocabulary`) restricts the ids the decoder
    predicts to those a corpus uses: ids are then positions in the sorted vocabulary. On small
    corpora this shrinks the output layer from 49,408 rows to a few thousand, which is what makes
    CPU training practical; the paper profiles keep the full vocabulary (``vocabulary: full``).
    """

    def __init__(self, vocabulary: list[int] | None = None):
        self.bpe = open_clip_tokenizer().SimpleTokenizer()
        self.pad_bpe, self.sot_bpe, self.eot_bpe = 0, self.bpe.sot_token_id, self.bpe.eot_token_id
        self.vocabulary = sorted({int(i) for i in vocabulary} | {self.pad_bpe, self.sot_bpe, self.eot_bpe}) \
            if vocabulary is not None else None
        self.to_model = {b: m for m, b in enumerate(self.vocabulary)} if self.vocabulary else None
        self._ids: dict[str, tuple[int, ...]] = {}   # text -> its model ids: a training encodes each caption every epoch
        self.vocab_size = len(self.vocabulary) if self.vocabulary else self.bpe.vocab_size   # 49408
        self.sot_id, self.eot_id, self.pad_id = (self._model_id(i) for i in (self.sot_bpe, self.eot_bpe, self.pad_bpe))
        # CLIP's start/end tokens are its two largest BPE ids, so in either vocabulary they are the
        # last two ids (decoders find them from the vocabulary size alone)
        assert (self.sot_id, self.eot_id) == (self.vocab_size - 2, self.vocab_size - 1)

    def corpus_vocabulary(self, texts) -> list[int]:
        """The BPE ids the captions ``texts`` use (specials added by the constructor)."""
        return sorted({i for text in texts for i in self.bpe.encode(text)})

    def _model_id(self, bpe_id: int) -> int:
        if self.to_model is None:
            return bpe_id
        if bpe_id not in self.to_model:
            raise KeyError(f"BPE token {self.bpe.decode([bpe_id]).strip()!r} ({bpe_id}) is not in this decoder's vocabulary")
        return self.to_model[bpe_id]

    def text_ids(self, text: str) -> tuple[int, ...]:
        """The model ids of ``text``'s BPE tokens, no special tokens; computed once per text (open_clip's
        ``encode`` runs ftfy and a regex on every call: a tenth of a small decoder's training step)."""
        ids = self._ids.get(text)
        if ids is None:
            ids = self._ids[text] = tuple(self._model_id(i) for i in self.bpe.encode(text))
        return ids

    def encode(self, texts: list[str] | str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids LongTensor [B, max_len], lengths LongTensor [B] (real tokens incl. sot/eot).
        Captions longer than max_len are cut to their first max_len-2 BPE tokens + eot."""
        if isinstance(texts, str):
            texts = [texts]
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (start and end tokens), got {max_len}")
        ids = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)
        lengths = torch.empty(len(texts), dtype=torch.long)
        for b, text in enumerate(texts):
            seq = [self.sot_id, *self.text_ids(text)[: max_len - 2], self.eot_id]
            ids[b, : len(seq)] = torch.tensor(seq)
            lengths[b] = len(seq)
        return ids, lengths

    def decode(self, ids) -> str:
        """Token ids (list or 1-D tensor) -> text; drops <start_of_text>, stops at <end_of_text>."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            if i == self.eot_id:
                break
            if i == self.sot_id:
                continue
            out.append(self.vocabulary[int(i)] if self.vocabulary else int(i))
        return " ".join(self.bpe.decode(out).split())

    @classmethod
    def for_corpus(cls, vocabulary: str, texts) -> "CaptionTokenizer":
        """``vocabulary: full`` (all of CLIP's BPE, as the papers) or ``corpus`` (the ids ``texts`` use)."""
        if vocabulary == "full":
            return cls()
        if vocabulary == "corpus":
            return cls(cls().corpus_vocabulary(texts))
        raise ValueError(f"vocabulary must be 'full' or 'corpus', got {vocabulary!r}")


class WordTokenizer:
    """Whole words over a corpus's most frequent ones (PCM-Net's released recipe: 10,200 words on
    COCO, captions of at most 20 words), the same interface as CaptionTokenizer.

    Words are the lower-cased runs of letters, digits and apostrophes of a caption; a word outside the
    vocabulary is ``<unk>``. Ids: 0 ``<pad>``, 1 ``<unk>``, then the words by frequency (ties by the
    word), then ``<start>`` and ``<end>`` as the last two ids (the decoders' convention). ``max_len``
    counts the start and end tokens, so 20 words take max_len 22.
    """
    SPECIALS = ("<pad>", "<unk>")
    WORD = re.compile(r"[a-z0-9']+")

    def __init__(self, words: list[str]):
        self.words = list(words)
        self.itos = list(self.SPECIALS) + self.words + ["<start>", "<end>"]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("a word vocabulary must not repeat a word or use a special token")
        self.vocab_size = len(self.itos)
        self.pad_id, self.unk_id, self.sot_id, self.eot_id = 0, 1, self.vocab_size - 2, self.vocab_size - 1
        self.vocabulary = self.words

    @classmethod
    def split(cls, text: str) -> list[str]:
        return cls.WORD.findall(text.lower())

    @classmethod
    def for_corpus(cls, texts, size: int) -> "WordTokenizer":
        counts = Counter(w for text in texts for w in cls.split(text))
        return cls([w for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))[:size]])

    def encode(self, texts: list[str] | str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (start and end tokens), got {max_len}")
        ids = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)
        lengths = torch.empty(len(texts), dtype=torch.long)
        for b, text in enumerate(texts):
            words = [self.stoi.get(w, self.unk_id) for w in self.split(text)][: max_len - 2]
            seq = [self.sot_id] + words + [self.eot_id]
            ids[b, : len(seq)] = torch.tensor(seq)
            lengths[b] = len(seq)
        return ids, lengths

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            if i == self.eot_id:
                break
            if i not in (self.sot_id, self.pad_id):
                out.append(self.itos[int(i)])
        return " ".join(out)
