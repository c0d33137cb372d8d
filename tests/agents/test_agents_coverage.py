"""Agents on the curvature path: the caller's arguments untouched, modules without a rule named by
their attribute path (at construction and ``learn()``, never at ``load()``), normalisation layers
inside SB3 policies, and ``hessian_diagonal(..., modules=...)``."""
import copy
import warnings

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

import agents
import hesscale
import hesscale.rules.registry as registry
from reference import exact_diag_by_double_backward

OPTIMIZERS = [None, {"name": "adam"}, {"name": "rmsprop"}, {"name": "sgd"}, {"name": "adahesscale"},
              {"name": "adahessian"}, {"name": "adam", "scaling": {"enabled": True}}]
SMALL = {"PPO": dict(n_steps=16, batch_size=16, n_epochs=1), "A2C": dict(n_steps=4),
         "SAC": dict(buffer_size=500, learning_starts=0, batch_size=16)}


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: "none" if o is None else str(o))
@pytest.mark.parametrize("algo", ["PPO", "A2C", "SAC"])
def test_one_kwargs_dict_builds_the_same_agent_twice(algo, optimizer):
    """SB3's A2C writes optimizer_class/kwargs into policy_kwargs; the caller's dicts stay as given."""
    policy_kwargs = dict(net_arch=[8], activation_fn=nn.Tanh)
    kwargs = dict(SMALL[algo])
    opt = copy.deepcopy(optimizer)
    before = copy.deepcopy((policy_kwargs, kwargs, opt))
    first = getattr(agents, algo)("MlpPolicy", "Pendulum-v1", optimizer=opt, policy_kwargs=policy_kwargs, **kwargs)
    second = getattr(agents, algo)("MlpPolicy", "Pendulum-v1", optimizer=opt, policy_kwargs=policy_kwargs, **kwargs)
    assert (policy_kwargs, kwargs, opt) == before
    optimizers = [m.actor.optimizer if algo == "SAC" else m.policy.optimizer for m in (first, second)]
    assert type(optimizers[0]) is type(optimizers[1])


class Hardswished(BaseFeaturesExtractor):
    """A features extractor with a module the core has no rule for, at ``features_extractor.act``."""

    def __init__(self, observation_space, features_dim: int = 4):
        super().__init__(observation_space, features_dim)
        self.lin = nn.Linear(observation_space.shape[0], features_dim)
        self.act = nn.Hardswish()

    def forward(self, obs):
        return self.act(self.lin(obs))


def test_module_without_a_rule_fails_at_construction_and_learn_but_loads_and_acts(tmp_path, monkeypatch):
    pk = dict(features_extractor_class=Hardswished, net_arch=[8])
    with pytest.raises(hesscale.UnsupportedModuleError) as e:
        agents.PPO("MlpPolicy", "Pendulum-v1", optimizer={"name": "adahesscale"}, policy_kwargs=pk, **SMALL["PPO"])
    msg = str(e.value)
    assert "'features_extractor.act' of type Hardswish" in msg and "Supported: " in msg and "LayerNorm" in msg
    assert "hesscale.register_rule" in msg and "optimizer={'name': 'adam'}" in msg

    # A model trained where a rule was registered, loaded where it is not: load() and predict() work.
    monkeypatch.setitem(registry._RULES, nn.Hardswish, hesscale.ElementwiseRule(lambda m, x, y: th.ones_like(x)))
    model = agents.PPO("MlpPolicy", "Pendulum-v1", optimizer={"name": "adahesscale"}, policy_kwargs=pk,
                       seed=0, **SMALL["PPO"])
    model.learn(16)
    model.save(tmp_path / "m.zip")
    monkeypatch.delitem(registry._RULES, nn.Hardswish)
    loaded = agents.PPO.load(tmp_path / "m.zip", env=model.get_env())
    obs = model.get_env().reset()
    th.testing.assert_close(th.as_tensor(loaded.predict(obs, deterministic=True)[0]),
                            th.as_tensor(model.predict(obs, deterministic=True)[0]))
    with pytest.raises(hesscale.UnsupportedModuleError, match="'features_extractor.act' of type Hardswish"):
        loaded.learn(16)


def test_sac_paths_name_the_network():
    with pytest.raises(hesscale.UnsupportedModuleError, match=r"'actor\.latent_pi\.1' of type Hardswish"):
        agents.SAC("MlpPolicy", "Pendulum-v1", optimizer={"name": "adahesscale"},
                   policy_kwargs=dict(net_arch=[8], activation_fn=nn.Hardswish), **SMALL["SAC"])


class BatchNormExtractor(BaseFeaturesExtractor):
    """SB3's test extractor shape: Flatten → BatchNorm1d → Dropout (as in SB3's train/eval mode test)."""

    def __init__(self, observation_space):
        super().__init__(observation_space, observation_space.shape[0])
        self.flatten, self.bn, self.dropout = nn.Flatten(), nn.BatchNorm1d(observation_space.shape[0]), nn.Dropout(0.5)

    def forward(self, obs):
        return self.dropout(self.bn(self.flatten(obs)))


@pytest.mark.parametrize("algo", ["PPO", "SAC"])
def test_batch_norm_extractor_trains_on_the_curvature_path_and_round_trips(tmp_path, algo):
    model = getattr(agents, algo)("MlpPolicy", "Pendulum-v1", optimizer={"name": "adahesscale"}, seed=1,
                                  policy_kwargs=dict(features_extractor_class=BatchNormExtractor, net_arch=[8]),
                                  **SMALL[algo])
    bn = model.policy.features_extractor.bn if algo == "PPO" else model.actor.features_extractor.bn
    model.learn(32)
    assert bn.weight.hess_diag is not None and th.isfinite(bn.weight.hess_diag).all()
    assert int(bn.num_batches_tracked) > 0
    model.save(tmp_path / "m.zip")
    loaded = getattr(agents, algo).load(tmp_path / "m.zip", env=model.get_env())
    loaded_bn = loaded.policy.features_extractor.bn if algo == "PPO" else loaded.actor.features_extractor.bn
    th.testing.assert_close(loaded_bn.running_mean, bn.running_mean)
    loaded.learn(16)


def test_hessian_diagonal_of_a_subset_of_modules(float64):
    """``modules=`` leaves out a module without a rule; the captured last layer is exact (MSE)."""

    class Weird(nn.Module):
        def forward(self, x):
            return x * th.sigmoid(x)

    th.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), Weird(), nn.Linear(4, 2))
    x, y = th.randn(5, 3), th.randn(5, 2)
    with pytest.raises(hesscale.UnsupportedModuleError, match=r"'1' of type Weird.*modules="):
        hesscale.hessian_diagonal(model, nn.MSELoss(), x, y)
    ref = exact_diag_by_double_backward(model, nn.MSELoss(), x, y)
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-module operations" warning for the uncaptured trunk
        by_path = hesscale.hessian_diagonal(model, nn.MSELoss(), x, y, modules=["2"])
    assert by_path.keys() == {"2.weight", "2.bias"}
    for k in by_path:
        th.testing.assert_close(by_path[k], ref[k], rtol=1e-10, atol=1e-10)
    grads = th.autograd.grad(nn.MSELoss()(model(x), y), list(model.parameters()))
    for p, g in zip(model.parameters(), grads):  # every parameter's .grad, as loss.backward() gives
        th.testing.assert_close(p.grad, g)
    model.zero_grad()
    by_object = hesscale.hessian_diagonal(model, nn.MSELoss(), x, y, modules=[model[2]])
    assert by_object.keys() == by_path.keys()
    with pytest.raises(ValueError, match="not a submodule"):
        hesscale.hessian_diagonal(model, nn.MSELoss(), x, y, modules=[nn.Linear(4, 2)])


GSDE_CASES = [("PPO", None), ("A2C", None), ("SAC", "gn"), ("SAC", "exact"), ("SAC", "expln")]


@pytest.mark.parametrize("algo,route", GSDE_CASES)
def test_gsde_trains_on_the_curvature_path_saves_loads_and_resumes(tmp_path, algo, route):
    """gSDE on the curvature path; SAC with ``use_expln`` (no closed form) takes the autograd route."""
    cls = getattr(agents, algo)
    optimizer = {"name": "adahesscale", "scaling": {"enabled": True}}
    policy_kwargs = dict(net_arch=[8])
    if route is not None:
        optimizer["actor_curvature"] = "exact" if route == "exact" else "gn"
    if route == "expln":
        policy_kwargs["use_expln"] = True
    model = cls("MlpPolicy", "Pendulum-v1", optimizer=optimizer,
                use_sde=True, sde_sample_freq=4, seed=0, policy_kwargs=policy_kwargs, **SMALL[algo])
    if algo == "SAC":
        assert model._actor_gn is (route == "gn")
    model.learn(32)
    log_std = model.policy.log_std if algo != "SAC" else model.actor.log_std
    assert log_std.shape == (8, 1) and th.isfinite(log_std.hess_diag).all() and log_std.hess_diag.abs().max() > 0
    model.save(tmp_path / "m.zip")
    loaded = cls.load(tmp_path / "m.zip", env=model.get_env())
    optimizer_of = (lambda m: m.policy.optimizer) if algo != "SAC" else (lambda m: m.actor.optimizer)
    saved, restored = optimizer_of(model).state_dict(), optimizer_of(loaded).state_dict()
    th.testing.assert_close(restored["optimizer"]["state"], saved["optimizer"]["state"], rtol=0, atol=0)
    assert saved["optimizer"]["state"] and restored["scaler"].keys() == saved["scaler"].keys()
    obs = model.get_env().reset()
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])
    loaded.learn(16, reset_num_timesteps=False)
    assert loaded.divergence is None and loaded.num_timesteps > model.num_timesteps
