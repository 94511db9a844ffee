"""Problems reported against other Hessian-diagonal tools, checked against jax.hessian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import cpjax
from tests import cases
from tests.helpers import assert_unbiased, draw_estimates, reference_diag

CASES = [
    pytest.param(cases.scatter_update, cases.scatter_update_args(), id="scatter_update"),
    pytest.param(
        cases.self_attention_power, cases.self_attention_power_args(), id="self_attention_power"
    ),
    pytest.param(cases.coupled_cubic, cases.coupled_cubic_args(), id="coupled_cubic"),
    pytest.param(cases.weight_sharing, cases.weight_sharing_args(), id="weight_sharing"),
]


@pytest.mark.parametrize(("fun", "args"), CASES)
def test_case_unbiased(fun, args):
    exact = reference_diag(fun, args)
    assert_unbiased(cpjax.cp_hessian_diag(fun), args, exact)


# The same functions with every use of the leaf given its own copy. The sum of the copies'
# diagonals is what an estimator that drops the cross terms between uses converges to.
def self_attention_untied(x1, x2, x3):
    return jnp.sum(jnp.exp(x1 @ x2.T / x1.shape[1]) @ x3)


def weight_sharing_untied(w1, w2, w3, x):
    h = jnp.tanh(x @ w1)
    h = jnp.tanh(h @ w2.T)
    return jnp.sum(h**2) + jnp.sum(w3 * w3 * w3)


def _self_attention_untied_diag():
    (x,) = cases.self_attention_power_args()
    return sum(reference_diag(self_attention_untied, (x, x, x), (0, 1, 2)))


def _weight_sharing_untied_diag():
    params, x = cases.weight_sharing_args()
    w = params["w"]
    return {"w": sum(reference_diag(weight_sharing_untied, (w, w, w, x), (0, 1, 2)))}


CROSS_TERM_CASES = [
    pytest.param(
        cases.self_attention_power, cases.self_attention_power_args(),
        _self_attention_untied_diag, id="self_attention_power",
    ),
    pytest.param(
        cases.weight_sharing, cases.weight_sharing_args(), _weight_sharing_untied_diag,
        id="weight_sharing",
    ),
]


@pytest.mark.parametrize(("fun", "args", "untied_diag"), CROSS_TERM_CASES)
def test_case_keeps_cross_terms(fun, args, untied_diag):
    """A K-probe average lands within 6 standard errors (single-probe std / √K) of exact.

    On some coordinate the bound is three times tighter than the gap between the exact
    diagonal and the one with the cross terms between uses of the leaf dropped, so an
    estimator that pruned them would fail the test.
    """
    num_samples = 8192
    exact = np.asarray(ravel_pytree(reference_diag(fun, args))[0])
    pruned = np.asarray(ravel_pytree(untied_diag())[0])
    single_std = draw_estimates(cpjax.cp_hessian_diag(fun), args, n=2000, seed=11).std(axis=0)
    estimator = cpjax.cp_hessian_diag(fun, num_samples=num_samples)
    estimate = np.asarray(ravel_pytree(estimator(*args, key=jax.random.key(12)))[0])

    bound = 6 * single_std / np.sqrt(num_samples) + 1e-9
    error = np.abs(estimate - exact)
    assert np.all(error <= bound), (error, bound)
    assert np.any(np.abs(pruned - exact) > 3 * bound)
