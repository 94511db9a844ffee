"""Elementwise chains fused into one node: which chains, unbiasedness, variance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import cpjax
from cpjax import _chains
from cpjax._trace import trace_program
from tests.helpers import assert_unbiased, reference_diag, sample_variance


def nodes_of(fun, *args):
    leaves, tree = jax.tree_util.tree_flatten(args)
    program, _ = trace_program(fun, leaves, tree)
    return program.nodes


def gelu_mlp(params, x):
    h = jax.nn.gelu(x @ params["w1"])
    return jnp.sum(jnp.sin(h @ params["w2"]))


def gelu_mlp_args(dtype=jnp.float64):
    k = jax.random.split(jax.random.key(4), 3)
    params = {"w1": jax.random.normal(k[0], (3, 4), dtype) / 2,
              "w2": jax.random.normal(k[1], (4, 2), dtype) / 2}
    return params, jax.random.normal(k[2], (5, 3), dtype)


def test_gelu_becomes_one_node():
    params, x = gelu_mlp_args(jnp.float32)
    nodes = nodes_of(gelu_mlp, params, x)
    fused = [n for n in nodes if n.composite == "elementwise"]
    assert len(fused) == 1
    assert [n.primitive.name for n in nodes] == [
        "dot_general", "jit", "dot_general", "sin", "reduce_sum"]


def test_chain_with_escaping_step_not_fused():
    """tanh(x) is used after the chain ends, so the chain cannot be one node."""
    def fun(x):
        t = jnp.tanh(x)
        return jnp.sum(jnp.exp(t) * 2.0) + jnp.sum(t @ x.T)

    nodes = nodes_of(fun, jnp.ones((2, 2)))
    assert all(n.composite is None for n in nodes)


def test_single_nonlinear_step_not_fused():
    nodes = nodes_of(lambda x: jnp.sum(jnp.tanh(x * 2.0 + 1.0) @ x.T), jnp.ones((2, 2)))
    assert all(n.composite is None for n in nodes)


@pytest.mark.parametrize("approximate", [True, False])
def test_gelu_mlp_unbiased(approximate):
    def fun(params, x):
        h = jax.nn.gelu(x @ params["w1"], approximate=approximate)
        return jnp.sum(jnp.sin(h @ params["w2"]))

    args = gelu_mlp_args()
    assert_unbiased(cpjax.cp_hessian_diag(fun), args, reference_diag(fun, args))


def test_hand_written_swish_unbiased_at_both_inputs():
    def fun(w, x):
        z = x @ w
        return jnp.sum(z / (1.0 + jnp.exp(-z)) * jnp.cos(z))

    (params, x) = gelu_mlp_args()
    w = params["w1"]
    assert any(n.composite == "elementwise" for n in nodes_of(fun, w, x))
    assert_unbiased(cpjax.cp_hessian_diag(fun, argnums=(0, 1)), (w, x),
                    reference_diag(fun, (w, x), argnums=(0, 1)))


def test_gauss_newton_with_fused_model_chain_unbiased():
    """A chain in the model part stays silent: the estimate is still the Gauss-Newton one."""
    params, x = gelu_mlp_args()

    def model(params, x):
        return jax.nn.gelu(x @ params["w1"]) @ params["w2"]

    def loss(z):
        return jnp.sum(jnp.log1p(z * z))

    exact = cpjax.exact_ggn_diag(model, loss)(params, x, loss_args=())
    assert_unbiased(cpjax.cp_ggn_diag(model, loss), (params, x), exact)


def test_fused_gelu_variance_not_worse(monkeypatch):
    args = gelu_mlp_args()
    estimator = cpjax.cp_hessian_diag(gelu_mlp)
    fused = sample_variance(estimator, args, 1000, 6)
    monkeypatch.setattr(_chains, "fuse_elementwise_chains", lambda program: program)
    unfused = sample_variance(cpjax.cp_hessian_diag(gelu_mlp), args, 1000, 6)
    total_fused = sum(float(v.sum()) for v in jax.tree_util.tree_leaves(fused))
    total_unfused = sum(float(v.sum()) for v in jax.tree_util.tree_leaves(unfused))
    assert total_fused <= total_unfused
