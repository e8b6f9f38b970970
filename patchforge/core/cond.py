"""What a denoiser is conditioned on, whatever the model family."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Cond:
    """Token embeddings (+ the pooled embedding of families that also condition on one, e.g. SDXL)."""
    emb: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self):
        return self.emb.shape[0]

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        """One batch from several (methods run target and preserve rows in one denoiser call)."""
        pooled = None if conds[0].pooled is None else torch.cat([c.pooled for c in conds])
        return Cond(torch.cat([c.emb for c in conds]), pooled)
