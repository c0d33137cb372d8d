"""The curvature an agent's update uses, recomputed independently, and the update it takes.

* PPO / A2C with AdaHesScale: the ``hess_diag`` present when the optimizer steps equals the core's
  diagonal for the same loss written out here (plus exact checks: the value head's bias, the
  state-independent ``log_std`` by a full autograd Hessian), and the step equals AdaHesScale's
  equation; with step-size scaling, each group's α and step equal §6's formula.
* SAC's closed-form ``actor_curvature="gn"``: equals the exact route where the critic is piecewise
  linear in the action (ReLU) and, for a tanh critic, the exact route on the critic linearised in
  the action — and differs from the exact route there.
"""

from __future__ import annotations

import math

import hesscale
import pytest
import torch as th
from torch.nn import functional as F

import agents

N = 64
NET = dict(net_arch=[16, 16])


def _snapshot_step(optimizer, record: list):
    """Wrap ``optimizer.step`` to record θ, grad and hess_diag just before each step."""
    inner = optimizer.step

    def step(*args, **kwargs):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        record.append(
            dict(
                theta=[p.detach().clone() for p in params],
                grad=[p.grad.detach().clone() for p in params],
                hess=[p.hess_diag.detach().clone() for p in params],
            )
        )
        return inner(*args, **kwargs)

    optimizer.step = step


def _ppo_loss(model, pol, data):
    advantages = data.advantages
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    with hesscale.capture([pol.mlp_extractor, pol.action_net, pol.value_net], leaf_params=[pol.log_std]) as cap:
        values, log_prob, entropy = pol.evaluate_actions(data.observations, data.actions)
    ratio = th.exp(log_prob - data.old_log_prob)
    clip = model.clip_range(1.0)
    surrogate = th.min(advantages * ratio, advantages * th.clamp(ratio, 1 - clip, 1 + clip))
    loss = -surrogate.mean() - model.ent_coef * entropy.mean() + model.vf_coef * F.mse_loss(data.returns, values.flatten())
    return cap, loss


def _a2c_loss(model, pol, data):
    with hesscale.capture([pol.mlp_extractor, pol.action_net, pol.value_net], leaf_params=[pol.log_std]) as cap:
        values, log_prob, entropy = pol.evaluate_actions(data.observations, data.actions)
    loss = (
        -(data.advantages * log_prob).mean()
        - model.ent_coef * entropy.mean()
        + model.vf_coef * F.mse_loss(data.returns, values.flatten())
    )
    return cap, loss


def _one_update(algo: str, optimizer: dict):
    # no clipping: the loss's own curvature (clipping is tested on its own, at the end)
    common = dict(optimizer=optimizer, ent_coef=0.01, seed=3, device="cpu", policy_kwargs=dict(NET),
                  max_grad_norm=float("inf"))
    if algo == "ppo":
        model = agents.PPO("MlpPolicy", "Pendulum-v1", n_steps=N, batch_size=N, n_epochs=1, **common)
    else:
        model = agents.A2C("MlpPolicy", "Pendulum-v1", n_steps=N, **common)
    record: list = []
    _snapshot_step(model.policy.optimizer, record)
    model.learn(N)  # one rollout, one update (one minibatch = the whole rollout)
    assert len(record) == 1 and model.divergence is None
    return model, record[0]


@pytest.mark.parametrize("algo", ["ppo", "a2c"])
def test_adahesscale_uses_the_cores_diagonal_and_its_equation(algo):
    model, snap = _one_update(algo, {"name": "adahesscale", "kwargs": {"eps": 1e-5}})
    opt = model.policy.optimizer
    params = [p for g in opt.param_groups for p in g["params"]]
    names = {id(p): n for n, p in model.policy.named_parameters()}

    theta_after = [p.detach().clone() for p in params]
    # Recompute the curvature of the same loss on the same data at θ_before, independently
    # (in the model's own policy, reset to θ_before).
    pol = model.policy
    own = dict(pol.named_parameters())
    with th.no_grad():
        for p, theta in zip(params, snap["theta"]):
            own[names[id(p)]].copy_(theta)
            p.grad = None
    data = next(model.rollout_buffer.get(None))
    cap, loss = (_ppo_loss if algo == "ppo" else _a2c_loss)(model, pol, data)
    cap.backward(loss)
    for p, h, g in zip(params, snap["hess"], snap["grad"]):
        ref = own[names[id(p)]]
        scale = ref.hess_diag.abs().max().clamp_min(1e-8)
        assert float((h - ref.hess_diag).abs().max() / scale) < 1e-4, names[id(p)]
        assert th.allclose(g, ref.grad, rtol=1e-4, atol=1e-6), names[id(p)]

    # Exact anchors: value-head bias = vf_coef·2 (MSE); log_std by a full autograd Hessian.
    idx = {names[id(p)]: i for i, p in enumerate(params)}
    assert th.allclose(snap["hess"][idx["value_net.bias"]], th.tensor([2.0 * model.vf_coef]), rtol=1e-5)

    latent_pi = pol.mlp_extractor.forward_actor(pol.extract_features(data.observations, pol.pi_features_extractor)).detach()
    mean = pol.action_net(latent_pi).detach()
    values = pol.predict_values(data.observations).detach().flatten()

    def loss_ls(ls):
        dist = th.distributions.Normal(mean, th.exp(ls).expand_as(mean))
        log_prob = dist.log_prob(data.actions).sum(1)
        ent = dist.entropy().sum(1)
        if algo == "ppo":
            adv = (data.advantages - data.advantages.mean()) / (data.advantages.std() + 1e-8)
            ratio = th.exp(log_prob - data.old_log_prob)
            pl = -th.min(adv * ratio, adv * th.clamp(ratio, 0.8, 1.2)).mean()
        else:
            pl = -(data.advantages * log_prob).mean()
        return pl - model.ent_coef * ent.mean() + model.vf_coef * F.mse_loss(data.returns, values)

    h_exact = th.autograd.functional.hessian(loss_ls, snap["theta"][idx["log_std"]]).diagonal()
    assert th.allclose(snap["hess"][idx["log_std"]], h_exact, rtol=1e-4, atol=1e-7)

    # The step is AdaHesScale's equation at t = 1.
    group = opt.param_groups[0]
    (b1, b2), eps, lr = group["betas"], group["eps"], group["lr"]
    for p, after, theta, g, h in zip(params, theta_after, snap["theta"], snap["grad"], snap["hess"]):
        m, v = (1 - b1) * g, (1 - b2) * h * h
        expected = theta - lr * (m / (1 - b1)) / (th.sqrt(v / (1 - b2)) + eps)
        assert th.allclose(after, expected, rtol=1e-6, atol=1e-7), names[id(p)]
    assert max(float((a - t).abs().max()) for a, t in zip(theta_after, snap["theta"])) > 1e-5


def test_scaled_adahesscale_alpha_per_group_is_the_formula():
    delta = 1e-6
    model, snap = _one_update("ppo", {"name": "adahesscale", "kwargs": {"eps": 1e-5},
                                      "scaling": {"enabled": True, "delta": delta, "beta": 0.999}})
    opt = model.policy.optimizer
    assert isinstance(opt, hesscale.optim.StepSizeScaling)
    assert set(opt.last_scales) == {"pi", "log_std", "vf"}
    assert opt.last_route == "fused"
    assert (0, 1, 2) in opt._layouts  # the three groups stepped as one flat batch, each with its α
    i = 0
    for group in opt.param_groups:
        (b1, b2), eps, lr = group["betas"], group["eps"], group["lr"]
        us, cs, thetas, ps = [], [], [], []
        for p in group["params"]:
            theta, g, h = snap["theta"][i], snap["grad"][i], snap["hess"][i]
            i += 1
            u = lr * g / (th.sqrt((1 - b2) * h * h / (1 - b2)) + eps)  # AdaHesScale's update at t = 1
            us.append(u)
            cs.append(th.sqrt((1 - 0.999) * h * h))  # c = sqrt(EMA(ĥ²)), no bias correction
            thetas.append(theta)
            ps.append(p.detach())
        total = sum(float((c * u * u).sum()) for c, u in zip(cs, us))
        alpha = 1.0 if total == 0 else min(1.0, math.sqrt(2 * delta / total))
        assert opt.last_scales[group["name"]] == pytest.approx(alpha, rel=1e-4)
        for p, theta, u in zip(ps, thetas, us):
            assert th.allclose(p, theta - alpha * u, rtol=1e-5, atol=1e-7)
    assert min(opt.last_scales.values()) < 1.0  # the scaling really acted here


# -- SAC: the closed-form actor curvature ------------------------------------------------------
def _sac(activation):
    model = agents.SAC("MlpPolicy", "Pendulum-v1", optimizer={"name": "adahesscale"}, learning_starts=N,
                       batch_size=N, ent_coef=0.3, seed=5, device="cpu",
                       policy_kwargs=dict(net_arch=[16, 16], activation_fn=activation))
    model.learn(N + 8)
    return model


def _actor_hess(model, obs, route: str, linearise: bool = False):
    """hess_diag of the actor's parameters for the actor loss on ``obs`` with fixed noise."""
    update = model._updates["actor"]
    th.manual_seed(123)
    with update.capture() as cap:
        actions_pi, log_prob = model.actor.action_log_prob(obs)
    heads = model._actor_heads(cap)
    q = th.cat(model.critic(obs, actions_pi), dim=1)
    min_q, _ = th.min(q, dim=1, keepdim=True)
    if linearise:  # Q(ã) ≈ Q(ã₀) + g·(ã − ã₀): no action curvature of the critic
        (g,) = th.autograd.grad(min_q.sum(), actions_pi, retain_graph=True)
        min_q = (g.detach() * actions_pi).sum(1, keepdim=True)
    loss = (model.ent_coef_tensor * log_prob.reshape(-1, 1) - min_q).mean()
    hessians = None
    if route == "gn":
        q_true = th.min(th.cat(model.critic(obs, actions_pi), dim=1), dim=1, keepdim=True)[0]
        hessians = model._actor_gn_derivatives(heads, actions_pi, q_true, model.ent_coef_tensor, cap)["output_hessians"]
    for p in model.actor.parameters():
        p.grad = None
    cap.backward(loss, output_hessians=hessians)
    return {n: p.hess_diag.clone() for n, p in model.actor.named_parameters()}


def _rel(a, b):
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b)


def test_sac_gn_equals_exact_for_relu_critics():
    model = _sac(th.nn.ReLU)
    obs = model.replay_buffer.sample(N).observations
    gn, exact = _actor_hess(model, obs, "gn"), _actor_hess(model, obs, "exact")
    assert _rel(gn, exact) < 1e-4
    assert all(float(h.abs().max()) > 0 for h in exact.values())


def test_sac_actor_head_gradients_equal_autograd():
    """``sac_actor_head_derivatives``'s gradients against autograd on SB3's own squashed Gaussian
    (``log_prob_from_params`` with the clamp of ``log_std``, entries past both bounds included) and
    a critic linear in the action, in float64."""
    from stable_baselines3.common.distributions import SquashedDiagGaussianDistribution

    from agents.policy_hessians import sac_actor_head_derivatives

    g = th.Generator().manual_seed(4)
    n, a, alpha, bounds = 6, 3, th.tensor(0.3, dtype=th.float64), (-2.0, 0.5)
    mean = th.randn(n, a, generator=g, dtype=th.float64).requires_grad_(True)
    raw = (th.randn(n, a, generator=g, dtype=th.float64) * 1.5).requires_grad_(True)
    w = th.randn(a, dtype=th.float64, generator=g)
    dist = SquashedDiagGaussianDistribution(a)
    th.manual_seed(0)
    actions, log_prob = dist.log_prob_from_params(mean, th.clamp(raw, *bounds))
    q = (actions * w).sum(1, keepdim=True)
    loss = (alpha * log_prob.reshape(-1, 1) - q).mean()
    grad_mean, grad_raw = th.autograd.grad(loss, [mean, raw])
    dq_da = w.expand(n, a)
    g_mu, g_log_std, _, _ = sac_actor_head_derivatives(mean, raw, dist.gaussian_actions, actions, dq_da, alpha,
                                                       dist.epsilon, bounds)
    assert (raw < bounds[0]).any() and (raw > bounds[1]).any()  # the clamp is active at both bounds
    th.testing.assert_close(g_mu, grad_mean, rtol=1e-10, atol=1e-12)
    th.testing.assert_close(g_log_std, grad_raw, rtol=1e-10, atol=1e-12)


def test_sac_gn_is_the_linearised_critic_for_tanh_critics():
    model = _sac(th.nn.Tanh)
    obs = model.replay_buffer.sample(N).observations
    gn = _actor_hess(model, obs, "gn")
    linearised = _actor_hess(model, obs, "exact", linearise=True)
    exact = _actor_hess(model, obs, "exact")
    assert _rel(gn, linearised) < 1e-4
    assert _rel(gn, exact) > 1e-3  # the critic's action curvature is what "gn" drops


def _gsde_actor_hess(model, obs, route: str):
    """hess_diag of the gSDE actor's parameters: ``"gn"`` with the agent's closed forms (log_std
    matrix, latent, mean head), ``"exact"`` with the core's autograd route for all three."""
    actor = model.actor
    th.manual_seed(123)
    actor.reset_noise()  # the same exploration matrix (with its graph to log_std) for both routes
    if route == "gn":
        cap_obj = model._updates["actor"]._capture
    else:
        cap_obj = hesscale.capture([actor.latent_pi, actor.mu], leaf_params=[actor.log_std])
    with cap_obj as cap:
        actions_pi, log_prob = actor.action_log_prob(obs)
    heads = model._actor_heads(cap) if route == "gn" else None
    min_q, _ = th.min(th.cat(model.critic(obs, actions_pi), dim=1), dim=1, keepdim=True)
    loss = (model.ent_coef_tensor * log_prob.reshape(-1, 1) - min_q).mean()
    for p in actor.parameters():
        p.grad = None
    if route == "gn":
        forms = model._actor_gn_derivatives(heads, actions_pi, min_q, model.ent_coef_tensor, cap)
        assert len(forms["output_hessians"]) == 2  # mean head and latent: the trunk's variance path
        cap.backward(loss, output_hessians=forms["output_hessians"], external_grads=True)
        for p, h in forms["leaf_hessians"].items():
            p.hess_diag = h
    else:
        cap.backward(loss)
    return {n: p.hess_diag.clone() for n, p in actor.named_parameters()}


def test_sac_gsde_closed_forms_equal_autograd_for_relu_critics():
    """gSDE: the [K, A] log_std matrix, the latent's variance/noise path and the mean head in closed
    form equal the autograd route (ReLU critics: "gn" is exact); a 2-D action space."""
    from stable_baselines3.common.env_util import make_vec_env

    env = make_vec_env("Reacher-v5", n_envs=1, seed=0)
    model = agents.SAC("MlpPolicy", env, optimizer={"name": "adahesscale"}, use_sde=True, learning_starts=N,
                       batch_size=N, ent_coef=0.3, seed=5, device="cpu", policy_kwargs=dict(net_arch=[6, 5]))
    model.learn(N + 8)
    obs = model.replay_buffer.sample(N).observations
    gn, exact = _gsde_actor_hess(model, obs, "gn"), _gsde_actor_hess(model, obs, "exact")
    assert gn.keys() == exact.keys() and "log_std" in gn and gn["log_std"].shape == (5, 2)
    assert _rel(gn, exact) < 1e-4
    assert all(float(h.abs().max()) > 0 for h in exact.values())


def test_sac_exact_route_trains():
    model = agents.SAC("MlpPolicy", "Pendulum-v1", optimizer={"name": "adahesscale", "actor_curvature": "exact"},
                       learning_starts=32, batch_size=32, seed=0, device="cpu", policy_kwargs=dict(NET))
    model.learn(48)
    assert model.divergence is None
    assert all(hasattr(p, "hess_diag") or p.grad is None for p in model.actor.parameters())


@pytest.mark.parametrize("use_sde", [False, True], ids=["gaussian", "gsde"])
@pytest.mark.parametrize("algo", ["ppo", "a2c"])
def test_closed_form_head_hessians_equal_the_cores_autograd_route(algo, use_sde):
    """The closed forms for the Gaussian heads (mean, value, log_std; with gSDE the [K, A] log_std
    matrix, entropy curvature included) equal the core's exact per-sample autograd route, with
    PPO's ratio clipping and value clipping active."""
    records = {}
    for closed in (True, False):
        if algo == "ppo":
            model = agents.PPO("MlpPolicy", "Pendulum-v1", optimizer={"name": "adahesscale", "kwargs": {"eps": 1e-5}},
                               n_steps=N, batch_size=N // 2, n_epochs=4, clip_range=0.01, clip_range_vf=0.002,
                               ent_coef=0.01, seed=1, device="cpu", policy_kwargs=dict(NET), closed_form_heads=closed,
                               use_sde=use_sde)
        else:
            model = agents.A2C("MlpPolicy", "Pendulum-v1", optimizer={"name": "adahesscale", "kwargs": {"eps": 1e-5}},
                               n_steps=16, ent_coef=0.01, normalize_advantage=True, seed=1, device="cpu",
                               policy_kwargs=dict(NET), closed_form_heads=closed, use_sde=use_sde)
        assert model._gaussian_heads is closed
        records[closed] = []
        _snapshot_step(model.policy.optimizer, records[closed])
        model.learn(2 * model.n_steps)
        if algo == "ppo":
            assert model.logger.name_to_value["train/clip_fraction"] > 0
    assert len(records[True]) == len(records[False]) >= 2
    for a, b in zip(records[True], records[False]):  # the runs agree to float rounding throughout
        # relative to the step's largest entry: a head bias whose per-sample terms nearly cancel
        # (A2C's normalised advantages) is all rounding relative to itself
        scale = max(float(h.abs().max()) for h in b["hess"])
        for h1, h2 in zip(a["hess"], b["hess"]):
            assert float((h1 - h2).abs().max()) / scale < 1e-4


def test_curvature_method_choice_reaches_the_sweep():
    """``curvature`` selects the sweep: HesScaleGN drops σ''·g in the tanh trunk only, so the
    heads' curvature (exact output Hessians) agrees and the trunk's differs."""
    snaps = {}
    for method in ("hesscale", "hesscale_gn", "bl89"):
        model, snaps[method] = _one_update("ppo", {"name": "adahesscale", "curvature": method})
        assert model._updates["policy"]._capture.method == method
    names = [n for n, _ in model.policy.named_parameters()]
    order = {id(p): i for i, p in enumerate(p for g in model.policy.optimizer.param_groups for p in g["params"])}
    index = {n: order[id(p)] for n, p in model.policy.named_parameters()}
    for name in names:
        h, gn, bl = (snaps[m]["hess"][index[name]] for m in ("hesscale", "hesscale_gn", "bl89"))
        assert th.equal(h, bl)  # BL89 = HesScale unless the output is a softmax cross-entropy
        if name.startswith(("action_net", "value_net", "log_std")):
            assert th.allclose(h, gn, rtol=1e-6, atol=0), name
        else:  # every trunk layer sits below a tanh whose σ''·g term GN drops
            assert not th.allclose(h, gn, rtol=1e-3, atol=0), name


def test_clipping_scales_the_gradient_and_the_curvature_by_one_factor():
    """``CurvatureUpdate`` clips as SB3 does, ``c = min(1, τ / (‖g‖ + 1e-6))``, and multiplies ĥ by
    the same c (the clipped step is the step on the loss c·L); checked against the unclipped
    update of the same batch (lr = 0 keeps θ, so both see the same point)."""
    th.manual_seed(0)
    net = th.nn.Sequential(th.nn.Linear(3, 8), th.nn.Tanh(), th.nn.Linear(8, 2))
    x, y = th.randn(32, 3), th.randn(32, 2)

    def grads_and_curvature(max_grad_norm):
        opt = hesscale.optim.AdaHesScale([{"name": "net", "params": list(net.parameters())}], lr=0.0)
        update = agents.second_order.CurvatureUpdate(opt, {"net": net}, max_grad_norm=max_grad_norm)
        with update.capture() as cap:
            out = net(x)
        update.step(cap, F.mse_loss(out, y))
        return [p.grad.clone() for p in net.parameters()], [p.hess_diag.clone() for p in net.parameters()]

    g, h = grads_and_curvature(None)
    norm = th.linalg.vector_norm(th.cat([t.reshape(-1) for t in g]))
    tau = float(norm) / 10
    c = tau / (norm + 1e-6)
    g_clip, h_clip = grads_and_curvature(tau)
    for a, b in zip(g_clip, g):
        th.testing.assert_close(a, c * b)
    for a, b in zip(h_clip, h):
        th.testing.assert_close(a, c * b)
        assert b.abs().max() > 0
    g_inf, h_inf = grads_and_curvature(float("inf"))  # the switched-off threshold: untouched
    assert all(th.equal(a, b) for a, b in zip(g_inf + h_inf, g + h))


def test_curvature_diagnostics_are_the_per_update_means_and_the_max():
    """``train/hess_diag_mean/<group>`` is the mean over the group's entries averaged over the updates
    in which it had ĥ, ``hess_diag_max`` the max over entries and updates: checked against ĥ read
    after each step, over updates in which the set of parameters with ĥ changes (head ``b`` unused)."""
    th.manual_seed(0)
    trunk, head_a, head_b = th.nn.Sequential(th.nn.Linear(3, 8), th.nn.Tanh()), th.nn.Linear(8, 2), th.nn.Linear(8, 1)
    groups = [{"name": "trunk", "params": list(trunk.parameters())},
              {"name": "heads", "params": list(head_a.parameters()) + list(head_b.parameters())}]
    opt = hesscale.optim.AdaHesScale(groups, lr=1e-2)
    update = agents.second_order.CurvatureUpdate(opt, {"trunk": trunk, "a": head_a, "b": head_b})
    seen = {"trunk": [], "heads": []}
    for use_b in (True, True, False, True, False, False, True):
        x = th.randn(16, 3)
        with update.capture() as cap:
            z = trunk(x)
            loss = head_a(z).square().mean() + (head_b(z).exp().mean() if use_b else 0.0)
        update.step(cap, loss)
        for name, group in zip(seen, groups):
            hs = [p.hess_diag.reshape(-1) for p in group["params"] if p.hess_diag is not None]
            seen[name].append(th.cat(hs))
        assert (head_b.weight.hess_diag is not None) == use_b
    logged = {}
    update.record(type("Logger", (), {"record": lambda self, k, v: logged.__setitem__(k, v)})())
    for name, hs in seen.items():
        assert logged[f"train/hess_diag_mean/{name}"] == pytest.approx(sum(float(h.mean()) for h in hs) / len(hs), rel=1e-5)
        assert logged[f"train/hess_diag_max/{name}"] == float(th.cat(hs).max())
    logged.clear()
    update.record(type("Logger", (), {"record": lambda self, k, v: logged.__setitem__(k, v)})())
    assert not any(k.startswith("train/hess_diag") for k in logged)  # reset by record()


@pytest.mark.parametrize("case", ["general", "linear", "second_equals_first"])
def test_gaussian_head_derivatives_equal_autograd(case):
    """``gaussian_head_derivatives`` against autograd's gradient and Hessian diagonal of
    ``Σ_n ℓ_n(log π(a_n)) − c·mean_n H_n`` with ``ℓ_n(z) = ℓ'_n (z − z0_n) + ½ ℓ''_n (z − z0_n)²``
    (so ``ℓ'``, ``ℓ''`` at the point are the given ones) and SB3's Gaussian entropy, in float64:
    the general Hessian and both short routes (``d2l=None`` for A2C's ``ℓ'' = 0``, ``d2l is dl``
    for PPO's ``ℓ'' = ℓ'``)."""
    from stable_baselines3.common.distributions import DiagGaussianDistribution

    from agents.policy_hessians import gaussian_head_derivatives

    g = th.Generator().manual_seed(1)
    n, a, c = 7, 3, 0.37
    mean = th.randn(n, a, generator=g, dtype=th.float64)
    log_std = th.randn(a, generator=g, dtype=th.float64) * 0.3
    actions = th.randn(n, a, generator=g, dtype=th.float64)
    dl = th.randn(n, generator=g, dtype=th.float64)
    d2l = {"general": th.randn(n, generator=g, dtype=th.float64), "linear": None, "second_equals_first": dl}[case]

    def dist(m, s):
        return DiagGaussianDistribution(a).proba_distribution(m, s)

    z0 = dist(mean, log_std).log_prob(actions).detach()

    def loss(m, s):
        z = dist(m, s).log_prob(actions) - z0
        quadratic = 0.0 if d2l is None else 0.5 * (d2l * z * z).sum()
        return (dl * z).sum() + quadratic - c * dist(m, s).entropy().mean()

    g_mean, g_log_std, h_mean, h_log_std = gaussian_head_derivatives(mean, log_std, actions, dl, d2l, c)
    m, s = mean.clone().requires_grad_(True), log_std.clone().requires_grad_(True)
    grad_m, grad_s = th.autograd.grad(loss(m, s), [m, s])
    th.testing.assert_close(g_mean, grad_m, rtol=1e-10, atol=1e-12)
    th.testing.assert_close(g_log_std, grad_s, rtol=1e-10, atol=1e-12)
    rows = th.autograd.functional.hessian(lambda m: loss(m.reshape(n, a), log_std), mean.reshape(-1))
    th.testing.assert_close(h_mean.reshape(-1), rows.diagonal(), rtol=1e-10, atol=1e-12)
    full = th.autograd.functional.hessian(lambda s: loss(mean, s), log_std)
    th.testing.assert_close(h_log_std, full.diagonal(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("clip_range_vf", [None, 0.05])
def test_value_mse_derivatives_equal_autograd(clip_range_vf):
    """``value_mse_derivatives`` against autograd on ``vf_coef·MSE(returns, v_pred)``, with SB3's
    value clipping ``v_pred = v_old + clamp(v − v_old, −c, c)`` (entries on the bounds included)."""
    from agents.policy_hessians import value_mse_derivatives

    g = th.Generator().manual_seed(2)
    values = th.randn(9, 1, generator=g, dtype=th.float64)
    old, returns = values.reshape(-1) + 0.1 * th.randn(9, generator=g, dtype=th.float64), th.randn(9, dtype=th.float64)
    old[0] = values[0, 0] - 0.05  # exactly on a bound

    def loss(v):
        pred = v.reshape(-1) if clip_range_vf is None else old + th.clamp(v.reshape(-1) - old, -clip_range_vf, clip_range_vf)
        return 0.7 * th.nn.functional.mse_loss(returns, pred), pred

    v = values.clone().requires_grad_(True)
    value, pred = loss(v)
    (grad,) = th.autograd.grad(value, v)
    g_v, h_v = value_mse_derivatives(values, pred.detach(), returns, 0.7, old, clip_range_vf)
    th.testing.assert_close(g_v, grad, rtol=1e-12, atol=1e-14)
    hess = th.autograd.functional.hessian(lambda v: loss(v.reshape(9, 1))[0], values.reshape(-1))
    th.testing.assert_close(h_v.reshape(-1), hess.diagonal(), rtol=1e-12, atol=1e-14)
    if clip_range_vf is not None:
        assert (h_v == 0).any() and (h_v != 0).any()


def test_ppo_surrogate_dl_equals_autograd_on_ties_and_clip_bounds():
    """``ppo_surrogate_dl`` is autograd's ∂ℓ/∂log π of PPO's clipped surrogate, entry by entry: ratios
    inside, outside and on the clip bounds (ties: factor 1), zero advantages (ties outside the range)."""
    from agents.policy_hessians import ppo_surrogate_dl

    clip = 0.2
    th.manual_seed(0)
    log_ratio = th.cat([th.randn(40, dtype=th.float64) * 0.3,
                        th.log(th.tensor([0.8, 1.2, 1.0, 0.5, 1.7], dtype=th.float64))])
    advantages = th.cat([th.randn(40, dtype=th.float64), th.tensor([1.5, -2.0, 0.7, 0.0, 0.0], dtype=th.float64)])
    log_prob = log_ratio.clone().requires_grad_(True)
    ratio = th.exp(log_prob)
    unclipped = advantages * ratio
    clipped = advantages * th.clamp(ratio, 1 - clip, 1 + clip)
    loss = -th.min(unclipped, clipped).mean()
    (expected,) = th.autograd.grad(loss, log_prob)
    assert (unclipped == clipped).sum() >= 5  # ties inside the range, on its bounds and outside it
    th.testing.assert_close(ppo_surrogate_dl(unclipped, clipped, ratio, clip), expected, rtol=1e-14, atol=0)
