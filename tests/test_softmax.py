"""A softmax written out as exp, sum and divide, kept as one node: which ones, correctness."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import cpjax
from cpjax import _softmax
from tests.helpers import assert_unbiased, reference_diag, sample_variance
from tests.test_chains import nodes_of

KEYS = jax.random.split(jax.random.key(23), 4)
X = jax.random.normal(KEYS[0], (6, 4), jnp.float64)  # six positions of width four
W = jax.random.normal(KEYS[1], (3, 4, 4), jnp.float64) / 2  # query, key and value weights
MASK = jnp.tril(jnp.ones((6, 6), bool))


def attention(w, x):
    """Causal softmax attention of one head, then a smooth readout."""
    q, k, v = (x @ w[i] for i in range(3))
    scores = jnp.where(MASK, q @ k.T, -1e9)
    return jnp.sum(jnp.sin(jax.nn.softmax(scores, axis=-1) @ v))


def softmax_over_first_axis(x):
    e = jnp.exp(x)
    return e / e.sum(axis=0)  # the sum comes back with a broadcast, not keepdims


def softmax_over_two_axes(x):
    e = jnp.exp(x)
    return e / jnp.sum(e, axis=(1, 2), keepdims=True)


def test_attention_softmax_becomes_one_node():
    nodes = nodes_of(attention, W.astype(jnp.float32), X.astype(jnp.float32))
    fused = [n for n in nodes if n.composite == "softmax"]
    assert len(fused) == 1
    assert fused[0].params["name"] == "softmax"
    assert not [n for n in nodes if n.primitive in (jax.lax.exp_p, jax.lax.div_p)]


def multi_head_attention(w, x):
    """Two heads of width two, split by a reshape, as the suite's transformer does."""
    q, k, v = ((x @ w[i]).reshape(6, 2, 2) for i in range(3))
    scores = jnp.einsum("qhd,khd->hqk", q, k)
    weights = jax.nn.softmax(jnp.where(MASK, scores, -1e9), axis=-1)
    return jnp.sum(jnp.sin(jnp.einsum("hqk,khd->qhd", weights, v)))


def test_flat_stacking_matches_concatenation(monkeypatch):
    # The bilinear rule stacks [K v_b; v_a] on flat rows (`_stack_flat`) when K > 1. The
    # estimate must equal the one from a plain concatenation in the operand's shape.
    from cpjax.rules import bilinear

    def estimate():
        def fun(w, x):  # a new function on each call, so that no cached trace is reused
            return multi_head_attention(w, x)

        return cpjax.cp_hessian_diag(fun, argnums=(0, 1), num_samples=3)(
            W, X, key=jax.random.key(5))

    calls = []

    def counted(stack):
        def stack_and_count(t, u):
            calls.append(t.ndim)
            return stack(t, u)

        return stack_and_count

    monkeypatch.setattr(bilinear, "_stack_flat", counted(bilinear._stack_flat))
    flat = estimate()
    assert calls == [4] * 4  # two products with two operands each, rows with four axes
    monkeypatch.setattr(bilinear, "_stack_flat", counted(lambda t, u: jnp.concatenate([t, u])))
    concatenated = estimate()
    assert len(calls) == 8
    for a, b in zip(flat, concatenated, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    assert np.abs(flat[1]).max() > 0


@pytest.mark.parametrize("softmax", [softmax_over_first_axis, softmax_over_two_axes])
def test_written_out_softmax_becomes_one_node(softmax):
    nodes = nodes_of(lambda x: jnp.sum(jnp.cos(softmax(x))), jnp.ones((3, 4, 2)))
    assert [n.composite for n in nodes].count("softmax") == 1


def test_exponential_read_elsewhere_not_fused():
    """exp(x) is also used outside the softmax, so the four equations cannot be one node."""
    def fun(x):
        e = jnp.exp(x)
        return jnp.sum(jnp.cos(e / e.sum(axis=1, keepdims=True))) + jnp.sum(e * e)

    nodes = nodes_of(fun, jnp.ones((2, 3)))
    assert all(n.composite != "softmax" for n in nodes)
    x = X[:2, :3]
    assert_unbiased(cpjax.cp_hessian_diag(fun), (x,), reference_diag(fun, (x,)))


def test_attention_unbiased_at_weights_and_input():
    estimator = cpjax.cp_hessian_diag(attention, argnums=(0, 1))
    assert_unbiased(estimator, (W, X), reference_diag(attention, (W, X), argnums=(0, 1)))


@pytest.mark.parametrize("softmax", [softmax_over_first_axis, softmax_over_two_axes])
def test_written_out_softmax_unbiased(softmax):
    weights = jnp.cos(jnp.arange(24.0)).reshape(2, 3, 4)

    def fun(x):
        return jnp.sum(weights * softmax(jnp.sin(x) * x[::-1]))

    x = jnp.linspace(-1.2, 1.3, 24).reshape(2, 3, 4)
    assert_unbiased(cpjax.cp_hessian_diag(fun), (x,), reference_diag(fun, (x,)))


def test_value_and_gradient_unchanged():
    value, grad, _ = cpjax.cp_value_grad_and_hessian_diag(attention)(W, X, key=KEYS[2])
    want_value, want_grad = jax.value_and_grad(attention)(W, X)
    assert abs(float(value - want_value)) < 1e-12
    assert np.allclose(grad, want_grad, rtol=0, atol=1e-12)


def test_variance_lower_than_inlined(monkeypatch):
    """One probe per row, against three for the exponential and the quotient's 2 × 2 block.

    In a run of this test the fused rule's summed variance was 0.9 % of the inlined
    equations', because the masked scores make the exponential's and the quotient's
    curvatures large and opposite. The test requires only that it be no larger.
    """
    estimator = cpjax.cp_hessian_diag(attention)
    fused = sample_variance(estimator, (W, X), 1000, 7)
    monkeypatch.setattr(_softmax, "fuse_softmax", lambda program: program)
    assert all(n.composite != "softmax" for n in nodes_of(attention, W, X))
    inlined = sample_variance(cpjax.cp_hessian_diag(attention), (W, X), 1000, 7)
    assert fused.sum() <= inlined.sum()


def test_gradient_of_estimate_finite_where_masked():
    """Masked scores give p = 0 and zero curvature, where the square root must not give NaN."""
    def objective(x):
        return jnp.sum(cpjax.cp_hessian_diag(attention)(W, x, key=KEYS[3]))

    grad = jax.grad(objective)(X)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_attention_keeps_dtype(dtype):
    diag = cpjax.cp_hessian_diag(attention)(W.astype(dtype), X.astype(dtype), key=KEYS[3])
    assert diag.dtype == dtype
    assert np.all(np.isfinite(np.asarray(diag, np.float32)))


def test_becker_lecun_exact_at_the_softmax():
    """Applied to the argument itself, the softmax's diagonal is exact in Becker-LeCun."""
    weights = jnp.cos(jnp.arange(20.0).reshape(4, 5))

    def fun(x):
        return jnp.sum(weights * jax.nn.softmax(x, axis=-1))

    x = jax.random.normal(KEYS[3], (4, 5), jnp.float64)
    np.testing.assert_allclose(cpjax.becker_lecun_hessian_diag(fun)(x),
                               reference_diag(fun, (x,)), rtol=1e-8, atol=1e-10)


def test_becker_lecun_closer_with_softmax_whole(monkeypatch):
    """Becker-LeCun drops fewer cross terms with the softmax as one node than as four.

    Relative errors against the exact diagonal were 1.7 (weights) and 0.9 (input) with the
    softmax whole, 26 and 14 with it inlined.
    """
    exact = reference_diag(attention, (W, X), argnums=(0, 1))
    whole = cpjax.becker_lecun_hessian_diag(attention, argnums=(0, 1))(W, X)
    monkeypatch.setattr(_softmax, "fuse_softmax", lambda program: program)
    inlined = cpjax.becker_lecun_hessian_diag(attention, argnums=(0, 1))(W, X)
    for got_whole, got_inlined, want in zip(whole, inlined, exact, strict=True):
        assert np.all(np.isfinite(got_whole))
        error_whole = np.linalg.norm(got_whole - want) / np.linalg.norm(want)
        error_inlined = np.linalg.norm(got_inlined - want) / np.linalg.norm(want)
        assert error_whole < error_inlined


def test_gauss_newton_with_softmax_in_model_unbiased():
    """A softmax in the model part stays silent: the estimate is still the Gauss-Newton one."""
    def model(w, x):
        q, k, v = (x @ w[i] for i in range(3))
        return jax.nn.softmax(jnp.where(MASK, q @ k.T, -1e9), axis=-1) @ v

    def loss(z):
        return jnp.sum(jnp.log1p(z * z))

    exact = cpjax.exact_ggn_diag(model, loss)(W, X, loss_args=())
    assert_unbiased(cpjax.cp_ggn_diag(model, loss), (W, X), exact)


def test_softmax_in_scan_body_grouped_and_unbiased():
    """Loop bodies get the same grouping: one softmax node in the body's program."""
    from cpjax.rules.scan import _body_program

    def fun(x):
        def step(carry, _):
            return jax.nn.softmax(carry * x, axis=-1) + 0.5 * carry, None

        return jnp.sum(jnp.sin(lax.scan(step, x, None, length=3)[0]))

    x = X[:2]
    (scan,) = [e for e in jax.make_jaxpr(fun)(x).eqns if e.primitive is lax.scan_p]
    body = _body_program(scan.params["jaxpr"])
    assert [n.composite for n in body.nodes].count("softmax") == 1
    assert_unbiased(cpjax.cp_hessian_diag(fun), (x,), reference_diag(fun, (x,)))


def test_softmax_in_cond_branch_unbiased():
    def fun(x):
        return lax.cond(jnp.sum(x) > 0, lambda z: jnp.sum(jnp.cos(jax.nn.softmax(z * z))),
                        lambda z: jnp.sum(z), x)

    x = jnp.abs(X[:2]) + 0.1
    assert_unbiased(cpjax.cp_hessian_diag(fun), (x,), reference_diag(fun, (x,)))
