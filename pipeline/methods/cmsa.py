"""CMSA: unpaired image captioning via cross-modal semantic alignment (Yang, Zhou & Ren, Appl. Sci. 2025).

Only the paper's outline survives (../shared/docs/METHODS.md section 5; the seed file keeps its headings
and tables): its equations, architectures and training settings are lost. Every choice below is ours,
made as a reader of the outline would expect, and each names the outline sentence it rests on. Read
top to bottom:

1. Multi-level joint feature (``Generator.prefix``). Outline: "Multi-level joint features: CLIP image
   feature fused with CLIP text features of automatically extracted semantic entities (tags)."
   - Entities (``entities: tags | concepts | both``). "automatically extracted semantic entities (tags)":
     ``tags`` (the default and the paper profile's, since the outline says tags) are the detector labels
     this pipeline already caches for every image (``synthetic_tags.labels`` at training,
     ``image_tags.labels`` at captioning), each represented by the CLIP text feature of its label (the
     tag vocabulary, as SynTIC Eq. 4). ``concepts`` extracts them with CLIP alone: the ``concept_k``
     concepts of the ``concepts`` artifact (frequent corpus nouns, "A photo of {c}") whose text feature
     is closest (cosine) to the image feature, PCM-Net's Eq. 1 (``salient_concepts``); the concept
     vocabulary is copied into the model (a buffer, its words a fact), so captioning needs no concept
     artifact. ``both`` takes the union (tags first, then the K concepts; a word in both appears twice,
     with its two text features). An image with no tag attends to the fusion's "no object" token.
   - I-F, the image feature (``image_feature``): the image's CLIP global feature (L2-normalised),
     mapped to the decoder width by a linear layer: one prefix embedding.
   - T-F, the entity text features (``entity_features``): fused with the image feature by multi-head
     attention with the image feature as the query and the entities' text features as keys and values
     ("CLIP image feature fused with CLIP text features"), i.e. SynTIC's Eq. 5 module
     (``pipeline.nn.fusion.AuxiliaryFusion``, reused, ``fusion_heads`` heads), then a linear layer to the decoder
     width: a second prefix embedding. Without I-F (the ablation "T-F") the prefix is this one
     embedding; the image still selects among the entities as the attention query, since that is how
     "fused" is defined here. The prefix is [I-F, T-F] (or the one that is on): "multi-level" is read
     as the two levels, the global image and the semantic entities, side by side.
2. Generator (``Generator``). Outline: "Generator (captioner)". SynTIC's prefix decoder
   (pipeline/nn/prefix_decoder.py: a causal Transformer trained from scratch on CLIP BPE, Eq. 6's
   4 layers x 4 heads by default) conditioned on the joint-feature prefix; ``vocabulary: corpus``
   predicts only the BPE ids the corpus uses (offline, as SynTIC's), ``full`` all of CLIP's (the paper
   profile). Captions are decoded greedily or by beam search (``caption.beam_size``; not given: 3, as
   SynTIC).
3. Discriminator (``TextClassifier``, ``PretrainedClassifier``). Outline: "discriminator (a text
   classifier telling real corpus captions from generated ones; the paper cites RoBERTa)".
   ``discriminator.model: null`` (offline) is a small Transformer classifier built here: token and
   position embeddings over the generator's own token ids, ``layers`` pre-LN encoder layers, the mean
   of the real tokens' states, a linear logit. A ``discriminator.model`` ref (the paper profile:
   ``roberta-base``, "the paper cites RoBERTa") is a Hugging Face sequence classifier
   (``AutoModelForSequenceClassification``, ``num_labels: 1``: one logit) loaded by id or local
   folder (``load_text_classifier``; the hub is not needed when it is a local folder or cached with
   ``HF_HUB_OFFLINE=1``), and captions are re-tokenised with its own tokenizer (at most
   ``discriminator.max_len`` tokens). Either way real and generated captions reach it in the same form:
   the corpus caption is encoded by the generator's tokenizer and both are read back from those ids
   (``CaptionTokenizer.decode``), so it cannot tell them apart by casing, punctuation or BPE splits the
   generator cannot produce. Its loss is the binary cross-entropy of real (label 1) against generated
   (label 0), the two halves averaged (``discriminator_loss``; "GANs", the other paper it cites).
4. Joint reward (``joint_reward``). Outline: "Joint reward: image-text alignment (CLIP similarity) +
   language fluency (discriminator)". C-R is CLIPScore (Hessel et al. 2021, which the paper cites for it):
   w * max(cos, 0), w = ``clip_reward_scale`` (CLIPScore's 2.5), cos between the CLIP text feature of the
   generated caption (the artifacts' own CLIP text encoder, ``Data.text_encoder``) and the image's CLIP
   feature (the caption as generated, without CLIPScore's "A photo depicts" prefix: the reward reads
   the text the discriminator reads). So C-R spans [0, 2.5] (about 0.75 at a raw cosine of 0.3) beside B-R in [0, 1]: a raw
   cosine would leave the alignment term a third of its cited weight. ``clip_reward_scale: 1`` with a
   non-negative cosine is the raw similarity. B-R = the discriminator's probability that the caption is
   real, sigmoid(logit). R =
   ``clip_reward_weight`` * C-R + ``fluency_reward_weight`` * B-R (not given: 1 and 1). A term is on
   when its switch (``clip_reward``, ``fluency_reward``) is on and its weight is above 0 ("0 switches
   it off"). All texts of a batch (its samples and its greedy baselines) are encoded in ONE call of the
   text encoder, and scored by ONE discriminator forward; the discriminator scores in eval mode (no
   dropout) and no gradient flows through a reward.
5. Progressive optimisation (``phases``; the runner's multi-phase training, pipeline/methods/__init__.py).
   Outline: "Progressive multi-stage optimisation: initialise by maximum likelihood, then reinforcement
   learning (self-critical sequence training, greedy baseline)".
   - ``mle`` (``mle_epochs``, ``optim``, trains the generator: fusion, projections and decoder): the
     caption cross-entropy (Eq. 6 of SynTIC) of the corpus caption given the joint feature of its
     synthetic image and that image's entities: the synthetic pairs are the only pairs there are.
   - ``discriminator`` (``discriminator_epochs``, ``discriminator.optim``, trains the discriminator only;
     only when B-R is used): "initialise" is read as initialising both players, as GAN captioners
     (SeqGAN-style) do: the discriminator learns the corpus captions (real) against captions sampled
     from the MLE generator (fake) before its probability becomes a reward. Not in the outline
     explicitly; ``discriminator_epochs: 0`` skips it.
   - ``rl`` (``rl_epochs``, ``rl_optim``, trains the generator): self-critical sequence training
     (Rennie et al. 2017, cited). Per batch: one caption sampled per image from the generator
     (``decoding.sample``, the model in train mode, keeping the graph), the greedy caption as the
     baseline (the test-time policy: decoded in eval mode without gradient), advantage A = R(sample) -
     R(greedy), loss = -mean_b(A_b * log p(sample_b)) with log p the sum of the sample's token
     log-probabilities (its end token included) (``scst_loss``). Then one discriminator update on the
     batch's corpus captions (real) against the batch's samples (fake), by the discriminator's own
     optimiser: the runner builds one optimiser per phase (the generator's here), so this one is held
     by the method: created by the ``rl`` phase's ``setup`` (``CMSACaptioner.start_adversarial``, with
     ``discriminator.optim`` and its schedule over the phase's steps) and stepped inside
     ``CMSACaptioner.loss`` after the rewards are computed (so a batch is rewarded by the discriminator
     before it has seen that batch's samples). The training report logs per epoch the reward of the
     samples and of the greedy captions, the advantage, each reward term and the discriminator's loss.
   - Rows. Both stages read the synthetic images (their CLIP features and tags), aligned with the
     corpus: the unpaired setting's images. In the RL stage the corpus caption of a row is NOT a target
     (only the rewards teach the generator); it is the "real" text the discriminator sees. An unlabelled
     image folder of the user's own domain would plug in as another row source for the RL stage (its
     images' features and tags, with corpus captions drawn independently as the real texts); it is not
     implemented.
6. Ablation (the paper's table: columns I-F, T-F, C-R, B-R; rows with three of the four, which one each
   drops was lost): the switches ``image_feature``, ``entity_features``, ``clip_reward``,
   ``fluency_reward``; ``variant`` names the components on, "I-F+T-F+C-R+B-R" for the full method (the
   string of pipeline/evaluation/paper_results.yaml). A reward term that is off (or RL off,
   ``rl_epochs: 0``) leaves its name out. Without B-R no discriminator is built at all.
7. Checkpoint: the whole model, i.e. the generator (fusion, projections, decoder), the concept buffer
   (``entities: concepts | both``) and the discriminator, as safetensors (tensors only, loaded without
   unpickling, as the runner saves every model). Captioning needs only the generator; the
   discriminator is kept so that a checkpoint holds both players of the adversarial training it ends.
   The paper profile's RoBERTa is NOT frozen (it trains as the discriminator), so its fine-tuned weights
   are stored too (about 500 MB for roberta-base; a frozen pretrained model would be left out,
   ``frozen_pretrained``). Its architecture is rebuilt from its configuration, recorded in the
   checkpoint's facts, so loading a checkpoint (e.g. to caption) never needs the hub or the folder it was
   trained from; its tokenizer is loaded at training only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import ModelRef, at_least, divides, dropout_rate, non_negative, opt, positive
from pipeline.methods import Data, Needs, Pairs, Phase, Step, pairs_mark, pairs_option
from pipeline.models import weights_sha256
from pipeline.nn import decoding, schedules
from pipeline.nn.fusion import AuxiliaryFusion
from pipeline.nn.prefix_decoder import Decoder, DecoderConfig, PrefixDecoder, caption_loss
from pipeline.nn.schedules import Optim
from pipeline.nn.tokenizer import CaptionTokenizer, to_longest
from pipeline.vectors import l2_normalize


# ---------------------------------------------------------------------------------------------
# 1. Multi-level joint feature
# ---------------------------------------------------------------------------------------------
def salient_concepts(image: torch.Tensor, concepts: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` concepts whose text feature is closest (cosine) to each image feature, most similar first
    (PCM-Net Eq. 1): image [B, D], concepts [N_c, D] -> their unit text features [B, min(k, N_c), D]."""
    c = F.normalize(concepts, dim=-1)
    top = (F.normalize(image, dim=-1) @ c.T).topk(min(k, c.shape[0]), dim=-1).indices
    return c[top]


def entity_set(image: torch.Tensor, tag_feats: torch.Tensor | None, tag_mask: torch.Tensor | None,
               concepts: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The entities of each image: its tags' text features (padded, ``tag_mask`` True = a real tag),
    then its ``k`` salient concepts when ``concepts`` is given -> (feats [B, M, D], mask [B, M])."""
    parts, masks = [], []
    if tag_feats is not None:
        parts.append(tag_feats)
        masks.append(tag_mask.bool())
    if concepts is not None:
        salient = salient_concepts(image, concepts, k).to(image.dtype)
        parts.append(salient)
        masks.append(torch.ones(salient.shape[:2], dtype=torch.bool, device=image.device))
    if not parts:
        raise ValueError("the entity features need tags or concepts")
    return torch.cat(parts, dim=1), torch.cat(masks, dim=1)


class Generator(nn.Module):
    """The captioner: joint feature -> prefix [I-F, T-F] at the decoder width -> PrefixDecoder."""

    def __init__(self, feature_dim: int, decoder: DecoderConfig, image_feature: bool = True,
                 entity_features: bool = True, fusion_heads: int = 4):
        super().__init__()
        if not (image_feature or entity_features):
            raise ValueError("the joint feature needs the image feature (I-F), the entity features (T-F) or both")
        self.image_feature, self.entity_features = image_feature, entity_features
        width = decoder.width
        if image_feature:
            self.v_proj = nn.Linear(feature_dim, width)                  # I-F
        if entity_features:
            self.fusion = AuxiliaryFusion(feature_dim, fusion_heads)      # T-F: MHAttn(image, entities, entities)
            self.u_proj = nn.Linear(feature_dim, width)
        self.decoder = PrefixDecoder(replace(decoder, prefix_len=int(image_feature) + int(entity_features)))

    def prefix(self, image: torch.Tensor, entity_feats: torch.Tensor | None = None,
               entity_mask: torch.Tensor | None = None) -> torch.Tensor:
        """image [B, D] (unit), entities [B, M, D] with mask [B, M] -> prefix [B, P, W], P = I-F + T-F."""
        parts = []
        if self.image_feature:
            parts.append(self.v_proj(image))
        if self.entity_features:
            if entity_feats is None:
                raise ValueError("T-F is on: the generator needs the entities' text features")
            parts.append(self.u_proj(self.fusion(image, entity_feats, entity_mask)))
        return torch.stack(parts, dim=1)


# ---------------------------------------------------------------------------------------------
# 3. Discriminators
# ---------------------------------------------------------------------------------------------
def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy: real captions labelled 1, generated ones 0, the mean of the two halves."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return 0.5 * (real + fake)


def id_tokens(ids: list[list[int]], sot: int, eot: int, pad: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption ids (after the start token, without the end token) in CaptionTokenizer.encode's layout:
    [sot, ids[:max_len - 2], eot], 0-padded to max_len -> tokens [N, max_len], lengths [N]."""
    tokens = torch.full((len(ids), max_len), pad, dtype=torch.long)
    lengths = torch.empty(len(ids), dtype=torch.long)
    for b, row in enumerate(ids):
        seq = [sot] + list(row)[: max_len - 2] + [eot]
        tokens[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        lengths[b] = len(seq)
    return tokens, lengths


class TextClassifier(nn.Module):
    """The small discriminator: embeddings of the generator's token ids + positions, pre-LN Transformer
    encoder layers, the mean of the real tokens' states, one logit ("real")."""

    def __init__(self, vocab_size: int, max_len: int, sot: int, eot: int, pad: int, width: int = 128,
                 layers: int = 2, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.max_len, self.sot, self.eot, self.pad = max_len, sot, eot, pad
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(max_len, width)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, batch_first=True,
                                                               norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens [N, T] (CaptionTokenizer layout), lengths [N] -> logits [N]."""
        T = tokens.shape[1]
        valid = torch.arange(T, device=tokens.device)[None, :] < lengths.to(tokens.device)[:, None]
        x = self.embed(tokens) + self.pos(torch.arange(T, device=tokens.device))[None]
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=~valid)
        x = self.norm(x) * valid[..., None]
        pooled = x.sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
        return self.head(pooled)[:, 0]

    def score(self, ids: list[list[int]]) -> torch.Tensor:
        """Logits of captions given as generator ids (after the start token, without the end token)."""
        tokens, lengths = id_tokens(ids, self.sot, self.eot, self.pad, self.max_len)
        device = self.head.weight.device
        return self(tokens.to(device), lengths.to(device))


class PretrainedClassifier(nn.Module):
    """A Hugging Face sequence classifier (one logit) as the discriminator: generator ids are decoded to
    text by the generator's tokenizer and re-tokenised with the classifier's own tokenizer. ``self.model``
    (the transformers model) is a registered submodule: trained and saved with the rest."""

    def __init__(self, model: nn.Module, tokenizer, caption_tokenizer: CaptionTokenizer, max_len: int):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer                  # None when rebuilt to load a checkpoint (captioning)
        self.caption_tokenizer = caption_tokenizer
        self.max_len = max_len

    def score(self, ids: list[list[int]]) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("this discriminator was rebuilt from its configuration to load a checkpoint: it has "
                             "no tokenizer (it is only needed at training)")
        texts = [self.caption_tokenizer.decode(row) for row in ids]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        device = next(self.model.parameters()).device
        return self.model(**{k: v.to(device) for k, v in enc.items()}).logits[:, 0].float()


TEXT_CLASSIFIER = "text_classifier"


def load_text_classifier(name: str, pretrained: str, device: str = "cpu"):
    """A pretrained sequence classifier with ONE output (``num_labels=1``: a new head is initialised from
    torch's generator when the checkpoint has none, e.g. roberta-base, or one of another size, e.g. a
    2-label classifier) and its tokenizer, from a Hugging Face id or a local folder -> (model in eval
    mode, tokenizer, identity)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(pretrained)
        model = AutoModelForSequenceClassification.from_pretrained(pretrained, num_labels=1,
                                                                   ignore_mismatched_sizes=True)
    except Exception as err:   # unknown id, missing folder, no network and no cache: say which and how
        raise RuntimeError(
            f"could not load the {TEXT_CLASSIFIER} model {name!r} (pretrained={pretrained!r}): {err}\n"
            f"Provide it by one of: a local folder in params.yaml (methods.NAME.train.discriminator.model."
            f"pretrained, a folder written by save_pretrained with its tokenizer), a Hugging Face cache that "
            f"already holds it (with HF_HUB_OFFLINE=1), or network access to the hub. The offline profile uses "
            f"the small discriminator built here instead (discriminator.model: null).") from err
    model = model.to(device).eval()
    identity = {"kind": TEXT_CLASSIFIER, "name": name, "pretrained": str(pretrained),
                "weights_sha256": weights_sha256(model), "model_class": type(model).__name__,
                "tokenizer": type(tokenizer).__name__}
    return model, tokenizer, identity


def classifier_config(name: str, pretrained: str) -> dict:
    """The configuration of the pretrained classifier with one output, as JSON (a fact of the checkpoint)."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(pretrained, num_labels=1)
    except Exception as err:
        raise RuntimeError(f"could not load the configuration of the {TEXT_CLASSIFIER} model {name!r} "
                           f"(pretrained={pretrained!r}): {err}") from err
    return json.loads(config.to_json_string())


def classifier_from_config(config: dict) -> nn.Module:
    """The classifier's architecture from its recorded configuration (weights from torch's generator;
    a checkpoint then overwrites them): loading a checkpoint needs neither the hub nor the folder."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    spec = {k: v for k, v in config.items() if k != "transformers_version"}
    return AutoModelForSequenceClassification.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))


# ---------------------------------------------------------------------------------------------
# 4. Joint reward, 5. SCST
# ---------------------------------------------------------------------------------------------
def joint_reward(text_feats: torch.Tensor | None, image_feats: torch.Tensor | None, real_prob: torch.Tensor | None,
                 clip_weight: float, fluency_weight: float, clip_scale: float = 2.5
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """R = clip_weight * C-R + fluency_weight * B-R, C-R = CLIPScore = clip_scale * max(cos(text, image), 0),
    B-R = P(real). A term with weight 0 (or None inputs) is left out. -> (R [N], {"clip": C-R [N],
    "fluency": B-R [N]} of the terms that are on)."""
    terms, total = {}, None
    if clip_weight > 0:
        cosine = (F.normalize(text_feats.float(), dim=-1) * F.normalize(image_feats.float(), dim=-1)).sum(-1)
        terms["clip"] = clip_scale * cosine.clamp(min=0)
        total = clip_weight * terms["clip"]
    if fluency_weight > 0:
        terms["fluency"] = real_prob.float()
        total = fluency_weight * terms["fluency"] if total is None else total + fluency_weight * terms["fluency"]
    if total is None:
        raise ValueError("the joint reward needs at least one term (C-R or B-R) with a weight above 0")
    return total, terms


def scst_loss(sample_logp: torch.Tensor, sample_reward: torch.Tensor, greedy_reward: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-critical sequence training: A = R(sample) - R(greedy) (no gradient), loss =
    -mean_b(A_b * log p(sample_b)), log p = the sum of the sample's token log-probs ``sample_logp``
    [B, T] (0 after its end token). -> (loss, advantage [B])."""
    advantage = (sample_reward - greedy_reward).detach().to(sample_logp.dtype)
    return -(advantage * sample_logp.sum(dim=1)).mean(), advantage


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
@dataclass
class CMSAConfig:
    feature_dim: int = 512
    decoder: DecoderConfig = None
    image_feature: bool = True
    entity_features: bool = True
    fusion_heads: int = 4
    use_tags: bool = True
    use_concepts: bool = False
    concept_k: int = 5
    num_concepts: int = 0
    clip_weight: float = 1.0          # 0: C-R off
    clip_scale: float = 2.5           # CLIPScore's w: C-R = w * max(cos, 0)
    fluency_weight: float = 1.0       # 0: B-R off (no discriminator)


class CMSACaptioner(nn.Module):
    """``generator`` (fusion, projections, prefix decoder) and ``discriminator`` (or None without B-R);
    ``loss(batch)`` is the phase's loss (``batch["phase"]``: mle | discriminator | rl)."""

    def __init__(self, cfg: CMSAConfig, tokenizer: CaptionTokenizer, discriminator: nn.Module | None = None,
                 concepts: torch.Tensor | None = None):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        if tokenizer.vocab_size != cfg.decoder.vocab_size:
            raise ValueError(f"decoder vocab_size {cfg.decoder.vocab_size} != tokenizer's {tokenizer.vocab_size}")
        self.generator = Generator(cfg.feature_dim, cfg.decoder, cfg.image_feature, cfg.entity_features,
                                   cfg.fusion_heads)
        self.width = cfg.decoder.width
        if (cfg.fluency_weight > 0) != (discriminator is not None):
            raise ValueError("a discriminator is built exactly when the fluency reward (B-R) is on")
        self.discriminator = discriminator
        if cfg.use_concepts:
            feats = torch.zeros(cfg.num_concepts, cfg.feature_dim) if concepts is None else concepts.float().clone()
            if tuple(feats.shape) != (cfg.num_concepts, cfg.feature_dim) or cfg.num_concepts == 0:
                raise ValueError(f"concept features {tuple(feats.shape)} != ({cfg.num_concepts}, {cfg.feature_dim}), "
                                 f"at least one concept")
            self.register_buffer("concepts", feats)
        self.text_encoder = None              # texts -> unit CLIP features (numpy), handed at training (C-R)
        self.discriminator_optimizer = None   # (optimizer, scheduler), created by the rl phase's setup

    @property
    def device(self) -> torch.device:
        return self.generator.decoder.tok_emb.weight.device

    # ---- the joint feature and decoding -------------------------------------------------------
    def prefix(self, batch: dict) -> torch.Tensor:
        dev = self.device
        image = batch["image"].to(dev)
        feats = mask = None
        if self.cfg.entity_features:
            tags = (batch["tag_feats"].to(dev), batch["tag_mask"].to(dev)) if self.cfg.use_tags else (None, None)
            feats, mask = entity_set(image, *tags, self.concepts if self.cfg.use_concepts else None, self.cfg.concept_k)
        return self.generator.prefix(image, feats, mask)

    def _sample(self, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.tokenizer
        return decoding.sample(self.generator.decoder, prefix, t.sot_id, t.eot_id, self.cfg.decoder.max_len)

    def _greedy(self, prefix: torch.Tensor) -> list[list[int]]:
        t, decoder = self.tokenizer, self.generator.decoder
        was = decoder.training
        decoder.eval()                                     # the test-time policy: no dropout
        try:
            return decoding.greedy(decoder, prefix.detach(), t.sot_id, t.eot_id, self.cfg.decoder.max_len)
        finally:
            decoder.train(was)

    @torch.no_grad()
    def generate(self, batch: dict, beam_size: int = 3, max_len: int | None = None) -> list[str]:
        return decoding.captions(self.generator.decoder, self.prefix(batch), self.tokenizer,
                                 self.cfg.decoder.max_len, max_len, beam_size)

    # ---- rewards ------------------------------------------------------------------------------
    @torch.no_grad()
    def real_probability(self, ids: list[list[int]]) -> torch.Tensor:
        """B-R: the discriminator's P(real) of captions given as generator ids (eval mode, no gradient)."""
        was = self.discriminator.training
        self.discriminator.eval()
        try:
            return torch.sigmoid(self.discriminator.score(ids).float())
        finally:
            self.discriminator.train(was)

    @torch.no_grad()
    def reward(self, ids: list[list[int]], image: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The joint reward of captions ``ids`` (generator ids) for the images ``image`` [N, D]: ONE call of
        the CLIP text encoder and ONE discriminator forward for all of them."""
        text = prob = None
        if self.cfg.clip_weight > 0:
            if self.text_encoder is None:
                raise ValueError("the CLIP reward needs the CLIP text encoder (Needs.text_encoder)")
            texts = [self.tokenizer.decode(row) for row in ids]
            text = torch.from_numpy(np.asarray(self.text_encoder(texts), dtype=np.float32)).to(image.device)
        if self.cfg.fluency_weight > 0:
            prob = self.real_probability(ids).to(image.device)
        return joint_reward(text, image, prob, self.cfg.clip_weight, self.cfg.fluency_weight, self.cfg.clip_scale)

    # ---- the losses of the three phases ---------------------------------------------------------
    def loss(self, batch: dict):
        phase = batch.get("phase", "mle")
        if phase == "mle":
            return self.mle_loss(batch)
        if phase == "discriminator":
            return self.discriminator_phase_loss(batch)
        if phase == "rl":
            return self.rl_loss(batch)
        raise ValueError(f"unknown CMSA training phase {phase!r} (mle | discriminator | rl)")

    def mle_loss(self, batch: dict) -> torch.Tensor:
        """Stage 1: the corpus caption's cross-entropy given its synthetic image's joint feature."""
        dev = self.device
        tokens, lengths = batch["tokens"].to(dev), batch["lengths"].to(dev)
        return caption_loss(self.generator.decoder(self.prefix(batch), tokens), tokens, lengths)

    def _real_ids(self, batch: dict) -> list[list[int]]:
        return decoding.ids_of(batch["tokens"], self.tokenizer.eot_id)

    def discriminator_phase_loss(self, batch: dict):
        """The discriminator's initialisation: corpus captions (real) against samples of the generator (fake)."""
        if self.discriminator is None:
            raise ValueError("the discriminator phase needs a discriminator (the fluency reward B-R is off)")
        with torch.no_grad():
            tokens, _ = self._sample(self.prefix(batch))
        fake = decoding.ids_of(tokens, self.tokenizer.eot_id)
        real_logits, fake_logits = self.discriminator.score(self._real_ids(batch)), self.discriminator.score(fake)
        loss = discriminator_loss(real_logits, fake_logits)
        return loss, {"real_prob_real": torch.sigmoid(real_logits).mean().item(),
                      "real_prob_generated": torch.sigmoid(fake_logits).mean().item()}

    def start_adversarial(self, optim: Optim, total_steps: int) -> None:
        """The rl phase's setup: the discriminator's own optimiser (and schedule over the phase's steps)."""
        if self.discriminator is not None:
            self.discriminator_optimizer = schedules.build(self.discriminator, optim, total_steps=total_steps)
            self._discriminator_clip = (optim.grad_clip, optim.grad_clip_value)

    def update_discriminator(self, real_ids: list[list[int]], fake_ids: list[list[int]]) -> float:
        """One step of the discriminator on real vs generated captions, by its own optimiser."""
        if self.discriminator_optimizer is None:
            raise ValueError("the discriminator has no optimiser: the rl phase's setup creates it")
        optimizer, scheduler = self.discriminator_optimizer
        loss = discriminator_loss(self.discriminator.score(real_ids), self.discriminator.score(fake_ids))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_norm, clip_value = self._discriminator_clip
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(self.discriminator.parameters(), clip_value)
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(), clip_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)      # leave no gradient behind for the generator's step
        return loss.item()

    def rl_loss(self, batch: dict):
        """Stage 2, SCST: sample, greedy baseline, joint rewards (one encoder call), advantage, policy
        gradient; then one discriminator update on the batch's corpus captions vs its samples."""
        prefix = self.prefix(batch)
        tokens, logp = self._sample(prefix)                          # keeps the graph
        eot = self.tokenizer.eot_id
        samples, greedy = decoding.ids_of(tokens, eot), self._greedy(prefix)
        B = len(samples)
        image = batch["image"].to(self.device)
        reward, terms = self.reward(samples + greedy, torch.cat([image, image]))
        loss, advantage = scst_loss(logp, reward[:B], reward[B:])
        logs = {"reward": reward[:B].mean().item(), "reward_greedy": reward[B:].mean().item(),
                "advantage": advantage.mean().item(), "sample_tokens": float(np.mean([len(s) for s in samples]))}
        logs.update({f"{name}_reward": value[:B].mean().item() for name, value in terms.items()})
        if self.discriminator is not None:
            logs["discriminator_loss"] = self.update_discriminator(self._real_ids(batch), samples)
        return loss, logs


# ---------------------------------------------------------------------------------------------
# Settings and the method contract (pipeline/methods/__init__.py)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Discriminator:
    model: ModelRef | None = opt(None, "null: the small Transformer classifier built here over the generator's "
                                       "tokens; a Hugging Face sequence classifier by id or local folder (the paper "
                                       "profile: roberta-base), one logit, its own tokenizer")
    width: int = opt(128, "the small classifier's width", check=at_least(1))
    layers: int = opt(2, "the small classifier's encoder layers", check=at_least(1))
    heads: int = opt(4, "the small classifier's attention heads", check=at_least(1))
    dropout: float = opt(0.1, "the small classifier's dropout", check=dropout_rate)
    max_len: int = opt(64, "longest caption in the pretrained classifier's own tokens", check=at_least(2))
    optim: Optim = opt(Optim(name="adam", lr=1e-4, grad_clip=1.0),
                       "its optimiser (the discriminator phase's, and its own one in the rl phase)")


@dataclass(frozen=True, kw_only=True)
class Train:
    entities: Literal["tags", "concepts", "both"] = opt("tags", "semantic entities: the detector's tags | the "
                                                                "top-K corpus concepts by CLIP cosine | both")
    concept_k: int = opt(5, "K salient concepts per image (entities: concepts | both)", check=at_least(1))
    image_feature: bool = opt(True, "ablation I-F: the image feature in the prefix")
    entity_features: bool = opt(True, "ablation T-F: the entities' text features fused with the image feature")
    clip_reward: bool = opt(True, "ablation C-R: the CLIP image-text similarity reward")
    fluency_reward: bool = opt(True, "ablation B-R: the discriminator's fluency reward")
    clip_reward_weight: float = opt(1.0, "weight of C-R (0 switches it off)", check=non_negative)
    clip_reward_scale: float = opt(2.5, "w of C-R = CLIPScore = w * max(cos, 0) (Hessel et al. 2021, cited by the "
                                        "paper; 2.5 is CLIPScore's)", check=positive)
    fluency_reward_weight: float = opt(1.0, "weight of B-R (0 switches it off)", check=non_negative)
    fusion_heads: int = opt(4, "heads of the image-entity attention (SynTIC's Eq. 5 module)", check=at_least(1))
    vocabulary: Literal["full", "corpus"] = opt("full", "generator output over all of CLIP's BPE | the BPE ids the "
                                                        "corpus uses (fast on CPU)")
    decoder: Decoder = opt(Decoder(), "the generator's prefix decoder")
    discriminator: Discriminator = opt(Discriminator())
    mle_epochs: int = opt(10, "stage 1: epochs of caption cross-entropy on the synthetic pairs", check=at_least(1))
    discriminator_epochs: int = opt(1, "epochs of the discriminator alone on corpus vs sampled captions before RL "
                                       "(with B-R and RL only; 0 = none)", check=at_least(0))
    rl_epochs: int = opt(5, "stage 2: epochs of self-critical sequence training (0 = MLE only)", check=at_least(0))
    batch_size: int = opt(64, "images (and corpus captions) per step", check=at_least(1))
    optim: Optim = opt(Optim(name="adam", lr=1e-4, warmup_steps=1000, grad_clip=1.0), "stage 1's optimiser")
    rl_optim: Optim = opt(Optim(name="adam", lr=1e-5, grad_clip=1.0), "stage 2's optimiser (the generator's)")
    seed: int = opt(0, "seed of the weights, the data order, dropout and the sampled captions")
    pairs: Pairs = pairs_option()

    def __post_init__(self):
        if not (self.image_feature or self.entity_features):
            raise ValueError("the joint feature needs image_feature (I-F), entity_features (T-F) or both")
        if self.rl_epochs > 0 and not (uses_clip_reward(self) or uses_fluency_reward(self)):
            raise ValueError("reinforcement learning needs a reward: switch on clip_reward (C-R) or fluency_reward "
                             "(B-R) with a weight above 0, or set rl_epochs: 0 (MLE only)")

    @property
    def epochs(self) -> int:
        """Every phase's epochs (the runner reads ``phases``)."""
        return sum(p.epochs for p in phases(self))


@dataclass(frozen=True, kw_only=True)
class Caption:
    beam_size: int = opt(3, "beam search width (1 = greedy; not given in the paper: SynTIC's 3)", check=at_least(1))
    max_len: int | None = opt(None, "longest caption in tokens (null = as trained)", check=at_least(2))
    batch_size: int = opt(64, "images per decoding batch", check=at_least(1))


def uses_clip_reward(train: Train) -> bool:
    return train.clip_reward and train.clip_reward_weight > 0


def uses_fluency_reward(train: Train) -> bool:
    return train.fluency_reward and train.fluency_reward_weight > 0


def uses_tags(train: Train) -> bool:
    return train.entity_features and train.entities in ("tags", "both")


def uses_concepts(train: Train) -> bool:
    return train.entity_features and train.entities in ("concepts", "both")


def has_discriminator(train: Train) -> bool:
    return uses_fluency_reward(train) and train.rl_epochs > 0


def phases(train: Train) -> list[Phase]:
    """MLE (the generator), the discriminator's initialisation (with B-R), SCST (the generator; its setup
    creates the discriminator's own optimiser). Phases of 0 epochs are skipped by the runner."""
    out = [Phase("mle", train.mle_epochs, train.optim, ("generator",))]
    if has_discriminator(train):
        out.append(Phase("discriminator", train.discriminator_epochs, train.discriminator.optim, ("discriminator",)))
    out.append(Phase("rl", train.rl_epochs, train.rl_optim, ("generator",),
                     setup=lambda model, total: model.start_adversarial(train.discriminator.optim, total)))
    return out


def needs(train: Train, caption: Caption | None = None) -> Needs:
    tags = uses_tags(train)
    if caption is None:                                 # training: the synthetic images, aligned with the corpus
        rows = {"image": "synthetic.global", "text": "corpus.text"}
        if tags:
            rows["tags"] = "synthetic_tags.labels"
        return Needs(rows=rows, corpus=("text",) if train.vocabulary == "corpus" else (), tag_vocabulary=tags,
                     concepts=uses_concepts(train), text_encoder=uses_clip_reward(train) and train.rl_epochs > 0,
                     pairs=train.pairs)
    rows = {"image": "image.global"}                    # captioning: the real images
    if tags:
        rows["tags"] = "image_tags.labels"
    return Needs(rows=rows, tag_vocabulary=tags)


def facts(train: Train, data: Data) -> dict:
    """The CLIP dim, the generator's output ids (None: all of CLIP's BPE), the concept words (entities:
    concepts | both) and the pretrained discriminator's configuration (to rebuild it without the hub)."""
    tokenizer = CaptionTokenizer.for_corpus(train.vocabulary, data.corpus.get("text", ()))
    out = {"feature_dim": data.feature_dim, "vocabulary": tokenizer.vocabulary}
    if uses_concepts(train):
        out["concepts"] = list(data.concepts[0])
    ref = train.discriminator.model
    if has_discriminator(train) and ref is not None:
        out["discriminator_config"] = classifier_config(ref.name, ref.pretrained)
    return out


def _discriminator(train: Train, facts: dict, tokenizer: CaptionTokenizer, data: Data | None) -> nn.Module | None:
    if not has_discriminator(train):
        return None
    d = train.discriminator
    if d.model is None:
        return TextClassifier(tokenizer.vocab_size, train.decoder.max_len, tokenizer.sot_id, tokenizer.eot_id,
                              tokenizer.pad_id, d.width, d.layers, d.heads, d.dropout)
    if d.model.pretrained is None:
        raise ValueError(f"discriminator.model {d.model.name!r} needs `pretrained` (a Hugging Face id or local "
                         f"folder); `discriminator.model: null` is the small classifier built here")
    if data is None:                                    # loading a checkpoint: the architecture, its weights follow
        return PretrainedClassifier(classifier_from_config(facts["discriminator_config"]), None, tokenizer, d.max_len)
    model, hf_tokenizer, _ = load_text_classifier(d.model.name, d.model.pretrained, data.device)
    return PretrainedClassifier(model, hf_tokenizer, tokenizer, d.max_len)


def create(train: Train, facts: dict, data: Data | None = None) -> CMSACaptioner:
    tokenizer = CaptionTokenizer(facts["vocabulary"])
    d = train.decoder
    config = CMSAConfig(
        feature_dim=facts["feature_dim"], image_feature=train.image_feature, entity_features=train.entity_features,
        decoder=DecoderConfig(vocab_size=tokenizer.vocab_size, width=d.width, layers=d.layers, heads=d.heads,
                              max_len=d.max_len, dropout=d.dropout),
        fusion_heads=train.fusion_heads, use_tags=uses_tags(train), use_concepts=uses_concepts(train),
        concept_k=train.concept_k, num_concepts=len(facts.get("concepts", ())),
        clip_weight=train.clip_reward_weight if uses_clip_reward(train) and train.rl_epochs > 0 else 0.0,
        clip_scale=train.clip_reward_scale,
        fluency_weight=train.fluency_reward_weight if has_discriminator(train) else 0.0)
    torch.manual_seed(train.seed)                       # the generator's and the small discriminator's weights
    discriminator = _discriminator(train, facts, tokenizer, data)
    concepts = torch.from_numpy(np.asarray(data.concepts[1], np.float32)) if data is not None and config.use_concepts \
        else None
    model = CMSACaptioner(config, tokenizer, discriminator, concepts)
    if data is not None:
        model.text_encoder = data.text_encoder
    return model.to(data.device if data is not None else "cpu")


def _features(rows: dict, idx: np.ndarray, train: Train, data: Data) -> dict:
    out = {"image": torch.from_numpy(l2_normalize(rows["image"][idx]).astype(np.float32))}
    if uses_tags(train):
        tag_feats, tag_mask = data.tag_vocabulary.batch([rows["tags"][i] for i in idx])
        out.update(tag_feats=torch.from_numpy(tag_feats), tag_mask=torch.from_numpy(tag_mask))
    return out


def batch(model: CMSACaptioner, rows: dict, idx: np.ndarray, train: Train, data: Data, step: Step) -> dict:
    """Rows ``idx``: the synthetic images' features and entities, the corpus captions' tokens, the phase."""
    tokens, lengths = to_longest(*model.tokenizer.encode([rows["text"][i] for i in idx], train.decoder.max_len))
    return {**_features(rows, idx, train, data), "tokens": tokens, "lengths": lengths,
            "phase": step.phase or "mle"}


def caption(model: CMSACaptioner, rows: dict, idx: np.ndarray, train: Train, caption: Caption,
            data: Data) -> list[str]:
    return model.generate(_features(rows, idx, train, data), caption.beam_size, caption.max_len)


def variant(train: Train, caption: Caption | None) -> str:
    """The ablation row: the components on, "I-F+T-F+C-R+B-R" for the full method. A reward is on when its
    switch is on, its weight is above 0 and there is an RL stage."""
    rl = train.rl_epochs > 0
    on = [("I-F", train.image_feature), ("T-F", train.entity_features),
          ("C-R", rl and uses_clip_reward(train)), ("B-R", rl and uses_fluency_reward(train))]
    return "+".join(name for name, flag in on if flag) + pairs_mark(train.pairs)
