"""SynTIC: text-only captioning with synthetic image-text pairs (Liu, Liu & Ma, AAAI 2024).

Read top to bottom:
1. Feature optimisation (FO, Eq. 1-2): the CLIP features s^v of the synthetic images are free
   parameters pulled towards their own caption's text feature by InfoNCE; text features frozen.
2. Feature projection (FP, Eq. 3): lives in pipeline/support.py (the caller projects).
3. Auxiliary feature (AF, Eq. 4-5): CLIP text features of the detected object tags, fused by
   multi-head attention with the pseudo image feature as the query.
4. Prefix decoding (Eq. 6): prefix [v, u] -> small causal Transformer -> caption cross-entropy.

Which features are fed is the caller's choice (the Table 4 ablations are flag combinations
outside the model): `feature` is v (projected, or raw/optimised when FP is off) and `aux_query`
is the Eq. 5 query. Only `use_aux=False` changes the model: the prefix is then [v] alone.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.nn import training
from pipeline.nn.prefix_decoder import (CaptionTokenizer, DecoderConfig, PrefixDecoder, caption_batches,
                                            caption_loss, decode)


# ---------------------------------------------------------------------------------------------
# 1. Feature optimisation, Eq. 1-2
# ---------------------------------------------------------------------------------------------
def contrastive_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 2: -(1/b) sum_i log softmax_j( f_sim(s_i, t_j) / tau )[i], f_sim = cosine (Eq. 1)."""
    logits = F.normalize(image_feats, dim=-1) @ F.normalize(text_feats, dim=-1).T / tau
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def minibatches(n: int, batch_size: int, seed: int = 0) -> list[np.ndarray]:
    """The fixed FO mini-batches: a seeded permutation of range(n) cut into chunks of batch_size
    (the last one may be smaller). Each chunk is optimised independently, so the chunks can be
    distributed over shards or workers and the result does not depend on how."""
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def optimize_minibatch(image_feats: np.ndarray, text_feats: np.ndarray, tau: float, lr: float,
                       steps: int) -> np.ndarray:
    """Run `steps` Adam(lr) steps of Eq. 2 on one mini-batch; returns the raw (unnormalised)
    optimised parameters, float32 [b, D]. A fresh Adam per mini-batch, no randomness."""
    s = torch.nn.Parameter(torch.tensor(np.asarray(image_feats, dtype=np.float32)))
    t = torch.tensor(np.asarray(text_feats, dtype=np.float32))
    if s.shape[0] < 2 or steps == 0:       # b = 1: Eq. 2 is log(1) = 0 for any s, nothing to learn
        return s.detach().numpy().copy()
    opt = torch.optim.Adam([s], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        contrastive_loss(s, t, tau).backward()
        opt.step()
    return s.detach().numpy().copy()


def optimize_features(image_feats: np.ndarray, text_feats: np.ndarray, tau: float = 0.01,
                      lr: float = 1e-5, steps: int = 100, batch_size: int = 64,
                      seed: int = 0, progress: bool = False) -> np.ndarray:
    """FO (Eq. 2) over a whole corpus: image_feats [n, D] (synthetic-image CLIP features, the
    initialisation), text_feats [n, D] (row i = the caption of image i, frozen) -> optimised
    features [n, D] float32, L2-normalised. A pure function of its inputs: fixed mini-batches
    from `minibatches(n, batch_size, seed)`, each with its own Adam(lr) for `steps` steps.
    A mini-batch of one row is returned unchanged (normalised): its loss is identically 0.
    steps and batch_size are not given in the paper (tau = 1/100 and lr = 1e-5 are)."""
    image_feats = np.asarray(image_feats, dtype=np.float32)
    text_feats = np.asarray(text_feats, dtype=np.float32)
    if image_feats.shape != text_feats.shape or image_feats.ndim != 2:
        raise ValueError(f"image features {image_feats.shape} and text features "
                         f"{text_feats.shape} must both be [n, D] with the same shape")
    out = np.empty_like(image_feats)
    batches = minibatches(image_feats.shape[0], batch_size, seed)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="feature optimisation (Eq. 2)", unit="batch")
    for idx in batches:
        out[idx] = optimize_minibatch(image_feats[idx], text_feats[idx], tau, lr, steps)
    return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# 3. Auxiliary feature, Eq. 5
# ---------------------------------------------------------------------------------------------
class AuxiliaryFusion(nn.Module):
    """u = MHAttn(s^v, O^t, O^t) (Eq. 5). A row with no valid tag attends to a learnable
    "no object" embedding alone; for rows with m >= 1 tags that embedding is masked out, so
    Eq. 5 holds exactly. Padded tags are zeroed and masked: they never affect u."""

    def __init__(self, dim: int, heads: int = 4):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.no_object = nn.Parameter(torch.randn(dim) * dim ** -0.5)

    def forward(self, query: torch.Tensor, tag_feats: torch.Tensor, tag_mask: torch.Tensor) -> torch.Tensor:
        """query [B, D], tag_feats [B, M, D] (M may be 0), tag_mask [B, M] bool True = valid -> u [B, D]."""
        B, M, D = tag_feats.shape
        tag_mask = tag_mask.bool()
        tags = tag_feats.masked_fill(~tag_mask[..., None], 0.0)
        has_tag = tag_mask.any(dim=1) if M > 0 else torch.zeros(B, dtype=torch.bool, device=query.device)
        kv = torch.cat([self.no_object.expand(B, 1, D).to(tags.dtype), tags], dim=1)   # [B, 1+M, D]
        ignore = torch.cat([has_tag[:, None], ~tag_mask], dim=1)                        # True = masked
        u, _ = self.attn(query[:, None], kv, kv, key_padding_mask=ignore, need_weights=False)
        return u[:, 0]


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
    def __init__(self, cfg: SynTICConfig):
        super().__init__()
        self.cfg = cfg
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
    def generate(self, batch: dict, beam_size: int = 1, max_len: int | None = None) -> list[list[int]]:
        prefix = self.prefix(batch)
        return decode(self.decoder, prefix, beam_size, max_len)


# ---------------------------------------------------------------------------------------------
# Training and captioning loops
# ---------------------------------------------------------------------------------------------
def train_syntic(model: SynTICCaptioner, make_batches: Callable[[int], Iterable[dict]],
                 epochs: int, lr: float, weight_decay: float = 0.01, warmup_steps: int = 0,
                 seed: int = 0, progress: bool = True, grad_clip: float | None = 1.0) -> list[float]:
    """Train on Eq. 6. make_batches(epoch) yields the batches of one epoch (the caller streams
    shards and reshuffles per epoch). AdamW with weight decay on the >= 2-D parameters (weights
    and embeddings, as nanoGPT), none on biases, LayerNorms and the no-object vector. Learning
    rate: linear warm-up from lr/warmup_steps to lr over `warmup_steps` optimizer steps, then
    constant (a constant rate needs no total step count, so the batches can be a stream).
    Gradient norm clipped at grad_clip (None = off). Returns the per-epoch mean loss (a mean over
    captions). The model is left in eval mode."""
    torch.manual_seed(seed)                         # dropout
    opt = training.adamw(model, lr, weight_decay)
    sched = training.warmup_then_constant(opt, warmup_steps)
    return training.fit(model, make_batches, epochs, opt, sched, grad_clip=grad_clip, desc="SynTIC", progress=progress)


# ---------------------------------------------------------------------------------------------
# Checkpoints: safetensors, config JSON in the header metadata (never pickles)
# ---------------------------------------------------------------------------------------------
CHECKPOINT_FORMAT = "synthcap.syntic.v1"


def save_checkpoint(model: SynTICCaptioner, config: SynTICConfig, path, clip_model: dict | None = None,
                    vocabulary: list[int] | None = None) -> None:
    """``vocabulary``: the BPE ids a corpus-vocabulary decoder predicts (None = all of CLIP's BPE)."""
    training.save_checkpoint(model, path, CHECKPOINT_FORMAT, asdict(config), clip_model=clip_model,
                             vocabulary=vocabulary)


def load_checkpoint(path, device: str = "cpu") -> SynTICCaptioner:
    meta = training.checkpoint_metadata(path, CHECKPOINT_FORMAT)
    model = training.load_weights(SynTICCaptioner(SynTICConfig(**meta["config"])), path, device)
    model.clip_model, model.vocabulary = meta.get("clip_model"), meta.get("vocabulary")
    return model


# ---------------------------------------------------------------------------------------------
# Pipeline entry points (stages/train.py, stages/caption.py): cached artifacts -> batches
# ---------------------------------------------------------------------------------------------
def variant(cfg: dict) -> str:
    """The ablation row of Table 4 this instance is: Baseline, or the switches it turns on."""
    on = [flag.upper() for flag in ("fo", "fp", "af") if cfg[flag]]
    tt = "-TT" if cfg.get("inference_support", "corpus") != "corpus" else ""
    return ("+".join(on) if on else "Baseline") + tt


def _inputs(p: dict, train: bool, evalset: str | None = None, support_name: str = "corpus") -> dict:
    """The artifacts SynTIC reads, checked to come from one CLIP model. Training projects onto the
    corpus's support set; inference onto ``support_name`` ("corpus", or a target-domain set: "-TT")."""
    from pipeline import paths
    from pipeline.data.aligned import read_single_table
    from pipeline.data.shards import ShardedArtifact, require_same_model
    from pipeline.support import SupportSet
    from pipeline.extract.tag import TagVocabulary

    if train:
        arts = {"corpus": ShardedArtifact(paths.CORPUS), "features": ShardedArtifact(paths.SYNTHETIC_FEATURES),
                "optimized": ShardedArtifact(paths.OPTIMIZED), "tags": ShardedArtifact(paths.SYNTHETIC_TAGS)}
        model = require_same_model(synthetic_features=arts["features"], optimized_features=arts["optimized"])
    else:
        arts = {"features": ShardedArtifact(paths.EVAL_FEATURES / evalset),
                "tags": ShardedArtifact(paths.EVAL_TAGS / evalset)}
        model = arts["features"].model
    support = paths.support_dir("corpus" if train else support_name)
    require_same_model(image_features=model, support_set=json.loads((support / "report.json").read_text())["model"])
    vocabulary = read_single_table(paths.TAG_VOCABULARY / "vocabulary.parquet", model, "tag_vocabulary")
    return {**arts, "model": model, "support": SupportSet.load(support), "vocabulary": TagVocabulary(vocabulary)}


def _columns(inputs: dict, train: bool, cfg: dict) -> list:
    from pipeline.data.aligned import Column
    cols = [Column(inputs["features"], "global"), Column(inputs["tags"], "labels")]
    if train:
        cols.append(Column(inputs["corpus"], "text"))
        if cfg["fo"]:
            cols.append(Column(inputs["optimized"], "global", "optimized"))
    return cols


def _shard_batches(shard: dict, cfg: dict, p: dict, inputs: dict, tokenizer, batch_size: int,
                   order: np.ndarray | None) -> Iterator[dict]:
    """One shard's rows as model batches: FO picks the feature, FP projects it (Eq. 3), AF adds tags."""
    s = shard["optimized"] if "optimized" in shard else shard["global"]          # s^v: Eq. 2 output or raw
    v = inputs["support"].project(s, p["support"]["tau"], p["support"]["top_k"]) if cfg["fp"] else s  # Eq. 3
    query = s if cfg["aux_query"] == "image" else v                               # Eq. 5 query
    order = np.arange(len(s)) if order is None else order
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        tag_feats, tag_mask = inputs["vocabulary"].batch([shard["labels"][i] for i in idx])   # Eq. 4
        batch = {"feature": torch.from_numpy(v[idx]), "aux_query": torch.from_numpy(query[idx]),
                 "tag_feats": torch.from_numpy(tag_feats), "tag_mask": torch.from_numpy(tag_mask)}
        if "text" in shard:
            batch["tokens"], batch["lengths"] = tokenizer.encode([shard["text"][i] for i in idx], cfg["decoder"]["max_len"])
        yield batch


def train(name: str, cfg: dict, p: dict, out_dir) -> dict:
    """Fit SynTIC on the synthetic pairs: shards in a fresh order each epoch, rows shuffled within."""
    from pathlib import Path
    from pipeline.data.aligned import aligned_shards, check_dim, shard_order

    inputs = _inputs(p, train=True)
    tokenizer = CaptionTokenizer.for_corpus(cfg.get("vocabulary", "full"), inputs["corpus"].read_column("text").to_pylist())
    dim = int(inputs["model"]["embed_dim"])
    check_dim(inputs["support"].features, dim, "support set features")
    config = SynTICConfig(feature_dim=dim, aux_heads=cfg["aux_heads"], use_aux=cfg["af"],
                          decoder=DecoderConfig(vocab_size=tokenizer.vocab_size, **cfg["decoder"]))
    torch.manual_seed(cfg["seed"])
    model = SynTICCaptioner(config)
    columns = _columns(inputs, True, cfg)
    num_shards = len(inputs["corpus"].paths)

    def make_batches(epoch: int) -> Iterator[dict]:
        order = shard_order(num_shards, epoch, cfg["seed"])
        for k, shard in zip(order, aligned_shards("caption_id", columns, order)):
            check_dim(shard["global"], dim, f"synthetic features of shard {k}")
            rows = np.random.default_rng([cfg["seed"], epoch, k]).permutation(len(shard["caption_id"]))
            yield from _shard_batches(shard, cfg, p, inputs, tokenizer, cfg["batch_size"], rows)

    history = train_syntic(model, make_batches, cfg["epochs"], cfg["lr"], cfg["weight_decay"],
                           cfg["warmup_steps"], cfg["seed"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, config, out_dir / "model.safetensors", clip_model=inputs["model"],
                    vocabulary=tokenizer.vocabulary)
    return {"method": "syntic", "variant": variant(cfg), "epoch_loss": history, "clip_model": inputs["model"],
            "training_pairs": inputs["corpus"].num_rows,
            "summary": f"{variant(cfg)}: loss {history[0]:.3f} -> {history[-1]:.3f} over {len(history)} epochs"}


def caption(name: str, cfg: dict, p: dict, model_dir) -> dict[str, dict[str, str]]:
    """Real eval image -> CLIP feature -> the same projection (Eq. 3) and tags (Eq. 4-5) -> decode."""
    from pathlib import Path
    from pipeline.data.aligned import aligned_shards, check_dim
    from pipeline.runtime import evalsets
    from pipeline.data.shards import require_same_model

    model = load_checkpoint(Path(model_dir) / "model.safetensors")
    tokenizer = CaptionTokenizer(model.vocabulary)
    out: dict[str, dict[str, str]] = {}
    for evalset in evalsets(p):
        inputs = _inputs(p, train=False, evalset=evalset, support_name=cfg.get("inference_support", "corpus"))
        if model.clip_model is not None:
            require_same_model(trained_on=model.clip_model, **{f"eval_features_{evalset}": inputs["model"]})
        captions: dict[str, str] = {}
        for shard in aligned_shards("image_id", _columns(inputs, False, cfg)):
            check_dim(shard["global"], model.cfg.feature_dim, f"eval image features of {evalset}")
            batches = _shard_batches(shard, cfg, p, inputs, tokenizer, cfg["batch_size"], None)
            texts = caption_batches(model, batches, cfg["beam_size"], cfg["decoder"]["max_len"], tokenizer)
            captions.update(zip(shard["image_id"], texts))
        out[evalset] = captions
    return out
