"""A token embedding kept in a compact float type and handed out in the activation type.

A quantized model multiplies with int4/int8 weights but looks tokens up by row, so its
embedding stays a float table: bfloat16 rows (half of float32's memory) returned as the
model's activations (float32 keeps the residual stream exact). The table is a buffer,
filled by quantize_model, so the model's first parameter still tells its dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RowEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, *, store_dtype: torch.dtype = torch.bfloat16,
                 out_dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):  # fmt: skip
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.out_dtype = out_dtype
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=store_dtype, device=device))

    def fill(self, w, chunk: int = 4096) -> RowEmbedding:
        """Copy from an (V, E) tensor or a row source (w[a:b]), a block of rows at a time."""
        with torch.no_grad():
            for a in range(0, self.num_embeddings, chunk):
                self.weight[a : a + chunk].copy_(w[a : a + chunk])
        return self

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, stored {self.weight.dtype}, out {self.out_dtype}"
