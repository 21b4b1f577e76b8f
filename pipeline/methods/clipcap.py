"""The text-feature family: Unsupervised-ClipCap, CapDec and DeCap as switches of one ClipCap captioner.

Every instance trains on CLIP TEXT features of the corpus captions only (the cached
``artifacts/features/text``, L2-normalised) and captions real images from their CLIP image feature.
Read top to bottom:

1. ClipCap (Unsupervised-ClipCap Eq. 1): a prefix MLP h maps a CLIP feature to P embeddings of the
   causal LM's width; the LM f_g decodes the caption after them,
       p(y_i | x) = f_g(h(f(x)), y_<i),   L = sum_i CE(p(y_i | x), y_i)
   (``PrefixMLP``, ``ClipCapCaptioner``, ``CausalLM.prefix_loss``). LM and MLP are both trained
   unless ``freeze_lm``.
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
     (``SupportSet.project`` with ``support.tau`` / ``support.top_k``); DeCap's inference code
     renormalises the projected embedding (``projection_renormalize``, default true). Not applied
     at training: DeCap trains on the text features themselves.
5. Decoding: greedy or beam search (``beam_size``) through the LM from the prefix embeddings.

The mix-up analysis (Unsupervised-ClipCap Sec. 5) is pipeline/mixup.py; it captions through
``feature_captioner`` (this module's inference path without any correction).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from pipeline.nn import training
from pipeline.models.language_model import CausalLM, load_from_config
from pipeline.support import l2_normalize

CORRECTIONS = ("none", "mean", "projection")
MEAN_IMAGE_SOURCES = ("synthetic", "eval")
LR_SCHEDULES = ("linear", "constant")

# Every key an instance may set in params.yaml (methods.NAME), with its default. The defaults are
# ClipCap's published training setup (Mokady et al. 2021: GPT-2 fine-tuned with an MLP prefix of
# length 10, AdamW lr 2e-5, 5000 warm-up steps, batch 40, 10 epochs), which Unsupervised-ClipCap
# and CapDec build on; the offline profile overrides them with small values.
DEFAULTS: dict = {
    "method": "clipcap",
    "matched": False,                   # Unsupervised-ClipCap's matched captions (Eq. 2)
    "noise_variance": 0.0,              # CapDec's sigma^2 (0.016); 0 = off
    "noise_renormalize": True,          # normalize(t + n), as CapDec's released code
    "correction": "none",               # none | mean | projection (inference only)
    "mean_image_source": "synthetic",   # mean correction: synthetic | eval
    "projection_renormalize": True,     # DeCap renormalises the projected embedding
    "language_model": {"name": "synthcap-tiny-gpt2", "pretrained": None, "seed": 0},
    "prefix_length": 10,
    "prefix_hidden": None,              # MLP hidden width: null = P*W/2 (ClipCap), 0 = one Linear (DeCap)
    "freeze_lm": False,
    "max_len": 30,                      # caption tokens incl. the end token (training and decoding)
    "epochs": 10,
    "batch_size": 40,
    "lr": 2e-5,
    "weight_decay": 0.01,
    "warmup_steps": 5000,
    "lr_schedule": "linear",            # linear warm-up then linear decay to 0 (ClipCap) | constant
    "label_smoothing": 0.0,
    "grad_clip": None,
    "seed": 0,
    "beam_size": 1,
    "caption_batch_size": 64,
}


def settings(cfg: dict) -> dict:
    """cfg over DEFAULTS, validated: unknown keys and impossible values fail here, by name."""
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown clipcap parameter(s) {unknown} (known: {sorted(DEFAULTS)})")
    s = {**DEFAULTS, **cfg}
    s["language_model"] = {**DEFAULTS["language_model"], **(cfg.get("language_model") or {})}
    if s["correction"] not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {s['correction']!r}")
    if s["mean_image_source"] not in MEAN_IMAGE_SOURCES:
        raise ValueError(f"mean_image_source must be one of {MEAN_IMAGE_SOURCES}, got {s['mean_image_source']!r}")
    if s["lr_schedule"] not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {s['lr_schedule']!r}")
    if not s["noise_variance"] >= 0:
        raise ValueError(f"noise_variance must be >= 0, got {s['noise_variance']}")
    for key in ("prefix_length", "max_len", "epochs", "batch_size", "beam_size", "caption_batch_size"):
        if int(s[key]) < 1:
            raise ValueError(f"{key} must be >= 1, got {s[key]}")
    return s


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
def _unit64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def feature_mean(batches: Iterable[np.ndarray]) -> np.ndarray:
    """Mean of L2-normalised rows over a stream of [n, D] blocks, in float64 -> [D]."""
    total, count = None, 0
    for block in batches:
        block = _unit64(block)
        total = block.sum(axis=0) if total is None else total + block.sum(axis=0)
        count += block.shape[0]
    if count == 0:
        raise ValueError("cannot take the mean of zero features")
    return total / count


def artifact_mean(artifact, column: str) -> np.ndarray:
    """``feature_mean`` of one feature column of a sharded artifact, streamed shard by shard."""
    from pipeline.data.shards import feature_numpy
    return feature_mean(feature_numpy(b.column(0)) for b in artifact.iter_batches([column]))


def mean_shift(features: np.ndarray, text_mean: np.ndarray, image_mean: np.ndarray) -> np.ndarray:
    """Align the means: normalize(v - mu_image + mu_text), row-wise."""
    shifted = _unit64(features) + (np.asarray(text_mean, np.float64) - np.asarray(image_mean, np.float64))
    return l2_normalize(shifted)


def support_projection(features: np.ndarray, support, tau: float, top_k: int | None,
                       renormalize: bool = True) -> np.ndarray:
    """DeCap: Eq. 3 of SynTIC onto the support set (``SupportSet.project``), renormalised."""
    v = support.project(np.asarray(features, dtype=np.float32), tau, top_k)
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


@dataclass
class ClipCapConfig:
    feature_dim: int = 512
    prefix_length: int = 10
    prefix_hidden: int | None = None
    max_len: int = 30
    freeze_lm: bool = False
    label_smoothing: float = 0.0
    language_model: dict = field(default_factory=lambda: dict(DEFAULTS["language_model"]))


class ClipCapCaptioner(nn.Module):
    """Prefix MLP + causal LM. ``self.lm`` is the transformers model (a registered submodule, so
    its weights are in the state dict); ``self.causal`` the CausalLM around it (tokenizer etc.)."""

    def __init__(self, cfg: ClipCapConfig, lm: CausalLM):
        super().__init__()
        self.cfg = cfg
        self.causal = lm
        self.lm = lm.model
        limit = lm.max_positions
        if limit is not None and cfg.prefix_length + cfg.max_len > limit:
            raise ValueError(f"prefix_length {cfg.prefix_length} + max_len {cfg.max_len} exceeds the language "
                             f"model's {limit} positions")
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
        return self.prefix_mlp(features.to(self.device, torch.float32))

    def loss(self, batch: dict) -> torch.Tensor:
        """Eq. 1 (Eq. 2 when the batch pairs each target with another caption's feature)."""
        dev = self.device
        return self.causal.prefix_loss(self.prefix(batch["feature"]), batch["tokens"].to(dev),
                                       batch["lengths"].to(dev), self.cfg.label_smoothing)

    @torch.no_grad()
    def generate(self, features: torch.Tensor, beam_size: int = 1) -> list[list[int]]:
        return self.causal.generate(self.prefix(features), self.cfg.max_len, beam_size)


def caption_features(model: ClipCapCaptioner, features: np.ndarray, beam_size: int = 1,
                     batch_size: int = 64) -> list[str]:
    """Decode one caption per feature row (features used as given: correct them first)."""
    model.eval()
    out: list[str] = []
    for start in range(0, len(features), batch_size):
        block = torch.from_numpy(np.ascontiguousarray(features[start:start + batch_size], dtype=np.float32))
        out.extend(model.causal.decode(ids) for ids in model.generate(block, beam_size))
    return out


# ---------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------
def lr_factor(step: int, warmup_steps: int, total_steps: int | None, schedule: str) -> float:
    """Linear warm-up over warmup_steps (from 1/warmup_steps), then constant or a linear decay that
    reaches 0 at total_steps (ClipCap's get_linear_schedule_with_warmup shape)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or not total_steps:
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def train_clipcap(model: ClipCapCaptioner, make_batches: Callable[[int], Iterable[dict]], epochs: int,
                  lr: float, weight_decay: float = 0.01, warmup_steps: int = 0, seed: int = 0,
                  total_steps: int | None = None, schedule: str = "constant", grad_clip: float | None = None,
                  progress: bool = True) -> list[float]:
    """AdamW on the trainable parameters (weight decay on >= 2-D weights only); make_batches(epoch)
    streams one epoch. Returns the per-epoch mean loss (mean over captions); model left in eval."""
    torch.manual_seed(seed)                                   # dropout
    opt = training.adamw(model, lr, weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup_steps, total_steps, schedule))
    return training.fit(model, make_batches, epochs, opt, sched, grad_clip=grad_clip, desc="ClipCap",
                        progress=progress)


# ---------------------------------------------------------------------------------------------
# Checkpoints: safetensors (prefix MLP + LM weights), config and identities in the header
# ---------------------------------------------------------------------------------------------
CHECKPOINT_FORMAT = "synthcap.clipcap.v1"


def save_checkpoint(model: ClipCapCaptioner, path, clip_model: dict | None = None) -> None:
    """Prefix MLP + LM weights (tied LM tensors stored once); config and both identities in the header."""
    training.save_checkpoint(model, path, CHECKPOINT_FORMAT, asdict(model.cfg),
                             language_model=model.causal.identity, clip_model=clip_model)


def checkpoint_metadata(path) -> dict:
    return training.checkpoint_metadata(path, CHECKPOINT_FORMAT)


def load_checkpoint(path, device: str = "cpu") -> ClipCapCaptioner:
    """Rebuild the LM named in the header (same name / pretrained / seed: same architecture and
    tokenizer), then load every weight from the file (strict). ``model.clip_model`` is the CLIP
    identity of the training features."""
    meta = checkpoint_metadata(path)
    cfg = ClipCapConfig(**meta["config"])
    lm = load_from_config(cfg.language_model, device=device)
    if lm.identity["model_class"] != meta["language_model"].get("model_class"):
        raise ValueError(f"{path}: trained with a {meta['language_model'].get('model_class')} but "
                         f"{cfg.language_model} now loads a {lm.identity['model_class']}")
    model = training.load_weights(ClipCapCaptioner(cfg, lm), path, device)
    model.clip_model = meta["clip_model"]
    return model


# ---------------------------------------------------------------------------------------------
# Pipeline entry points (stages/train.py, stages/caption.py, stages/mixup.py)
# ---------------------------------------------------------------------------------------------
def variant(cfg: dict) -> str:
    """Short row label: the switches that are on, e.g. "matched+mean", "noise 0.016", "projection"."""
    s = settings(cfg)
    parts = (["matched"] if s["matched"] else []) + \
            ([f"noise {s['noise_variance']:g}"] if s["noise_variance"] > 0 else []) + \
            ([s["correction"]] if s["correction"] != "none" else [])
    return "+".join(parts) if parts else "text only"


def _shard_offsets(artifact) -> list[int]:
    rows = [int(s["rows"]) for s in artifact.manifest["shards"]]
    return np.r_[0, np.cumsum(rows)].astype(int).tolist()


def _epoch_batches(s: dict, lm: CausalLM, text_features, corpus_columns: dict, epoch: int,
                   dim: int) -> Iterator[dict]:
    """One epoch: shards in a seeded order, rows shuffled within a shard; each row's prefix is its
    (noised) text feature, its target the partner caption (itself unless ``matched``).

    Memory: the corpus's caption_id/group_id/text columns are held whole (strings, small next to
    the features), so a group's other captions are found wherever they sit, even across shard
    borders; the features are streamed one shard at a time."""
    from pipeline.data.aligned import Column, aligned_shards, check_dim, shard_order

    caption_ids, texts = corpus_columns["caption_id"], corpus_columns["text"]
    n = len(caption_ids)
    partners = matched_partners(corpus_columns["group_id"], epoch, s["seed"]) if s["matched"] else np.arange(n)
    offsets = _shard_offsets(text_features)
    order = shard_order(len(text_features.paths), epoch, s["seed"])
    for k, shard in zip(order, aligned_shards("caption_id", [Column(text_features, "text_feature")], order)):
        start = offsets[k]
        if shard["caption_id"] != caption_ids[start:start + len(shard["caption_id"])]:
            raise ValueError(f"shard {k} of {text_features.folder} holds other captions than rows {start}.. of "
                             f"the corpus: the artifacts come from different runs; rerun the pipeline")
        feats = l2_normalize(shard["text_feature"])
        check_dim(feats, dim, f"text features of shard {k}")
        feats = inject_noise(feats, s["noise_variance"], np.random.default_rng([s["seed"], epoch, k, 1]),
                             s["noise_renormalize"])
        rows = np.random.default_rng([s["seed"], epoch, k, 0]).permutation(len(feats))
        for b in range(0, len(rows), s["batch_size"]):
            idx = rows[b:b + s["batch_size"]]
            # Eq. 2: the prefix is row i's text feature, the target its partner caption
            tokens, lengths = lm.encode([texts[partners[start + i]] for i in idx], s["max_len"])
            yield {"feature": torch.from_numpy(feats[idx]), "tokens": tokens, "lengths": lengths}


def train(name: str, cfg: dict, p: dict, out_dir) -> dict:
    """Fit on the corpus text features alone; write model.safetensors to out_dir."""
    from pathlib import Path
    from pipeline import paths
    from pipeline.data.shards import ShardedArtifact

    s = settings(cfg)
    device = p.get("device", "cpu")
    corpus = ShardedArtifact(paths.CORPUS)
    text_features = ShardedArtifact(paths.TEXT_FEATURES)
    clip_identity = text_features.model
    dim = int(clip_identity["embed_dim"])
    columns = {c: corpus.read_column(c).to_pylist() for c in ("caption_id", "group_id", "text")}
    if len(columns["caption_id"]) != text_features.num_rows:
        raise ValueError(f"the corpus has {len(columns['caption_id'])} captions but {text_features.folder} "
                         f"{text_features.num_rows} features: rerun the pipeline")

    lm = load_from_config(s["language_model"], device=device)
    config = ClipCapConfig(feature_dim=dim, prefix_length=s["prefix_length"], prefix_hidden=s["prefix_hidden"],
                           max_len=s["max_len"], freeze_lm=s["freeze_lm"], label_smoothing=s["label_smoothing"],
                           language_model=dict(s["language_model"]))
    torch.manual_seed(s["seed"])
    model = ClipCapCaptioner(config, lm).to(device)
    steps_per_epoch = sum(math.ceil(int(sh["rows"]) / s["batch_size"]) for sh in text_features.manifest["shards"])
    history = train_clipcap(
        model, lambda epoch: _epoch_batches(s, lm, text_features, columns, epoch, dim), s["epochs"], s["lr"],
        s["weight_decay"], s["warmup_steps"], s["seed"], total_steps=steps_per_epoch * s["epochs"],
        schedule=s["lr_schedule"], grad_clip=s["grad_clip"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, out_dir / "model.safetensors", clip_identity)
    return {"method": "clipcap", "variant": variant(cfg), "epoch_loss": history, "clip_model": clip_identity,
            "language_model": lm.identity, "pairs": pairing_stats(columns["group_id"]) if s["matched"] else None,
            "noise_variance": s["noise_variance"], "training_captions": len(columns["caption_id"]),
            "summary": f"{variant(cfg)}: loss {history[0]:.3f} -> {history[-1]:.3f} over {len(history)} epochs"}


def feature_captioner(name: str, cfg: dict, p: dict, model_dir) -> Callable[[np.ndarray], list[str]]:
    """The trained model's own inference path WITHOUT any correction: features [N, D], used as
    given (the cached CLIP features are L2-normalised; so are the outputs of every correction and
    of the mix-up) -> captions. ``caption`` applies the instance's correction first; mix-up calls it
    directly. ``.clip_model`` on the returned function names the CLIP model the features must come
    from."""
    from pathlib import Path
    from pipeline.data.aligned import check_dim

    s = settings(cfg)
    model = load_checkpoint(Path(model_dir) / "model.safetensors", device=p.get("device", "cpu"))

    def run(features: np.ndarray) -> list[str]:
        check_dim(np.asarray(features), model.cfg.feature_dim, "features to caption")
        return caption_features(model, features, s["beam_size"], s["caption_batch_size"])

    run.clip_model = model.clip_model
    return run


def correction_for(cfg: dict, p: dict, clip_identity: dict, evalset: str) -> Callable[[np.ndarray], np.ndarray]:
    """The instance's inference-time correction of eval image features (section 4)."""
    from pipeline import paths
    from pipeline.data.shards import ShardedArtifact, require_same_model

    s = settings(cfg)
    if s["correction"] == "none":
        return l2_normalize
    if s["correction"] == "mean":
        text = ShardedArtifact(paths.TEXT_FEATURES)
        source = (ShardedArtifact(paths.SYNTHETIC_FEATURES) if s["mean_image_source"] == "synthetic"
                  else ShardedArtifact(paths.EVAL_FEATURES / evalset))
        require_same_model(model_training_features=clip_identity, corpus_text_features=text,
                           **{f"{s['mean_image_source']}_image_features": source})
        text_mean, image_mean = artifact_mean(text, "text_feature"), artifact_mean(source, "global")
        return lambda v: mean_shift(v, text_mean, image_mean)
    from pipeline.support import SupportSet
    support_model = json.loads((paths.SUPPORT / "report.json").read_text())["model"]
    require_same_model(model_training_features=clip_identity, support_set=support_model)
    support = SupportSet.load(paths.SUPPORT)
    tau, top_k = p["support"]["tau"], p["support"]["top_k"]
    return lambda v: support_projection(v, support, tau, top_k, s["projection_renormalize"])


def caption(name: str, cfg: dict, p: dict, model_dir) -> dict[str, dict[str, str]]:
    """Real eval image -> cached CLIP feature -> correction (none / mean / projection) -> decode."""
    from pipeline import paths
    from pipeline.data.aligned import Column, aligned_shards
    from pipeline.runtime import evalsets
    from pipeline.data.shards import ShardedArtifact, require_same_model

    decode = feature_captioner(name, cfg, p, model_dir)
    out: dict[str, dict[str, str]] = {}
    for evalset in evalsets(p):
        features = ShardedArtifact(paths.EVAL_FEATURES / evalset)
        require_same_model(model_training_features=decode.clip_model, eval_image_features=features)
        correct = correction_for(cfg, p, decode.clip_model, evalset)
        captions: dict[str, str] = {}
        for shard in aligned_shards("image_id", [Column(features, "global")]):
            captions.update(zip(shard["image_id"], decode(correct(shard["global"]))))
        out[evalset] = captions
    return out
