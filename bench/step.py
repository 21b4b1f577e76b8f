"""One training step of the world's SynTIC decoder: batches cut after their longest caption vs padded to
``max_len``, and Adam's fused kernel vs its per-tensor loop.

    .venv/bin/python -m bench.step [--device cpu] [--quick]

The model and batch are the world profile's (profiles/world.yaml via offline.yaml): SynTIC's prefix decoder
(width 128, 4 layers, 4 heads, ``max_len`` 24, dropout 0.1) over the BPE ids of 2,000 world captions (the
grammar's, ``pipeline.world``), batches of 32 of them, AdamW. Both variants of each figure run in the same
process, interleaved round by round, and each takes its fastest round: on a machine whose speed drifts (this
one's moved by a quarter within the hour), two separate runs cannot show a 20% saving, one interleaved run can.

- cut vs padded: ``pipeline.nn.tokenizer.to_longest`` on the same batches (the loss is the same:
  tests/test_padding.py); forward, backward and the optimiser step.
- fused vs per-tensor: AdamW's step alone on the decoder's parameters with fixed gradients
  (``pipeline.nn.schedules.optimizer`` takes the fused kernel where the device has it).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from bench.common import Figure, main


def world_captions(n: int) -> list[str]:
    from pipeline.world.grammar import describe
    from pipeline.world.scenes import sample_scene, world_rng
    rng = world_rng(0, "bench-step")
    return [describe(sample_scene(rng), rng) for _ in range(n)]


def run(device: str = "cpu", quick: bool = False) -> list[Figure]:
    from pipeline.methods.syntic import SynTICCaptioner, SynTICConfig
    from pipeline.nn.prefix_decoder import DecoderConfig
    from pipeline.nn.tokenizer import CaptionTokenizer, to_longest
    torch.set_num_threads(2 if device == "cpu" else torch.get_num_threads())
    rounds, steps, batch = (2, 3, 32) if quick else (5, 20, 32)
    captions = world_captions(2000)
    tok = CaptionTokenizer.for_corpus("corpus", captions)
    torch.manual_seed(0)
    model = SynTICCaptioner(SynTICConfig(feature_dim=64, aux_heads=4, use_aux=False, decoder=DecoderConfig(
        vocab_size=tok.vocab_size, width=128, layers=4, heads=4, max_len=24, dropout=0.1)), tok).to(device).train()
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(steps):
        tokens, lengths = tok.encode([captions[i] for i in rng.choice(len(captions), batch, replace=False)], 24)
        batches.append({"feature": torch.randn(batch, 64), "tokens": tokens, "lengths": lengths})
    cut = [{**b, **dict(zip(("tokens", "lengths"), to_longest(b["tokens"], b["lengths"])))} for b in batches]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def train(data) -> float:
        t0 = time.perf_counter()
        for b in data:
            b = {k: v.to(device) for k, v in b.items()}
            loss = model.loss(b)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device != "cpu":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / len(data)

    padded_s, cut_s = [], []
    for _ in range(rounds):
        padded_s.append(train(batches))
        cut_s.append(train(cut))
    width = np.mean([b["tokens"].shape[1] for b in cut])

    for p in model.parameters():
        p.grad = torch.randn_like(p)
    fused, loop = (torch.optim.AdamW(model.parameters(), lr=1e-6, **kw) for kw in ({"fused": True}, {"foreach": False}))

    def adam(opt) -> float:
        t0 = time.perf_counter()
        for _ in range(steps * 5):
            opt.step()
        return (time.perf_counter() - t0) / (steps * 5)

    fused_s, loop_s = [], []
    for _ in range(rounds):
        loop_s.append(adam(loop))
        fused_s.append(adam(fused))
    where = (f"the world's SynTIC decoder (width 128, 4 layers, corpus vocabulary of {tok.vocab_size}), batch {batch}, "
             f"{steps} steps x {rounds} interleaved rounds, fastest round, {device}, {torch.get_num_threads()} threads")
    return [
        Figure("training step: batch cut after its longest caption vs padded to max_len", min(cut_s) * 1e3,
               min(padded_s) * 1e3, min(padded_s) / min(cut_s), "ms/step",
               f"{where}; {width:.1f} token columns on average instead of 24", ""),
        Figure("AdamW step: fused kernel vs per-tensor loop", min(fused_s) * 1e3, min(loop_s) * 1e3,
               min(loop_s) / min(fused_s), "ms/step", f"{where}; the optimiser step alone", ""),
    ]


if __name__ == "__main__":
    main(run, __doc__)
