"""``nn.Conv1d`` / ``nn.Conv2d``: the same rule as Linear, per kernel offset and position.

``ĥ_W = conv_weight_backward(x∘x, d_out)``, ``ĥ_b = Σ_{n,pos} d_out``,
``d_in = conv_input_backward(W∘W, d_out)``: the convolution's own backward kernels applied to the
squared input and squared kernel (off-diagonal terms, including overlaps of patches, dropped).
Fused with the gradient: one ``convolution_backward`` on ``(g_out, x, W)`` gives ``∂L/∂x``,
``∂L/∂W``, ``∂L/∂b``, and one on ``(d_out, x∘x, W∘W)`` gives ``d_in``, ``ĥ_W``, ``ĥ_b``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Rule

_GRAD_FNS = {
    nn.Conv1d: (torch.nn.grad.conv1d_weight, torch.nn.grad.conv1d_input),
    nn.Conv2d: (torch.nn.grad.conv2d_weight, torch.nn.grad.conv2d_input),
}


def _numeric_padding(module: nn.Module):
    padding = module.padding
    if padding == "valid":
        return 0
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if any(t % 2 for t in total):
            raise NotImplementedError(
                f"{type(module).__name__} with padding='same' and an even effective kernel pads "
                "asymmetrically; HesScale supports symmetric padding only"
            )
        return tuple(t // 2 for t in total)
    return padding


class ConvRule(Rule):
    fused = True
    fresh_outputs = True
    fused_reads = frozenset({"x"})

    def _options(self, module):
        if module.padding_mode != "zeros":
            raise NotImplementedError(
                f"{type(module).__name__}(padding_mode={module.padding_mode!r}): only 'zeros' is supported"
            )
        return dict(
            stride=module.stride,
            padding=_numeric_padding(module),
            dilation=module.dilation,
            groups=module.groups,
        )

    def param_diag(self, module, x, y, d_out, per_sample):
        weight_fn, _ = _GRAD_FNS[type(module)]
        opts = self._options(module)
        x2 = x.square()
        if per_sample:
            weight = torch.stack(
                [
                    weight_fn(x2[n : n + 1], module.weight.shape, d_out[n : n + 1], **opts)
                    for n in range(x.shape[0])
                ]
            )
            out = {"weight": weight}
            if module.bias is not None:
                out["bias"] = d_out.flatten(2).sum(2)
            return out
        out = {"weight": weight_fn(x2, module.weight.shape, d_out, **opts)}
        if module.bias is not None:
            out["bias"] = d_out.transpose(0, 1).flatten(1).sum(1)
        return out

    def input_diag(self, module, x, y, d_out, g_out, gauss_newton):
        _, input_fn = _GRAD_FNS[type(module)]
        return input_fn(x.shape, module.weight.square(), d_out, **self._options(module))

    def fused_backward(self, module, x, y, g_out, d_out, gauss_newton, per_sample, need_input):
        opts = self._options(module)
        dims = x.dim() - 2
        padding = opts["padding"]
        padding = [padding] * dims if isinstance(padding, int) else list(padding)
        w, has_bias = module.weight, module.bias is not None
        args = (list(opts["stride"]), padding, list(opts["dilation"]), False, [0] * dims, opts["groups"])
        bias_sizes = [w.shape[0]] if has_bias else None
        backward = torch.ops.aten.convolution_backward
        g_in, g_w, g_b = backward(g_out, x, w, bias_sizes, *args, [need_input, True, has_bias])
        grads = {"weight": g_w, **({"bias": g_b} if has_bias else {})}
        if per_sample:  # the weight's diagonal per example (param_diag); the kernel only for d_in
            hess = self.param_diag(module, x, y, d_out, per_sample)
            d_in = backward(d_out, x, w.square(), None, *args, [True, False, False])[0] if need_input else None
            return grads, hess, g_in, d_in
        # the input (weight) of a kernel call is read only for its shape where its output is not asked
        d_in, h_w, h_b = backward(
            d_out, x.square(), w.square() if need_input else w, bias_sizes, *args, [need_input, True, has_bias]
        )
        return grads, {"weight": h_w, **({"bias": h_b} if has_bias else {})}, g_in, d_in
