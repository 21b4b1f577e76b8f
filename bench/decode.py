"""Decoding a prefix decoder: the incremental path (``PrefixDecoder.start``/``step`` over a KV cache) vs the
full re-run of the sequence at every step (``decoding.FullRerun``, the path before the cache).

    .venv/bin/python -m bench.decode [--device cpu] [--quick]

The decoder has the world profile's shape (SynTIC's and CMSA's: width 128, 4 layers, 4 heads, ``max_len``
24, dropout 0.1, prefix 2) over a vocabulary of 1,000, random weights, a batch of 32 random prefixes. Random
weights rarely emit <end_of_text>, so every caption runs to ``max_len`` (23 generated tokens): the longest
decode, where the cache saves most (a trained decoder's captions end sooner). Both variants run in the same
process, interleaved round by round, and each takes its fastest round (bench/step.py says why); one thread,
as bench/train.py (two threads on a busy two-core machine measured thread contention, not decoding).

- greedy (``decoding.greedy``, eval mode, no gradient): the SCST baseline of CMSA's RL phase;
- beam 3 (``decoding.beam``, eval mode): the caption stages of SynTIC and CMSA;
- sample (``decoding.sample``, train mode, the graph kept) and the backward of its log-probs: CMSA's
  policy-gradient step without the reward (the two paths draw dropout differently in train mode, so
  their samples differ; both run the same number of steps here).
"""
from __future__ import annotations

import time

import torch

from bench.common import Figure, main


def run(device: str = "cpu", quick: bool = False) -> list[Figure]:
    from pipeline.nn import decoding
    from pipeline.nn.prefix_decoder import DecoderConfig, PrefixDecoder
    torch.set_num_threads(1)      # small ops: one thread is fastest, and steady on a shared machine (bench/train.py)
    rounds, batch, max_len = (1, 8, 24) if quick else (5, 32, 24)
    sot, eot = 998, 999
    torch.manual_seed(0)
    model = PrefixDecoder(DecoderConfig(vocab_size=1000, width=128, layers=4, heads=4, max_len=max_len,
                                        prefix_len=2, dropout=0.1)).to(device)
    prefix = torch.randn(batch, 2, 128, device=device)
    paths = {"cached": model, "full": decoding.FullRerun(model)}

    def greedy(m):
        model.eval()
        return decoding.greedy(m, prefix, sot, eot, max_len)

    def beam(m):
        model.eval()
        return decoding.beam(m, prefix, sot, eot, max_len, beam_size=3)

    def sample(m):
        model.train()
        tokens, logps = decoding.sample(m, prefix, sot, eot, max_len, generator=torch.Generator(device).manual_seed(0))
        logps.sum().backward()
        model.zero_grad(set_to_none=True)
        return tokens

    def timed(fn, m) -> float:
        t0 = time.perf_counter()
        fn(m)
        if device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    same = {name: fn(paths["cached"]) == fn(paths["full"]) for name, fn in (("greedy", greedy), ("beam 3", beam))}
    figures = []
    for name, fn, what in (("greedy", greedy, "eval mode, no gradient"),
                           ("beam 3", beam, "eval mode, beams of one example batched, example by example"),
                           ("sample", sample, "train mode (dropout 0.1), the graph kept, then the backward of "
                                              "the summed log-probs")):
        times = {"cached": [], "full": []}
        for _ in range(rounds):
            for path in ("full", "cached"):
                times[path].append(timed(fn, paths[path]))
        cached, full = min(times["cached"]), min(times["full"])
        ids = f"; the same ids as the re-run: {same[name]}" if name in same else ""
        figures.append(Figure(
            f"decoding, {name}: KV cache vs full re-run each step", cached * 1e3, full * 1e3, full / cached,
            "ms/batch",
            f"PrefixDecoder width 128, 4 layers, 4 heads, vocab 1000, batch {batch}, prefix 2, {max_len - 1} "
            f"generated tokens (random weights); {what}{ids}; {rounds} interleaved rounds, fastest round, "
            f"{device}, {torch.get_num_threads()} threads", ""))
    return figures


if __name__ == "__main__":
    main(run, __doc__)
