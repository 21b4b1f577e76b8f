"""MacCap (Qiu, Ning, He, AAAI 2024): zero-shot captioning by text-only training, with region noise
injection, an adaptor decoder in front of a frozen causal LM, sub-region feature aggregation and
multiple sampling with CLIP filtering at inference.

Training reads the corpus TEXT features only (``artifacts/features/text``); captioning reads the eval
images' CLIP global feature, projected patch tokens and the last layer's attention map over all
tokens (``image.attention``, cached for eval images only; MacCap never looks at a synthetic image).
The released code is ``Artanic30/MacCap`` (``models/models/MacCap.py``, ``models/BaseModel.py``,
``models/engine.py``, ``main.py``); where the paper is silent we follow it and say so. Read top to
bottom, equation by equation:

1. Region noise injection, Eq. 2-4 (``region_noise``): the unit text feature T_c (Eq. 2, the cached
   CLIP text feature, L2-normalised) is repeated N_cr times (Eq. 3) and every copy gets its own
   zero-mean Gaussian noise and is L2-normalised (Eq. 4): T_cr^i = normalize(T_c + n_i),
   n_i ~ N(0, sigma^2 I). The paper writes "sigma variance" with sigma = 0.016, "as suggested in"
   CapDec, and CapDec's 0.016 is a variance (its ``noise_variance``, std sqrt(0.016)); the released
   MacCap code draws ``randn * sqrt(variance)`` with variance 0.016 too. So ``noise_variance`` is
   sigma^2 = 0.016. (The text also says "uniform"; Eq. 4 and the code use a Gaussian.) The noise is
   drawn inside the model's loss from torch's generator, which the runner seeds: a run is
   reproducible.
2. Adaptor decoder, Eq. 5-8 (``Adaptor``): N_q learnable queries Q (32 in the released code) ->
   self-attention (Eq. 5) -> cross-attention to T_cr (Eq. 6) -> FFN (Eq. 7): one post-norm
   Transformer decoder layer as DETR's (8 heads, width 512 = D for ViT-B/32, FFN 2048, ReLU,
   dropout 0.1) plus a final LayerNorm, no positional embeddings; then an MLP of 3 linear layers with
   ReLU between them, width -> width -> width -> LM width (Eq. 8), giving the prefix E (N_q x LM
   width). ``width: null`` is the CLIP dimension D (the paper's Q in R^{N_q x D}); another width gives
   the cross-attention keys and values of dimension D.
3. Text reconstruction, Eq. 9 (``MacCapCaptioner.loss``): the caption's token cross-entropy through
   the causal LM after the prefix (``CausalLM.prefix_loss``: the caption ends with the end token,
   padding masked; the mean runs over the batch's tokens, as the Hugging Face ``labels`` loss of the
   released code, rather than per caption first). ``start_token`` (default, as released): the LM's
   start token follows the prefix, in training and decoding. The released Dataloader tokenizes
   ``caption + '</s>'`` with OPT's tokenizer, which puts OPT's ``</s>`` (its bos, id 2) in front, so
   the LM reads [E, e(</s>), e(t_1)..]; ``generate_by_strategy`` decodes from [E, e(</s>)] (the
   embedding of ``tokenizer.encode('')`` = [</s>]). Off, the prefix plays the start token. Two details
   of the released loss are not taken: its labels also ask the last query to predict that leading
   ``</s>``, and the caption's padding (OPT's pad id 1, not -100) is a target too; here the targets
   are the caption and its end token. The LM is FROZEN in the paper (OPT-1.3b) and kept in eval
   mode (no dropout); only the adaptor trains. The
   frozen LM is left out of the checkpoint (``frozen_pretrained``, pipeline/methods/__init__.py):
   it is loaded again from its identity, and a checkpoint whose LM loads with other weights is
   refused. ``freeze_lm: false`` trains the LM too (then it is saved): the offline profile's
   departure, because a small LM built from a seed has never learned language and a frozen one
   cannot speak. ``vocabulary: corpus`` (offline too, as the text-feature family's and SynTIC's and
   PCM-Net's offline decoders) builds the small LM to predict only the BPE ids the corpus uses
   (``load_causal_lm(..., vocabulary=)``; the ids are a fact of the checkpoint): its output layer
   shrinks from 49,408 rows to the corpus's few hundred, which is what lets it learn word order
   within the demo's budget. ``full`` (the paper's, and the only choice for a pretrained LM) keeps
   the LM's own vocabulary.
4. Sub-region feature aggregation, Eq. 10-13 (``subregion_features``): every last-layer token
   (CLS included) projected to the joint space and L2-normalised, I'_p = [I_c, patches] (Eq. 10-11;
   the cache's ``global`` is the projected CLS, its ``patches`` the projected patch tokens, both by
   CLIP's own ``ln_post`` + ``proj``). The N_cr tokens with the highest CLS attention (row 0 of the
   attention map; CLS itself eligible, as in the code) are the informative tokens; A = their own
   attention rows over all N_p + 1 tokens (N_cr x (N_p + 1)). The released code softmaxes those rows
   once more (``attn_weight[idx, tp_idx].softmax(dim=-1)``); we follow it (``attention_softmax``,
   default true; false takes the rows as they are). I_s = A I'_p with each row L2-normalised
   (Eq. 12). I_cr^k = I_s^k + I_c (Eq. 13): a sum in the code, "the average" in the text; we take the
   sum, unnormalised, as the code: its norm lies between 1 and 2 (about 1.6-1.9 for CLIP), and the
   inference noise of section 5 is added to it before the one L2 normalisation, so the noise is
   relative to a longer vector than a unit one (added after normalising it would be ~1.7x stronger).
   The adaptor sees unit vectors, as in training. ``aggregation: cls`` is Table 5's "CLS token" row:
   I_cr = I_c repeated N_cr times.
5. Multiple sampling and filtering (``caption``): S noisy copies of I_cr, normalize(I_cr + n) with
   n ~ N(0, sigma^2 I) of the same variance on the unnormalised I_s + I_c (released
   ``MacCap.generate``: ``noise_injection(cls + patches)`` adds the noise, then normalises; applied
   even for S = 1, as the released code does), each decoded by beam search (beam 4) from [E, </s>]
   through the LM (``pipeline.nn.decoding.generate_from_prefix``,
   at most ``max_new_tokens``: 16 in the released code); the caption whose CLIP text feature (of its
   first 80 characters, as the released code) has the highest cosine to the image's global feature
   is kept (``rerank``). All S candidates of a batch of images are encoded in one call of the
   artifacts' own CLIP text encoder. The noise of an image is drawn from a generator seeded by
   (``caption.seed``, image id): its caption does not depend on the batch, the shard or the other
   images of the eval set.

Table 5 rows are switches: ``train.n_cr`` 1 ("single token") vs 10 ("multiple token"),
``train.noise_variance`` 0 ("w/o noise") vs 0.016, ``caption.aggregation`` ``cls`` vs ``subregion``,
``caption.samples`` 1 vs 20 ("sampling and filtering"). ``variant`` names the row; the full method is
"MacCap".
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import ModelRef, at_least, divides, dropout_rate, non_negative, opt
from pipeline.methods import Data, Needs, Step
from pipeline.models.language_model import CausalLM, corpus_vocabulary, load_causal_lm, tokenizer_of
from pipeline.nn import decoding
from pipeline.nn.schedules import Optim
from pipeline.nn.tokenizer import to_longest
from pipeline.vectors import l2_normalize, l2_normalize_torch


# ---------------------------------------------------------------------------------------------
# 1. Region noise injection, Eq. 2-4 (and the inference-time noise of section 5)
# ---------------------------------------------------------------------------------------------
def add_noise(x: torch.Tensor, variance: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """normalize(x + n), n ~ N(0, variance * I), independently for every row (last axis = D); variance 0
    only normalises (nothing is drawn). The draw is made on the generator's device and moved to x's."""
    if variance < 0:
        raise ValueError(f"noise variance must be >= 0, got {variance}")
    if variance == 0:
        return l2_normalize_torch(x)
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    return l2_normalize_torch(x + noise * math.sqrt(variance))                      # Eq. 4


def region_noise(t: torch.Tensor, n_cr: int, variance: float, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Eq. 3-4: text features T_c [B, D] -> T_cr [B, N_cr, D], N_cr copies each with its own noise."""
    repeated = t.unsqueeze(-2).expand(*t.shape[:-1], n_cr, t.shape[-1])             # Eq. 3: Concat(T_c, ..)
    return add_noise(repeated, variance, generator)                                 # Eq. 4


# ---------------------------------------------------------------------------------------------
# 2. Adaptor decoder, Eq. 5-8
# ---------------------------------------------------------------------------------------------
class AdaptorLayer(nn.Module):
    """One post-norm Transformer decoder layer (DETR's ``forward_post``, no positional embeddings)."""

    def __init__(self, width: int, heads: int, ffn_dim: int, dropout: float, memory_dim: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, dropout=dropout, kdim=memory_dim, vdim=memory_dim,
                                                batch_first=True)
        self.linear1, self.linear2 = nn.Linear(width, ffn_dim), nn.Linear(ffn_dim, width)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.dropout, self.dropout1 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q = self.norm1(q + self.dropout1(self.self_attn(q, q, q, need_weights=False)[0]))            # Eq. 5
        q = self.norm2(q + self.dropout2(self.cross_attn(q, memory, memory, need_weights=False)[0]))  # Eq. 6
        return self.norm3(q + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(q))))))    # Eq. 7


class Adaptor(nn.Module):
    """Learnable queries -> decoder layer(s) -> final LayerNorm -> MLP (Eq. 5-8): memory [B, N, D] ->
    prefix E [B, N_q, LM width]."""

    def __init__(self, feature_dim: int, lm_width: int, queries: int = 32, width: int | None = None, heads: int = 8,
                 layers: int = 1, ffn_dim: int = 2048, dropout: float = 0.1, mlp_layers: int = 3):
        super().__init__()
        width = feature_dim if width is None else width
        if width % heads:
            raise ValueError(f"methods.*.train.heads ({heads}) must divide the adaptor width ({width}; width null "
                             f"is the CLIP dimension)")
        self.width = width
        self.queries = nn.Embedding(queries, width)                 # Q (released: nn.Embedding, N(0, 1) init)
        self.layers = nn.ModuleList(AdaptorLayer(width, heads, ffn_dim, dropout, feature_dim) for _ in range(layers))
        self.norm = nn.LayerNorm(width)                              # the decoder's final norm
        dims = [width] * mlp_layers + [lm_width]                     # 512 -> 512 -> 512 -> LM width (3 layers)
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, memory: torch.Tensor) -> torch.Tensor:
        q = self.queries.weight.unsqueeze(0).expand(memory.shape[0], -1, -1)
        for layer in self.layers:                                   # Eq. 5-7
            q = layer(q, memory)
        q = self.norm(q)                                            # Q'
        for i, linear in enumerate(self.mlp):                       # Eq. 8: E = MLP(Q'), ReLU between layers
            q = linear(q) if i == len(self.mlp) - 1 else F.relu(linear(q))
        return q


# ---------------------------------------------------------------------------------------------
# 3. The captioner, Eq. 9
# ---------------------------------------------------------------------------------------------
@dataclass
class MacCapConfig:
    feature_dim: int = 512
    n_cr: int = 10
    noise_variance: float = 0.016
    queries: int = 32
    width: int | None = None
    heads: int = 8
    layers: int = 1
    ffn_dim: int = 2048
    dropout: float = 0.1
    mlp_layers: int = 3
    freeze_lm: bool = True
    max_len: int = 24
    start_token: bool = True        # [E, </s>, caption], as the released code


class MacCapCaptioner(nn.Module):
    """Adaptor + causal LM. ``self.lm`` is the transformers model (a registered submodule), ``self.causal``
    the CausalLM around it (tokenizer etc.). With ``freeze_lm`` the LM's parameters do not train and
    ``frozen_pretrained`` names it, so checkpoints leave its tensors out."""

    def __init__(self, cfg: MacCapConfig, lm: CausalLM):
        super().__init__()
        self.cfg = cfg
        self.causal = lm
        self.lm = lm.model
        self.adaptor = Adaptor(cfg.feature_dim, lm.width, cfg.queries, cfg.width, cfg.heads, cfg.layers, cfg.ffn_dim,
                               cfg.dropout, cfg.mlp_layers)
        self.width = self.adaptor.width
        limit = lm.max_positions
        if limit is not None and cfg.queries + cfg.start_token + cfg.max_len > limit:
            raise ValueError(f"{cfg.queries} queries + max_len {cfg.max_len}"
                             + (" + the start token" if cfg.start_token else "")
                             + f" exceed the language model's {limit} positions")
        self.frozen_pretrained: dict[str, dict] = {}
        if cfg.freeze_lm:
            for param in self.lm.parameters():
                param.requires_grad_(False)
            self.frozen_pretrained = {"lm": dict(lm.identity)}

    def train(self, mode: bool = True):
        super().train(mode)
        if self.cfg.freeze_lm:
            self.lm.eval()                    # a frozen LM keeps its dropout off
        return self

    @property
    def device(self) -> torch.device:
        return self.adaptor.queries.weight.device

    def prefix(self, memory: torch.Tensor) -> torch.Tensor:
        """The LM's input before the caption: Eq. 5-8, T_cr or I_cr [B, N_cr, D] -> E [B, N_q, LM width],
        then (``start_token``, as released) the start token's embedding: [B, N_q + 1, LM width]."""
        prefix = self.adaptor(memory.to(self.device, torch.float32))
        if not self.cfg.start_token:
            return prefix
        bos = torch.full((prefix.shape[0], 1), self.causal.bos_id, dtype=torch.long, device=prefix.device)
        return torch.cat([prefix, self.causal.embed(bos).to(prefix.dtype)], dim=1)

    def loss(self, batch: dict) -> torch.Tensor:
        dev = self.device
        t = l2_normalize_torch(batch["feature"].to(dev, torch.float32))                  # Eq. 2: T_c
        memory = region_noise(t, self.cfg.n_cr, self.cfg.noise_variance)                 # Eq. 3-4: T_cr
        return self.causal.prefix_loss(self.prefix(memory), batch["tokens"].to(dev),     # Eq. 9
                                       batch["lengths"].to(dev))

    @torch.no_grad()
    def generate(self, memory: torch.Tensor, beam_size: int = 4, max_new_tokens: int = 16,
                 batch_size: int = 64) -> list[str]:
        """Captions of memories [M, N_cr, D] (already noised), ``batch_size`` prefixes per LM call."""
        lm, out = self.causal, []
        limit = lm.max_positions
        if limit is not None and self.cfg.queries + self.cfg.start_token + max_new_tokens > limit:
            raise ValueError(f"{self.cfg.queries} queries + max_new_tokens {max_new_tokens}"
                             + (" + the start token" if self.cfg.start_token else "")
                             + f" exceed the language model's {limit} positions")
        for start in range(0, len(memory), batch_size):
            prefix = self.prefix(memory[start:start + batch_size])
            ids = decoding.generate_from_prefix(self.lm, prefix, lm.eos_id, lm.pad_id, max_new_tokens, beam_size)
            out += [lm.decode(row) for row in ids]
        return out


# ---------------------------------------------------------------------------------------------
# 4. Sub-region feature aggregation, Eq. 10-13
# ---------------------------------------------------------------------------------------------
def projected_tokens(global_: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Eq. 10-11: I'_p = [I_c, projected patches] [B, N_p + 1, D], every token L2-normalised (I_c = I'_p[:, 0])."""
    return l2_normalize_torch(torch.cat([global_[:, None, :], patches], dim=1))


def subregion_features(global_: torch.Tensor, patches: torch.Tensor, attention: torch.Tensor, n_cr: int,
                       attention_softmax: bool = True) -> torch.Tensor:
    """Eq. 10-13 -> I_cr [B, N_cr, D] = I_s + I_c, unnormalised as in the released code (the inference
    noise is added to it, then normalised: ``noisy_samples``). attention [B, N_p + 1, N_p + 1]: row i is
    token i's last-layer attention over all tokens (CLS = 0)."""
    tokens = projected_tokens(global_, patches)                                         # Eq. 10-11
    if n_cr > tokens.shape[1]:
        raise ValueError(f"N_cr = {n_cr} sub-regions but the image has only {tokens.shape[1]} tokens")
    top = attention[:, 0, :].topk(n_cr, dim=-1).indices                                 # highest CLS attention
    rows = torch.gather(attention, 1, top[..., None].expand(-1, -1, attention.shape[-1]))   # A [B, N_cr, N_p+1]
    if attention_softmax:
        rows = rows.softmax(dim=-1)                                                     # as the released code
    i_s = l2_normalize_torch(rows @ tokens)                                             # Eq. 12: I_s = A I'_p
    return i_s + tokens[:, :1, :]                                                       # Eq. 13: I_s^k + I_c


def cls_features(global_: torch.Tensor, n_cr: int) -> torch.Tensor:
    """Table 5's "CLS token" row: I_cr = I_c repeated N_cr times [B, N_cr, D]."""
    return l2_normalize_torch(global_)[:, None, :].expand(-1, n_cr, -1)


# ---------------------------------------------------------------------------------------------
# 5. Multiple sampling and filtering
# ---------------------------------------------------------------------------------------------
def image_generator(seed: int, image_id: str) -> torch.Generator:
    """The generator of one image's inference noise: seeded by (seed, image id) only."""
    digest = hashlib.sha256(f"{int(seed)}\x00{image_id}".encode("utf-8")).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def noisy_samples(i_cr: torch.Tensor, samples: int, variance: float, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """S noisy copies of one image's I_cr [N_cr, D] -> [S, N_cr, D]: normalize(I_cr + n), n ~ N(0, variance)
    on I_cr as given (the unnormalised I_s + I_c of Eq. 13, as the released code)."""
    return add_noise(i_cr.unsqueeze(0).expand(samples, *i_cr.shape), variance, generator)


def rerank(candidates: Sequence[Sequence[str]], image: np.ndarray, encode_texts: Callable[[list[str]], np.ndarray],
           max_chars: int = 80) -> list[str]:
    """Per image, the candidate whose CLIP text feature (of its first ``max_chars`` characters) has the
    highest cosine with the image's global feature; the first such on a tie. All candidates of all
    images are encoded in ONE call of ``encode_texts``."""
    counts = [len(c) for c in candidates]
    if any(n == 0 for n in counts):
        raise ValueError("every image needs at least one candidate caption")
    flat = [text[:max_chars] for c in candidates for text in c]
    text = l2_normalize(np.asarray(encode_texts(flat), dtype=np.float32), np.float64)
    image = l2_normalize(image, np.float64)
    out, start = [], 0
    for b, n in enumerate(counts):
        scores = text[start:start + n] @ image[b]
        out.append(candidates[b][int(np.argmax(scores))])
        start += n
    return out


# ---------------------------------------------------------------------------------------------
# Settings and the method contract (pipeline/methods/__init__.py)
# ---------------------------------------------------------------------------------------------
# Defaults: the paper's COCO setting (Implementation Details; released code where the paper is silent).
@dataclass(frozen=True, kw_only=True)
class Train:
    n_cr: int = opt(10, "N_cr: noisy copies of the text feature (Eq. 3-4), and sub-regions at inference "
                        "(Eq. 12); 1 = Table 5's 'single token'", check=at_least(1))
    noise_variance: float = opt(0.016, "sigma^2 of Eq. 4 (CapDec's 0.016, a variance); 0 = Table 5's 'w/o noise'",
                                check=non_negative)
    queries: int = opt(32, "N_q: learnable queries = prefix embeddings (released code)", check=at_least(1))
    width: int | None = opt(None, "adaptor width; null = the CLIP dim D (Q in R^{N_q x D}; 512 for ViT-B/32)",
                            check=at_least(1))
    heads: int = opt(8, "attention heads of the adaptor decoder", check=at_least(1))
    layers: int = opt(1, "adaptor decoder layers", check=at_least(1))
    ffn_dim: int = opt(2048, "adaptor FFN width (released: DETR's 2048)", check=at_least(1))
    dropout: float = opt(0.1, "adaptor dropout (released: 0.1)", check=dropout_rate)
    mlp_layers: int = opt(3, "Eq. 8 MLP: linear layers, ReLU between (released: 3)", check=at_least(1))
    language_model: ModelRef = opt(ModelRef(name="facebook/opt-1.3b", pretrained="facebook/opt-1.3b"),
                                   "the causal LM (name, pretrained, seed)")
    freeze_lm: bool = opt(True, "the paper's frozen LM (left out of checkpoints); false also trains the LM")
    vocabulary: Literal["full", "corpus"] = opt("full", "an LM built from configuration predicts over all its "
                                                        "tokenizer's ids (the paper's) | only those the corpus "
                                                        "uses (offline)")
    max_len: int = opt(24, "training caption tokens incl. the end token", check=at_least(1))
    start_token: bool = opt(True, "the LM's start token (OPT's </s>) follows the prefix, in training and "
                                  "decoding: [E, </s>, caption] (released code); false: the prefix plays it")
    epochs: int = opt(8, "passes over the corpus", check=at_least(1))
    batch_size: int = opt(128, "captions per step", check=at_least(1))
    optim: Optim = opt(Optim(name="adamw", lr=4e-4, weight_decay=0.01, schedule="linear", warmup_steps=200,
                             grad_clip=1.0))
    seed: int = opt(0, "seed of the adaptor's weights, the data order and the training noise")

    def __post_init__(self):
        divides("heads", "width")(self)    # width null (= the CLIP dim D) is checked when the model is built


@dataclass(frozen=True, kw_only=True)
class Caption:
    aggregation: Literal["subregion", "cls"] = opt("subregion", "I_cr: sub-region aggregation (Eq. 10-13) | cls "
                                                                "(Table 5's 'CLS token': I_c repeated)")
    attention_softmax: bool = opt(True, "softmax the selected attention rows again, as the released code")
    samples: int = opt(20, "S noisy samples, the CLIP-best kept; 1 = no sampling and filtering", check=at_least(1))
    noise_variance: float = opt(0.016, "sigma^2 of the inference-time noise (applied for S = 1 too)",
                                check=non_negative)
    rerank_chars: int = opt(80, "characters of a candidate the CLIP text encoder sees (released code)",
                            check=at_least(1))
    beam_size: int = opt(4, "beam search width (1 = greedy)", check=at_least(1))
    max_new_tokens: int = opt(16, "longest caption in tokens (released decoding_len)", check=at_least(1))
    seed: int = opt(0, "seed of the inference noise (with the image id)")
    batch_size: int = opt(16, "images per batch (their S candidates are re-ranked in one text-encoder call)",
                          check=at_least(1))
    decode_batch_size: int = opt(64, "noisy samples per LM decoding call", check=at_least(1))


def needs(train: Train, caption: Caption | None = None) -> Needs:
    if caption is None:                                    # text-only training: corpus text features
        return Needs(rows={"feature": "text.text_feature", "text": "corpus.text"},
                     corpus=("text",) if train.vocabulary == "corpus" else ())
    rows = {"id": "image.image_id", "global": "image.global"}
    if caption.aggregation == "subregion":
        rows.update(patches="image.patches", attention="image.attention")
    return Needs(rows=rows, text_encoder=caption.samples > 1)


def facts(train: Train, data: Data) -> dict:
    ref, vocabulary = train.language_model, None
    if train.vocabulary == "corpus":
        vocabulary = corpus_vocabulary(tokenizer_of(ref.name, ref.pretrained), data.corpus["text"])
    return {"feature_dim": data.feature_dim, "vocabulary": vocabulary}


def create(train: Train, facts: dict, data: Data | None = None) -> MacCapCaptioner:
    ref = train.language_model
    lm = load_causal_lm(ref.name, ref.pretrained, seed=ref.seed, device=data.device if data else "cpu",
                        vocabulary=facts.get("vocabulary"))
    torch.manual_seed(train.seed)                          # the adaptor's weights
    cfg = MacCapConfig(feature_dim=facts["feature_dim"], n_cr=train.n_cr, noise_variance=train.noise_variance,
                       queries=train.queries, width=train.width, heads=train.heads, layers=train.layers,
                       ffn_dim=train.ffn_dim, dropout=train.dropout, mlp_layers=train.mlp_layers,
                       freeze_lm=train.freeze_lm, max_len=train.max_len, start_token=train.start_token)
    return MacCapCaptioner(cfg, lm).to(data.device if data else "cpu")


def batch(model: MacCapCaptioner, rows: dict, idx: np.ndarray, train: Train, data: Data, step: Step) -> dict:
    """Rows ``idx``: their unit text features (Eq. 2; the noise of Eq. 4 is drawn in the loss) and tokens."""
    tokens, lengths = to_longest(*model.causal.encode([rows["text"][i] for i in idx], train.max_len))
    return {"feature": torch.from_numpy(l2_normalize(rows["feature"][idx])), "tokens": tokens, "lengths": lengths}


def image_features(rows: dict, idx: np.ndarray, train: Train, caption: Caption) -> torch.Tensor:
    """I_cr [B, N_cr, D] of rows ``idx``: Eq. 10-13, or the CLS token repeated."""
    g = torch.from_numpy(np.ascontiguousarray(rows["global"][idx], dtype=np.float32))
    if caption.aggregation == "cls":
        return cls_features(g, train.n_cr)
    patches = torch.from_numpy(np.ascontiguousarray(rows["patches"][idx], dtype=np.float32))
    attention = torch.from_numpy(np.ascontiguousarray(rows["attention"][idx], dtype=np.float32))
    return subregion_features(g, patches, attention, train.n_cr, caption.attention_softmax)


def caption(model: MacCapCaptioner, rows: dict, idx: np.ndarray, train: Train, caption: Caption,
            data: Data) -> list[str]:
    """I_cr -> S noisy samples per image (seeded by image id) -> beam search -> the CLIP-best (S > 1)."""
    model.eval()
    i_cr = image_features(rows, idx, train, caption)
    S = caption.samples
    memory = torch.cat([noisy_samples(i_cr[b], S, caption.noise_variance, image_generator(caption.seed, rows["id"][i]))
                        for b, i in enumerate(idx)])                       # [B * S, N_cr, D], image-major
    texts = model.generate(memory, caption.beam_size, caption.max_new_tokens, caption.decode_batch_size)
    if S == 1:
        return texts
    if data.text_encoder is None:
        raise ValueError("sampling and filtering needs the CLIP text encoder (Needs.text_encoder)")
    candidates = [texts[b * S:(b + 1) * S] for b in range(len(idx))]
    return rerank(candidates, rows["global"][idx], data.text_encoder, caption.rerank_chars)


def variant(train: Train, caption: Caption | None) -> str:
    """Table 5's row names: "single token w/o noise", ..., "CLS token" / "subregion aggregation",
    "sampling and filtering"; the full method (N_cr > 1, noise, sub-regions, S > 1, frozen LM) is "MacCap"."""
    tokens = f"{'single' if train.n_cr == 1 else 'multiple'} token {'w/' if train.noise_variance > 0 else 'w/o'} noise"
    lm = ("" if train.freeze_lm else ", LM trained") + (", corpus vocabulary" if train.vocabulary == "corpus" else "")
    if caption is None:
        return tokens + lm
    full = train.n_cr > 1 and train.noise_variance > 0 and caption.aggregation == "subregion" and caption.samples > 1
    if full:
        return "MacCap" + lm
    parts = [tokens, "CLS token" if caption.aggregation == "cls" else "subregion aggregation"]
    if caption.samples > 1:
        parts.append(f"sampling and filtering (S={caption.samples})")
    return ", ".join(parts) + lm
