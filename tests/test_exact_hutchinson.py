"""The baselines: exact_hessian_diag matches jax.hessian, hutchinson_hessian_diag is unbiased."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpjax
from tests.helpers import assert_unbiased, reference_diag

X = jnp.array([0.21, -0.47, 0.33, 0.78, -0.62, 0.15, 0.9, -0.05, 0.4])
PARAMS = {
    "weights": jnp.array([[0.4, -0.3], [0.2, 0.7], [-0.5, 0.1]]),
    "bias": jnp.array([0.1, -0.2]),
}
BATCH = jnp.array([[0.5, -0.2, 0.9], [-0.7, 0.3, 0.1], [0.2, 0.8, -0.4], [-0.1, -0.6, 0.6]])


def coupled(x):
    return jnp.sum(jnp.sin(x) * jnp.exp(x[::-1])) + jnp.sum(x) ** 3


def network(params, x):
    h = jnp.tanh(x @ params["weights"] + params["bias"])
    return jnp.sum(jnp.sin(h) * h[::-1])


def two_arguments(a, b):
    return jnp.sum(jnp.sin(a) * jnp.exp(b)) + jnp.sum(a) * jnp.sum(b**2)


def assert_trees_close(actual, expected, atol):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected),
                    strict=True):
        np.testing.assert_allclose(a, e, rtol=0, atol=atol)


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_exact_vector(chunk_size):
    # 9 coordinates: chunk sizes 1 and 4 split them unevenly, 64 takes them in one chunk.
    diag = cpjax.exact_hessian_diag(coupled, chunk_size=chunk_size)(X)
    np.testing.assert_allclose(diag, reference_diag(coupled, (X,)), rtol=0, atol=1e-10)


def test_exact_pytree_params():
    diag = jax.jit(cpjax.exact_hessian_diag(network, chunk_size=3))(PARAMS, BATCH)
    assert_trees_close(diag, reference_diag(network, (PARAMS, BATCH)), atol=1e-10)


def test_exact_tuple_argnums():
    a, b = X[:4], X[4:8]
    diag = jax.jit(cpjax.exact_hessian_diag(two_arguments, argnums=(0, 1), chunk_size=2))(a, b)
    assert isinstance(diag, tuple)
    assert_trees_close(diag, reference_diag(two_arguments, (a, b), (0, 1)), atol=1e-10)


def test_exact_has_aux():
    def with_aux(x):
        return coupled(x), {"double": 2 * x}

    diag, aux = jax.jit(cpjax.exact_hessian_diag(with_aux, has_aux=True))(X)
    np.testing.assert_allclose(diag, reference_diag(coupled, (X,)), rtol=0, atol=1e-10)
    np.testing.assert_allclose(aux["double"], 2 * X, rtol=0, atol=1e-15)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_unbiased(probe):
    estimator = cpjax.hutchinson_hessian_diag(coupled, probe=probe)
    assert_unbiased(estimator, (X,), reference_diag(coupled, (X,)))


def test_hutchinson_unbiased_pytree():
    estimator = cpjax.hutchinson_hessian_diag(network)
    assert_unbiased(estimator, (PARAMS, BATCH), reference_diag(network, (PARAMS, BATCH)))


def test_hutchinson_num_samples_unbiased():
    estimator = cpjax.hutchinson_hessian_diag(coupled, num_samples=4)
    assert_unbiased(estimator, (X,), reference_diag(coupled, (X,)))
