"""The estimator family: full Hessian, factors, trace, Becker-LeCun and Gauss-Newton."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpjax
from tests.helpers import assert_unbiased, reference_diag


def coupled(params):
    a, b = params["a"], params["b"]
    return jnp.sum(jnp.tanh(a @ b)) + jnp.sum(a**3) * b[0, 0] + jnp.sum(jnp.exp(b))


def coupled_params():
    return {"a": jnp.arange(6.0).reshape(2, 3) / 5, "b": jnp.arange(3.0)[:, None] / 4 + 0.2}


def relu_skip(params, x, y):
    """A ReLU network with a skip connection and a convex loss (GGN equals the Hessian)."""
    h = jax.nn.relu(x @ params["w1"])
    h = h + jax.nn.relu(h @ params["w2"])
    return 0.5 * jnp.sum((h @ params["w3"] - y) ** 2)


def relu_skip_model(params, x):
    h = jax.nn.relu(x @ params["w1"])
    h = h + jax.nn.relu(h @ params["w2"])
    return h @ params["w3"]


def squared_error(z, y):
    return 0.5 * jnp.sum((z - y) ** 2)


def relu_skip_args(seed=1, batch=8, d=5, width=6, out=2):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    params = {
        "w1": jax.random.normal(k[0], (d, width)),
        "w2": jax.random.normal(k[1], (width, width)) / 3,
        "w3": jax.random.normal(k[2], (width, out)),
    }
    return params, jax.random.normal(k[3], (batch, d)), jax.random.normal(k[4], (batch, out))


def tanh_model(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


def cross_entropy(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


def tanh_args(seed=4, batch=10, d=4, width=5, classes=3):
    k = jax.random.split(jax.random.key(seed), 4)
    params = {
        "w1": jax.random.normal(k[0], (d, width)),
        "w2": jax.random.normal(k[1], (width, classes)),
    }
    return params, jax.random.normal(k[2], (batch, d)), jax.random.randint(k[3], (batch,), 0,
                                                                           classes)


def test_cp_hessian_shape_like_jax_hessian():
    params = coupled_params()
    estimate = cpjax.cp_hessian(coupled)(params, key=jax.random.key(0))
    exact = jax.hessian(coupled)(params)
    assert jax.tree_util.tree_structure(estimate) == jax.tree_util.tree_structure(exact)
    for got, want in zip(jax.tree_util.tree_leaves(estimate), jax.tree_util.tree_leaves(exact),
                         strict=True):
        assert got.shape == want.shape


def test_cp_hessian_unbiased_every_entry():
    """Every entry, cross blocks included: 2,000 probes, z = 6, fixed seed."""
    params = coupled_params()
    exact = jax.hessian(coupled)(params)
    assert_unbiased(cpjax.cp_hessian(coupled), (params,), exact)


def test_cp_hessian_symmetric():
    x = jnp.linspace(-0.5, 0.5, 4)
    square = cpjax.cp_hessian(lambda x: jnp.sum(jnp.tanh(jnp.outer(x, x))), num_samples=3)(
        x, key=jax.random.key(2))
    assert jnp.allclose(square, square.T, atol=1e-14)


def test_cp_hessian_blocks_transposed():
    params = coupled_params()
    blocks = cpjax.cp_hessian(coupled, num_samples=3)(params, key=jax.random.key(2))
    ab, ba = blocks["a"]["b"], blocks["b"]["a"]
    assert jnp.allclose(ab, jnp.transpose(ba, (2, 3, 0, 1)), atol=1e-14)


def test_cp_hessian_tuple_argnums():
    x, y = jnp.array([0.3, -0.2]), jnp.array([0.5, 0.1, 0.4])

    def f(x, y):
        return jnp.sum(jnp.sin(jnp.outer(x, y)))

    exact = jax.hessian(f, argnums=(0, 1))(x, y)
    assert_unbiased(cpjax.cp_hessian(f, argnums=(0, 1)), (x, y), exact)


def test_factors_shapes_and_samples():
    params = coupled_params()
    t, u = cpjax.cp_hessian_factors(coupled, num_samples=5)(params, key=jax.random.key(1))
    for name, value in params.items():
        assert t[name].shape == (5, *value.shape)
        assert u[name].shape == (5, *value.shape)


def test_factors_same_vector_when_psd():
    t, u = cpjax.cp_hessian_factors(lambda x: jnp.sum(x**2), num_samples=3)(
        jnp.ones(4), key=jax.random.key(0))
    assert jnp.array_equal(t, u)


def test_factors_give_off_diagonal_entry():
    """`T_a U_b` estimates H[a, b]: 2,000 probes, z = 6, fixed seed."""
    params = coupled_params()
    exact = jax.hessian(coupled)(params)["a"]["b"][1, 2, 0, 0]
    factors = cpjax.cp_hessian_factors(coupled)

    def entry(params, key):
        t, u = factors(params, key=key)
        return t["a"][0, 1, 2] * u["b"][0, 0, 0]

    assert_unbiased(entry, (params,), exact)


def test_trace_unbiased():
    params = coupled_params()
    diag = reference_diag(coupled, (params,))
    exact = sum(jnp.sum(d) for d in jax.tree_util.tree_leaves(diag))
    assert_unbiased(cpjax.cp_hessian_trace(coupled), (params,), exact)


def test_trace_with_aux():
    f = lambda x: (jnp.sum(x**3), x.shape)  # noqa: E731
    trace, aux = cpjax.cp_hessian_trace(f, has_aux=True)(jnp.array([1.0, 2.0]),
                                                        key=jax.random.key(0))
    assert jnp.allclose(trace, 18.0)
    assert aux == (2,)


def test_becker_lecun_exact_on_separate_coordinates():
    x = jnp.array([0.2, -0.4, 0.9])

    def f(x):
        return jnp.sum(jnp.exp(x)) + jnp.sum(jnp.tanh(x) ** 2) + jnp.sum(x**4)

    got = cpjax.becker_lecun_hessian_diag(f)(x)
    assert jnp.allclose(got, jnp.diagonal(jax.hessian(f)(x)), atol=1e-12)


def test_becker_lecun_exact_last_layer():
    """For the weights right before a softmax, the diagonal of the softmax curvature is exact."""
    params, x, labels = tanh_args()

    def loss(params, x, labels):
        return cross_entropy(tanh_model(params, x), labels)

    got = cpjax.becker_lecun_hessian_diag(loss)(params, x, labels)
    exact = reference_diag(loss, (params, x, labels))
    assert jnp.allclose(got["w2"], exact["w2"], atol=1e-12)


def test_becker_lecun_biased_when_units_interact():
    params, x, labels = tanh_args()

    def loss(params, x, labels):
        return cross_entropy(tanh_model(params, x), labels)

    got = cpjax.becker_lecun_hessian_diag(loss)(params, x, labels)
    exact = reference_diag(loss, (params, x, labels))
    assert not jnp.allclose(got["w1"], exact["w1"], atol=1e-6)


def test_becker_lecun_deterministic_under_jit():
    params, x, labels = tanh_args()

    def loss(params, x, labels):
        return cross_entropy(tanh_model(params, x), labels)

    first = cpjax.becker_lecun_hessian_diag(loss)(params, x, labels)
    second = jax.jit(cpjax.becker_lecun_hessian_diag(loss))(params, x, labels)
    assert jnp.allclose(first["w1"], second["w1"], atol=1e-14)


def test_becker_lecun_unknown_primitive_named():
    with pytest.raises(cpjax.CurvatureError, match="no rule for primitive 'cumprod'"):
        cpjax.becker_lecun_hessian_diag(lambda x: jnp.sum(jnp.cumprod(x)))(jnp.ones(3))


def test_exact_ggn_equals_hessian_for_relu():
    params, x, y = relu_skip_args()
    ggn = cpjax.exact_ggn_diag(relu_skip_model, squared_error)(params, x, loss_args=(y,))
    hessian = reference_diag(relu_skip, (params, x, y))
    for name in params:
        assert jnp.allclose(ggn[name], hessian[name], atol=1e-10)


@pytest.mark.parametrize("separable", [True, False])
def test_cp_ggn_unbiased_relu(separable):
    """Relu network, convex loss: mean of CP-GGN equals the Hessian diagonal (z = 6)."""
    params, x, y = relu_skip_args()
    exact = reference_diag(relu_skip, (params, x, y))

    def estimator(params, x, key):
        return cpjax.cp_ggn_diag(relu_skip_model, squared_error, separable=separable)(
            params, x, loss_args=(y,), key=key)

    assert_unbiased(estimator, (params, x), exact)


def test_cp_hessian_diag_relu_matches_ggn_mean():
    params, x, y = relu_skip_args()
    exact = cpjax.exact_ggn_diag(relu_skip_model, squared_error)(params, x, loss_args=(y,))
    assert_unbiased(cpjax.cp_hessian_diag(relu_skip), (params, x, y), exact)


def test_cp_ggn_unbiased_tanh_cross_entropy():
    params, x, labels = tanh_args()
    exact = cpjax.exact_ggn_diag(tanh_model, cross_entropy)(params, x, loss_args=(labels,))

    def estimator(params, x, key):
        return cpjax.cp_ggn_diag(tanh_model, cross_entropy)(params, x, loss_args=(labels,),
                                                             key=key)

    assert_unbiased(estimator, (params, x), exact)


def test_cp_ggn_never_negative():
    params, x, labels = tanh_args()
    estimate = cpjax.cp_ggn_diag(tanh_model, cross_entropy, num_samples=3)(
        params, x, loss_args=(labels,), key=jax.random.key(7))
    for leaf in jax.tree_util.tree_leaves(estimate):
        assert np.all(np.asarray(leaf) >= 0)


def test_cp_ggn_differs_from_hessian_for_tanh():
    params, x, labels = tanh_args()
    ggn = cpjax.exact_ggn_diag(tanh_model, cross_entropy)(params, x, loss_args=(labels,))

    def loss(params, x, labels):
        return cross_entropy(tanh_model(params, x), labels)

    hessian = reference_diag(loss, (params, x, labels))
    assert not jnp.allclose(ggn["w1"], hessian["w1"], atol=1e-6)


def test_cp_ggn_loss_args_not_tuple():
    params, x, labels = tanh_args()
    with pytest.raises(TypeError, match="loss_args to be a tuple"):
        cpjax.cp_ggn_diag(tanh_model, cross_entropy)(params, x, loss_args=labels,
                                                      key=jax.random.key(0))


def test_ggn_python_arguments_stay_static():
    """Strings among the model's and the loss's arguments stay static, as in the Hessian API."""

    def model(w, x, activation):
        return jnp.tanh(x @ w) if activation == "tanh" else x @ w

    def loss(z, y, reduction):
        return 0.5 * jnp.sum((z - y) ** 2) * (2.0 if reduction == "double" else 1.0)

    w, x, y = jnp.ones((3, 2)) / 3, jnp.arange(12.0).reshape(4, 3) / 10, jnp.zeros((4, 2))
    for activation, reduction in [("tanh", "single"), ("linear", "double")]:
        exact = cpjax.exact_ggn_diag(model, loss)(w, x, activation, loss_args=(y, reduction))
        assert_unbiased(
            lambda w, key, a=activation, r=reduction: cpjax.cp_ggn_diag(model, loss)(
                w, x, a, loss_args=(y, r), key=key), (w,), exact)


def test_ggn_vector_loss_rejected():
    model = lambda w, x: x @ w  # noqa: E731
    w, x = jnp.ones((3, 2)), jnp.ones((4, 3))
    calls = [(cpjax.cp_ggn_diag, {"key": jax.random.key(0)}), (cpjax.exact_ggn_diag, {})]
    for transform, kwargs in calls:
        with pytest.raises(TypeError, match=r"scalar output.*shape \(4, 2\).*jnp\.sum"):
            transform(model, lambda z: z**2)(w, x, **kwargs)


def test_fused_ggn_value_and_grad_exact():
    params, x, labels = tanh_args()
    value, grad, diag = cpjax.cp_value_grad_and_ggn_diag(tanh_model, cross_entropy)(
        params, x, loss_args=(labels,), key=jax.random.key(3))
    expected = cpjax.cp_ggn_diag(tanh_model, cross_entropy)(
        params, x, loss_args=(labels,), key=jax.random.key(3))

    def loss(params):
        return cross_entropy(tanh_model(params, x), labels)

    ref_value, ref_grad = jax.value_and_grad(loss)(params)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    for name in params:
        np.testing.assert_allclose(grad[name], ref_grad[name], rtol=1e-10, atol=1e-14)
        np.testing.assert_array_equal(diag[name], expected[name])


def test_fused_ggn_unbiased_tanh_cross_entropy():
    params, x, labels = tanh_args()
    exact = cpjax.exact_ggn_diag(tanh_model, cross_entropy)(params, x, loss_args=(labels,))
    fused = cpjax.cp_value_grad_and_ggn_diag(tanh_model, cross_entropy)

    def estimator(params, x, key):
        return fused(params, x, loss_args=(labels,), key=key)[2]

    assert_unbiased(estimator, (params, x), exact)


def test_becker_lecun_float32_inside_float64_loss():
    """A float32 intermediate (as in a float32 softmax) keeps its dtype in the sweep."""

    def loss(w, x):
        y = jnp.exp(x * w).astype(jnp.float32)
        return jnp.sum(jnp.tanh(y / jnp.sum(y)).astype(jnp.float64) ** 2)

    w, x = jnp.linspace(-0.5, 0.5, 4), jnp.linspace(1.0, 2.0, 4)
    diag = cpjax.becker_lecun_hessian_diag(loss)(w, x)
    assert diag.dtype == jnp.float64
    assert np.all(np.isfinite(np.asarray(diag)))
