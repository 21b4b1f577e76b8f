"""PCM-Net: patch-wise cross-modal feature mix-up + CLIP-weighted cross-entropy (Luo et al., ECCV 2024).

Read top to bottom:
1. Salient concepts (Eq. 1): the K concepts whose "A photo of {c}" CLIP text feature is closest
   (cosine) to the image's global feature g_I. The vocabulary is built by stages/concepts.py
   (pipeline/concepts.py: frequent corpus nouns).
2. Patch-concept affinity (Eq. 2): a_jk = cos(v'_j, c_k). The cached patch tokens are already v'_j:
   CLIP's own ln_post + proj applied to the last layer's patch tokens (pipeline/models/clip.py).
3. Textual feature map (Eq. 3): v^t_j = sum_k softmax_k(a_jk / tau) c_k.
4. Mix-up: the M patches most related to the salient concepts are replaced by their v^t_j during
   training; at inference those M v^t_j are appended to the real patch map.
5. Captioner (Eq. 4-8): [g_I; mixed patch map] -> fully connected to the hidden size -> N_e
   post-LN Transformer encoder blocks; inter-layer global feature g~ = W_g [g^(0); ..; g^(N_e)]
   (Eq. 6) replaces the global token in the encoder output (Eq. 7); N_d post-LN decoder blocks
   with masked self-attention and cross-attention to it (Eq. 8); CLIP BPE vocabulary.
6. CLIP-weighted cross-entropy (Eq. 11): per-pair weight c_I = min(1, w * cos(g_I, g_S)).
7. Noam learning-rate schedule, Adam; beam search at inference.

Choices where the paper is silent (each one a single place in the code):
- tau (Eq. 3) is not given: default 0.01, CLIP's own logit scale (1/100), the temperature at which
  CLIP cosines (a narrow band around 0.2-0.3) give a peaked rather than uniform softmax.
- "Most related" patches: patch j scores max_k a_jk (its affinity to its best-matching salient
  concept); the top-M scores are mixed. Salient concepts and affinities use the clean features.
- The paper's visual patches live in CLIP's width (1,024 for ViT-L/14) and its textual patches in
  the joint space (768), each mapped to 512 "through a fully connected layer". Only projected
  patches are cached here, so both are D-dimensional, but each stream keeps its own FC (global,
  visual patch, textual patch), and the embeddings are layer-normalised (BERT-style) because raw
  projected patches and unit-norm text features differ in scale.
- Token types: 0 global, 1 visual patch, 2 textual patch. Positions: 0 for the global token, j for
  patch j; a textual patch keeps the position of the patch it stands for, at training (where it
  replaces patch j) and at inference (where it is appended), so both see the same encoding.
- Gaussian noise (sigma^2 = 0.016, CapDec) goes on the captioner's global input only, at training.
- Eq. 11 cites CLIPScore [11], which clips negative cosines at 0: c_I = min(1, w * max(cos, 0)).
  The batch loss is sum_b c_b * sum_t NLL_bt / (number of target tokens in the batch): with
  c = 1 (cxe: false) this is the usual token-averaged cross-entropy. The introduction's mention of
  a per-word re-weighting by the predicted distribution has no equation; Eq. 11 is implemented.
- Encoder/decoder blocks are torch's post-LN TransformerEncoderLayer / TransformerDecoderLayer,
  which compute Eq. 5 and Eq. 8 exactly (ReLU as delta, as in the vanilla Transformer [39]); the
  output layer is tied to the word embedding.

Parameters (``methods.NAME`` in params.yaml), with the paper's values:

```yaml
method: pcmnet
mixup: true            # Table 3 "Mix-up": patch-wise cross-modal feature mix-up (false: Base)
cxe: true              # Table 3 "CXE": CLIP-weighted cross-entropy (false: plain cross-entropy)
salient_k: 5           # K, salient concepts per image (Eq. 1; Fig. 4a)
mix_m: 5               # M, patches replaced (training) / appended (inference) (Fig. 4b)
tau: 0.01              # Eq. 3 temperature (not given in the paper; CLIP's 1/100)
clip_w: 4.0            # w in Eq. 11 (Fig. 4c)
noise_variance: 0.016  # Gaussian noise on the global feature at training (CapDec)
hidden: 512            # hidden size of every Transformer block
heads: 8               # attention heads (not given; 8 as in the base Transformer)
ffn_dim: 2048          # feed-forward width (not given; 4 x hidden as in the base Transformer)
encoder_layers: 3      # N_e
decoder_layers: 3      # N_d
dropout: 0.1           # not given
max_len: 24            # caption tokens incl. start/end (CLIP BPE)
epochs: 12
batch_size: 32
warmup_steps: 10000    # Noam schedule [39]
lr_factor: 1.0         # Noam: lr = lr_factor * hidden^-0.5 * min(step^-0.5, step * warmup^-1.5)
seed: 0
beam_size: 3
```
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.nn import training
from pipeline.nn.prefix_decoder import CaptionTokenizer, caption_batches, decode

GLOBAL, VISUAL, TEXTUAL = 0, 1, 2          # token types


# ---------------------------------------------------------------------------------------------
# 1-4. Patch-wise cross-modal feature mix-up (parameter-free: computed from cached features)
# ---------------------------------------------------------------------------------------------
def salient_concepts(global_feats: torch.Tensor, concept_feats: torch.Tensor, k: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1: the top-K concepts by cos(c_j, g_I). global_feats [B, D], concept_feats [Nc, D] ->
    indices [B, K] (most similar first) and their (unit-norm) features C_s [B, K, D]."""
    c = F.normalize(concept_feats, dim=-1)
    sims = F.normalize(global_feats, dim=-1) @ c.T                                      # [B, Nc]
    idx = sims.topk(min(k, c.shape[0]), dim=-1).indices
    return idx, c[idx]


def patch_affinity(patches: torch.Tensor, salient: torch.Tensor) -> torch.Tensor:
    """Eq. 2: a_jk = cos(v'_j, c_k). patches [B, Np, D] (the v'_j), salient [B, K, D] -> [B, Np, K]."""
    return F.normalize(patches, dim=-1) @ F.normalize(salient, dim=-1).transpose(1, 2)


def textual_feature_map(affinity: torch.Tensor, salient: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 3: v^t_j = sum_k softmax_k(a_jk / tau) c_k. affinity [B, Np, K], salient [B, K, D] -> [B, Np, D]."""
    return torch.softmax(affinity / tau, dim=-1) @ F.normalize(salient, dim=-1)


def related_patches(affinity: torch.Tensor, m: int) -> torch.Tensor:
    """The M patches most related to the salient concepts: top-M of max_k a_jk -> indices [B, M]."""
    return affinity.max(dim=-1).values.topk(min(m, affinity.shape[1]), dim=-1).indices


def mix_up_train(visual: torch.Tensor, textual: torch.Tensor, idx: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training: V_IT = V_I with patches idx [B, M] replaced by their v^t_j.
    -> tokens [B, Np, D], token types [B, Np], positions [B, Np] (1..Np)."""
    B, Np, _ = visual.shape
    replace = torch.zeros(B, Np, dtype=torch.bool, device=visual.device)
    replace[torch.arange(B, device=visual.device)[:, None], idx] = True
    tokens = torch.where(replace[..., None], textual.to(visual.dtype), visual)
    types = torch.where(replace, TEXTUAL, VISUAL)
    positions = torch.arange(1, Np + 1, device=visual.device).expand(B, Np)
    return tokens, types, positions


def mix_up_inference(visual: torch.Tensor, textual: torch.Tensor, idx: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inference: V_IT = [V_I; v^t_j for j in idx]. -> tokens [B, Np+M, D], types, positions
    (an appended v^t_j takes the position j of the patch it stands for)."""
    B, Np, _ = visual.shape
    rows = torch.arange(B, device=visual.device)[:, None]
    tokens = torch.cat([visual, textual[rows, idx].to(visual.dtype)], dim=1)
    types = torch.cat([torch.full((B, Np), VISUAL, device=visual.device),
                       torch.full(idx.shape, TEXTUAL, device=visual.device)], dim=1)
    positions = torch.cat([torch.arange(1, Np + 1, device=visual.device).expand(B, Np), idx + 1], dim=1)
    return tokens, types, positions


def pcm(global_feats: torch.Tensor, patches: torch.Tensor, concept_feats: torch.Tensor, k: int, m: int,
        tau: float, training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 1-3 and the mix-up for one batch: global [B, D], patches [B, Np, D] -> (tokens, types, positions)."""
    _, salient = salient_concepts(global_feats, concept_feats, k)                      # Eq. 1
    affinity = patch_affinity(patches, salient)                                         # Eq. 2
    textual = textual_feature_map(affinity, salient, tau)                               # Eq. 3
    idx = related_patches(affinity, m)
    return (mix_up_train if training else mix_up_inference)(patches, textual, idx)


def no_mix(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Base model (mixup off): the visual patch map as it is."""
    B, Np, _ = patches.shape
    return (patches, torch.full((B, Np), VISUAL, device=patches.device),
            torch.arange(1, Np + 1, device=patches.device).expand(B, Np))


# ---------------------------------------------------------------------------------------------
# 6. CLIP-weighted cross-entropy, Eq. 11
# ---------------------------------------------------------------------------------------------
def clip_weights(image_feats: torch.Tensor, text_feats: torch.Tensor, w: float) -> torch.Tensor:
    """Eq. 11: c_I = CLIPScore(I, S) = min(1, w * max(cos(g_I, g_S), 0)) -> [B]."""
    cos = (F.normalize(image_feats, dim=-1) * F.normalize(text_feats, dim=-1)).sum(-1)
    return torch.clamp(w * cos.clamp_min(0.0), max=1.0)


def weighted_caption_loss(logits: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                          weights: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 9-11 over a batch: sum_b c_b * sum_t -log p(w_t | w_<t, I) / (target tokens in the batch).
    Targets are tokens[:, 1:] up to and including <end_of_text> (prefix_decoder's convention:
    logits[:, i] predicts tokens[:, i+1]); weights None means c_b = 1 (plain cross-entropy)."""
    logits = logits[:, :-1]
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)                             # [B, T-1]
    pos = torch.arange(1, tokens.shape[1], device=tokens.device)
    mask = (pos[None, :] < lengths[:, None]).to(nll.dtype)
    per_caption = (nll * mask).sum(1)                                                   # -log p(S|I)
    if weights is not None:
        per_caption = per_caption * weights.to(per_caption.dtype)
    return per_caption.sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------
# 5. The captioner, Eq. 4-8
# ---------------------------------------------------------------------------------------------
@dataclass
class PCMNetConfig:
    feature_dim: int = 512          # CLIP joint dim D (global, patches, concept features)
    num_patches: int = 49           # N_p of the cached patch map
    vocab_size: int = 49408         # CLIP BPE
    hidden: int = 512
    heads: int = 8
    ffn_dim: int = 2048
    encoder_layers: int = 3         # N_e
    decoder_layers: int = 3         # N_d
    dropout: float = 0.1
    max_len: int = 24               # caption tokens incl. <start_of_text> and <end_of_text>
    num_concepts: int = 0           # N_c, rows of the concept buffer
    mixup: bool = True
    salient_k: int = 5              # K
    mix_m: int = 5                  # M
    tau: float = 0.01
    noise_variance: float = 0.016


class VisualSemanticEncoder(nn.Module):
    """Embedding of [g_I; V_IT] (FC per stream + position + token type, Sec. 3.3), N_e post-LN
    blocks (Eq. 4-5), inter-layer global feature (Eq. 6) and the encoded map (Eq. 7)."""

    def __init__(self, cfg: PCMNetConfig):
        super().__init__()
        H = cfg.hidden
        self.global_fc = nn.Linear(cfg.feature_dim, H)
        self.visual_fc = nn.Linear(cfg.feature_dim, H)
        self.textual_fc = nn.Linear(cfg.feature_dim, H)
        self.pos_emb = nn.Embedding(cfg.num_patches + 1, H)          # 0: global, j: patch j
        self.type_emb = nn.Embedding(3, H)                            # GLOBAL, VISUAL, TEXTUAL
        self.emb_ln = nn.LayerNorm(H)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList([
            nn.TransformerEncoderLayer(H, cfg.heads, cfg.ffn_dim, cfg.dropout, activation="relu",
                                       batch_first=True, norm_first=False)
            for _ in range(cfg.encoder_layers)])
        self.w_g = nn.Linear((cfg.encoder_layers + 1) * H, H, bias=False)   # W_g of Eq. 6

    def embed(self, global_feats, tokens, types, positions) -> torch.Tensor:
        """V^(0) = {g^(0), v^(0)_1..}: [B, 1+N, H]."""
        B = tokens.shape[0]
        g = self.global_fc(global_feats)[:, None]
        v = torch.where((types == TEXTUAL)[..., None], self.textual_fc(tokens), self.visual_fc(tokens))
        x = torch.cat([g, v], dim=1)
        all_types = torch.cat([torch.full((B, 1), GLOBAL, device=types.device), types], dim=1)
        all_pos = torch.cat([torch.zeros(B, 1, dtype=positions.dtype, device=positions.device), positions], dim=1)
        return self.drop(self.emb_ln(x + self.pos_emb(all_pos) + self.type_emb(all_types)))

    def forward(self, global_feats, tokens, types, positions) -> torch.Tensor:
        """-> V~ = [g~; v^(N_e)_1..] [B, 1+N, H] (Eq. 7)."""
        x = self.embed(global_feats, tokens, types, positions)
        globals_ = [x[:, 0]]                                                            # g^(0)
        for layer in self.layers:
            x = layer(x)                                                                # Eq. 5
            globals_.append(x[:, 0])                                                    # g^(i)
        g_tilde = self.w_g(torch.cat(globals_, dim=-1))                                # Eq. 6
        return torch.cat([g_tilde[:, None], x[:, 1:]], dim=1)                           # Eq. 7


class SentenceDecoder(nn.Module):
    """N_d post-LN blocks: masked self-attention, cross-attention to V~, feed-forward (Eq. 8).
    forward(memory, tokens) follows prefix_decoder's conventions (logits[:, i] predicts
    tokens[:, i+1]), so its greedy_decode / beam_decode run on it unchanged."""

    def __init__(self, cfg: PCMNetConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden
        self.tok_emb = nn.Embedding(cfg.vocab_size, H)
        self.pos_emb = nn.Embedding(cfg.max_len, H)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList([
            nn.TransformerDecoderLayer(H, cfg.heads, cfg.ffn_dim, cfg.dropout, activation="relu",
                                       batch_first=True, norm_first=False)
            for _ in range(cfg.decoder_layers)])
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def forward(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """memory [B, S, H], tokens [B, T] -> logits [B, T, vocab] (output layer tied to tok_emb)."""
        T = tokens.shape[1]
        if T > self.cfg.max_len:
            raise ValueError(f"{T} tokens > config max_len {self.cfg.max_len}")
        h = self.drop(self.tok_emb(tokens) + self.pos_emb(torch.arange(T, device=tokens.device)))
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=tokens.device, dtype=h.dtype)
        for layer in self.layers:
            h = layer(h, memory, tgt_mask=causal, tgt_is_causal=True)
        return F.linear(h, self.tok_emb.weight)


class PCMNet(nn.Module):
    """The concept features (Eq. 1's c_j) are a buffer, so a checkpoint captions on its own."""

    def __init__(self, cfg: PCMNetConfig, concept_feats: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        feats = torch.zeros(cfg.num_concepts, cfg.feature_dim) if concept_feats is None else concept_feats
        if tuple(feats.shape) != (cfg.num_concepts, cfg.feature_dim):
            raise ValueError(f"concept features {tuple(feats.shape)} != ({cfg.num_concepts}, {cfg.feature_dim})")
        if cfg.mixup and cfg.num_concepts == 0:
            raise ValueError("mix-up needs a non-empty concept vocabulary")
        self.register_buffer("concepts", feats.float().clone())
        self.encoder = VisualSemanticEncoder(cfg)
        self.decoder = SentenceDecoder(cfg)

    def encoder_inputs(self, batch: dict) -> tuple[torch.Tensor, ...]:
        """PCM on the batch (Eq. 1-3 + mix-up, from the clean features) and the global input,
        with Gaussian noise at training."""
        g, patches = batch["global"], batch["patches"]
        if self.cfg.mixup:
            tokens, types, positions = pcm(g, patches, self.concepts, self.cfg.salient_k, self.cfg.mix_m,
                                           self.cfg.tau, self.training)
        else:
            tokens, types, positions = no_mix(patches)
        if self.training and self.cfg.noise_variance > 0:
            g = g + torch.randn_like(g) * math.sqrt(self.cfg.noise_variance)
        return g, tokens, types, positions

    def encode(self, batch: dict) -> torch.Tensor:
        return self.encoder(*self.encoder_inputs(batch))

    def forward(self, batch: dict) -> torch.Tensor:
        return self.decoder(self.encode(batch), batch["tokens"])

    def loss(self, batch: dict, clip_w: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eq. 11 (clip_w given) or plain cross-entropy (None) -> (loss, the weights c_I or None)."""
        weights = clip_weights(batch["global"], batch["text_feature"], clip_w) if clip_w is not None else None
        return weighted_caption_loss(self(batch), batch["tokens"], batch["lengths"], weights), weights

    @torch.no_grad()
    def generate(self, batch: dict, beam_size: int = 3, max_len: int | None = None) -> list[list[int]]:
        memory = self.encode(batch)
        return decode(self.decoder, memory, beam_size, max_len)


# ---------------------------------------------------------------------------------------------
# 7. Noam schedule and the training loop
# ---------------------------------------------------------------------------------------------
def noam_lr(step: int, hidden: int, warmup_steps: int, factor: float = 1.0) -> float:
    """Vaswani et al. [39]: factor * hidden^-0.5 * min(step^-0.5, step * warmup^-1.5), step >= 1."""
    step = max(int(step), 1)
    return factor * hidden ** -0.5 * min(step ** -0.5, step * max(warmup_steps, 1) ** -1.5)


def noam_scheduler(optimizer: torch.optim.Optimizer, hidden: int, warmup_steps: int, factor: float = 1.0):
    """The optimizer's lr after i scheduler steps is noam_lr(i + 1) (its base lr must be 1.0)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: noam_lr(i + 1, hidden, warmup_steps, factor))


def train_pcmnet(model: PCMNet, make_batches: Callable[[int], Iterable[dict]], epochs: int,
                 warmup_steps: int, lr_factor: float = 1.0, clip_w: float | None = 4.0, seed: int = 0,
                 progress: bool = True, max_steps: int | None = None) -> dict:
    """Adam (betas 0.9/0.98, eps 1e-9, as with the Noam schedule in [39]) on Eq. 11 (clip_w) or
    plain cross-entropy (clip_w None). make_batches(epoch) yields one epoch's batches. Returns
    {"epoch_loss": per-epoch mean of the batch losses weighted by batch size,
     "mean_clip_weight": mean c_I over training (None without CXE), "steps": optimizer steps}.
    max_steps stops early (tests). The model is left in eval mode."""
    torch.manual_seed(seed)                                  # dropout and the Gaussian noise
    opt = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9)
    sched = noam_scheduler(opt, model.cfg.hidden, warmup_steps, lr_factor)
    weights: list[float] = []

    def loss_fn(batch: dict) -> torch.Tensor:
        loss, c = model.loss(batch, clip_w)                                            # Eq. 11
        if c is not None:
            weights.extend(c.detach().tolist())
        return loss

    history = training.fit(model, make_batches, epochs, opt, sched, loss_fn=loss_fn, grad_clip=None,
                           desc="PCM-Net", progress=progress, max_steps=max_steps)
    return {"epoch_loss": history, "mean_clip_weight": float(np.mean(weights)) if weights else None,
            "steps": sched.last_epoch}


# ---------------------------------------------------------------------------------------------
# Checkpoints: safetensors, config JSON in the header metadata (never pickles)
# ---------------------------------------------------------------------------------------------
CHECKPOINT_FORMAT = "synthcap.pcmnet.v1"


def save_checkpoint(model: PCMNet, path, clip_model: dict | None = None,
                    concept_words: list[str] | None = None, vocabulary: list[int] | None = None) -> None:
    """``vocabulary``: the BPE ids a corpus-vocabulary decoder predicts (None = all of CLIP's BPE)."""
    training.save_checkpoint(model, path, CHECKPOINT_FORMAT, asdict(model.cfg), clip_model=clip_model,
                             concepts=concept_words or [], vocabulary=vocabulary)


def checkpoint_meta(path) -> dict:
    """The checkpoint's metadata: config, clip_model (the features it was trained on), concepts."""
    meta = training.checkpoint_metadata(path, CHECKPOINT_FORMAT)
    return {**meta, "config": PCMNetConfig(**meta["config"])}


def load_checkpoint(path, device: str = "cpu") -> PCMNet:
    return training.load_weights(PCMNet(checkpoint_meta(path)["config"]), path, device)


# ---------------------------------------------------------------------------------------------
# Pipeline entry points (stages/train.py, stages/caption.py): cached artifacts -> batches
# ---------------------------------------------------------------------------------------------
def variant(cfg: dict) -> str:
    """The Table 3 row this instance is: Base, Base+Mix-up, Base+CXE or Base+Mix-up+CXE (PCM-Net)."""
    return "+".join(["Base"] + [label for flag, label in (("mixup", "Mix-up"), ("cxe", "CXE")) if cfg[flag]])


def patch_shape(artifact, dim: int, what: str) -> int:
    """N_p from an image-feature artifact's manifest, checked against the CLIP dim."""
    meta = artifact.meta
    if not meta.get("num_patches"):
        raise ValueError(f"{what} ({artifact.folder}) records no patch grid: PCM-Net needs a ViT CLIP "
                         f"whose patch tokens were cached (rerun the encode stage)")
    if int(meta.get("dim", dim)) != dim:
        raise ValueError(f"{what} have {meta['dim']}-dimensional patches but the CLIP dim is {dim}")
    return int(meta["num_patches"])


def read_concepts(path, clip_model: dict) -> tuple[list[str], np.ndarray]:
    """The concept vocabulary (stages/concepts.py), refusing one encoded by another CLIP model."""
    from pipeline.data.aligned import check_dim, read_single_table
    from pipeline.data.shards import feature_numpy
    table = read_single_table(path, clip_model, "concepts")
    feats = feature_numpy(table.column("text_feature"))
    check_dim(feats, int(clip_model["embed_dim"]), "concept text features")
    return table.column("concept").to_pylist(), feats


def make_batch(shard: dict, idx: np.ndarray, num_patches: int, dim: int, tokenizer=None,
               max_len: int | None = None) -> dict:
    """Rows idx of one aligned shard -> a model batch (tokens only when the shard has texts)."""
    batch = {"global": torch.from_numpy(shard["global"][idx]),
             "patches": torch.from_numpy(shard["patches"][idx].reshape(len(idx), num_patches, dim))}
    if "text_feature" in shard:
        batch["text_feature"] = torch.from_numpy(shard["text_feature"][idx])
    if "text" in shard:
        batch["tokens"], batch["lengths"] = tokenizer.encode([shard["text"][i] for i in idx], max_len)
    return batch


def train(name: str, cfg: dict, p: dict, out_dir) -> dict:
    """Fit PCM-Net on the synthetic pairs: shards in a fresh order each epoch, rows shuffled within."""
    from pathlib import Path
    from pipeline import paths
    from pipeline.data.aligned import Column, aligned_shards, check_dim, shard_order
    from pipeline.data.shards import ShardedArtifact, require_same_model

    corpus = ShardedArtifact(paths.CORPUS)
    texts = ShardedArtifact(paths.TEXT_FEATURES)
    images = ShardedArtifact(paths.SYNTHETIC_FEATURES)
    clip = require_same_model(synthetic_features=images, text_features=texts)
    dim = int(clip["embed_dim"])
    num_patches = patch_shape(images, dim, "synthetic image features")
    words, concept_feats = read_concepts(paths.CONCEPTS / "concepts.parquet", clip)
    tokenizer = CaptionTokenizer.for_corpus(cfg.get("vocabulary", "full"), corpus.read_column("text").to_pylist())
    config = PCMNetConfig(
        feature_dim=dim, num_patches=num_patches, vocab_size=tokenizer.vocab_size, hidden=cfg["hidden"],
        heads=cfg["heads"], ffn_dim=cfg["ffn_dim"], encoder_layers=cfg["encoder_layers"],
        decoder_layers=cfg["decoder_layers"], dropout=cfg["dropout"], max_len=cfg["max_len"],
        num_concepts=len(words), mixup=cfg["mixup"], salient_k=cfg["salient_k"], mix_m=cfg["mix_m"],
        tau=cfg["tau"], noise_variance=cfg["noise_variance"])
    torch.manual_seed(cfg["seed"])
    model = PCMNet(config, torch.from_numpy(concept_feats))
    columns = [Column(corpus, "text"), Column(texts, "text_feature"), Column(images, "global"),
               Column(images, "patches")]
    num_shards = len(corpus.paths)

    def make_batches(epoch: int) -> Iterator[dict]:
        order = shard_order(num_shards, epoch, cfg["seed"])
        for k, shard in zip(order, aligned_shards("caption_id", columns, order)):
            check_dim(shard["global"], dim, f"synthetic image features of shard {k}")
            check_dim(shard["text_feature"], dim, f"text features of shard {k}")
            check_dim(shard["patches"], num_patches * dim, f"synthetic patch features of shard {k}")
            rows = np.random.default_rng([cfg["seed"], epoch, k]).permutation(len(shard["caption_id"]))
            for start in range(0, len(rows), cfg["batch_size"]):
                yield make_batch(shard, rows[start:start + cfg["batch_size"]], num_patches, dim,
                                 tokenizer, cfg["max_len"])

    result = train_pcmnet(model, make_batches, cfg["epochs"], cfg["warmup_steps"], cfg["lr_factor"],
                          cfg["clip_w"] if cfg["cxe"] else None, cfg["seed"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, out_dir / "model.safetensors", clip, words, tokenizer.vocabulary)
    history = result["epoch_loss"]
    return {"method": "pcmnet", "variant": variant(cfg), **result, "clip_model": clip,
            "training_pairs": corpus.num_rows, "num_concepts": len(words), "num_patches": num_patches,
            "summary": f"{variant(cfg)}: loss {history[0]:.3f} -> {history[-1]:.3f} over {len(history)} "
                       f"epochs ({result['steps']} steps, {len(words)} concepts)"}


def caption(name: str, cfg: dict, p: dict, model_dir) -> dict[str, dict[str, str]]:
    """Real eval image -> global feature + patch map -> PCM at inference (v^t appended) -> beam search."""
    from pathlib import Path
    from pipeline import paths
    from pipeline.data.aligned import Column, aligned_shards, check_dim
    from pipeline.runtime import evalsets
    from pipeline.data.shards import ShardedArtifact, require_same_model

    path = Path(model_dir) / "model.safetensors"
    meta = checkpoint_meta(path)
    trained_on = meta["clip_model"]
    model = load_checkpoint(path)
    dim, num_patches = model.cfg.feature_dim, model.cfg.num_patches
    tokenizer = CaptionTokenizer(meta.get("vocabulary"))
    out: dict[str, dict[str, str]] = {}
    for evalset in evalsets(p):
        features = ShardedArtifact(paths.EVAL_FEATURES / evalset)
        require_same_model(trained_on=trained_on, **{f"eval_features_{evalset}": features})
        if patch_shape(features, dim, f"eval image features of {evalset}") != num_patches:
            raise ValueError(f"eval set {evalset} has {features.meta['num_patches']} patches per image, "
                             f"the model was trained on {num_patches}")
        captions: dict[str, str] = {}
        for shard in aligned_shards("image_id", [Column(features, "global"), Column(features, "patches")]):
            check_dim(shard["global"], dim, f"eval image features of {evalset}")
            check_dim(shard["patches"], num_patches * dim, f"eval patch features of {evalset}")
            rows = np.arange(len(shard["image_id"]))
            batches = (make_batch(shard, rows[s:s + cfg["batch_size"]], num_patches, dim)
                       for s in range(0, len(rows), cfg["batch_size"]))
            texts = caption_batches(model, batches, cfg["beam_size"], model.cfg.max_len, tokenizer)
            captions.update(zip(shard["image_id"], texts))
        out[evalset] = captions
    return out
