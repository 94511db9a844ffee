"""The value and gradient from cp_value_grad_and_hessian_diag match jax.value_and_grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import cpjax

KEY = jax.random.key(0)
X = jnp.array([0.21, -0.47, 0.33, 0.78, -0.62, 0.15])
PARAMS = {
    "weights": jnp.array([[0.4, -0.3], [0.2, 0.7], [-0.5, 0.1]]),
    "bias": jnp.array([0.1, -0.2]),
}
BATCH = jnp.array([[0.5, -0.2, 0.9], [-0.7, 0.3, 0.1], [0.2, 0.8, -0.4], [-0.1, -0.6, 0.6]])
LABELS = jnp.array([0, 1, 1, 0])


def assert_trees_close(actual, expected):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected),
                    strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12)


def smooth_vector(x):
    return jnp.sum(jnp.tanh(x) * jnp.exp(x[::-1])) + jnp.prod(1 + x**2)


def cond_vector(x):
    return lax.cond(jnp.sum(x) > 0, lambda x: jnp.sum(jnp.sin(x) ** 2), jnp.sum, x)


def classifier(params, x, labels):
    log_probs = jax.nn.log_softmax(jnp.tanh(x @ params["weights"] + params["bias"]))
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def two_arguments(a, b):
    return jnp.sum(jnp.sin(a) * jnp.exp(b)) + jnp.sum(a**2 / (1 + b**2))


VALUE_GRAD_CASES = [
    pytest.param(smooth_vector, (X,), 0, id="smooth_vector"),
    pytest.param(cond_vector, (X,), 0, id="cond"),
    pytest.param(classifier, (PARAMS, BATCH, LABELS), 0, id="pytree_params"),
    pytest.param(two_arguments, (X[:3], X[3:]), (0, 1), id="tuple_argnums"),
    pytest.param(classifier, (PARAMS, BATCH, LABELS), (0, 1), id="params_and_inputs"),
]


@pytest.mark.filterwarnings("ignore::cpjax.FallbackWarning")
@pytest.mark.parametrize(("fun", "args", "argnums"), VALUE_GRAD_CASES)
def test_value_and_grad_match(fun, args, argnums):
    value, grad, _ = cpjax.cp_value_grad_and_hessian_diag(fun, argnums)(*args, key=KEY)
    expected_value, expected_grad = jax.value_and_grad(fun, argnums)(*args)
    np.testing.assert_allclose(value, expected_value, rtol=1e-12, atol=1e-12)
    assert_trees_close(grad, expected_grad)


def test_value_and_grad_has_aux():
    def with_aux(params, x, labels):
        loss = classifier(params, x, labels)
        return loss, {"loss_copy": loss, "hidden": jnp.tanh(x @ params["weights"])}

    args = (PARAMS, BATCH, LABELS)
    (value, aux), grad, _ = cpjax.cp_value_grad_and_hessian_diag(with_aux, has_aux=True)(
        *args, key=KEY
    )
    (expected_value, expected_aux), expected_grad = jax.value_and_grad(with_aux, has_aux=True)(
        *args
    )
    np.testing.assert_allclose(value, expected_value, rtol=1e-12, atol=1e-12)
    assert_trees_close(aux, expected_aux)
    assert_trees_close(grad, expected_grad)


def test_diag_matches_cp_hessian_diag():
    """With the same key, both transforms run the same sweep and return the same diagonal."""
    args = (PARAMS, BATCH, LABELS)
    _, _, diag = cpjax.cp_value_grad_and_hessian_diag(classifier)(*args, key=KEY)
    assert_trees_close(diag, cpjax.cp_hessian_diag(classifier)(*args, key=KEY))
