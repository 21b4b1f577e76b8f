"""Causal language models for prefix captioners (ClipCap / CapDec / DeCap, MacCap) through transformers.

One loader, the same config shape as every other model (``{name, pretrained, seed}``):
- ``pretrained`` set: ``AutoModelForCausalLM.from_pretrained`` + ``AutoTokenizer.from_pretrained``
  (a hub id such as ``gpt2``, or a local folder; ``HF_HUB_OFFLINE=1`` with a filled cache works).
- ``pretrained: null``: the model named ``name`` is built from ``configs/{name}.json`` with weights
  drawn from ``torch.manual_seed(seed)``: ``AutoConfig.for_model(model_type, **config)`` and
  ``AutoModelForCausalLM.from_config``, i.e. the same classes (``GPT2LMHeadModel`` for
  ``synthcap-tiny-gpt2``) and the same code paths below. Its tokenizer is CLIP's BPE (open_clip's
  bundled vocabulary, as a transformers ``CLIPTokenizer`` built offline), so nothing is downloaded.

Conventions of the prefix interface (``CausalLM.encode`` / ``prefix_loss``; decoding is
``pipeline.nn.decoding.generate_from_prefix``):
- A caption is its tokens WITHOUT a start token followed by ``eos`` and right-padded with ``pad``
  to ``max_len``; ``lengths`` counts the real tokens including ``eos``. The prefix embeddings play
  the role of the start token (as in ClipCap): the LM input is ``[prefix_1..prefix_P, e(t_1)..e(t_T)]``
  and the logit at position ``P-1+i`` predicts ``t_{i+1}``.
- Padding sits after ``eos``; causal attention never lets a real position see it, and the
  attention mask marks it anyway.
- Decoding returns the generated ids up to (not including) the first ``eos``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from pipeline.models import CONFIG_DIR, missing_model_error, weights_sha256
from pipeline.models.bpe import clip_bpe_tokenizer

KIND = "language_model"


@dataclass
class CausalLM:
    model: torch.nn.Module          # a transformers *ForCausalLM (GPT2LMHeadModel, OPTForCausalLM, ...)
    tokenizer: object               # the matching transformers tokenizer
    identity: dict                  # {kind, name, pretrained, seed, weights_sha256, ...}
    vocabulary: list[int] | None = None   # the tokenizer ids the model predicts (None: all); model id = position

    def __post_init__(self):
        self._to_model = {t: m for m, t in enumerate(self.vocabulary)} if self.vocabulary is not None else None

    def model_id(self, token_id: int) -> int:
        if self._to_model is None:
            return int(token_id)
        if token_id not in self._to_model:
            raise KeyError(f"token {self.tokenizer.convert_ids_to_tokens(int(token_id))!r} ({token_id}) is not in "
                           f"this language model's vocabulary")
        return self._to_model[token_id]

    # ---- shape facts ----------------------------------------------------------------------------
    @property
    def width(self) -> int:
        """Width of the token embeddings: the prefix embeddings must have it."""
        return int(self.model.get_input_embeddings().embedding_dim)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().num_embeddings)

    @property
    def max_positions(self) -> int | None:
        cfg = self.model.config
        return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)

    @property
    def eos_id(self) -> int:
        return self.model_id(int(self.tokenizer.eos_token_id))

    @property
    def bos_id(self) -> int:
        """The start token (CLIP BPE's <|startoftext|>, OPT's </s>; GPT-2's is its end token)."""
        bos = self.tokenizer.bos_token_id
        return self.model_id(int(bos if bos is not None else self.tokenizer.eos_token_id))

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.model_id(int(pad if pad is not None else self.tokenizer.eos_token_id))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- text <-> ids ---------------------------------------------------------------------------
    def encode(self, texts: Sequence[str] | str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids LongTensor [B, max_len] (caption tokens + eos, right-padded), lengths [B].
        A caption longer than max_len keeps its first max_len-1 tokens, then eos."""
        if isinstance(texts, str):
            texts = [texts]
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1 (the end token), got {max_len}")
        encoded = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        ids = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)
        lengths = torch.empty(len(texts), dtype=torch.long)
        for b, seq in enumerate(encoded):
            seq = [self.model_id(t) for t in seq[: max_len - 1]] + [self.eos_id]
            ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            lengths[b] = len(seq)
        return ids, lengths

    def decode(self, ids) -> str:
        """Ids (list or 1-D tensor) -> text, cut at the first eos, special tokens dropped,
        whitespace normalised."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        if self.vocabulary is not None:
            ids = [self.vocabulary[i] for i in ids]
        return " ".join(self.tokenizer.decode(ids, skip_special_tokens=True).split())

    # ---- the prefix interface -------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def prefix_logits(self, prefix: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """prefix [B, P, W], tokens [B, T] -> logits [B, T, V]; logits[:, i] predicts tokens[:, i]."""
        B, P, _ = prefix.shape
        T = tokens.shape[1]
        x = torch.cat([prefix, self.embed(tokens).to(prefix.dtype)], dim=1)
        positions = torch.arange(P + T, device=prefix.device)
        mask = (positions[None, :] < (P + lengths.to(prefix.device))[:, None]).long()
        logits = self.model(inputs_embeds=x, attention_mask=mask).logits
        return logits[:, P - 1: P - 1 + T]

    def prefix_loss(self, prefix: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                    label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean token cross-entropy of the caption (incl. eos) given the prefix; padding ignored."""
        logits = self.prefix_logits(prefix, tokens, lengths)
        valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths.to(tokens.device)[:, None]
        target = tokens.masked_fill(~valid, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                               ignore_index=-100, label_smoothing=label_smoothing)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def config_path(name: str) -> Path:
    return CONFIG_DIR / f"{name}.json"


def _offline_tokenizer(kind: str):
    """The offline tokenizer, built once per process (it takes seconds) and shared by every model
    built from configuration: treat it as read-only."""
    if kind != "open_clip_bpe":
        raise ValueError(f"unknown tokenizer {kind!r} in a language-model config (known: open_clip_bpe)")
    return clip_bpe_tokenizer()


def _build_from_config(name: str, seed: int, vocabulary: list[int] | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = config_path(name)
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise FileNotFoundError(f"no configuration for language model {name!r} at {path} (configs: {', '.join(known)}); "
                                f"set pretrained to a Hugging Face id or local folder to load a trained one")
    spec = json.loads(path.read_text())
    tokenizer = _offline_tokenizer(spec.get("tokenizer", "open_clip_bpe"))
    config = AutoConfig.for_model(spec["model_type"], **spec["config"])
    expected = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    wrong = {k: (getattr(config, k, None), v) for k, v in expected.items() if getattr(config, k, None) != v}
    if wrong:
        raise ValueError(f"{path}: config does not match its tokenizer (config, tokenizer): {wrong}")
    if vocabulary is not None:            # predict over these tokenizer ids only: model id = position
        position = {t: m for m, t in enumerate(vocabulary)}
        config.vocab_size = len(vocabulary)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config, key, position[getattr(config, key)])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model, tokenizer


def _load_pretrained(name: str, pretrained: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(pretrained)
        model = AutoModelForCausalLM.from_pretrained(pretrained)
    except Exception as err:   # unknown id, missing folder, no network and no cache: say which and how
        raise missing_model_error(KIND, name, pretrained, err) from err
    if tokenizer.pad_token is None:       # GPT-2 has none; padding sits after eos and is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"language model {name!r} ({pretrained}): its tokenizer has no end-of-text token")
    return model, tokenizer


def tokenizer_of(name: str, pretrained: str | None):
    """The tokenizer a language model uses, without building the model."""
    if pretrained is None:
        path = config_path(name)
        spec = json.loads(path.read_text()) if path.is_file() else {}
        return _offline_tokenizer(spec.get("tokenizer", "open_clip_bpe"))
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(pretrained)
    except Exception as err:
        raise missing_model_error(KIND, name, pretrained, err) from err


def corpus_vocabulary(tokenizer, texts) -> list[int]:
    """The tokenizer ids that ``texts`` use, with the special tokens, sorted."""
    ids = {i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]}
    ids |= {t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
    return sorted(ids)


def load_causal_lm(name: str, pretrained: str | None = None, seed: int = 0, device: str = "cpu",
                   vocabulary: list[int] | None = None) -> CausalLM:
    """A causal LM + tokenizer from a hub id / local folder, or built from ``configs/{name}.json``
    with weights drawn from ``seed``. Returned in eval mode on ``device``. ``vocabulary`` (tokenizer
    ids, e.g. ``corpus_vocabulary``) builds a model from configuration that predicts only those: on
    a small corpus this shrinks the output layer from 49,408 rows to a few thousand, which is what
    lets a small LM learn within a CPU demo (a pretrained model keeps its own vocabulary)."""
    if pretrained is None:
        model, tokenizer = _build_from_config(name, seed, vocabulary)
    else:
        if vocabulary is not None:
            raise ValueError(f"language model {name!r}: a restricted vocabulary applies only to a model built from "
                             f"configuration (pretrained: null), not to {pretrained!r}")
        model, tokenizer = _load_pretrained(name, str(pretrained))
    model = model.to(device).eval()
    identity = {"kind": KIND, "name": name, "pretrained": None if pretrained is None else str(pretrained),
                "seed": seed if pretrained is None else None, "weights_sha256": weights_sha256(model),
                "model_class": type(model).__name__, "tokenizer": type(tokenizer).__name__,
                "vocab_size": int(model.get_input_embeddings().num_embeddings),
                "width": int(model.get_input_embeddings().embedding_dim)}
    return CausalLM(model, tokenizer, identity, vocabulary)
