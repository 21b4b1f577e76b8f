"""SynTIC: text-only captioning with synthetic image-text pairs (Liu, Liu & Ma, AAAI 2024).

Read top to bottom:
1. Feature optimisation (FO, Eq. 1-2): the CLIP features s^v of the synthetic images are free
   parameters pulled towards their own caption's text feature by InfoNCE over corpus-wide
   mini-batches reshuffled every epoch; text features frozen. It runs as its own stage
   (`optimize`), which reports how far the features moved, and training reads its output.
2. Feature projection (FP, Eq. 3): v = sum_j softmax_j(cos(s^v, t_j) / tau) t_j onto the support
   set of corpus text features (pipeline/support.py), at training and at inference.
3. Auxiliary feature (AF, Eq. 4-5): CLIP text features of the detected object tags, fused by
   multi-head attention with the pseudo image feature as the query.
4. Prefix decoding (Eq. 6): prefix [v, u] -> small causal Transformer -> caption cross-entropy.

The Table 4 ablations are the switches `fo`, `fp`, `af` of `Train`; "-TT" is `Caption.support`
naming a target-domain support set.
"""
from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline.config import at_least, opt
from pipeline.methods import Data, Needs, Pairs, Step, pairs_mark, pairs_option
from pipeline.nn import decoding
from pipeline.nn.fusion import AuxiliaryFusion
from pipeline.nn.prefix_decoder import Decoder, DecoderConfig, PrefixDecoder, caption_loss
from pipeline.nn.schedules import Optim
from pipeline.nn.tokenizer import CaptionTokenizer, to_longest
from pipeline.vectors import l2_normalize


# ---------------------------------------------------------------------------------------------
# 1. Feature optimisation, Eq. 1-2
# ---------------------------------------------------------------------------------------------
def contrastive_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 2: -(1/b) sum_i log softmax_j( f_sim(s_i, t_j) / tau )[i], f_sim = cosine (Eq. 1)."""
    logits = F.normalize(image_feats, dim=-1) @ F.normalize(text_feats, dim=-1).T / tau
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def epoch_minibatches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """One epoch's FO mini-batches, drawn corpus-wide: a permutation of range(n) seeded by (seed,
    epoch), cut into chunks of batch_size. Reshuffled every epoch, so the captions of one image
    (consecutive corpus rows) are negatives of each other no more often than chance."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def optimize_features(image_feats: np.ndarray, text_feats: np.ndarray, tau: float = 0.01, lr: float = 1e-5,
                      epochs: int = 100, batch_size: int = 64, seed: int = 0,
                      progress: bool = False) -> tuple[np.ndarray, dict]:
    """FO (Eq. 2) over a whole corpus: image_feats [n, D] (synthetic-image CLIP features, the
    initialisation), text_feats [n, D] (row i = the caption of image i, frozen) -> (optimised
    features [n, D] float32 L2-normalised, a report).

    The features are free parameters, each optimised by Adam(lr): every epoch the corpus is cut into
    fresh random mini-batches of b pairs (``epoch_minibatches``), and each mini-batch takes one step
    of Eq. 2 on its rows. A row's Adam state (moments, step count) advances only when its row is in
    a batch, so each feature is exactly a parameter under Adam that sees one gradient per epoch.
    A mini-batch of one row is skipped (its loss is identically 0). The paper gives tau = 1/100 and
    lr = 1e-5, not the epochs or b. Memory: the features, their two moments and the text features,
    O(n x D) (about 4.6 GB in float32 for MSCOCO's 566k captions at D = 512).

    The report states how far Eq. 2 moved the features: the mean ||s_opt - s|| and the mean cosine
    of each feature to its own caption before and after (all on unit features)."""
    image_feats = np.asarray(image_feats, dtype=np.float32)
    text_feats = np.asarray(text_feats, dtype=np.float32)
    if image_feats.shape != text_feats.shape or image_feats.ndim != 2:
        raise ValueError(f"image features {image_feats.shape} and text features "
                         f"{text_feats.shape} must both be [n, D] with the same shape")
    n = image_feats.shape[0]
    s = torch.tensor(image_feats)                                     # the parameters
    t = torch.tensor(text_feats)
    m, v = torch.zeros_like(s), torch.zeros_like(s)                   # per-row Adam moments
    steps = torch.zeros(n, 1)                                         # per-row Adam step counts
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    batches = [(e, idx) for e in range(epochs) for idx in epoch_minibatches(n, batch_size, seed, e) if len(idx) > 1]
    for _, idx in tqdm(batches, desc="feature optimisation (Eq. 2)", unit="batch", disable=not progress):
        rows = torch.from_numpy(idx)
        x = s[rows].clone().requires_grad_(True)
        contrastive_loss(x, t[rows], tau).backward()                  # Eq. 2 on this mini-batch
        g = x.grad
        m[rows] = beta1 * m[rows] + (1 - beta1) * g
        v[rows] = beta2 * v[rows] + (1 - beta2) * g * g
        steps[rows] += 1
        m_hat = m[rows] / (1 - beta1 ** steps[rows])
        v_hat = v[rows] / (1 - beta2 ** steps[rows])
        s[rows] = x.detach() - lr * m_hat / (v_hat.sqrt() + eps)
    before, after, text = l2_normalize(image_feats), l2_normalize(s.numpy()), l2_normalize(text_feats)
    report = {"rows": n, "epochs": epochs, "batch_size": batch_size, "steps": len(batches),
              "mean_move": float(np.linalg.norm(after - before, axis=1).mean()),
              "mean_cosine_to_own_caption_before": float((before * text).sum(1).mean()),
              "mean_cosine_to_own_caption_after": float((after * text).sum(1).mean())}
    return after, report


# ---------------------------------------------------------------------------------------------
# 3. Auxiliary feature, Eq. 5
# ---------------------------------------------------------------------------------------------
# AuxiliaryFusion (pipeline/nn/fusion.py): u = MHAttn(s^v, O^t, O^t), with a "no object" token.


# ---------------------------------------------------------------------------------------------
# 4. The captioner, Eq. 6
# ---------------------------------------------------------------------------------------------
@dataclass
class SynTICConfig:
    feature_dim: int = 512                 # CLIP joint dim D
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    aux_heads: int = 4
    use_aux: bool = True                   # False: prefix = [v] only (prefix_len 1)

    def __post_init__(self):
        decoder = DecoderConfig(**self.decoder) if isinstance(self.decoder, dict) else self.decoder
        self.decoder = replace(decoder, prefix_len=2 if self.use_aux else 1)   # a copy: [v, u] or [v]


class SynTICCaptioner(nn.Module):
    def __init__(self, cfg: SynTICConfig, tokenizer: CaptionTokenizer):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer                           # its output ids (all of CLIP's BPE, or a corpus's)
        if self.tokenizer.vocab_size != cfg.decoder.vocab_size:
            raise ValueError(f"decoder vocab_size {cfg.decoder.vocab_size} != tokenizer's {self.tokenizer.vocab_size}")
        W = cfg.decoder.width
        self.v_proj = nn.Linear(cfg.feature_dim, W)
        if cfg.use_aux:
            self.aux = AuxiliaryFusion(cfg.feature_dim, cfg.aux_heads)
            self.u_proj = nn.Linear(cfg.feature_dim, W)
        self.decoder = PrefixDecoder(cfg.decoder)

    def prefix(self, batch: dict) -> torch.Tensor:
        """[v, u] mapped to the decoder width: [B, 2, W] (or [B, 1, W] without AF)."""
        parts = [self.v_proj(batch["feature"])]
        if self.cfg.use_aux:
            u = self.aux(batch["aux_query"], batch["tag_feats"], batch["tag_mask"])   # Eq. 5
            parts.append(self.u_proj(u))
        return torch.stack(parts, dim=1)

    def loss(self, batch: dict) -> torch.Tensor:
        logits = self.decoder(self.prefix(batch), batch["tokens"])
        return caption_loss(logits, batch["tokens"], batch["lengths"])                # Eq. 6

    @torch.no_grad()
    def generate(self, batch: dict, beam_size: int = 1, max_len: int | None = None) -> list[str]:
        return decoding.captions(self.decoder, self.prefix(batch), self.tokenizer, self.cfg.decoder.max_len,
                                 max_len, beam_size)


# ---------------------------------------------------------------------------------------------
# Settings and the method contract (pipeline/methods/__init__.py)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Train:
    fo: bool = opt(True, "Table 4 FO: train on the Eq. 2 optimised features")
    fp: bool = opt(True, "Table 4 FP: project onto the corpus support set (Eq. 3), at training and inference")
    af: bool = opt(True, "Table 4 AF: auxiliary object feature (Eq. 4-5)")
    aux_query: Literal["image", "projected"] = opt("image", "Eq. 5 query: image (the paper's s^v) | projected (v)")
    aux_heads: int = opt(4, "heads of the Eq. 5 attention", check=at_least(1))
    vocabulary: Literal["full", "corpus"] = opt("full", "decoder output over all of CLIP's BPE (the paper) or "
                                                        "the BPE ids the corpus uses (fast on CPU)")
    decoder: Decoder = opt(Decoder())
    epochs: int = opt(10, "passes over the corpus", check=at_least(1))
    batch_size: int = opt(64, "captions per step", check=at_least(1))
    optim: Optim = opt(Optim(name="adamw", lr=1e-4, weight_decay=0.01, warmup_steps=1000, grad_clip=1.0))
    seed: int = opt(0, "seed of the weights, the data order and dropout")
    pairs: Pairs = pairs_option()


@dataclass(frozen=True, kw_only=True)
class Caption:
    beam_size: int = opt(3, "beam search width (1 = greedy)", check=at_least(1))
    support: str = opt("corpus", "Eq. 3 support set at inference: corpus | a target_supports name (\"-TT\")")
    max_len: int | None = opt(None, "longest caption in tokens (null = as trained)", check=at_least(2))
    batch_size: int = opt(64, "images per decoding batch", check=at_least(1))


def needs(train: Train, caption: Caption | None = None) -> Needs:
    if caption is None:                                                    # training: synthetic pairs
        rows = {"text": "corpus.text", "image": "synthetic.global"}
        if train.fo:
            rows["optimized"] = "optimized.global"
        if train.af:
            rows["tags"] = "synthetic_tags.labels"
        return Needs(rows=rows, corpus=("text",) if train.vocabulary == "corpus" else (),
                     support="corpus" if train.fp else None, tag_vocabulary=train.af, pairs=train.pairs)
    rows = {"image": "image.global"}                                       # inference: real images
    if train.af:
        rows["tags"] = "image_tags.labels"
    return Needs(rows=rows, support=caption.support if train.fp else None, tag_vocabulary=train.af)


def facts(train: Train, data: Data) -> dict:
    """The CLIP dimension and the decoder's output ids (None: all of CLIP's BPE)."""
    tokenizer = CaptionTokenizer.for_corpus(train.vocabulary, data.corpus.get("text", ()))
    return {"feature_dim": data.feature_dim, "vocabulary": tokenizer.vocabulary}


def create(train: Train, facts: dict, data: Data | None = None) -> SynTICCaptioner:
    tokenizer = CaptionTokenizer(facts["vocabulary"])
    d = train.decoder
    config = SynTICConfig(feature_dim=facts["feature_dim"], aux_heads=train.aux_heads, use_aux=train.af,
                          decoder=DecoderConfig(vocab_size=tokenizer.vocab_size, width=d.width, layers=d.layers,
                                                heads=d.heads, max_len=d.max_len, dropout=d.dropout))
    return SynTICCaptioner(config, tokenizer)


class ProjectionCache:
    """Eq. 3 of each training shard, computed once and read back in every later epoch (the projection
    does not depend on the epoch). Kept on disk for the run, one ``.npy`` per shard under a key that is
    a digest of the shard's features, so memory stays one shard and a changed input is never served
    another's projection."""

    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="synthcap-eq3-")    # removed with the run's Data
        self.hits = 0

    def project(self, features: np.ndarray, support) -> np.ndarray:
        features = np.ascontiguousarray(features, dtype=np.float32)
        digest = hashlib.blake2b(features.tobytes(), digest_size=16)
        digest.update(repr((features.shape, support.tau, support.top_k, support.n)).encode())
        path = Path(self._dir.name) / f"{digest.hexdigest()}.npy"
        if path.is_file():
            self.hits += 1
            return np.load(path)
        v = support.project(features)
        np.save(path, v)
        return v


def prepare(rows: dict, train: Train, data: Data, step: Step | None) -> dict:
    """FO picks s^v (the Eq. 2 output when there is one), FP projects it (Eq. 3; at training once per
    shard for the whole run, ``ProjectionCache``)."""
    s = rows["optimized"] if "optimized" in rows else rows["image"]
    if train.fp and step is not None:
        if "projection" not in data.memo:
            data.memo["projection"] = ProjectionCache()
        v = data.memo["projection"].project(s, data.support)                        # Eq. 3
    else:
        v = data.support.project(s) if train.fp else s                              # Eq. 3
    return {**rows, "v": v, "query": s if train.aux_query == "image" else v}        # Eq. 5 query


def _features(rows: dict, idx: np.ndarray, train: Train, data: Data) -> dict:
    batch = {"feature": torch.from_numpy(rows["v"][idx]), "aux_query": torch.from_numpy(rows["query"][idx])}
    if train.af:
        tag_feats, tag_mask = data.tag_vocabulary.batch([rows["tags"][i] for i in idx])   # Eq. 4
        batch.update(tag_feats=torch.from_numpy(tag_feats), tag_mask=torch.from_numpy(tag_mask))
    return batch


def batch(model: SynTICCaptioner, rows: dict, idx: np.ndarray, train: Train, data: Data, step: Step) -> dict:
    tokens, lengths = to_longest(*model.tokenizer.encode([rows["text"][i] for i in idx], train.decoder.max_len))
    return {**_features(rows, idx, train, data), "tokens": tokens, "lengths": lengths}


def caption(model: SynTICCaptioner, rows: dict, idx: np.ndarray, train: Train, caption: Caption,
            data: Data) -> list[str]:
    return model.generate(_features(rows, idx, train, data), caption.beam_size, caption.max_len)


def variant(train: Train, caption: Caption | None) -> str:
    """The Table 4 row: Baseline, or the switches that are on; "-TT" with a target-domain support set."""
    on = [flag.upper() for flag in ("fo", "fp", "af") if getattr(train, flag)]
    tt = "-TT" if caption is not None and train.fp and caption.support != "corpus" else ""
    return ("+".join(on) if on else "Baseline") + pairs_mark(train.pairs) + tt
