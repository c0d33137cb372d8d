"""Closed-form loss Hessians w.r.t. the heads of SB3's policies: the Gaussian actor-critic of
PPO / A2C, and SAC's squashed-Gaussian actor (:func:`sac_actor_head_derivatives`).

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


def gaussian_head_derivatives(
    mean_actions: th.Tensor, log_std: th.Tensor, actions: th.Tensor, dl: th.Tensor, d2l: th.Tensor | None,
    entropy_coef: float,
) -> tuple[th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
    """``(g_mean [N, A], g_log_std [A], H_mean [N, A], H_log_std [A])``: gradient and Hessian
    diagonal of ``Σ_n ℓ_n(log π(a_n)) − c·mean_n H_n`` (``c = entropy_coef``, the entropy bonus of
    PPO/A2C's loss) w.r.t. the mean head and ``log σ``; ``dl``, ``d2l``: ``[N]``.

    ``g_mean = ℓ'·(a − μ)/σ²``, ``g_logσ = Σ_n ℓ'·(d² − 1) − c`` (the entropy ``Σ_j log σ_j + const``
    is free of μ and linear in log σ). Two Hessian cases in fewer ops (one per minibatch matters at
    SB3's sizes): ``d2l=None`` for ``ℓ'' = 0`` (A2C's loss is linear in log π): ``H_mean = −ℓ'/σ²``,
    ``H_logσ = −2 Σ_n ℓ'·d²``; ``d2l is dl`` (PPO's surrogate, ``ℓ'' = ℓ'``): ``H_mean = ℓ'·(d² − 1)/σ²``,
    ``H_logσ = Σ_n ℓ'·((d² − 1)² − 2d²)``.
    """
    with th.no_grad():
        inv_var = th.exp(log_std * -2.0)
        z = (actions - mean_actions).mul_(inv_var)  # (a − μ)/σ²
        d2 = (actions - mean_actions).mul_(z)  # d² = (a − μ)²/σ²
        dl_col = dl.reshape(-1, 1)
        dl_row = dl.reshape(1, -1).to(d2.dtype)  # mm does not promote (float32 advantages, float64 nets)
        d2m1 = d2 - 1.0
        g_mean = z.mul_(dl_col)
        g_log_std = dl_row.mm(d2m1).reshape(-1).sub_(entropy_coef)
        if d2l is None:
            h_mean = (dl_col * inv_var).neg_()
            h_log_std = dl_row.mm(d2).mul_(-2.0).reshape(-1)
        elif d2l is dl:
            h_mean = (dl_col * d2m1).mul_(inv_var)
            h_log_std = dl_row.mm(d2m1.square_().sub_(d2, alpha=2.0)).reshape(-1)
        else:
            d2l_col = d2l.reshape(-1, 1)
            h_mean = (d2l_col * d2 - dl_col) * inv_var
            h_log_std = (d2l_col * (d2 - 1.0) ** 2 - 2.0 * dl_col * d2).sum(0)
    return g_mean, g_log_std, h_mean, h_log_std


def gsde_log_prob_hessians(
    mean_actions: th.Tensor,
    variance: th.Tensor,
    latent: th.Tensor,
    log_std: th.Tensor,
    actions: th.Tensor,
    dl: th.Tensor,
    d2l: th.Tensor | None,
    entropy_weight: float,
) -> tuple[th.Tensor, th.Tensor]:
    """``(H_mean [N, A], H_log_std [K, A])`` for ``Σ_n ℓ_n(log π(a_n)) + w·Σ_n H_n`` under gSDE.

    SB3's ``StateDependentNoiseDistribution`` (``full_std``, no ``expln``, no squashing, detached
    latent ``z [N, K]`` as PPO/A2C use it) has per-sample variances ``v_nj = Σ_k z_nk² σ_kj² + ε``,
    ``σ = exp(log_std)`` a ``[K, A]`` matrix. With ``u_nkj = z_nk² σ_kj²`` (``∂v/∂L_kj = 2u``,
    ``∂²v/∂L_kj² = 4u``), ``log π = Σ_j f(v_j)``, ``f = −d²/(2v) − ½ log v``, entropy
    ``H = Σ_j ½ log(2πe·v_j)``::

        f'  = d²/(2v²) − 1/(2v)        f''  = −d²/v³ + 1/(2v²)        H' = 1/(2v)   H'' = −1/(2v²)
        ∂²/∂L_kj² = Σ_n 4u²·(ℓ''·f'² + ℓ'·f'' + w·H'') + 4u·(ℓ'·f' + w·H')
        H_mean    = (ℓ''·d²/v − ℓ')/v

    exact, in O(N·K·A) (an autograd diagonal would take one Hessian-vector product per entry).
    ``dl``, ``d2l``: ``[N]`` (``d2l=None``: zero); ``entropy_weight``: the coefficient ``w`` of each
    sample's entropy.
    """
    with th.no_grad():
        if d2l is None:
            d2l = th.zeros_like(dl)
        d2 = (actions - mean_actions) ** 2
        dl, d2l = dl.reshape(-1, 1), d2l.reshape(-1, 1)
        f1 = d2 / (2 * variance**2) - 1 / (2 * variance)
        f2 = -d2 / variance**3 + 1 / (2 * variance**2)
        quadratic = 4 * (d2l * f1**2 + dl * f2 - entropy_weight / (2 * variance**2))
        linear = 4 * (dl * f1 + entropy_weight / (2 * variance))
        std2 = th.exp(2 * log_std)
        z2 = latent.detach() ** 2
        h_log_std = std2**2 * (z2**2).t().mm(quadratic) + std2 * z2.t().mm(linear)
        h_mean = (d2l * d2 / variance - dl) / variance
    return h_mean, h_log_std


def ppo_surrogate_dl(unclipped: th.Tensor, clipped: th.Tensor, ratio: th.Tensor, clip_range: float) -> th.Tensor:
    """``∂ℓ_n/∂log π_n`` (= ``∂²ℓ_n/∂log π_n²``) of ``ℓ = −mean min(A·r, A·clip(r))``, from the loss's
    own ``unclipped = A·r`` and ``clipped = A·clip(r)``.

    Piecewise as autograd differentiates it: ``torch.min`` splits the gradient half-half on ties,
    ``clamp`` passes it inside ``[1 − ε, 1 + ε]`` (bounds included). So the factor on ``A·r`` is 1
    where ``A·r < A·clip(r)``, 0 where it is larger, and on a tie 1 inside the clip range, ½ outside.
    """
    with th.no_grad():
        inside = ratio == th.clamp(ratio, 1 - clip_range, 1 + clip_range)
        tie = th.where(inside, 1.0, 0.5).to(unclipped.dtype)  # no copy in the default dtype
        factor = th.where(unclipped == clipped, tie, unclipped < clipped)
        return factor.mul_(unclipped).div_(-ratio.numel())


def value_mse_derivatives(
    values: th.Tensor, values_pred: th.Tensor, returns: th.Tensor, vf_coef: float,
    old_values: th.Tensor | None = None, clip_range_vf: float | None = None,
) -> tuple[th.Tensor, th.Tensor]:
    """``(g, H)``, per sample and shaped like the value head ``values``: ``∂/∂v`` and ``∂²/∂v²`` of
    ``vf_coef·MSE(returns, v_pred)``, with ``values_pred`` the ``[N]`` predictions the loss read.

    ``g = 2·vf_coef·(v_pred − R)/N``, ``H = 2·vf_coef/N``; with value clipping
    ``v_pred = v_old + clamp(v − v_old, −c, c)`` both are zero where the clamp is active (bounds
    included, as autograd).
    """
    with th.no_grad():
        scale = 2.0 * vf_coef / values.shape[0]
        g = (values_pred - returns).mul_(scale).reshape(values.shape)
        h = th.full_like(values, scale)
        if clip_range_vf is not None:
            diff = values.reshape(-1) - old_values.reshape(-1)
            inside = ((diff >= -clip_range_vf) & (diff <= clip_range_vf)).to(values.dtype).reshape(values.shape)
            g, h = g * inside, h * inside
    return g, h


def sac_actor_head_derivatives(
    mean_actions: th.Tensor,
    log_std_raw: th.Tensor,
    gaussian_actions: th.Tensor,
    actions: th.Tensor,
    dq_da: th.Tensor,
    ent_coef: th.Tensor | float,
    epsilon: float,
    log_std_bounds: tuple[float, float],
) -> tuple[th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
    """``(g_mu, g_log_std, H_mu, H_log_std)``, each ``[N, A]``: gradient and per-sample Hessians of
    SAC's actor loss ``mean(α·log π(ã|s) − Q(s, ã))`` w.r.t. the mean head and the pre-clamp
    ``log_std`` head, the Hessians with the critic linearised in the action (``"gn"``).

    With ``u = μ + σ·ε`` (``gaussian_actions``), ``ã = tanh u`` (``actions``), ``s = 1 − ã²``,
    ``g = ∂Q/∂ã`` (``dq_da``), SB3's squashing term ``f(u) = −log(s + δ)`` (``δ = epsilon``) and
    ``φ(u) = α·f(u) − Q``::

        φ'  = α·f'(u) − g·s                    f'  = 2ãs/(s+δ)
        φ'' = α·f''(u) + 2g·ã·s                f'' = 2s(s−2ã²)/(s+δ) + 4ã²s²/(s+δ)²
        g_μ = φ'/N         g_logstd = m·(φ'·σε − α)/N
        H_μ = φ''/N        H_logstd = m·(φ''·(σε)² + φ'·σε)/N

    The Gaussian log-density is ``−ε²/2 − log σ`` under the reparametrisation (the ``−α`` of
    ``g_logstd``, no curvature);
    ``m`` masks SB3's clamp of ``log_std`` to ``log_std_bounds`` (bounds included, as autograd).
    """
    with th.no_grad():
        n = mean_actions.shape[0]
        phi1, phi2 = _squashed_phi_derivatives(actions, dq_da, _alpha(ent_coef), epsilon)
        sigma_eps = gaussian_actions.detach() - mean_actions.detach()
        raw = log_std_raw.detach()
        lo, hi = log_std_bounds
        mask = ((raw >= lo) & (raw <= hi)).to(raw.dtype)
        g_mu = phi1 / n
        g_log_std = mask * (phi1 * sigma_eps - _alpha(ent_coef)) / n
        h_mu = phi2 / n
        h_log_std = mask * (phi2 * sigma_eps * sigma_eps + phi1 * sigma_eps) / n
    return g_mu, g_log_std, h_mu, h_log_std


def _alpha(ent_coef: th.Tensor | float) -> float | th.Tensor:
    return ent_coef.detach().reshape(-1)[0] if th.is_tensor(ent_coef) else float(ent_coef)


def _squashed_phi_derivatives(actions: th.Tensor, dq_da: th.Tensor, alpha, epsilon: float):
    """``(φ', φ'')`` of ``φ(u) = α·f(u) − Q(tanh u)`` per entry, the critic linearised in the action
    (see :func:`sac_actor_head_derivatives`)."""
    t = actions.detach()
    s = 1.0 - t * t
    sd = s + epsilon
    f1 = 2.0 * t * s / sd
    f2 = 2.0 * s * (s - 2.0 * t * t) / sd + 4.0 * t * t * s * s / (sd * sd)
    g = dq_da.detach()
    return alpha * f1 - g * s, alpha * f2 + 2.0 * g * t * s


def sac_gsde_hessians(
    latent: th.Tensor,
    log_std: th.Tensor,
    exploration_mat: th.Tensor,
    variance: th.Tensor,
    actions: th.Tensor,
    dq_da: th.Tensor,
    ent_coef: th.Tensor | float,
    epsilon: float,
) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
    """``(H_mu [N, A], H_latent [N, K], H_log_std [K, A])`` of SAC's actor loss under gSDE (``"gn"``).

    SB3's gSDE actor (``learn_features=True``, ``full_std``, no ``expln``): ``u = μ + w`` with the
    noise ``w = z·X``, ``X = σ∘E`` the exploration matrix (``σ = exp(log_std)`` ``[K, A]``, ``E``
    fixed), ``v = z²·σ² + ε``, ``log π = G(w, v) + Σ f(u)``, ``G = −w²/(2v) − ½ log v`` per entry,
    and ``φ = α·log π − Q`` with ``φ'``, ``φ''`` of the squashing and the linearised critic as in
    :func:`sac_actor_head_derivatives`. ``μ`` enters only through ``u`` (``∂w/∂μ = 0``), so
    ``H_mu = φ''/N``. For ``log_std`` (``∂w/∂L_kj = ∂²w/∂L_kj² = z_k X_kj``, ``∂v/∂L_kj = 2z_k²σ_kj²``,
    ``∂²v/∂L_kj² = 4z_k²σ_kj²``) and for the latent ``z`` with ``μ`` held fixed (``∂w_j/∂z_k = X_kj``,
    ``∂v_j/∂z_k = 2z_kσ_kj²``, ``∂²v_j/∂z_k² = 2σ_kj²``: the variance and noise paths into the trunk;
    the mean path adds through the sweep)::

        ∂²/∂θ² = α·(G_ww w'² + 2G_wv w'v' + G_vv v'² + G_w w'' + G_v v'') + φ''·w'² + φ'·w''
        G_w = −w/v   G_ww = −1/v   G_v = w²/(2v²) − 1/(2v)   G_vv = −w²/v³ + 1/(2v²)   G_wv = w/v²

    summed over samples for ``log_std`` and over actions for ``z``, all over ``N``. O(N·K·A).
    """
    with th.no_grad():
        n = actions.shape[0]
        alpha = _alpha(ent_coef)
        phi1, phi2 = _squashed_phi_derivatives(actions, dq_da, alpha, epsilon)
        z, x = latent.detach(), exploration_mat.detach()
        w = z.mm(x)
        g_w, g_ww = -w / variance, -1.0 / variance
        g_v = w**2 / (2 * variance**2) - 1 / (2 * variance)
        g_vv = -(w**2) / variance**3 + 1 / (2 * variance**2)
        g_wv = w / variance**2
        std2 = th.exp(2 * log_std.detach())
        h_mu = phi2 / n
        h_log_std = (
            x**2 * (z**2).t().mm(alpha * g_ww + phi2)
            + 4 * x * std2 * (z**3).t().mm(alpha * g_wv)
            + 4 * std2**2 * (z**4).t().mm(alpha * g_vv)
            + x * z.t().mm(alpha * g_w + phi1)
            + 4 * std2 * (z**2).t().mm(alpha * g_v)
        ) / n
        h_latent = (
            (alpha * g_ww + phi2).mm((x**2).t())
            + 4 * z * (alpha * g_wv).mm((x * std2).t())
            + 4 * z**2 * (alpha * g_vv).mm((std2**2).t())
            + 2 * (alpha * g_v).mm(std2.t())
        ) / n
    return h_mu, h_latent, h_log_std
