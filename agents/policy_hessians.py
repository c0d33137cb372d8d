"""Closed-form loss Hessians w.r.t. the heads of SB3's policies: the Gaussian actor-critic of
PPO / A2C, and SAC's squashed-Gaussian actor (:func:`sac_actor_head_hessians`).

These are the *exact* per-sample diagonals the core would otherwise compute by autograd
(``hesscale.capture`` without ``output_hessians``: a batched Hessian-vector product per output,
about a third of the curvature path's cost on small MLPs); the tests check them against that
route. Notation: ``log π(a) = Σ_j −d_j²/2 − log σ_j − ½ log 2π`` with ``d = (a − μ)/σ`` and a
state-independent ``log σ`` (SB3's ``DiagGaussianDistribution``). For a per-sample loss
``ℓ_n(log π_n)`` with derivatives ``ℓ'``, ``ℓ''``::

    ∂²ℓ/∂μ_j²     = (ℓ''·d_j² − ℓ') / σ_j²
    ∂²ℓ/∂logσ_j²  = ℓ''·(d_j² − 1)² − 2ℓ'·d_j²       (summed over samples: log σ is shared)

The Gaussian entropy is linear in ``log σ`` and free of ``μ``: no curvature.
"""

from __future__ import annotations

import torch as th


def gaussian_log_prob_hessians(
    mean_actions: th.Tensor, log_std: th.Tensor, actions: th.Tensor, dl: th.Tensor, d2l: th.Tensor
) -> tuple[th.Tensor, th.Tensor]:
    """``(H_mean [N, A], H_log_std [A])`` for ``Σ_n ℓ_n(log π(a_n))``; ``dl``, ``d2l``: ``[N]``."""
    with th.no_grad():
        inv_var = th.exp(-2.0 * log_std)
        d2 = (actions - mean_actions) ** 2 * inv_var
        dl, d2l = dl.reshape(-1, 1), d2l.reshape(-1, 1)
        h_mean = (d2l * d2 - dl) * inv_var
        h_log_std = (d2l * (d2 - 1.0) ** 2 - 2.0 * dl * d2).sum(0)
    return h_mean, h_log_std


def ppo_surrogate_dl(advantages: th.Tensor, ratio: th.Tensor, clip_range: float) -> th.Tensor:
    """``∂ℓ_n/∂log π_n`` (= ``∂²ℓ_n/∂log π_n²``) of ``ℓ = −mean min(A·r, A·clip(r))``.

    Piecewise as autograd differentiates it: ``torch.min`` splits the gradient half-half on ties,
    ``clamp`` passes it inside ``[1 − ε, 1 + ε]`` (bounds included).
    """
    with th.no_grad():
        x = advantages * ratio
        y = advantages * th.clamp(ratio, 1 - clip_range, 1 + clip_range)
        half = th.full_like(x, 0.5)
        gx = th.where(x == y, half, (x < y).to(x.dtype))
        gy = th.where(x == y, half, (y < x).to(x.dtype))
        inside = ((ratio >= 1 - clip_range) & (ratio <= 1 + clip_range)).to(x.dtype)
        return -(gx + gy * inside) * advantages * ratio / ratio.numel()


def value_mse_hessian(
    values: th.Tensor, vf_coef: float, old_values: th.Tensor | None = None, clip_range_vf: float | None = None
) -> th.Tensor:
    """Per-sample ``∂²/∂v²`` of ``vf_coef·MSE(returns, v_pred)``, shaped like the value head ``values``.

    With value clipping ``v_pred = v_old + clamp(v − v_old, −c, c)`` the curvature is zero where the
    clamp is active (bounds included, as autograd).
    """
    with th.no_grad():
        h = th.full_like(values, 2.0 * vf_coef / values.shape[0])
        if clip_range_vf is not None:
            diff = values.reshape(-1) - old_values.reshape(-1)
            inside = ((diff >= -clip_range_vf) & (diff <= clip_range_vf)).to(values.dtype)
            h = h * inside.reshape(values.shape)
    return h


def sac_actor_head_hessians(
    mean_actions: th.Tensor,
    log_std_raw: th.Tensor,
    gaussian_actions: th.Tensor,
    actions: th.Tensor,
    dq_da: th.Tensor,
    ent_coef: th.Tensor | float,
    epsilon: float,
    log_std_bounds: tuple[float, float],
) -> tuple[th.Tensor, th.Tensor]:
    """``(H_mu, H_log_std)``, each ``[N, A]``: per-sample Hessians of SAC's actor loss
    ``mean(α·log π(ã|s) − Q(s, ã))`` w.r.t. the mean head and the pre-clamp ``log_std`` head, with
    the critic linearised in the action (``"gn"``).

    With ``u = μ + σ·ε`` (``gaussian_actions``), ``ã = tanh u`` (``actions``), ``s = 1 − ã²``,
    ``g = ∂Q/∂ã`` (``dq_da``), SB3's squashing term ``f(u) = −log(s + δ)`` (``δ = epsilon``) and
    ``φ(u) = α·f(u) − Q``::

        φ'  = α·f'(u) − g·s                    f'  = 2ãs/(s+δ)
        φ'' = α·f''(u) + 2g·ã·s                f'' = 2s(s−2ã²)/(s+δ) + 4ã²s²/(s+δ)²
        H_μ = φ''/N        H_logstd = m·(φ''·(σε)² + φ'·σε)/N

    The Gaussian log-density is ``−ε²/2 − log σ`` under the reparametrisation (no curvature);
    ``m`` masks SB3's clamp of ``log_std`` to ``log_std_bounds`` (bounds included, as autograd).
    """
    with th.no_grad():
        n = mean_actions.shape[0]
        t = actions.detach()
        s = 1.0 - t * t
        sd = s + epsilon
        f1 = 2.0 * t * s / sd
        f2 = 2.0 * s * (s - 2.0 * t * t) / sd + 4.0 * t * t * s * s / (sd * sd)
        alpha = ent_coef.detach().reshape(-1)[0] if th.is_tensor(ent_coef) else float(ent_coef)
        g = dq_da.detach()
        phi1 = alpha * f1 - g * s
        phi2 = alpha * f2 + 2.0 * g * t * s
        sigma_eps = gaussian_actions.detach() - mean_actions.detach()
        raw = log_std_raw.detach()
        lo, hi = log_std_bounds
        mask = ((raw >= lo) & (raw <= hi)).to(raw.dtype)
        h_mu = phi2 / n
        h_log_std = mask * (phi2 * sigma_eps * sigma_eps + phi1 * sigma_eps) / n
    return h_mu, h_log_std
