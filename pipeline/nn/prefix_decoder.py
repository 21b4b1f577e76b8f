"""A small causal Transformer decoder conditioned on a prefix of feature embeddings (GPT-2 style,
pre-LN), trained from scratch over CLIP BPE tokens (pipeline/nn/tokenizer.py).

Used by SynTIC (prefix = [v, u], Eq. 6); decoded by pipeline/nn/decoding.py.

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
- Incremental decoding (a KV cache): `start(prefix)` runs the P prefix positions and returns a
  `KVCache` (per layer the keys and values of the positions run so far); `step(tokens, cache)` runs
  the next positions only, attending to the cached ones, and returns the logits of its last
  position and the grown cache. In eval mode `step` gives `forward`'s logits (to float rounding);
  in train mode each position's dropout is drawn once, when it is run (forward redraws all of them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import at_least, divides, dropout_rate, opt


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Decoder:
    """A method's typed settings of its prefix decoder (-> DecoderConfig with the vocabulary and prefix)."""
    width: int = opt(768, "decoder width", check=at_least(1))
    layers: int = opt(4, "Transformer layers (Eq. 6: 4)", check=at_least(1))
    heads: int = opt(4, "attention heads (Eq. 6: 4)", check=at_least(1))
    max_len: int = opt(40, "caption tokens incl. start and end (CLIP BPE)", check=at_least(2))
    dropout: float = opt(0.1, "dropout", check=dropout_rate)

    def __post_init__(self):
        divides("heads", "width")(self)


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
        if cfg.width % cfg.heads:
            raise ValueError(f"decoder heads ({cfg.heads}) must divide its width ({cfg.width})")
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, past=None):
        """x [B, L, C]: the L positions after the S0 of ``past`` ((keys, values) [B, heads, S0, C/heads],
        None: S0 = 0). -> y [B, L, C] and (keys, values) of all S = S0 + L positions."""
        B, L, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, L, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        # causal: position S0 + i sees keys 0 .. S0 + i. Without a past that is is_causal (forward's
        # path); one new position sees every key (no mask); several see the lower band tril(S0).
        S = k.shape[2]
        mask = None if past is None or L == 1 else torch.ones(L, S, dtype=torch.bool, device=x.device).tril(S - L)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=past is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, L, C)
        return self.resid_drop(self.proj(y)), (k, v)


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

    def forward(self, x, past=None):
        """-> x and this layer's (keys, values) of all positions (see CausalSelfAttention)."""
        a, kv = self.attn(self.ln1(x), past)
        x = x + a
        return x + self.mlp(self.ln2(x)), kv


class KVCache(NamedTuple):
    """Per layer, the keys and values [B, heads, S, width/heads] of the S positions run so far
    (the prefix, then the tokens fed to ``PrefixDecoder.step``)."""
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def rows(self, index: torch.Tensor) -> "KVCache":
        """The cache at batch rows ``index`` (repeats allowed: a beam's parents)."""
        return KVCache(tuple(k[index] for k in self.keys), tuple(v[index] for v in self.values))


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
        P = self._check_prefix(prefix)
        self._check_tokens(tokens.shape[1])
        x, _ = self._run(torch.cat([prefix, self.tok_emb(tokens)], dim=1))
        return self._head(x[:, P:])

    # ---- incremental decoding: the same positions, run a few at a time over a KV cache ----------
    def start(self, prefix: torch.Tensor) -> KVCache:
        """Run the prefix positions 0 .. P-1 -> their cache (their outputs predict nothing)."""
        self._check_prefix(prefix)
        return self._run(prefix)[1]

    def step(self, tokens: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """tokens [B, L] at the positions after ``cache`` -> the logits [B, vocab] of the last one
        (the next token's distribution, as forward's logits[:, -1]) and the cache grown by L."""
        self._check_tokens(cache.length - self.cfg.prefix_len + tokens.shape[1])
        x, cache = self._run(self.tok_emb(tokens), cache)
        return self._head(x[:, -1]), cache

    # ---- the pieces both paths share ---------------------------------------------------------
    def _run(self, x: torch.Tensor, past: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """Embeddings x [B, L, width] of the L positions after ``past`` (None: from position 0)
        -> the last block's states [B, L, width] and the cache of all positions."""
        S0 = 0 if past is None else past.length
        x = self.drop(x + self.pos_emb(torch.arange(S0, S0 + x.shape[1], device=x.device)))
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            x, (k, v) = block(x, None if past is None else (past.keys[i], past.values[i]))
            keys.append(k)
            values.append(v)
        return x, KVCache(tuple(keys), tuple(values))

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm, then the output layer tied to tok_emb: logits = ln_f(x) @ tok_emb.weight^T."""
        return F.linear(self.ln_f(x), self.tok_emb.weight)

    def _check_prefix(self, prefix: torch.Tensor) -> int:
        P = prefix.shape[1]
        if P != self.cfg.prefix_len:
            raise ValueError(f"prefix length {P} != config prefix_len {self.cfg.prefix_len}")
        return P

    def _check_tokens(self, T: int) -> None:
        if T > self.cfg.max_len:
            raise ValueError(f"{T} tokens > config max_len {self.cfg.max_len}")


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
