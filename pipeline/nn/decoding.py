"""Decoding captions: the one place for greedy search, beam search and sampling.

Two kinds of decoder are decoded here:

- A decoder trained from scratch (SynTIC's ``PrefixDecoder``, PCM-Net's ``SentenceDecoder``): any
  module with ``forward(memory, tokens) -> logits [B, T, V]`` where ``logits[:, i]`` is the
  distribution of ``tokens[:, i + 1]``; ``memory`` [B, ...] is what it is conditioned on (a prefix,
  an encoder output), or a ``Memory`` (an encoder output whose length varies per row, with its
  key-padding mask), whose rows travel together through every search. Sequences start with ``sot``
  and end with ``eot``; ``max_len`` bounds the whole sequence including both, so at most
  ``max_len - 1`` tokens are generated.
  Two paths, the same searches:
  * incremental (a KV cache), for a model that also has ``start(memory) -> cache`` and
    ``step(tokens [B, L], cache) -> (logits [B, V] of the last position, cache)``, the cache having
    ``rows(index)`` (SynTIC's and CMSA's ``PrefixDecoder``): each step runs the newest token only;
    beam search takes the cache rows of the beams' parents and drops those of finished beams.
  * full re-run, for any other (PCM-Net's ``SentenceDecoder``, ``FullRerun``): each step runs
    ``model(memory, seq)`` over the whole sequence and keeps its last position.
  In eval mode both give the same ids, and ``sample`` the same draws and log-probs to float
  rounding (tests/test_decoding.py). In train mode (CMSA's sampling, dropout on) they differ by
  design: the full re-run redraws dropout on every earlier position at each step, the cache
  applies it once per position, as a training forward does.
- A pretrained causal LM (transformers): ``generate_from_prefix`` runs its own ``generate`` from
  prefix embeddings (greedy or beam search, no sampling).

Every function returns, per row, the generated ids after ``sot`` and without ``eot``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Memory(NamedTuple):
    """An encoder output padded to the batch's longest row: states [B, S, H] and padding [B, S]
    (True where a position is padding, torch's key_padding_mask)."""
    states: torch.Tensor
    padding: torch.Tensor


def _rows(memory, index: torch.Tensor):
    """memory (a tensor or a Memory) at batch rows ``index`` (repeats allowed: a beam's copies)."""
    return Memory(memory.states[index], memory.padding[index]) if isinstance(memory, Memory) else memory[index]


def _batch_size_and_device(memory) -> tuple[int, torch.device]:
    first = memory.states if isinstance(memory, Memory) else memory
    return first.shape[0], first.device


class FullRerun(torch.nn.Module):
    """``model`` seen through its ``forward`` only, so that decoding takes the full re-run path: the
    reference of the incremental one (tests/test_decoding.py, bench/decode.py)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, memory, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(memory, tokens)


class _Next:
    """The next-token logits of a growing sequence, by either path. ``next(seq)`` -> logits [B, V] of
    seq's last position; seq must extend by one token the seq of the previous call (or be [sot]).
    ``rows(index)`` follows a reordering of the sequences (beam search's parents, finished beams dropped)."""

    def __init__(self, model, memory):
        self.model, self.memory = model, memory
        self.cache = model.start(memory) if hasattr(model, "step") else None

    def next(self, seq: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            return self.model(self.memory, seq)[:, -1]                 # full re-run
        logits, self.cache = self.model.step(seq[:, -1:], self.cache)   # the newest token only
        return logits

    def rows(self, index: torch.Tensor) -> None:
        if self.cache is None:
            self.memory = _rows(self.memory, index)
        else:
            self.cache = self.cache.rows(index)


@torch.no_grad()
def greedy(model, memory: torch.Tensor, sot: int, eot: int, max_len: int) -> list[list[int]]:
    """Batched argmax decoding."""
    B, device = _batch_size_and_device(memory)
    seq = torch.full((B, 1), sot, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    run = _Next(model, memory)
    for _ in range(max_len - 1):
        nxt = run.next(seq).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, eot), nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        done |= nxt == eot
        if done.all():
            break
    return [_until(row, eot) for row in seq[:, 1:].tolist()]


@torch.no_grad()
def beam(model, memory: torch.Tensor, sot: int, eot: int, max_len: int, beam_size: int,
         length_normalize: bool = True) -> list[list[int]]:
    """Beam search with a shrinking beam, one example at a time (its beams batched).

    Each step keeps the k best expansions (by summed log-prob) of the live hypotheses; an expansion
    that ends in eot is finished and leaves the beam, so the beam shrinks from k to 0 and every
    example ends with exactly k hypotheses (the live ones are taken as they are at max_len). The
    answer is the hypothesis with the best score: the mean per-token log-prob (summed log-prob /
    generated tokens, eot included) when ``length_normalize``, else the summed log-prob; the first
    one wins on ties. With beam_size 1 this is exactly ``greedy``."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    out = []
    B, device = _batch_size_and_device(memory)
    for b in range(B):
        seqs = torch.full((1, 1), sot, dtype=torch.long, device=device)
        scores = torch.zeros(1, device=device)
        finished: list[tuple[float, list[int]]] = []
        width = beam_size
        run = _Next(model, _rows(memory, torch.tensor([b], device=device)))   # example b, one row
        for step in range(1, max_len):
            logits = run.next(seqs)
            cand = (scores[:, None] + F.log_softmax(logits.float(), dim=-1)).view(-1)
            top_v, top_i = cand.topk(width)
            V = logits.shape[-1]
            parent, tok = top_i // V, top_i % V
            keep = tok != eot
            for v, p in zip(top_v[~keep].tolist(), parent[~keep].tolist()):
                finished.append((v / step if length_normalize else v, seqs[p, 1:].tolist()))
            seqs = torch.cat([seqs[parent[keep]], tok[keep, None]], dim=1)
            scores = top_v[keep]
            width = seqs.shape[0]
            if width == 0:
                break
            run.rows(parent[keep])                  # the live beams' memory rows or cache rows
        steps = seqs.shape[1] - 1
        for v, row in zip(scores.tolist(), seqs.tolist()):
            finished.append((v / steps if length_normalize else v, row[1:]))
        best = max(range(len(finished)), key=lambda i: (finished[i][0], -i))
        out.append(finished[best][1])
    return out


def sample(model, memory: torch.Tensor, sot: int, eot: int, max_len: int,
           generator: torch.Generator | None = None, temperature: float = 1.0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one caption per row from the model's distribution, keeping the graph (for policy
    gradients). -> tokens [B, T] (sot first, eot then padding with eot) and the log-prob of each
    generated token [B, T-1] (0 after eot). The incremental path keeps the graph through its cache."""
    B, device = _batch_size_and_device(memory)
    seq = torch.full((B, 1), sot, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    logps = []
    run = _Next(model, memory)
    for _ in range(max_len - 1):
        logp = F.log_softmax(run.next(seq).float() / temperature, dim=-1)
        with torch.no_grad():
            nxt = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]
        nxt = torch.where(done, torch.full_like(nxt, eot), nxt)
        logps.append(logp.gather(1, nxt[:, None])[:, 0].masked_fill(done, 0.0))
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        done = done | (nxt == eot)
        if done.all():
            break
    return seq, torch.stack(logps, dim=1)


def decode(model, memory: torch.Tensor, sot: int, eot: int, max_len: int, beam_size: int = 1,
           length_normalize: bool = True) -> list[list[int]]:
    """Greedy (batched) for beam_size 1, else beam search."""
    if beam_size == 1:
        return greedy(model, memory, sot, eot, max_len)
    return beam(model, memory, sot, eot, max_len, beam_size, length_normalize)


def captions(model, memory: torch.Tensor, tokenizer, trained_max_len: int, max_len: int | None = None,
             beam_size: int = 1, length_normalize: bool = True) -> list[str]:
    """``decode`` to text with ``tokenizer`` (its sot_id, eot_id, decode): at most ``max_len`` tokens
    (None: ``trained_max_len``, the longest the model was trained on, which it may not exceed)."""
    max_len = trained_max_len if max_len is None else max_len
    if not 2 <= max_len <= trained_max_len:
        raise ValueError(f"max_len must be in [2, {trained_max_len}], got {max_len}")
    ids = decode(model, memory, tokenizer.sot_id, tokenizer.eot_id, max_len, beam_size, length_normalize)
    return [tokenizer.decode(row) for row in ids]


def ids_of(tokens: torch.Tensor, eot: int) -> list[list[int]]:
    """Rows of sampled ``tokens`` [B, T] (sot first) as id lists after sot, without eot."""
    return [_until(row, eot) for row in tokens[:, 1:].tolist()]


@torch.no_grad()
def generate_from_prefix(lm, prefix: torch.Tensor, eos: int, pad: int, max_new_tokens: int,
                         beam_size: int = 1) -> list[list[int]]:
    """A transformers causal LM's own ``generate`` from prefix embeddings [B, P, W] (the prefix plays
    the start token, as in ClipCap): greedy (beam_size 1) or beam search, deterministic. Returns per
    row the ids before the first eos."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    was_training = lm.training
    lm.eval()
    try:
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        out = lm.generate(inputs_embeds=prefix, attention_mask=mask, max_new_tokens=max_new_tokens,
                          num_beams=beam_size, num_return_sequences=1, do_sample=False,
                          eos_token_id=eos, pad_token_id=pad)
    finally:
        lm.train(was_training)
    return [_until(row, eos) for row in out.tolist()]


def _until(row: list[int], end: int) -> list[int]:
    return row[: row.index(end)] if end in row else row
