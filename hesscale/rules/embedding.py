"""``nn.Embedding``: ``y[..., :] = W[idx[...], :]``, a lookup that is linear in ``W`` with 0/1 Jacobian.

``ĥ_W[k] = Σ_{positions p with idx_p = k} D_y[p]`` (``index_add`` of ``D_y`` into the rows; the
``padding_idx`` row gets no gradient and no curvature). Exact given ``D_y`` when an index occurs
at most once per sample (repeats drop the cross-position terms). The integer input carries no
curvature.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Rule


class EmbeddingRule(Rule):
    def param_diag(self, module: nn.Embedding, x: Tensor, y: Tensor, d_out: Tensor, per_sample: bool):
        dim = module.embedding_dim
        if per_sample:
            n = x.shape[0]
            index = x.reshape(n, -1, 1).expand(-1, -1, dim)
            h = d_out.new_zeros(n, module.num_embeddings, dim)
            h.scatter_add_(1, index, d_out.reshape(n, -1, dim))
            if module.padding_idx is not None:
                h[:, module.padding_idx] = 0
        else:
            h = d_out.new_zeros(module.num_embeddings, dim)
            h.index_add_(0, x.reshape(-1), d_out.reshape(-1, dim))
            if module.padding_idx is not None:
                h[module.padding_idx] = 0
        return {"weight": h}

    def input_diag(self, module, x, y, d_out, g_out, gauss_newton):
        return torch.zeros(x.shape, dtype=d_out.dtype, device=d_out.device)
