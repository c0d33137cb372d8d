"""AdaHessian: Hutchinson curvature |z ⊙ Hz| on problems whose Hessian is known, and its update."""

import io

import pytest
import torch

from hesscale.optim import AdaHessian, StepSizeScaling, _common


def grads_with_graph(loss, params):
    for p, g in zip(params, torch.autograd.grad(loss, params, create_graph=True)):
        p.grad = g


def diagonal_problem(seed=0):
    """f = ½ Σ a·w² + ½ Σ A·W² + b·w + Σ W³/3: Hessian diagonal a, A + 2W (no off-diagonal terms)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))
    W = torch.nn.Parameter(torch.randn(2, 3, generator=g, dtype=torch.float64))
    a = torch.randn(5, generator=g, dtype=torch.float64)  # both signs
    A = torch.randn(2, 3, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)

    def loss():
        return 0.5 * (a * w**2).sum() + 0.5 * (A * W**2).sum() + (b * w).sum() + (W**3).sum() / 3

    def hess_diag():
        return [a.clone(), A + 2 * W.detach()]

    return [w, W], loss, hess_diag


def test_hess_diag_is_exact_when_the_hessian_is_diagonal():
    params, loss, hess_diag = diagonal_problem()
    opt = AdaHessian(params, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        expected = [h.abs() for h in hess_diag()]
        grads_with_graph(loss(), params)
        opt.step()
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.hess_diag, e, rtol=1e-12, atol=1e-12)


def test_hess_diag_is_one_rademacher_hessian_vector_product():
    """f = ½ θᵀMθ with M = [[a, b], [b, d]]: |z ⊙ Mz| = (|a + s·b|, |d + s·b|) with s = z1·z2 = ±1."""
    a, b, d = 2.0, 0.5, -3.0
    M = torch.tensor([[a, b], [b, d]], dtype=torch.float64)
    theta = torch.nn.Parameter(torch.tensor([0.3, -0.2], dtype=torch.float64))
    opt = AdaHessian([theta], lr=0.0, generator=torch.Generator().manual_seed(0))
    seen = set()
    for _ in range(20):
        opt.zero_grad()
        grads_with_graph(0.5 * theta @ M @ theta, [theta])
        opt.step()
        hd = theta.hess_diag.tolist()
        s = 1 if hd == pytest.approx([abs(a + b), abs(d + b)]) else -1
        assert hd == pytest.approx([abs(a + s * b), abs(d + s * b)])
        seen.add(s)
    assert seen == {1, -1}  # z is random, not fixed


def test_hessian_vector_product_couples_parameters_of_all_groups():
    """f = Σ x·y (x, y in different groups): ∂²f/∂x² = 0 but Hz couples them, so |z ⊙ Hz| = 1."""
    x = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    y = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = AdaHessian([{"params": [x]}, {"params": [y]}], generator=torch.Generator().manual_seed(0))
    grads_with_graph((x * y).sum(), [x, y])
    opt.step()
    assert torch.equal(x.hess_diag, torch.ones(4, dtype=torch.float64))
    assert torch.equal(y.hess_diag, torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("k", [1.0, 0.5])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_updates_follow_the_equations(k, wd):
    params, loss, hess_diag = diagonal_problem(1)
    lr, (b1, b2), eps = 0.1, (0.8, 0.95), 1e-4
    opt = AdaHessian(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, hessian_power=k,
                     generator=torch.Generator().manual_seed(0))
    theta = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, 6):
        opt.zero_grad()
        D = [h.abs() for h in hess_diag()]
        grads_with_graph(loss(), params)
        gs = [p.grad.detach().clone() for p in params]
        opt.step()
        for i, p in enumerate(params):
            theta[i] = theta[i] - lr * wd * theta[i]
            m[i] = b1 * m[i] + (1 - b1) * gs[i]
            v[i] = b2 * v[i] + (1 - b2) * D[i] ** 2
            denom = (torch.sqrt(v[i]) / (1 - b2**t) ** 0.5) ** k + eps
            theta[i] = theta[i] - lr * (m[i] / (1 - b1**t)) / denom
            torch.testing.assert_close(p.detach(), theta[i], rtol=1e-12, atol=1e-12)


def test_gradient_without_graph_is_a_clear_error():
    params, loss, _ = diagonal_problem()
    opt = AdaHessian([{"params": params, "name": "actor"}])
    loss().backward()
    with pytest.raises(RuntimeError, match=r"actor\[0\].*create_graph=True"):
        opt.step()


def test_same_generator_seed_same_trajectory_and_state_dict_round_trip():
    def make(seed_params):
        params, loss, _ = diagonal_problem(seed_params)
        return params, loss, AdaHessian(params, lr=0.05, generator=torch.Generator().manual_seed(123))

    (p1, l1, o1), (p2, l2, o2) = make(2), make(2)
    for _ in range(3):
        for params, loss, opt in ((p1, l1, o1), (p2, l2, o2)):
            opt.zero_grad()
            grads_with_graph(loss(), params)
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))

    buf = io.BytesIO()
    torch.save(o1.state_dict(), buf)
    buf.seek(0)
    p3, l3, _ = diagonal_problem(2)
    with torch.no_grad():
        for a, b in zip(p3, p1):
            a.copy_(b)
    o3 = AdaHessian(p3, lr=1.0, generator=torch.Generator().manual_seed(999))
    o3.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(3):
        for params, loss, opt in ((p1, l1, o1), (p3, l3, o3)):
            opt.zero_grad()
            grads_with_graph(loss(), params)
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(p1, p3))


@pytest.mark.parametrize("flat_limit", [_common.FLAT_LIMIT, 0])
def test_scaled_adahessian_uses_its_estimate_as_curvature(flat_limit, monkeypatch):
    monkeypatch.setattr(_common, "FLAT_LIMIT", flat_limit)
    params, loss, hess_diag = diagonal_problem(3)
    lr, delta = 0.1, 1e-3
    opt = StepSizeScaling(AdaHessian(params, lr=lr, generator=torch.Generator().manual_seed(0)), delta=delta)
    e = [torch.zeros_like(p) for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, 4):
        opt.zero_grad()
        D = [h.abs() for h in hess_diag()]
        grads_with_graph(loss(), params)
        gs = [p.grad.detach().clone() for p in params]
        before = [p.detach().clone() for p in params]
        opt.step()
        us, total = [], 0.0
        for i in range(len(params)):
            m[i] = 0.9 * m[i] + 0.1 * gs[i]
            v[i] = 0.999 * v[i] + 0.001 * D[i] ** 2
            us.append(lr * (m[i] / (1 - 0.9**t)) / (torch.sqrt(v[i]) / (1 - 0.999**t) ** 0.5 + 1e-4))
            e[i] = 0.999 * e[i] + 0.001 * D[i] ** 2
            total += float((torch.sqrt(e[i]) * us[i] ** 2).sum())
        alpha = min(1.0, (2 * delta / total) ** 0.5)
        assert opt.last_scales[0] == pytest.approx(alpha, rel=1e-10)
        assert alpha < 1.0
        for p, b, u in zip(params, before, us):
            torch.testing.assert_close(p.detach(), b - alpha * u, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, bad",
    [(dict(lr=-0.1), "-0.1"), (dict(eps=0.0), "0.0"), (dict(betas=(0.9, 1.0)), "1.0"),
     (dict(hessian_power=1.5), "1.5"), (dict(weight_decay=-1.0), "-1.0")],
)
def test_invalid_hyperparameters_are_rejected(kwargs, bad):
    params, _, _ = diagonal_problem()
    with pytest.raises(ValueError, match=bad):
        AdaHessian(params, **kwargs)


def test_zero_grad_clears_the_estimate():
    params, loss, _ = diagonal_problem()
    opt = AdaHessian(params)
    grads_with_graph(loss(), params)
    opt.step()
    assert all(p.hess_diag is not None for p in params)
    opt.zero_grad()
    assert all(p.grad is None and p.hess_diag is None for p in params)


def test_two_optimizers_can_share_one_loss_graph():
    """RL agents keep one optimizer per network; their gradients may come from one loss."""
    x = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    y = torch.nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64))
    ox, oy = AdaHessian([x], generator=torch.Generator().manual_seed(0)), AdaHessian([y])
    expected_x, expected_y = (2 * y.detach()).abs(), (6 * y.detach()).abs()  # ∂²/∂x² = 2y, ∂²/∂y² = 6y
    grads_with_graph((x**2 * y).sum() + (y**3).sum(), [x, y])
    ox.step()
    oy.step()  # would fail if the first HVP had freed the shared graph
    torch.testing.assert_close(x.hess_diag, expected_x)
    torch.testing.assert_close(y.hess_diag, expected_y)
