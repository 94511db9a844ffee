"""A function of separate coordinates has a diagonal Hessian that one Rademacher probe recovers.

With each coordinate fed to one elementwise function, the estimate at coordinate i is
φ_i''(x_i) v_i² for a single probe entry v_i. Rademacher entries have v_i² = 1, so every
estimate is exact; Gaussian entries do not, so there the estimate is only unbiased.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpjax
from tests.helpers import assert_unbiased, draw_estimates, reference_diag

X = jnp.array([0.3, -0.8, 1.2, 0.5, -0.4, 0.9, 1.5, -1.1, 0.2])


def separate_coordinates(x):
    return jnp.sum(jnp.sin(x[:3])) + jnp.sum(jnp.exp(x[3:6])) + jnp.sum(x[6:] ** 3)


def separate_coordinates_pytree(params):
    return (
        jnp.sum(jnp.sin(params["a"]))
        + jnp.sum(jnp.exp(params["b"]))
        + jnp.sum(params["c"] ** 3)
    )


@pytest.mark.parametrize("separable", [True, False])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_rademacher_exact(separable, num_samples):
    exact = np.asarray(reference_diag(separate_coordinates, (X,)))
    estimator = cpjax.cp_hessian_diag(
        separate_coordinates, num_samples=num_samples, separable=separable
    )
    samples = draw_estimates(estimator, (X,), n=50, seed=3)
    np.testing.assert_allclose(samples, np.broadcast_to(exact, samples.shape), rtol=0, atol=1e-10)


def test_rademacher_exact_pytree():
    params = {"a": X[:3], "b": X[3:6], "c": X[6:]}
    exact = reference_diag(separate_coordinates_pytree, (params,))
    estimate = cpjax.cp_hessian_diag(separate_coordinates_pytree)(params, key=jax.random.key(5))
    for name in params:
        np.testing.assert_allclose(estimate[name], exact[name], rtol=0, atol=1e-10)


def test_gaussian_unbiased():
    exact = reference_diag(separate_coordinates, (X,))
    estimator = cpjax.cp_hessian_diag(separate_coordinates, probe="gaussian")
    assert_unbiased(estimator, (X,), exact)


def test_gaussian_not_exact():
    exact = np.asarray(reference_diag(separate_coordinates, (X,)))
    estimator = cpjax.cp_hessian_diag(separate_coordinates, probe="gaussian")
    samples = draw_estimates(estimator, (X,), n=50, seed=3)
    assert np.all(samples.std(axis=0) > 1e-3 * np.abs(exact))


def test_shared_coordinates_unbiased():
    """Several elementwise functions of the same x: each draws its own probe, still unbiased."""

    def shared(x):
        return jnp.sum(jnp.sin(x)) + jnp.sum(jnp.exp(x)) + jnp.sum(x**3)

    assert_unbiased(cpjax.cp_hessian_diag(shared), (X,), reference_diag(shared, (X,)))
