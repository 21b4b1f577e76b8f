"""The text-feature family: Unsupervised-ClipCap, CapDec and DeCap as switches of one ClipCap captioner.

Every instance trains on CLIP TEXT features of the corpus captions only (the cached
``artifacts/features/text``, L2-normalised) and captions real images from their CLIP image feature.
Read top to bottom:

1. ClipCap (Unsupervised-ClipCap Eq. 1): a mapping network h (ClipCap's MLP, or its transformer
   mapper: ``mapper``, CapDec's released default) maps a CLIP feature to P embeddings of the causal
   LM's width; the LM f_g decodes the caption after them,
       p(y_i | x) = f_g(h(f(x)), y_<i),   L = sum_i CE(p(y_i | x), y_i)
   (``PrefixMLP``, ``ClipCapCaptioner``, ``CausalLM.prefix_loss``). LM and MLP are both trained
   unless ``freeze_lm``. With ``start_token`` (DeCap's released code) the start token's embedding
   follows the prefix: the LM reads [h(f(x)), SOT, y_<i] in training and decodes from [h(f(x)), SOT].
2. Matched captions (``matched``, Unsupervised-ClipCap Eq. 2): the prefix is h(f_t(y')) with y' a
   DIFFERENT caption of the same source image (same corpus ``group_id``) and the target is y.
   ``matched_partners``: per epoch a seeded random single cycle through each group's captions, so
   every caption is a prefix once and a target once, never paired with itself when its group has
   others; a caption alone in its group decodes itself. Off: every caption decodes itself.
3. Noise injection (``noise_variance``, CapDec): during training only,
       t~ = normalize(t + n),   n ~ N(0, sigma^2 I),   sigma^2 = noise_variance (0.016 in CapDec).
   Renormalisation (``noise_renormalize``, default true): the CapDec paper only says "add zero-mean
   Gaussian noise" to the text embedding; the authors' released training code (DavidHuji/CapDec,
   ``noise_injection`` in train.py) L2-normalises the embedding, adds the noise, and L2-normalises
   the sum again. We follow the code, for the same reason it is right here: at inference the
   prefix MLP sees unit-norm image features, so training inputs should also lie on the unit
   sphere (without it, with D = 512 and sigma^2 = 0.016 the noisy vector has norm ~3). Set it to
   false for the paper's literal wording. The noise draws come from (seed, epoch, shard), so a
   run is reproducible.
4. Inference-time corrections of the real image feature v (``correction``; never at training):
   - ``none``: v as is (CapDec, and Unsupervised-ClipCap's plain row).
   - ``mean`` (Unsupervised-ClipCap Sec. 5, "aligning the means", after Liang et al. 2022):
         v' = normalize(v - mu_image + mu_text)
     mu_text = mean of the corpus text features, mu_image = mean of the synthetic-image features
     (``mean_image_source: synthetic``, our stand-in for the training images the paper's text-only
     model never sees) or of the eval set's own image features (``eval``: transductive, it looks
     at the whole test set). Means are over L2-normalised rows, in float64. The shifted feature is
     renormalised (the paper does not say) so the model gets what it was trained on: unit-norm
     inputs; the shift then changes the direction of v only.
   - ``projection`` (DeCap): SynTIC's Eq. 3 onto the support set of corpus text features,
         v' = normalize( sum_j softmax_j(cos(v, t_j) / tau) t_j )
     with the support set's ``support.tau``. ``projection: exact`` sums over EVERY support caption,
     as DeCap's released inference (``softmax(sim * 100) @ text_features`` over its whole memory);
     ``top_k`` over the support set's ``support.top_k`` nearest captions found by its FAISS index
     (exact when the set has no top-k), as SynTIC's inference. DeCap's inference code renormalises
     the projected embedding (``projection_renormalize``, default true). Not applied at training:
     DeCap trains on the text features themselves.
5. Decoding: greedy or beam search (``beam_size``) through the LM from the prefix embeddings
   (pipeline/nn/decoding.py, the Hugging Face ``generate`` path).

The modality-gap analysis (Unsupervised-ClipCap Sec. 5) is pipeline/analysis/modality_gap.py; it
calls ``caption`` on mixed features directly, so no correction is applied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn as nn

from pipeline.config import ModelRef, at_least, non_negative, opt
from pipeline.methods import Data, Needs, Step
from pipeline.models.language_model import CausalLM, corpus_vocabulary, load_causal_lm, tokenizer_of
from pipeline.nn import decoding
from pipeline.nn.schedules import Optim
from pipeline.nn.tokenizer import to_longest
from pipeline.vectors import l2_normalize


# ---------------------------------------------------------------------------------------------
# 2. Matched captions, Eq. 2
# ---------------------------------------------------------------------------------------------
def matched_partners(group_ids: Sequence[str], epoch: int, seed: int) -> np.ndarray:
    """partner[i] = the index of the caption decoded (the target y) when caption i's TEXT FEATURE is
    the prefix (Eq. 2: decode y from h(f_t(y')), y' = caption i). Per group, a seeded random order of its captions is
    closed into one cycle and each caption is paired with the next one: a permutation with no
    fixed point inside any group of >= 2 captions (so every caption is a target once and a prefix
    once per epoch), the identity on singleton groups. Deterministic in (group_ids, epoch, seed),
    independent of where groups sit in the corpus or its shards."""
    n = len(group_ids)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    _, codes = np.unique(np.asarray(group_ids, dtype=object).astype(str), return_inverse=True)
    key = np.random.default_rng([int(seed), int(epoch), 2]).random(n)
    order = np.lexsort((key, codes))                       # by group, randomly within a group
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    sizes = np.diff(np.r_[starts, n])
    first = np.repeat(starts, sizes)
    size = np.repeat(sizes, sizes)
    nxt = first + (np.arange(n) - first + 1) % size       # the next caption in the cycle
    partner = np.empty(n, dtype=np.int64)
    partner[order] = order[nxt]
    return partner


def pairing_stats(group_ids: Sequence[str]) -> dict:
    _, counts = np.unique(np.asarray(group_ids, dtype=object).astype(str), return_counts=True)
    return {"captions": int(counts.sum()), "groups": int(len(counts)),
            "singleton_captions": int((counts == 1).sum()),
            "captions_matched_to_another": int(counts[counts > 1].sum())}


# ---------------------------------------------------------------------------------------------
# 3. CapDec noise
# ---------------------------------------------------------------------------------------------
def inject_noise(features: np.ndarray, variance: float, rng: np.random.Generator,
                 renormalize: bool = True) -> np.ndarray:
    """t + n with n ~ N(0, variance * I), then L2-normalised when ``renormalize`` (see the module
    docstring). variance 0 returns the features unchanged (no draw)."""
    features = np.asarray(features, dtype=np.float32)
    if variance < 0:
        raise ValueError(f"noise variance must be >= 0, got {variance}")
    if variance == 0:
        return features
    noisy = features.astype(np.float64) + rng.standard_normal(features.shape) * math.sqrt(variance)
    return l2_normalize(noisy) if renormalize else noisy.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# 4. Inference-time corrections
# ---------------------------------------------------------------------------------------------
def mean_shift(features: np.ndarray, text_mean: np.ndarray, image_mean: np.ndarray) -> np.ndarray:
    """Align the means: normalize(v - mu_image + mu_text), row-wise."""
    shifted = l2_normalize(features, np.float64) + (np.asarray(text_mean, np.float64) - np.asarray(image_mean, np.float64))
    return l2_normalize(shifted)


def support_projection(features: np.ndarray, support, renormalize: bool = True, exact: bool = False) -> np.ndarray:
    """DeCap: Eq. 3 of SynTIC onto the support set (``SupportSet.project``), renormalised. ``exact``: the
    softmax over every support feature (DeCap's released code); else over the set's own top-k."""
    v = support.project(np.asarray(features, dtype=np.float32), top_k=None if exact else "own")
    return l2_normalize(v) if renormalize else v


# ---------------------------------------------------------------------------------------------
# 1. The captioner, Eq. 1
# ---------------------------------------------------------------------------------------------
class PrefixMLP(nn.Module):
    """ClipCap's mapping network: feature [B, D] -> prefix [B, P, W]. hidden=None: D -> P*W/2 ->
    tanh -> P*W (ClipCap's MLP); hidden=0: one Linear D -> P*W (DeCap's projection)."""

    def __init__(self, feature_dim: int, width: int, prefix_length: int, hidden: int | None = None):
        super().__init__()
        self.prefix_length, self.width = prefix_length, width
        out = prefix_length * width
        hidden = out // 2 if hidden is None else int(hidden)
        if hidden == 0:
            self.net = nn.Linear(feature_dim, out)
        else:
            self.net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.Tanh(), nn.Linear(hidden, out))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).view(features.shape[0], self.prefix_length, self.width)


class TransformerMapper(nn.Module):
    """ClipCap's transformer mapping network (CapDec's released default): the feature mapped to
    ``clip_length`` embeddings, followed by ``prefix_length`` learnable constants; a pre-LN Transformer
    (8 heads, MLP ratio 2, ReLU, no dropout) runs over both, and the outputs at the constants' places
    are the prefix [B, P, W]."""

    def __init__(self, feature_dim: int, width: int, prefix_length: int, clip_length: int, layers: int = 8,
                 heads: int = 8):
        super().__init__()
        self.clip_length, self.width = clip_length, width
        self.linear = nn.Linear(feature_dim, clip_length * width)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, activation="relu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.linear(features).view(features.shape[0], self.clip_length, self.width)
        prefix = self.prefix_const.expand(features.shape[0], *self.prefix_const.shape)
        return self.transformer(torch.cat([x, prefix], dim=1))[:, self.clip_length:]


@dataclass
class ClipCapConfig:
    feature_dim: int = 512
    prefix_length: int = 10
    prefix_hidden: int | None = None
    mapper: str = "mlp"             # mlp | transformer
    mapper_clip_length: int = 10    # transformer: embeddings the feature is mapped to
    mapper_layers: int = 8          # transformer: layers
    max_len: int = 30
    freeze_lm: bool = False
    label_smoothing: float = 0.0
    start_token: bool = False       # DeCap: [prefix, SOT, words...]


class ClipCapCaptioner(nn.Module):
    """Prefix MLP + causal LM. ``self.lm`` is the transformers model (a registered submodule, so
    its weights are in the state dict); ``self.causal`` the CausalLM around it (tokenizer etc.)."""

    def __init__(self, cfg: ClipCapConfig, lm: CausalLM):
        super().__init__()
        self.cfg = cfg
        self.causal = lm
        self.lm = lm.model
        limit = lm.max_positions
        if limit is not None and cfg.prefix_length + cfg.start_token + cfg.max_len > limit:
            raise ValueError(f"prefix_length {cfg.prefix_length} + max_len {cfg.max_len}"
                             + (" + the start token" if cfg.start_token else "")
                             + f" exceeds the language model's {limit} positions")
        if cfg.mapper == "transformer":
            self.prefix_mlp = TransformerMapper(cfg.feature_dim, lm.width, cfg.prefix_length, cfg.mapper_clip_length,
                                                cfg.mapper_layers)
        else:
            self.prefix_mlp = PrefixMLP(cfg.feature_dim, lm.width, cfg.prefix_length, cfg.prefix_hidden)
        if cfg.freeze_lm:
            for param in self.lm.parameters():
                param.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.cfg.freeze_lm:
            self.lm.eval()        # a frozen LM keeps dropout off (ClipCap's prefix-only variant)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.prefix_mlp.parameters()).device

    def prefix(self, features: torch.Tensor) -> torch.Tensor:
        """The LM's input before the caption: the mapped feature [B, P, W], then (``start_token``, as the
        released DeCap trains and decodes) the start token's embedding: [B, P + 1, W]."""
        prefix = self.prefix_mlp(features.to(self.device, torch.float32))
        if not self.cfg.start_token:
            return prefix
        sot = torch.full((prefix.shape[0], 1), self.causal.bos_id, dtype=torch.long, device=prefix.device)
        return torch.cat([prefix, self.causal.embed(sot).to(prefix.dtype)], dim=1)

    def loss(self, batch: dict) -> torch.Tensor:
        """Eq. 1 (Eq. 2 when the batch pairs each target with another caption's feature)."""
        dev = self.device
        return self.causal.prefix_loss(self.prefix(batch["feature"]), batch["tokens"].to(dev),
                                       batch["lengths"].to(dev), self.cfg.label_smoothing)

    @torch.no_grad()
    def generate(self, features: torch.Tensor, beam_size: int = 1) -> list[str]:
        lm = self.causal
        ids = decoding.generate_from_prefix(self.lm, self.prefix(features), lm.eos_id, lm.pad_id, self.cfg.max_len,
                                            beam_size)
        return [lm.decode(row) for row in ids]


# ---------------------------------------------------------------------------------------------
# Settings and the method contract (pipeline/methods/__init__.py)
# ---------------------------------------------------------------------------------------------
# Defaults: ClipCap's published training setup (Mokady et al. 2021: GPT-2 fine-tuned with an MLP
# prefix of length 10, AdamW lr 2e-5, 5000 warm-up steps, batch 40, 10 epochs), which
# Unsupervised-ClipCap and CapDec build on.
@dataclass(frozen=True, kw_only=True)
class Train:
    matched: bool = opt(False, "Unsupervised-ClipCap's matched captions (Eq. 2)")
    noise_variance: float = opt(0.0, "CapDec's sigma^2 (0.016); 0 = off", check=non_negative)
    noise_renormalize: bool = opt(True, "normalize(t + n), as CapDec's released code")
    language_model: ModelRef = opt(ModelRef(name="gpt2", pretrained="gpt2"), "the causal LM (name, pretrained, seed)")
    vocabulary: Literal["full", "corpus"] = opt("full", "an LM built from configuration predicts over all its "
                                                        "tokenizer's ids | only those the corpus uses (fast on CPU)")
    mapper: Literal["mlp", "transformer"] = opt("mlp", "the mapping network: ClipCap's MLP | its transformer "
                                                       "(CapDec's released default)")
    prefix_length: int = opt(10, "prefix embeddings", check=at_least(1))
    prefix_hidden: int | None = opt(None, "MLP hidden width: null = P*W/2 (ClipCap), 0 = one Linear (DeCap)",
                                    check=non_negative)
    mapper_clip_length: int = opt(10, "transformer mapper: embeddings the feature is mapped to (CapDec: 40)",
                                  check=at_least(1))
    mapper_layers: int = opt(8, "transformer mapper: layers (ClipCap, CapDec: 8)", check=at_least(1))
    freeze_lm: bool = opt(False, "train the prefix MLP only")
    start_token: bool = opt(False, "the start token's embedding follows the prefix, in training and decoding: "
                                   "DeCap's [prefix, SOT, words] (released code); ClipCap and CapDec: none")
    max_len: int = opt(30, "caption tokens incl. the end token (training and decoding)", check=at_least(1))
    label_smoothing: float = opt(0.0, "label smoothing of the caption cross-entropy")
    epochs: int = opt(10, "passes over the corpus", check=at_least(1))
    batch_size: int = opt(40, "captions per step", check=at_least(1))
    optim: Optim = opt(Optim(name="adamw", lr=2e-5, weight_decay=0.01, schedule="linear", warmup_steps=5000))
    seed: int = opt(0, "seed of the prefix MLP, the data order, the pairing and the noise")


@dataclass(frozen=True, kw_only=True)
class Caption:
    correction: Literal["none", "mean", "projection"] = opt("none", "inference-time correction of the image "
                                                                    "feature (module docstring, section 4)")
    mean_image_source: Literal["synthetic", "eval"] = opt("synthetic", "mean correction: the image mean from")
    projection_renormalize: bool = opt(True, "DeCap renormalises the projected embedding")
    projection: Literal["top_k", "exact"] = opt("top_k", "Eq. 3 over the support set's top-k neighbours "
                                                         "(support.top_k) | over every support caption "
                                                         "(DeCap's released code)")
    support: str = opt("corpus", "projection support set: corpus | a target_supports name")
    beam_size: int = opt(1, "beam search width (1 = greedy)", check=at_least(1))
    batch_size: int = opt(64, "images per decoding batch", check=at_least(1))


def needs(train: Train, caption: Caption | None = None) -> Needs:
    if caption is None:                                 # text-only training: corpus text features
        return Needs(rows={"feature": "text.text_feature"}, corpus=("caption_id", "group_id", "text"))
    if caption.correction == "mean":
        return Needs(rows={"feature": "image.global"},
                     means=("text", "eval" if caption.mean_image_source == "eval" else "synthetic"))
    if caption.correction == "projection":
        return Needs(rows={"feature": "image.global"}, support=caption.support)
    return Needs(rows={"feature": "image.global"})


def facts(train: Train, data: Data) -> dict:
    ref = train.language_model
    vocabulary = None
    if train.vocabulary == "corpus":
        vocabulary = corpus_vocabulary(tokenizer_of(ref.name, ref.pretrained), data.corpus["text"])
    return {"feature_dim": data.feature_dim, "vocabulary": vocabulary}


def create(train: Train, facts: dict, data: Data | None = None) -> ClipCapCaptioner:
    ref = train.language_model
    lm = load_causal_lm(ref.name, ref.pretrained, seed=ref.seed, device=data.device if data else "cpu",
                        vocabulary=facts.get("vocabulary"))
    torch.manual_seed(train.seed)                       # the prefix MLP's weights
    return ClipCapCaptioner(ClipCapConfig(feature_dim=facts["feature_dim"], prefix_length=train.prefix_length,
                                          prefix_hidden=train.prefix_hidden, mapper=train.mapper,
                                          mapper_clip_length=train.mapper_clip_length,
                                          mapper_layers=train.mapper_layers, max_len=train.max_len,
                                          freeze_lm=train.freeze_lm, label_smoothing=train.label_smoothing,
                                          start_token=train.start_token), lm)


def _partners(train: Train, data: Data, epoch: int) -> np.ndarray:
    """This epoch's pairing (Eq. 2), computed once per epoch."""
    key = ("clipcap.partners", epoch)
    if key not in data.memo:
        data.memo.clear()
        groups = data.corpus["group_id"]
        data.memo[key] = matched_partners(groups, epoch, train.seed) if train.matched else np.arange(len(groups))
    return data.memo[key]


def prepare(rows: dict, train: Train, data: Data, step: Step | None) -> dict:
    """Training: unit-norm text features, CapDec noise drawn per (seed, epoch, shard). Captioning: the
    instance's correction is applied in ``caption_prepare`` instead (see ``caption``)."""
    if step is None:
        return rows
    ids = data.corpus["caption_id"]
    if rows["caption_id"] != ids[step.offset:step.offset + len(rows["caption_id"])]:
        raise ValueError(f"shard {step.shard} of the text features holds other captions than rows {step.offset}.. "
                         f"of the corpus: the artifacts come from different runs; rerun the pipeline")
    feats = l2_normalize(rows["feature"])
    feats = inject_noise(feats, train.noise_variance, np.random.default_rng([train.seed, step.epoch, step.shard, 1]),
                         train.noise_renormalize)
    return {**rows, "feature": feats}


def batch(model: ClipCapCaptioner, rows: dict, idx: np.ndarray, train: Train, data: Data, step: Step) -> dict:
    """Eq. 2: the prefix is row i's (noised) text feature, the target its partner caption."""
    partners, texts = _partners(train, data, step.epoch), data.corpus["text"]
    tokens, lengths = to_longest(*model.causal.encode([texts[partners[step.offset + i]] for i in idx], train.max_len))
    return {"feature": torch.from_numpy(rows["feature"][idx]), "tokens": tokens, "lengths": lengths}


def correct(features: np.ndarray, caption: Caption, data: Data) -> np.ndarray:
    """The instance's inference-time correction of real image features (section 4)."""
    if caption.correction == "mean":
        image_mean = data.means["eval" if caption.mean_image_source == "eval" else "synthetic"]
        return mean_shift(features, data.means["text"], image_mean)
    if caption.correction == "projection":
        return support_projection(features, data.support, caption.projection_renormalize,
                                  exact=caption.projection == "exact")
    return l2_normalize(features)


def caption(model: ClipCapCaptioner, rows: dict, idx: np.ndarray, train: Train, caption: Caption,
            data: Data) -> list[str]:
    """Real image feature -> correction (none / mean / projection) -> decode. The correction is
    row-wise, so applying it per batch equals applying it to the whole eval set."""
    features = correct(rows["feature"][idx], caption, data)
    return decode_features(model, features, caption.beam_size, len(idx))


def decode_features(model: ClipCapCaptioner, features: np.ndarray, beam_size: int = 1,
                    batch_size: int = 64) -> list[str]:
    """Captions of features used as given (the modality-gap analysis feeds mixed features here)."""
    model.eval()
    out: list[str] = []
    for start in range(0, len(features), batch_size):
        block = np.ascontiguousarray(features[start:start + batch_size], dtype=np.float32)
        out += model.generate(torch.from_numpy(block), beam_size)
    return out


def variant(train: Train, caption: Caption | None) -> str:
    """Short row label: the switches that are on, e.g. "matched+mean", "noise 0.016", "projection"."""
    parts = (["matched"] if train.matched else []) + \
            ([f"noise {train.noise_variance:g}"] if train.noise_variance > 0 else []) + \
            ([caption.correction] if caption is not None and caption.correction != "none" else [])
    return "+".join(parts) if parts else "text only"
