"""PCM-Net: patch-wise cross-modal feature mix-up + CLIP-weighted cross-entropy (Luo et al., ECCV 2024).

Read top to bottom:
1. Salient concepts (Eq. 1): the K concepts whose "A photo of {c}" CLIP text feature is closest
   (cosine) to the image's global feature g_I. The vocabulary is built by the `concepts` stage
   (pipeline/extract/concepts.py: frequent corpus nouns).
2. Patch-concept affinity (Eq. 2): a_jk = cos(v'_j, c_k). The cached patch tokens are already v'_j:
   CLIP's own ln_post + proj applied to the last layer's patch tokens (pipeline/models/clip.py). Only
   here are the projected patches used: the encoder's visual stream reads the raw grid (step 5).
3. Textual feature map (Eq. 3): v^t_j = sum_k softmax_k(a_jk / tau) c_k.
4. Mix-up: the M patches most related to the salient concepts are replaced by their v^t_j during
   training; at inference those v^t_j are appended to the real patch map, each patch once (so rows
   append different numbers: the appended part is padded, and the padding masked out of the
   encoder's self-attention and the decoder's cross-attention).
5. Captioner (Eq. 4-8): [g_I; mixed patch map] -> fully connected to the hidden size (a visual patch
   from its raw grid cell, the last layer's token before ln_post / proj, W wide: "a grid feature map"
   through "a fully connected layer", released Linear(768, 512) for ViT-B/32; ``encoder_input``) -> N_e
   post-LN Transformer encoder blocks; inter-layer global feature g~ = W_g [g^(0); ..; g^(N_e)]
   (Eq. 6) replaces the global token in the encoder output (Eq. 7); N_d post-LN decoder blocks
   with masked self-attention and cross-attention to it (Eq. 8); a word vocabulary (released) or
   CLIP BPE.
6. CLIP-weighted cross-entropy (Eq. 11): per-pair weight c_I = min(1, w * cos(g_I, g_S)); the
   released loss adds label smoothing and a batch-mean (1 - p_target)^gamma factor.
7. Noam learning-rate schedule (pipeline/nn/schedules.py), Adam; beam search at inference.

Choices where the paper is silent (each one a single place in the code):
- tau (Eq. 3) is not given: default 0.01, CLIP's own logit scale (1/100), the temperature at which
  CLIP cosines (a narrow band around 0.2-0.3) give a peaked rather than uniform softmax.
- "Most related" patches (``mix_select``): the released code mixes the patches of the top-M
  (patch, concept) entries of the affinity matrix (``pairs``, the default); ``patches`` scores
  patch j by max_k a_jk and mixes the top-M. Salient concepts and affinities use the clean features.
- The paper's visual patches live in CLIP's width (1,024 for ViT-L/14) and its textual patches in
  the joint space (768), each mapped to 512 "through a fully connected layer": each stream keeps its
  own FC (global, visual patch from the raw grid, textual patch), and the embeddings are
  layer-normalised (BERT-style). ``encoder_input: patches`` feeds the projected patches instead.
- Token types: 0 global, 1 visual patch, 2 textual patch. Positions: 0 for the global token, j for
  patch j; a textual patch keeps the position of the patch it stands for, at training (where it
  replaces patch j) and at inference (where it is appended), so both see the same encoding.
- Gaussian noise (sigma^2 = 0.016, CapDec) goes on the captioner's global input only, at training:
  normalise, add noise, normalise again (the released ``noise_injection``), so training sees unit
  features as inference does.
- Eq. 11 cites CLIPScore [11], which clips negative cosines at 0: c_I = min(1, w * max(cos, 0)).
  The batch loss is the mean over the batch's target tokens of c_b * l_bt: with c = 1 (cxe: false)
  the usual token-averaged cross-entropy. The introduction's "re-weighting each word by the
  predicted distribution" has no equation; the released loss (``weighted_caption_loss``) is label
  smoothing 0.1 and the loss times the batch mean of (1 - p_target)^2: both are switches.
- The released recipe (dropouts 0.5 / 0.2 / 0.3 / 0.5 and 0.1 on the word embeddings, ReLU on the
  summed visual-semantic embeddings before their LayerNorm, W_g with bias + LayerNorm, Adam betas
  (0.9, 0.999), gradient value clipping 0.1, 10,200 words, beams ranked by summed log-prob) is the
  default of ``Train`` / ``Caption``; each is a switch.
- Encoder/decoder blocks are torch's post-LN TransformerEncoderLayer / TransformerDecoderLayer,
  which compute Eq. 5 and Eq. 8 exactly (ReLU as delta, as in the vanilla Transformer [39]). The
  decoder's input and output are the released ones (jianjieluo/PCM-Net on xmodaler): word embedding +
  sinusoidal position [39], LayerNorm, dropout; an output Linear with bias, not tied to the words.

Settings: ``Train`` and ``Caption`` below (params.yaml ``methods.NAME.train`` / ``.caption``), each
documented with the paper's value where it gives one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import at_least, divides, dropout_rate, non_negative, opt, positive
from pipeline.methods import Data, Needs, Pairs, Step, pairs_mark, pairs_option
from pipeline.nn import decoding
from pipeline.nn.schedules import Optim
from pipeline.nn.tokenizer import CaptionTokenizer, WordTokenizer, to_longest

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


def related_patches(affinity: torch.Tensor, m: int, select: str = "patches") -> torch.Tensor:
    """The M patches most related to the salient concepts -> indices [B, M].
    "patches" (the paper's reading): top-M of max_k a_jk. "pairs" (the released code): the top-M
    (patch, concept) entries of the affinity matrix; a patch in several of them counts once, so fewer
    than M distinct patches may result (repeated indices mark the same patch)."""
    if select == "patches":
        return affinity.max(dim=-1).values.topk(min(m, affinity.shape[1]), dim=-1).indices
    B, Np, K = affinity.shape
    flat = affinity.reshape(B, Np * K).topk(min(m, Np * K), dim=-1).indices
    return torch.div(flat, K, rounding_mode="floor")


def mix_up_train(visual: torch.Tensor, textual: torch.Tensor, idx: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training: V_IT = V_I with patches idx [B, M] replaced by their v^t_j.
    -> tokens [B, Np, D], token types [B, Np], positions [B, Np] (1..Np), padding [B, Np] (none)."""
    B, Np, _ = visual.shape
    replace = torch.zeros(B, Np, dtype=torch.bool, device=visual.device)
    replace[torch.arange(B, device=visual.device)[:, None], idx] = True
    tokens = torch.where(replace[..., None], textual.to(visual.dtype), visual)
    types = torch.where(replace, TEXTUAL, VISUAL)
    positions = torch.arange(1, Np + 1, device=visual.device).expand(B, Np)
    return tokens, types, positions, torch.zeros(B, Np, dtype=torch.bool, device=visual.device)


def mix_up_inference(visual: torch.Tensor, textual: torch.Tensor, idx: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inference: V_IT = [V_I; v^t_j for each distinct j in idx], each selected patch appended once
    (in patch order, as released: a patch named by several pairs is not weighted twice), at the
    position j of the patch it stands for. Rows select different numbers of patches, so the appended
    part is padded to the batch's largest and ``padding`` marks the slots that hold nothing.
    -> tokens [B, Np+A, D], types, positions, padding [B, Np+A] (True: padding; A <= M)."""
    B, Np, _ = visual.shape
    rows = torch.arange(B, device=visual.device)[:, None]
    selected = torch.zeros(B, Np, dtype=torch.bool, device=visual.device)
    selected[rows, idx] = True
    count = selected.sum(dim=1)
    width = int(count.max()) if B else 0
    order = torch.sort((~selected).to(torch.int8), dim=1, stable=True).indices[:, :width]   # selected first
    padded = torch.arange(width, device=visual.device)[None, :] >= count[:, None]
    appended = textual[rows, order].to(visual.dtype).masked_fill(padded[..., None], 0.0)
    tokens = torch.cat([visual, appended], dim=1)
    types = torch.cat([torch.full((B, Np), VISUAL, device=visual.device),
                       torch.full((B, width), TEXTUAL, device=visual.device)], dim=1)
    positions = torch.cat([torch.arange(1, Np + 1, device=visual.device).expand(B, Np), order + 1], dim=1)
    padding = torch.cat([torch.zeros(B, Np, dtype=torch.bool, device=visual.device), padded], dim=1)
    return tokens, types, positions, padding


def pcm(global_feats: torch.Tensor, patches: torch.Tensor, concept_feats: torch.Tensor, k: int, m: int,
        tau: float, training: bool, select: str = "patches"
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 1-3 and the mix-up for one batch: global [B, D], patches [B, Np, D] -> (tokens, types,
    positions, padding)."""
    _, salient = salient_concepts(global_feats, concept_feats, k)                      # Eq. 1
    affinity = patch_affinity(patches, salient)                                         # Eq. 2
    textual = textual_feature_map(affinity, salient, tau)                               # Eq. 3
    idx = related_patches(affinity, m, select)
    return (mix_up_train if training else mix_up_inference)(patches, textual, idx)


def no_mix(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Base model (mixup off): the visual patch map as it is."""
    B, Np, _ = patches.shape
    return (patches, torch.full((B, Np), VISUAL, device=patches.device),
            torch.arange(1, Np + 1, device=patches.device).expand(B, Np),
            torch.zeros(B, Np, dtype=torch.bool, device=patches.device))


# ---------------------------------------------------------------------------------------------
# 6. CLIP-weighted cross-entropy, Eq. 11
# ---------------------------------------------------------------------------------------------
def clip_weights(image_feats: torch.Tensor, text_feats: torch.Tensor, w: float) -> torch.Tensor:
    """Eq. 11: c_I = CLIPScore(I, S) = min(1, w * max(cos(g_I, g_S), 0)) -> [B]."""
    cos = (F.normalize(image_feats, dim=-1) * F.normalize(text_feats, dim=-1)).sum(-1)
    return torch.clamp(w * cos.clamp_min(0.0), max=1.0)


def weighted_caption_loss(logits: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                          weights: torch.Tensor | None = None, label_smoothing: float = 0.0,
                          focal_gamma: float = 0.0) -> torch.Tensor:
    """Eq. 9-11 over a batch: the mean over the batch's target tokens of c_b * l_bt, where l_bt is the
    token's cross-entropy (-log p(w_t | w_<t, I)) and c_b the caption's CLIP weight (None: c_b = 1).
    Targets are tokens[:, 1:] up to and including the end token (logits[:, i] predicts tokens[:, i+1]).

    The released loss (xmodaler WeightedLabelSmoothing, gamma_type "batch") adds two factors, both off
    at 0: label smoothing, l_bt = KL(q_t || p) with q_t = 1 - ls on the target and ls / (V - 1)
    elsewhere (the cross-entropy up to a constant); and "re-weighting each word by the predicted
    distribution": the loss is multiplied by the batch mean of (1 - p_target)^gamma over the same
    tokens (not detached, as released)."""
    logits = logits[:, :-1]
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    target = tokens[:, 1:]
    pos = torch.arange(1, tokens.shape[1], device=tokens.device)
    mask = (pos[None, :] < lengths[:, None]).to(logp.dtype)                            # [B, T-1]
    if label_smoothing > 0:
        q = torch.full_like(logp, label_smoothing / (logp.shape[-1] - 1))
        q.scatter_(-1, target[..., None], 1.0 - label_smoothing)
        per_token = F.kl_div(logp, q, reduction="none").sum(-1)
    else:
        per_token = -logp.gather(-1, target[..., None]).squeeze(-1)                    # NLL
    if weights is not None:
        per_token = per_token * weights.to(per_token.dtype)[:, None]
    loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    if focal_gamma > 0:
        p_target = logp.gather(-1, target[..., None]).squeeze(-1).exp()
        loss = loss * (((1 - p_target) ** focal_gamma) * mask).sum() / mask.sum().clamp(min=1)
    return loss


# ---------------------------------------------------------------------------------------------
# 5. The captioner, Eq. 4-8
# ---------------------------------------------------------------------------------------------
@dataclass
class PCMNetConfig:
    feature_dim: int = 512          # CLIP joint dim D (global, patches, concept features)
    num_patches: int = 49           # N_p of the cached patch map
    grid_dim: int | None = None     # W of the raw grid the visual stream reads (None: it reads the projected patches)
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
    clip_w: float | None = 4.0      # w of Eq. 11; None = plain cross-entropy (Table 3 without CXE)
    label_smoothing: float = 0.0
    focal_gamma: float = 0.0
    mix_select: str = "patches"     # "patches": top-M patches by max_k a_jk | "pairs": top-M (patch, concept) pairs
    attention_dropout: float | None = None   # None: = dropout
    embedding_dropout: float | None = None   # None: = dropout
    predictor_dropout: float = 0.0
    word_embedding_dropout: float = 0.1   # dropout of the decoder's word + position embeddings (released)
    embedding_relu: bool = False    # ReLU on the summed embeddings, before their LayerNorm (released)
    w_g_layernorm: bool = False     # W_g as Linear with bias + LayerNorm (released) instead of a bias-free Linear


class VisualSemanticEncoder(nn.Module):
    """Embedding of [g_I; V_IT] (FC per stream + position + token type, Sec. 3.3), N_e post-LN
    blocks (Eq. 4-5), inter-layer global feature (Eq. 6) and the encoded map (Eq. 7)."""

    def __init__(self, cfg: PCMNetConfig):
        super().__init__()
        H = cfg.hidden
        self.global_fc = nn.Linear(cfg.feature_dim, H)
        self.visual_fc = nn.Linear(cfg.grid_dim or cfg.feature_dim, H)     # released: Linear(768, 512) on the grid
        self.textual_fc = nn.Linear(cfg.feature_dim, H)
        self.pos_emb = nn.Embedding(cfg.num_patches + 1, H)          # 0: global, j: patch j
        self.type_emb = nn.Embedding(3, H)                            # GLOBAL, VISUAL, TEXTUAL
        self.emb_ln = nn.LayerNorm(H)
        self.emb_relu = cfg.embedding_relu
        self.drop = nn.Dropout(cfg.dropout if cfg.embedding_dropout is None else cfg.embedding_dropout)
        self.layers = nn.ModuleList([
            nn.TransformerEncoderLayer(H, cfg.heads, cfg.ffn_dim, cfg.dropout, activation="relu",
                                       batch_first=True, norm_first=False)
            for _ in range(cfg.encoder_layers)])
        _set_attention_dropout(self.layers, cfg)
        w_g = nn.Linear((cfg.encoder_layers + 1) * H, H, bias=cfg.w_g_layernorm)       # W_g of Eq. 6
        self.w_g = nn.Sequential(w_g, nn.LayerNorm(H)) if cfg.w_g_layernorm else w_g

    def embed(self, global_feats, tokens, types, positions, grid=None) -> torch.Tensor:
        """V^(0) = {g^(0), v^(0)_1..}: [B, 1+N, H]. As released: FC, + position, + token type, ReLU,
        LayerNorm, dropout. ``grid`` [B, N, W]: the visual tokens' raw grid cells (the visual stream's
        input when given; else the tokens themselves)."""
        B = tokens.shape[0]
        g = self.global_fc(global_feats)[:, None]
        visual = self.visual_fc(tokens if grid is None else grid)
        v = torch.where((types == TEXTUAL)[..., None], self.textual_fc(tokens), visual)
        all_types = torch.cat([torch.full((B, 1), GLOBAL, device=types.device), types], dim=1)
        all_pos = torch.cat([torch.zeros(B, 1, dtype=positions.dtype, device=positions.device), positions], dim=1)
        x = torch.cat([g, v], dim=1) + self.pos_emb(all_pos) + self.type_emb(all_types)
        if self.emb_relu:
            x = F.relu(x)
        return self.drop(self.emb_ln(x))

    def forward(self, global_feats, tokens, types, positions, padding, grid=None) -> torch.Tensor:
        """-> V~ = [g~; v^(N_e)_1..] [B, 1+N, H] (Eq. 7). padding [B, N] (True: an empty slot) is
        masked out of every self-attention; the global token is never padding."""
        x = self.embed(global_feats, tokens, types, positions, grid)
        mask = torch.cat([torch.zeros_like(padding[:, :1]), padding], dim=1)
        globals_ = [x[:, 0]]                                                            # g^(0)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=mask)                                     # Eq. 5
            globals_.append(x[:, 0])                                                    # g^(i)
        g_tilde = self.w_g(torch.cat(globals_, dim=-1))                                # Eq. 6
        return torch.cat([g_tilde[:, None], x[:, 1:]], dim=1)                           # Eq. 7


def sinusoid_positions(length: int, width: int) -> torch.Tensor:
    """The Transformer's [39] position encoding: PE[p, 2i] = sin(p / 10000^(2i/width)),
    PE[p, 2i+1] = cos(p / 10000^(2i/width)) -> [length, width]."""
    angle = torch.arange(length, dtype=torch.float64)[:, None] * torch.exp(
        torch.arange(0, width, 2, dtype=torch.float64) * -(math.log(10000.0) / width))
    pe = torch.zeros(length, width, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : width // 2])
    return pe.float()


class SentenceDecoder(nn.Module):
    """N_d post-LN blocks: masked self-attention, cross-attention to V~, feed-forward (Eq. 8).
    forward(memory, tokens) follows pipeline/nn/decoding.py's conventions (logits[:, i] predicts
    tokens[:, i+1]; memory a decoding.Memory when it carries padding), so its searches run on it.
    Word embedding as released (xmodaler TokenBaseEmbedding): word + sinusoidal position, LayerNorm,
    dropout; output layer (BasePredictor): dropout, then a Linear with bias, not tied."""

    def __init__(self, cfg: PCMNetConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden
        self.tok_emb = nn.Embedding(cfg.vocab_size, H)
        self.register_buffer("word_positions", sinusoid_positions(cfg.max_len, H), persistent=False)
        self.emb_ln = nn.LayerNorm(H)
        self.drop = nn.Dropout(cfg.word_embedding_dropout)
        self.layers = nn.ModuleList([
            nn.TransformerDecoderLayer(H, cfg.heads, cfg.ffn_dim, cfg.dropout, activation="relu",
                                       batch_first=True, norm_first=False)
            for _ in range(cfg.decoder_layers)])
        _set_attention_dropout(self.layers, cfg)
        self.predictor_drop = nn.Dropout(cfg.predictor_dropout)
        self.output = nn.Linear(H, cfg.vocab_size)
        nn.init.normal_(self.tok_emb.weight, std=0.02)

    def forward(self, memory: torch.Tensor | decoding.Memory, tokens: torch.Tensor) -> torch.Tensor:
        """memory [B, S, H] or a Memory (its padding masked out of the cross-attention),
        tokens [B, T] -> logits [B, T, vocab]."""
        states, padding = memory if isinstance(memory, decoding.Memory) else (memory, None)
        T = tokens.shape[1]
        if T > self.cfg.max_len:
            raise ValueError(f"{T} tokens > config max_len {self.cfg.max_len}")
        h = self.drop(self.emb_ln(self.tok_emb(tokens) + self.word_positions[:T]))
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=tokens.device, dtype=h.dtype)
        for layer in self.layers:
            h = layer(h, states, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=padding)
        return self.output(self.predictor_drop(h))


def _set_attention_dropout(layers: nn.ModuleList, cfg: PCMNetConfig) -> None:
    """torch's Transformer layers take one dropout; the released recipe drops attention weights at
    its own rate (MultiheadAttention reads its ``dropout`` attribute at every call)."""
    if cfg.attention_dropout is None:
        return
    for layer in layers:
        for attn in (getattr(layer, "self_attn", None), getattr(layer, "multihead_attn", None)):
            if attn is not None:
                attn.dropout = cfg.attention_dropout


class PCMNet(nn.Module):
    """The concept features (Eq. 1's c_j) are a buffer, so a checkpoint captions on its own."""

    def __init__(self, cfg: PCMNetConfig, tokenizer: CaptionTokenizer | WordTokenizer,
                 concept_feats: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.width = cfg.hidden                                      # the Noam schedule's d_model
        self.tokenizer = tokenizer
        if tokenizer.vocab_size != cfg.vocab_size:
            raise ValueError(f"vocab_size {cfg.vocab_size} != the tokenizer's {tokenizer.vocab_size}")
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
            tokens, types, positions, padding = pcm(g, patches, self.concepts, self.cfg.salient_k, self.cfg.mix_m,
                                                    self.cfg.tau, self.training, self.cfg.mix_select)
        else:
            tokens, types, positions, padding = no_mix(patches)
        if self.training and self.cfg.noise_variance > 0:                  # normalise, add noise, normalise
            g = F.normalize(F.normalize(g, dim=-1) + torch.randn_like(g) * math.sqrt(self.cfg.noise_variance), dim=-1)
        return g, tokens, types, positions, padding

    def visual_grid(self, batch: dict, positions: torch.Tensor) -> torch.Tensor | None:
        """The raw grid cell of each token's patch (position j: cell j - 1), the visual stream's input as
        released; None when it reads the projected patches. A textual or padding token's cell is never used."""
        if self.cfg.grid_dim is None:
            return None
        grid = batch["grid"]
        return grid[torch.arange(grid.shape[0], device=grid.device)[:, None], positions - 1]

    def encode(self, batch: dict) -> decoding.Memory:
        """V~ with its padding (the global token and every patch slot that holds a patch are kept)."""
        g, tokens, types, positions, padding = self.encoder_inputs(batch)
        states = self.encoder(g, tokens, types, positions, padding, self.visual_grid(batch, positions))
        return decoding.Memory(states, torch.cat([torch.zeros_like(padding[:, :1]), padding], dim=1))

    def forward(self, batch: dict) -> torch.Tensor:
        return self.decoder(self.encode(batch), batch["tokens"])

    def loss(self, batch: dict):
        """Eq. 11 with the CLIP weights c_I (cfg.clip_w), or plain cross-entropy (clip_w None)."""
        cfg = self.cfg
        weights = clip_weights(batch["global"], batch["text_feature"], cfg.clip_w) if cfg.clip_w else None  # Eq. 11
        loss = weighted_caption_loss(self(batch), batch["tokens"], batch["lengths"], weights,
                                     cfg.label_smoothing, cfg.focal_gamma)
        return (loss, {"clip_weight": weights.mean().item()}) if weights is not None else loss

    @torch.no_grad()
    def generate(self, batch: dict, beam_size: int = 3, max_len: int | None = None,
                 length_normalize: bool = True) -> list[str]:
        return decoding.captions(self.decoder, self.encode(batch), self.tokenizer, self.cfg.max_len, max_len,
                                 beam_size, length_normalize)


# ---------------------------------------------------------------------------------------------
# Settings and the method contract (pipeline/methods/__init__.py)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Train:
    """Defaults: the paper's values, and where the paper is silent the released ViT-B/32 recipe
    (jianjieluo/PCM-Net configs/mscoco_sd/vit_b32/train.yaml, METHODS.md section 2)."""
    mixup: bool = opt(True, "Table 3 Mix-up: patch-wise cross-modal feature mix-up (false: Base)")
    cxe: bool = opt(True, "Table 3 CXE: CLIP-weighted cross-entropy, Eq. 11 (false: plain cross-entropy)")
    salient_k: int = opt(5, "K, salient concepts per image (Eq. 1; Fig. 4a)", check=at_least(1))
    mix_m: int = opt(5, "M, patches replaced (training) / appended (inference) (Fig. 4b)", check=at_least(0))
    mix_select: Literal["patches", "pairs"] = opt("pairs", "the M mixed patches: top-M by max_k a_jk (the paper's "
                                                           "reading) | the top-M (patch, concept) pairs (released)")
    tau: float = opt(0.01, "Eq. 3 temperature (not given in the paper: CLIP's 1/100)", check=positive)
    clip_w: float = opt(2.5, "w of Eq. 11 (released: 2.5 for ViT-B/32, 4 for ViT-L/14)", check=positive)
    label_smoothing: float = opt(0.1, "label smoothing of the caption loss (released)", check=non_negative)
    focal_gamma: float = opt(2.0, "the loss times the batch mean of (1 - p_target)^gamma (released; 0 = off)",
                             check=non_negative)
    noise_variance: float = opt(0.016, "Gaussian noise on the global feature at training (CapDec's), renormalised")
    encoder_input: Literal["grid", "patches"] = opt("grid", "the encoder's visual patches: the raw last-layer grid "
                                                           "through its own Linear (paper, released: 768 -> 512 for "
                                                           "ViT-B/32) | the projected patches of Eq. 2")
    hidden: int = opt(512, "hidden size of every Transformer block", check=at_least(1))
    heads: int = opt(8, "attention heads (not given: the base Transformer's)", check=at_least(1))
    ffn_dim: int = opt(2048, "feed-forward width (not given: the base Transformer's)", check=at_least(1))
    encoder_layers: int = opt(3, "N_e", check=at_least(1))
    decoder_layers: int = opt(3, "N_d", check=at_least(1))
    dropout: float = opt(0.2, "dropout of hidden states and feed-forward (released)", check=dropout_rate)
    attention_dropout: float = opt(0.3, "dropout of attention weights (released)", check=dropout_rate)
    embedding_dropout: float = opt(0.5, "dropout of the visual-semantic embeddings (released)", check=dropout_rate)
    predictor_dropout: float = opt(0.5, "dropout before the output layer (released)", check=dropout_rate)
    word_embedding_dropout: float = opt(0.1, "dropout of the decoder's word embeddings (released TOKEN_EMBED)",
                                        check=dropout_rate)
    embedding_relu: bool = opt(True, "ReLU on the visual-semantic embeddings after position and type are added, "
                                     "before their LayerNorm (released)")
    w_g_layernorm: bool = opt(True, "W_g (Eq. 6) as Linear with bias + LayerNorm (released)")
    vocabulary: Literal["full", "corpus", "words"] = opt("words", "decoder output: all of CLIP's BPE | the corpus's "
                                                                  "BPE ids | the corpus's most frequent words (released)")
    vocabulary_size: int = opt(10200, "words kept with vocabulary: words (released: 10,200 on COCO)",
                               check=at_least(1))
    max_len: int = opt(22, "caption tokens incl. start and end (released: 20 words)", check=at_least(2))
    epochs: int = opt(12, "passes over the corpus (released checkpoint: epoch 10 of 12)", check=at_least(1))
    batch_size: int = opt(32, "captions per step", check=at_least(1))
    optim: Optim = opt(Optim(name="adam", lr=1.0, betas=(0.9, 0.999), eps=1e-8, schedule="noam", warmup_steps=10000,
                             grad_clip_value=0.1), "Adam with the Noam schedule (lr is Noam's factor); released "
                                               "betas, eps and gradient value clipping")
    seed: int = opt(0, "seed of the weights, the data order, dropout and noise")
    pairs: Pairs = pairs_option()

    def __post_init__(self):
        divides("heads", "hidden")(self)


@dataclass(frozen=True, kw_only=True)
class Caption:
    beam_size: int = opt(3, "beam search width", check=at_least(1))
    length_normalize: bool = opt(False, "rank beams by mean per-token log-prob (false: summed, as released)")
    max_len: int | None = opt(None, "longest caption in tokens (null = as trained)", check=at_least(2))
    batch_size: int = opt(32, "images per decoding batch", check=at_least(1))


def needs(train: Train, caption: Caption | None = None) -> Needs:
    grid = ("grid",) if train.encoder_input == "grid" else ()       # the raw grid, only when the encoder reads it
    if caption is None:
        return Needs(rows={"text": "corpus.text", "text_feature": "text.text_feature",
                           **{c: f"synthetic.{c}" for c in ("global", "patches", *grid)}},
                     corpus=("text",) if train.vocabulary != "full" else (), concepts=True, pairs=train.pairs)
    return Needs(rows={c: f"image.{c}" for c in ("global", "patches", *grid)})


def tokenizer_for(train: Train, vocabulary) -> CaptionTokenizer | WordTokenizer:
    return WordTokenizer(vocabulary) if train.vocabulary == "words" else CaptionTokenizer(vocabulary)


def facts(train: Train, data: Data) -> dict:
    if train.encoder_input == "grid" and not data.grid_dim:
        raise ValueError("encoder_input: grid reads the raw grid, whose width the features do not record")
    words, _ = data.concepts
    texts = data.corpus.get("text", ())
    if train.vocabulary == "words":
        vocabulary = WordTokenizer.for_corpus(texts, train.vocabulary_size).vocabulary
    else:
        vocabulary = CaptionTokenizer.for_corpus(train.vocabulary, texts).vocabulary
    return {"feature_dim": data.feature_dim, "num_patches": data.num_patches, "concepts": list(words),
            "vocabulary": vocabulary, "grid_dim": data.grid_dim if train.encoder_input == "grid" else None}


def create(train: Train, facts: dict, data: Data | None = None) -> PCMNet:
    tokenizer = tokenizer_for(train, facts["vocabulary"])
    config = PCMNetConfig(
        feature_dim=facts["feature_dim"], num_patches=facts["num_patches"], grid_dim=facts.get("grid_dim"),
        vocab_size=tokenizer.vocab_size,
        hidden=train.hidden, heads=train.heads, ffn_dim=train.ffn_dim, encoder_layers=train.encoder_layers,
        decoder_layers=train.decoder_layers, dropout=train.dropout, max_len=train.max_len,
        num_concepts=len(facts["concepts"]), mixup=train.mixup, salient_k=train.salient_k, mix_m=train.mix_m,
        tau=train.tau, noise_variance=train.noise_variance, clip_w=train.clip_w if train.cxe else None,
        label_smoothing=train.label_smoothing, focal_gamma=train.focal_gamma, mix_select=train.mix_select,
        attention_dropout=train.attention_dropout, embedding_dropout=train.embedding_dropout,
        predictor_dropout=train.predictor_dropout, word_embedding_dropout=train.word_embedding_dropout,
        embedding_relu=train.embedding_relu,
        w_g_layernorm=train.w_g_layernorm)
    concepts = torch.from_numpy(data.concepts[1]) if data is not None else None
    return PCMNet(config, tokenizer, concepts)


def _features(rows: dict, idx: np.ndarray) -> dict:
    return {c: torch.from_numpy(rows[c][idx]) for c in ("global", "patches", "grid") if c in rows}


def batch(model: PCMNet, rows: dict, idx: np.ndarray, train: Train, data: Data, step: Step) -> dict:
    tokens, lengths = to_longest(*model.tokenizer.encode([rows["text"][i] for i in idx], train.max_len))
    return {**_features(rows, idx), "text_feature": torch.from_numpy(rows["text_feature"][idx]),
            "tokens": tokens, "lengths": lengths}


def caption(model: PCMNet, rows: dict, idx: np.ndarray, train: Train, caption: Caption, data: Data) -> list[str]:
    return model.generate(_features(rows, idx), caption.beam_size, caption.max_len, caption.length_normalize)


def variant(train: Train, caption: Caption | None) -> str:
    """The Table 3 row: Base, Base+Mix-up, Base+CXE or Base+Mix-up+CXE."""
    row = "+".join(["Base"] + [label for flag, label in (("mixup", "Mix-up"), ("cxe", "CXE")) if getattr(train, flag)])
    return row + pairs_mark(train.pairs)
