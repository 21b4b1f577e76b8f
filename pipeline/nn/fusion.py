"""Attention fusion of a query feature with a set of entity features (SynTIC Eq. 5; CMSA's T-F reuses it)."""
from __future__ import annotations

import torch
import torch.nn as nn


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
