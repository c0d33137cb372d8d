"""``capture`` on Stable-Baselines3 policies, against exact references (float32, as SB3 runs)."""
import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

import hesscale
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.sac.policies import SACPolicy

RTOL = dict(rtol=2e-4, atol=1e-7)


def exact_diag(loss_fn, params):
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    out = []
    for p, g in zip(params, grads):
        flat = g.reshape(-1)
        rows = [torch.autograd.grad(flat[i], p, retain_graph=True)[0].reshape(-1)[i] for i in range(p.numel())]
        out.append(torch.stack(rows).reshape(p.shape))
    return out


def _spaces(obs_dim=3, act_dim=2):
    obs = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
    act = gym.spaces.Box(-1, 1, (act_dim,), np.float32)
    return obs, act


def test_capture_ppo_loss_on_actor_critic_policy():
    torch.manual_seed(0)
    obs_space, act_space = _spaces()
    policy = ActorCriticPolicy(obs_space, act_space, lambda _: 3e-4, net_arch=dict(pi=[16, 16], vf=[16, 16]))
    n = 32
    obs = torch.randn(n, 3)
    with torch.no_grad():
        actions, _, old_logp = policy(obs)
    old_logp = old_logp - 0.1 * torch.rand(n)
    adv, returns = torch.randn(n), torch.randn(n)

    def ppo_loss():
        values, logp, entropy = policy.evaluate_actions(obs, actions)
        ratio = torch.exp(logp - old_logp)
        pg = -torch.min(adv * ratio, adv * ratio.clamp(0.8, 1.2)).mean()
        return pg + 0.01 * -entropy.mean() + 0.5 * F.mse_loss(returns, values.flatten())

    params = [policy.action_net.weight, policy.action_net.bias, policy.value_net.weight, policy.value_net.bias, policy.log_std]
    ref = exact_diag(ppo_loss, params)
    policy.zero_grad()
    with hesscale.capture(policy) as cap:
        loss = ppo_loss()
    cap.backward(loss)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.hess_diag, r, **RTOL)
    # every parameter got a gradient and a curvature
    for name, p in policy.named_parameters():
        assert p.grad is not None and p.hess_diag.shape == p.shape, name


def test_capture_sac_actor_loss_through_the_critic():
    torch.manual_seed(1)
    obs_space, act_space = _spaces(4, 2)
    policy = SACPolicy(obs_space, act_space, lambda _: 3e-4, net_arch=[16, 16])
    actor, critic = policy.actor, policy.critic
    n = 24
    obs, noise, alpha = torch.randn(n, 4), torch.randn(n, 2), 0.2

    def actor_loss():
        mean, log_std, _ = actor.get_action_dist_params(obs)
        std = log_std.exp()
        u = mean + std * noise
        a = torch.tanh(u)
        logp = torch.distributions.Normal(mean, std).log_prob(u).sum(1) - torch.log(1 - a**2 + 1e-6).sum(1)
        q = torch.min(*critic(obs, a))
        return (alpha * logp - q.flatten()).mean()

    params = [actor.mu.weight, actor.mu.bias, actor.log_std.weight, actor.log_std.bias]
    ref = exact_diag(actor_loss, params)
    with hesscale.capture(actor) as cap:
        loss = actor_loss()
    cap.backward(loss)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.hess_diag, r, **RTOL)
    assert all(p.grad is None for p in critic.parameters())
