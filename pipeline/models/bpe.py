"""CLIP's BPE as a transformers ``CLIPTokenizer``, built offline from open_clip's bundled vocabulary.

The small text-to-image model and the small causal LMs built from configuration use it, so nothing
is downloaded; its ids are CLIP's (tests/test_models.py checks them against open_clip's tokenizer).
"""
from __future__ import annotations

import gzip
import json
import tempfile
from functools import lru_cache
from pathlib import Path


def clip_tokenizer_from_open_clip(folder: Path):
    """A transformers CLIPTokenizer whose vocab.json/merges.txt are rebuilt from open_clip's BPE file.
    open_clip and transformers are imported here, not at the top: every stage parses the method modules
    that import this one, and importing open_clip costs seconds a stage without a model need not pay."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                         pad_token="<|endoftext|>")


@lru_cache(maxsize=1)
def clip_bpe_tokenizer() -> "CLIPTokenizer":  # noqa: F821 (transformers, imported when it is built)
    """The tokenizer, built once per process (it takes seconds): treat it as read-only."""
    with tempfile.TemporaryDirectory() as tmp:
        return clip_tokenizer_from_open_clip(Path(tmp))     # the files are read while building it
