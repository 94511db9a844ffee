"""sample_chunk_size: the diagonal averaged over chunks of probes, with memory of one chunk."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpjax
from tests.helpers import assert_unbiased, reference_diag


def loss(params, x):
    h = jnp.tanh(x @ params["w"])
    return jnp.mean((h @ params["v"]) ** 2) + jnp.sum(jnp.sin(params["v"]))


def inputs(width=6, batch=32):
    k = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(k[0], (3, width)) / 2,
              "v": jax.random.normal(k[1], (width,))}
    return params, jax.random.normal(k[2], (batch, 3))


@pytest.mark.parametrize("chunk", [2, 4])
def test_chunked_diagonal_unbiased(chunk):
    """Five probes in chunks of 2 (a scanned chunk and a remainder) or of 4 (a remainder)."""
    args = inputs()
    estimator = cpjax.cp_hessian_diag(loss, num_samples=5, sample_chunk_size=chunk)
    assert_unbiased(estimator, args, reference_diag(loss, args), n=1000)


def test_chunk_not_smaller_than_samples_is_one_sweep():
    args, key = inputs(), jax.random.key(1)
    whole = cpjax.cp_hessian_diag(loss, num_samples=4)(*args, key=key)
    chunked = cpjax.cp_hessian_diag(loss, num_samples=4, sample_chunk_size=4)(*args, key=key)
    for name in whole:
        np.testing.assert_array_equal(chunked[name], whole[name])


def test_chunked_value_and_grad_exact():
    args = inputs()
    value, grad, _ = cpjax.cp_value_grad_and_hessian_diag(
        loss, num_samples=6, sample_chunk_size=4)(*args, key=jax.random.key(1))
    ref_value, ref_grad = jax.value_and_grad(loss)(*args)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    for name in grad:
        np.testing.assert_allclose(grad[name], ref_grad[name], rtol=1e-12, atol=1e-14)


def test_chunks_bound_compiled_memory():
    """XLA's memory analysis: 64 probes in chunks of 8 need far less scratch than in one."""
    args, key = inputs(width=64, batch=256), jax.random.key(1)

    def scratch_bytes(chunk):
        estimator = cpjax.cp_hessian_diag(loss, num_samples=64, sample_chunk_size=chunk)
        compiled = jax.jit(lambda p, x, k: estimator(p, x, key=k)).lower(*args, key).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    whole, chunked = scratch_bytes(None), scratch_bytes(8)
    assert chunked < 0.35 * whole, (chunked, whole)


def test_ggn_accepts_chunks():
    params, x = inputs()
    model = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]  # noqa: E731
    square = lambda z: jnp.mean(z ** 2)  # noqa: E731
    estimate = cpjax.cp_ggn_diag(model, square, num_samples=5, sample_chunk_size=2)(
        params, x, key=jax.random.key(2))
    assert jax.tree.map(jnp.shape, estimate) == jax.tree.map(jnp.shape, params)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_invalid_chunk_size_rejected(bad):
    with pytest.raises(ValueError, match="sample_chunk_size"):
        cpjax.cp_hessian_diag(loss, num_samples=4, sample_chunk_size=bad)
