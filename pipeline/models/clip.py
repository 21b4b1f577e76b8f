"""Frozen CLIP through open_clip: global image features, projected patch tokens, attention, text features.

Per image (MacCap Eq. 10-13 and PCM-Net Eq. 2 need more than the global feature), the columns of
``IMAGE_COLUMNS``; ``encode_pixels(pixels, columns)`` computes only those asked for:
- ``global``: the projected CLS token, L2-normalised (D = embed_dim).
- ``patches``: the last layer's patch tokens mapped by CLIP's own head (``ln_post`` then ``proj``) into
  the joint space, NOT normalised (N_p x D).
- ``grid``: the same patch tokens raw, the last layer's output before ``ln_post`` and ``proj``, in the
  vision tower's width W (N_p x W; 49 x 768 for ViT-B/32): PCM-Net's encoder input as released.
- ``cls_attention``: the last block's attention of the CLS token over the patches, averaged over
  heads (N_p).
- ``attention``: the last block's whole attention map over the N_p + 1 tokens (CLS first), averaged
  over heads ((N_p + 1) x (N_p + 1); row i is token i's attention, each row sums to 1). Its row 0
  holds ``cls_attention`` (columns 1..N_p) and the CLS token's attention to itself (column 0).
Both attention columns come from one extra pass of the last block's attention over its captured
input; when neither is asked for, that pass is skipped. A ResNet CLIP has no transformer tower: its
columns come from its attention pool (``_resnet_columns``: the cells of the pool's input grid are the
patches, and that grid, C channels a cell, is ``grid``).
Per text: the projected EOT feature, L2-normalised (``encode_texts``: batches of similar length, each
run up to its longest text).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import open_clip
import torch
from PIL import Image

from pipeline.config import IMAGE_COLUMNS
from pipeline.models import CONFIG_DIR, missing_model_error, weights_sha256
from pipeline.vectors import l2_normalize_torch

open_clip.add_model_config(CONFIG_DIR)



@dataclass
class ClipEncoder:
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    identity: dict
    device: str = "cpu"

    @property
    def dim(self) -> int:
        return int(self.identity["embed_dim"])

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, columns: Sequence[str] = IMAGE_COLUMNS) -> dict[str, np.ndarray]:
        """Preprocessed images [B,3,H,W] -> the ``columns`` asked for (module docstring): global [B,D],
        patches [B,Np,D], grid [B,Np,W], cls_attention [B,Np], attention [B,Np+1,Np+1]."""
        unknown = [c for c in columns if c not in IMAGE_COLUMNS]
        if unknown:
            raise ValueError(f"unknown image feature column(s) {unknown} (known: {', '.join(IMAGE_COLUMNS)})")
        visual = self.model.visual
        if hasattr(visual, "attnpool"):          # a ResNet CLIP (RN50, RN50x4, ...): no transformer tower
            return _resnet_columns(visual, pixels.to(self.device, self._dtype), columns)
        last_block = visual.transformer.resblocks[-1]
        want_attention = "cls_attention" in columns or "attention" in columns
        captured: dict[str, torch.Tensor] = {}
        hooks = []
        if want_attention:       # the last block's input
            hooks.append(last_block.register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0])))
        if "grid" in columns:    # the last block's output: the tokens before ln_post
            hooks.append(last_block.register_forward_hook(lambda _m, _args, out: captured.__setitem__("out", out)))
        previous, visual.output_tokens = visual.output_tokens, True
        try:
            pooled, tokens = visual(pixels.to(self.device, self._dtype))
        finally:
            visual.output_tokens = previous
            for hook in hooks:
                hook.remove()
        out: dict[str, np.ndarray] = {}
        if "global" in columns:
            out["global"] = l2_normalize_torch(pooled).float().cpu().numpy()
        if "patches" in columns:
            patches = tokens @ visual.proj if visual.proj is not None else tokens  # ln_post already applied
            out["patches"] = patches.float().cpu().numpy()
        if "grid" in columns:
            out["grid"] = captured["out"][:, -tokens.shape[1]:].float().cpu().numpy()     # CLS dropped
        if want_attention:     # one pass: the last block's attention over its own input, heads averaged
            x = last_block.ln_1(captured["x"])
            _, attention = last_block.attn(x, x, x, need_weights=True, average_attn_weights=True)
            if "cls_attention" in columns:
                out["cls_attention"] = attention[:, 0, 1:].float().cpu().numpy()
            if "attention" in columns:
                out["attention"] = attention.float().cpu().numpy()
        return {c: out[c] for c in columns}

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> L2-normalised features [N,D], encoded ``batch_size`` at a time. Texts of similar token
        length share a batch, and a batch runs only up to its longest text (``encode_tokens``)."""
        out = np.zeros((len(texts), self.dim), np.float32)
        if not len(texts):
            return out
        tokens = self.tokenizer(list(texts))
        order = torch.argsort(tokens.argmax(dim=-1), stable=True).numpy()   # by position of the end token
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            features = self._encode_tokens(tokens[rows].to(self.device))
            out[rows] = l2_normalize_torch(features).float().cpu().numpy()
        return out

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return encode_tokens(self.model, tokens)

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def _resnet_columns(visual: torch.nn.Module, pixels: torch.Tensor, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """The image columns of a ResNet CLIP, from its attention pool (``visual.attnpool``, whose query is the
    mean of the last grid, prepended as token 0): ``global`` is the pool's output; the grid cells are the
    patches, each its value through the pool's output projection (``c_proj(v_proj(token))``, what the pool
    mixes into ``global``); ``grid`` is the cells themselves (the pool's input, C channels, before its
    positional embedding); ``attention`` is the pool's attention over the mean token and the cells, heads
    averaged, and ``cls_attention`` the mean token's row over the cells."""
    captured: dict[str, torch.Tensor] = {}
    hook = visual.attnpool.register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0]))
    try:
        pooled = visual(pixels)
    finally:
        hook.remove()
    pool, cells = visual.attnpool, captured["x"].flatten(2).permute(0, 2, 1)     # [B, N, C]
    tokens = torch.cat([cells.mean(dim=1, keepdim=True), cells], dim=1) + pool.positional_embedding.to(cells.dtype)
    out: dict[str, np.ndarray] = {}
    if "grid" in columns:
        out["grid"] = cells.float().cpu().numpy()
    if "global" in columns:
        out["global"] = l2_normalize_torch(pooled).float().cpu().numpy()
    if "patches" in columns:
        out["patches"] = pool.c_proj(pool.v_proj(tokens[:, 1:])).float().cpu().numpy()
    if "cls_attention" in columns or "attention" in columns:
        b, n, c = tokens.shape
        heads = pool.num_heads
        q = pool.q_proj(tokens).view(b, n, heads, c // heads).transpose(1, 2)
        k = pool.k_proj(tokens).view(b, n, heads, c // heads).transpose(1, 2)
        attention = torch.softmax(q @ k.transpose(-1, -2) / (c // heads) ** 0.5, dim=-1).mean(dim=1)
        if "cls_attention" in columns:
            out["cls_attention"] = attention[:, 0, 1:].float().cpu().numpy()
        if "attention" in columns:
            out["attention"] = attention.float().cpu().numpy()
    return {c: out[c] for c in columns}


def encode_tokens(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` (not normalised); for open_clip's CLIP (causal text tower, feature
    read at the end token, the highest token id), on the columns up to the batch's last end token only: a
    causal mask keeps later (padding) positions from changing earlier ones, so this is the same function
    at a fraction of the 77-token cost (captions are ~15 tokens). Differentiable: the world CLIP's
    training (pipeline/world/clip_training.py) runs it too."""
    m = model
    if not (isinstance(m, open_clip.model.CLIP) and getattr(m, "text_pool_type", "argmax") == "argmax"
            and m.attn_mask is not None):
        return m.encode_text(tokens)
    n = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :n]
    cast = m.transformer.get_cast_dtype()
    x = m.token_embedding(tokens).to(cast) + m.positional_embedding[:n].to(cast)
    x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:n, :n]))
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    if m.text_projection is None:
        return x
    return m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection


def load_clip(name: str, pretrained: str | None = None, seed: int = 0, device: str = "cpu",
              precision: str = "fp32") -> ClipEncoder:
    """open_clip's factory for both cases: a pretrained tag / local file, or built from config with ``seed``."""
    if pretrained is None:
        torch.manual_seed(seed)
    quiet = logging.getLogger().level
    if pretrained is None:  # open_clip warns that no weights were loaded: here that is the point
        logging.getLogger().setLevel(logging.ERROR)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, precision=precision, device=device)
    except Exception as err:  # unknown name, missing file, no network: say which and how to fix
        raise missing_model_error("clip", name, pretrained or "", err) from err
    finally:
        logging.getLogger().setLevel(quiet)
    model.eval()
    config = open_clip.get_model_config(name) or {}
    image_size = model.visual.image_size
    identity = {
        "kind": "clip", "name": name, "pretrained": pretrained,
        "seed": seed if pretrained is None else None,
        "weights_sha256": weights_sha256(model),
        "embed_dim": int(config.get("embed_dim") or model.text_projection.shape[-1]),
        "image_size": list(image_size) if isinstance(image_size, tuple) else [image_size, image_size],
        "dtype": precision,
    }
    return ClipEncoder(model, preprocess, open_clip.get_tokenizer(name), identity, device)


@lru_cache(maxsize=4)
def clip_for(name: str, pretrained: str | None, seed: int, precision: str, device: str) -> ClipEncoder:
    """``load_clip``, once per process and configuration (a shard function asks for its model by
    configuration: locally it loads once, on a Ray cluster once per worker, and nothing big is pickled)."""
    return load_clip(name, pretrained, seed=seed, device=device, precision=precision)


def clip_from_identity(identity: dict, device: str = "cpu") -> ClipEncoder:
    """The CLIP model an artifact records as its producer, loaded again and checked to be the same
    weights: code that encodes new text or images next to cached features never re-chooses a model."""
    clip = clip_for(identity["name"], identity.get("pretrained"), identity.get("seed") or 0,
                    identity.get("dtype", "fp32"), device)
    if clip.identity["weights_sha256"] != identity.get("weights_sha256"):
        raise ValueError(f"CLIP {identity['name']} (pretrained={identity.get('pretrained')}) loads with weights "
                         f"{clip.identity['weights_sha256'][:12]}, not the {str(identity.get('weights_sha256'))[:12]} "
                         f"the artifacts were made with: provide the same weights")
    return clip
