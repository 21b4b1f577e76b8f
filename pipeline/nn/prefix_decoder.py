"""A small causal Transformer decoder conditioned on a prefix of feature embeddings.

Used by SynTIC (prefix = [v, u], Eq. 6) and by the DeCap/CapDec-style decoders. Trained from
scratch on CLIP BPE tokens (open_clip's bundled vocabulary, works offline).

Conventions (read these once, everything below follows them):
- A caption is encoded as `<start_of_text> w_1 .. w_L <end_of_text>` and right-padded with 0
  (`pad_id`) to `max_len`; `lengths[b]` counts the real tokens including both special tokens.
- The decoder input is the sequence [prefix_1 .. prefix_P, e(tokens_0) .. e(tokens_{T-1})],
  attended causally (the prefix positions attend causally among themselves too).
- `forward(prefix, tokens)` returns logits [B, T, V] at the token positions only, and
  logits[:, i] is the distribution of the NEXT token, tokens[:, i+1], given the prefix and
  tokens[:, :i+1] (the usual language-model shift: targets = tokens[:, 1:]).
  Padding sits after <end_of_text>, so causal attention never lets a real token see it.
- Decoding returns the generated ids after <start_of_text>, without <end_of_text>.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# Tokenizer: CLIP BPE with <start_of_text> / <end_of_text>, padding 0
# ---------------------------------------------------------------------------------------------
class CaptionTokenizer:
    """CLIP BPE with start/end tokens and 0-padding, over the full BPE vocabulary or a corpus's.

    ``vocabulary`` (BPE ids, e.g. from :meth:`corpus_vocabulary`) restricts the ids the decoder
    predicts to those a corpus uses: ids are then positions in the sorted vocabulary. On small
    corpora this shrinks the output layer from 49,408 rows to a few thousand, which is what makes
    CPU training practical; the paper profiles keep the full vocabulary (``vocabulary: full``).
    """

    def __init__(self, vocabulary: list[int] | None = None):
        from open_clip.tokenizer import SimpleTokenizer
        self.bpe = SimpleTokenizer()
        self.pad_bpe, self.sot_bpe, self.eot_bpe = 0, self.bpe.sot_token_id, self.bpe.eot_token_id
        self.vocabulary = sorted({int(i) for i in vocabulary} | {self.pad_bpe, self.sot_bpe, self.eot_bpe}) \
            if vocabulary is not None else None
        self.to_model = {b: m for m, b in enumerate(self.vocabulary)} if self.vocabulary else None
        self.vocab_size = len(self.vocabulary) if self.vocabulary else self.bpe.vocab_size   # 49408
        self.sot_id, self.eot_id, self.pad_id = (self._model_id(i) for i in (self.sot_bpe, self.eot_bpe, self.pad_bpe))
        # CLIP's start/end tokens are its two largest BPE ids, so in either vocabulary they are the
        # last two ids: the decoding functions rely on it (special_ids)
        assert (self.sot_id, self.eot_id) == special_ids(self.vocab_size)

    def corpus_vocabulary(self, texts) -> list[int]:
        """The BPE ids the captions ``texts`` use (specials added by the constructor)."""
        return sorted({i for text in texts for i in self.bpe.encode(text)})

    def _model_id(self, bpe_id: int) -> int:
        if self.to_model is None:
            return bpe_id
        if bpe_id not in self.to_model:
            raise KeyError(f"BPE token {self.bpe.decode([bpe_id]).strip()!r} ({bpe_id}) is not in this decoder's vocabulary")
        return self.to_model[bpe_id]

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
            seq = [self.sot_id] + [self._model_id(i) for i in self.bpe.encode(text)[: max_len - 2]] + [self.eot_id]
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

    def decode_batch(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
@dataclass
class DecoderConfig:
    vocab_size: int = 49408
    width: int = 512
    layers: int = 4
    heads: int = 4
    max_len: int = 40          # max caption tokens, including <start_of_text> and <end_of_text>
    prefix_len: int = 2
    dropout: float = 0.1


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        assert cfg.width % cfg.heads == 0
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, S, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, S, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, S, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.width, 4 * cfg.width)
        self.proj = nn.Linear(4 * cfg.width, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class PrefixDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_emb = nn.Embedding(cfg.prefix_len + cfg.max_len, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.layers)])
        self.ln_f = nn.LayerNorm(cfg.width)
        # output head tied to tok_emb (logits = h @ tok_emb.weight^T), no separate parameter
        self.apply(self._init_weights)
        for name, p in self.named_parameters():   # GPT-2 scaled init of the residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.layers))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """prefix [B, P, width], tokens [B, T] -> logits [B, T, vocab];
        logits[:, i] predicts tokens[:, i+1] (see the module docstring)."""
        B, P, _ = prefix.shape
        T = tokens.shape[1]
        if P != self.cfg.prefix_len:
            raise ValueError(f"prefix length {P} != config prefix_len {self.cfg.prefix_len}")
        if T > self.cfg.max_len:
            raise ValueError(f"{T} tokens > config max_len {self.cfg.max_len}")
        x = torch.cat([prefix, self.tok_emb(tokens)], dim=1)
        x = self.drop(x + self.pos_emb(torch.arange(P + T, device=tokens.device)))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x[:, P:])
        return F.linear(x, self.tok_emb.weight)


def caption_loss(logits: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Eq. 6: L = -1/|t| sum_i log P(w_i | w_<i, prefix) per caption, then the batch mean.
    The w_i are the real tokens after <start_of_text>, <end_of_text> included, padding excluded:
    targets tokens[:, 1:], predicted by logits[:, :-1]; |t| = lengths - 1."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)                      # [B, T-1]
    pos = torch.arange(1, tokens.shape[1], device=tokens.device)
    mask = (pos[None, :] < lengths[:, None]).to(nll.dtype)                       # target index < length
    per_caption = (nll * mask).sum(1) / mask.sum(1).clamp(min=1)
    return per_caption.mean()


# ---------------------------------------------------------------------------------------------
# Decoding (deterministic; no KV cache: captions are short, the full prefix is re-run each step)
# ---------------------------------------------------------------------------------------------
def _check_len(model: PrefixDecoder, max_len: int | None) -> int:
    max_len = model.cfg.max_len if max_len is None else int(max_len)
    if not 2 <= max_len <= model.cfg.max_len:
        raise ValueError(f"max_len must be in [2, {model.cfg.max_len}], got {max_len}")
    return max_len


@torch.no_grad()
def special_ids(vocab_size: int) -> tuple[int, int]:
    """(<start_of_text>, <end_of_text>) of a CaptionTokenizer vocabulary of this size: the last two ids."""
    return vocab_size - 2, vocab_size - 1


def greedy_decode(model: PrefixDecoder, prefix: torch.Tensor, max_len: int | None = None) -> list[list[int]]:
    """prefix [B, P, width] -> B lists of ids (after sot, without eot). max_len bounds the whole
    sequence including sot and eot, so at most max_len - 1 tokens are generated."""
    max_len = _check_len(model, max_len)
    sot_id, eot_id = special_ids(model.cfg.vocab_size)
    B = prefix.shape[0]
    seq = torch.full((B, 1), sot_id, dtype=torch.long, device=prefix.device)
    done = torch.zeros(B, dtype=torch.bool, device=prefix.device)
    for _ in range(max_len - 1):
        nxt = model(prefix, seq)[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, eot_id), nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        done |= nxt == eot_id
        if done.all():
            break
    out = []
    for row in seq[:, 1:].tolist():
        out.append(row[: row.index(eot_id)] if eot_id in row else row)
    return out


@torch.no_grad()
def beam_decode(model: PrefixDecoder, prefix: torch.Tensor, beam_size: int = 3,
                max_len: int | None = None) -> list[list[int]]:
    """Beam search with a shrinking beam. prefix [B, P, width] -> B lists of ids (after sot,
    without eot).

    Each step keeps the k best expansions (by summed log-prob) of the live hypotheses; an
    expansion that ends in eot is finished and leaves the beam, so the beam shrinks from k to 0
    and every example ends with exactly k hypotheses (the live ones are taken as they are when
    max_len is reached). The answer is the hypothesis with the best length-normalised score:
    summed log-prob / number of generated tokens (eot included), i.e. the mean per-token
    log-prob; the first one wins on ties. With beam_size=1 this is exactly greedy_decode."""
    max_len = _check_len(model, max_len)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    sot_id, eot_id = special_ids(model.cfg.vocab_size)
    out = []
    for b in range(prefix.shape[0]):                       # one example at a time, its beams batched
        seqs = torch.full((1, 1), sot_id, dtype=torch.long, device=prefix.device)
        scores = torch.zeros(1, device=prefix.device)
        finished: list[tuple[float, list[int]]] = []
        width = beam_size
        for step in range(1, max_len):
            logits = model(prefix[b:b + 1].expand(seqs.shape[0], -1, -1), seqs)[:, -1]
            cand = (scores[:, None] + F.log_softmax(logits.float(), dim=-1)).view(-1)
            top_v, top_i = cand.topk(width)
            V = logits.shape[-1]
            parent, tok = top_i // V, top_i % V
            keep = tok != eot_id
            for v, p in zip(top_v[~keep].tolist(), parent[~keep].tolist()):
                finished.append((v / step, seqs[p, 1:].tolist()))
            seqs = torch.cat([seqs[parent[keep]], tok[keep, None]], dim=1)
            scores = top_v[keep]
            width = seqs.shape[0]
            if width == 0:
                break
        steps = seqs.shape[1] - 1
        for v, row in zip(scores.tolist(), seqs.tolist()):   # max_len reached: live beams as they are
            finished.append((v / steps, row[1:]))
        best = max(range(len(finished)), key=lambda i: (finished[i][0], -i))
        out.append(finished[best][1])
    return out


def decode(model, prefix: torch.Tensor, beam_size: int = 1, max_len: int | None = None) -> list[list[int]]:
    """Greedy (batched) for beam_size 1, else beam search: the one decoding entry point of every decoder here."""
    if beam_size == 1:
        return greedy_decode(model, prefix, max_len)
    return beam_decode(model, prefix, beam_size, max_len)


def caption_batches(model, batches, beam_size: int = 1, max_len: int | None = None,
                    tokenizer: CaptionTokenizer | None = None) -> list[str]:
    """Caption every batch with ``model.generate(batch, beam_size, max_len)`` (CLIP-BPE token ids) -> strings."""
    tokenizer = tokenizer or CaptionTokenizer()
    model.eval()
    out = []
    for batch in batches:
        out.extend(tokenizer.decode(ids) for ids in model.generate(batch, beam_size, max_len))
    return out
