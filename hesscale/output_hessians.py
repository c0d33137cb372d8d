"""Diagonals of the loss Hessian w.r.t. network outputs, per sample.

* :func:`exact_per_sample_diag` — any loss that is separable over samples (dim 0): one batched
  Hessian-vector product per output feature, through the loss graph only.
* :func:`closed_form_output_derivatives` — fast paths, with the gradient too: ``MSELoss``
  (``2/numel`` for the mean), softmax ``CrossEntropyLoss`` (``(p − p²)/N``) and BL89's
  element-wise treatment of the softmax (``onehot(y)·(p − p²)/N``).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _batched_vhp(grad: Tensor, wrt: Tensor, vectors: Tensor) -> Tensor:
    """``[H v for v in vectors]`` given ``grad = ∂L/∂wrt`` built with ``create_graph=True``."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            (hv,) = torch.autograd.grad(
                grad, wrt, vectors, retain_graph=True, is_grads_batched=True, allow_unused=True
            )
    except RuntimeError:  # an op without a batching rule: one product at a time
        rows = [torch.autograd.grad(grad, wrt, v, retain_graph=True, allow_unused=True)[0] for v in vectors]
        hv = None if rows[0] is None else torch.stack(rows)
    return torch.zeros_like(vectors) if hv is None else hv


def exact_per_sample_diag(grad: Tensor, output: Tensor) -> Tensor:
    """``D[n, c] = ∂²L/∂output[n, c]²`` for a loss separable over samples.

    With ``v_c = e_c`` in every sample, ``(Hv_c)[n, c] = H_n[c, c]`` because ``H`` has no blocks
    between different samples: ``C = output[0].numel()`` products in one batched call.
    """
    if not grad.requires_grad:  # the loss is linear in this output
        return torch.zeros_like(output)
    n, c = output.shape[0], output[0].numel()
    vectors = torch.zeros(c, n, c, dtype=output.dtype, device=output.device)
    idx = torch.arange(c, device=output.device)
    vectors[idx, :, idx] = 1
    hv = _batched_vhp(grad, output, vectors.reshape(c, *output.shape)).reshape(c, n, c)
    return hv.diagonal(dim1=0, dim2=2).reshape(output.shape)


def exact_param_diag(grad: Tensor, param: Tensor) -> Tensor:
    """Exact ``diag ∂²L/∂θ²`` of a small parameter: one Hessian-vector product per entry."""
    if not grad.requires_grad:
        return torch.zeros_like(param)
    k = param.numel()
    eye = torch.eye(k, dtype=param.dtype, device=param.device).reshape(k, *param.shape)
    hv = _batched_vhp(grad, param, eye).reshape(k, k)
    return hv.diagonal().reshape(param.shape)


def _reduction_scale(reduction: str, count: Tensor | int) -> Tensor | float:
    if reduction == "mean":
        return 1.0 / count
    if reduction == "sum":
        return 1.0
    raise ValueError(f"reduction={reduction!r} gives no scalar loss; use 'mean' or 'sum'")


def closed_form_output_derivatives(
    loss_fn, output: Tensor, targets: Tensor | None, elementwise_softmax: bool = False
) -> tuple[Tensor, Tensor] | None:
    """Closed-form ``(∂L/∂output, diag ∂²L/∂output²)`` per sample, or ``None`` when there is none
    for ``loss_fn``.

    MSE: ``2s·(output − y)`` and ``2s``; softmax cross-entropy: ``s·keep·(p − onehot(y))`` and
    ``s·keep·(p − p²)`` (``keep``: target ≠ ``ignore_index``); ``s`` is ``1/count`` for the mean,
    ``1`` for the sum. ``elementwise_softmax`` gives BL89's diagonal ``onehot(y)·(p − p²)``.
    """
    output = output.detach()
    if type(loss_fn) is nn.MSELoss and targets is not None and targets.shape == output.shape:
        scale = 2.0 * _reduction_scale(loss_fn.reduction, output.numel())
        return (output - targets.detach()) * scale, torch.full_like(output, scale)
    if (
        type(loss_fn) is nn.CrossEntropyLoss
        and loss_fn.weight is None
        and loss_fn.label_smoothing == 0.0
        and output.dim() == 2
        and targets is not None
        and not targets.is_floating_point()
    ):
        keep = (targets != loss_fn.ignore_index).to(output.dtype)
        scale = (keep * _reduction_scale(loss_fn.reduction, keep.sum()))[:, None]
        p = F.softmax(output, dim=1)
        onehot = F.one_hot(targets.clamp(min=0), output.shape[1]).to(output.dtype)
        diag = p - p.square()
        if elementwise_softmax:
            diag = diag * onehot
        return (p - onehot) * scale, diag * scale
    return None
