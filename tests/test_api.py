"""Public API behaviour: output structure, aux, jit and vmap, num_samples and warnings."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import cpjax
from tests.helpers import assert_unbiased, reference_diag, sample_variance

KEY = jax.random.key(0)
X = jnp.array([0.21, -0.47, 0.33, 0.78, -0.62, 0.15])
MIX = jnp.array([
    [0.5, 0.2, 0.1, 0.0, 0.1, 0.1],
    [0.1, 0.4, 0.2, 0.1, 0.0, 0.2],
    [0.0, 0.3, 0.3, 0.2, 0.2, 0.0],
    [0.2, 0.0, 0.1, 0.5, 0.1, 0.1],
    [0.1, 0.1, 0.0, 0.2, 0.4, 0.2],
    [0.3, 0.1, 0.1, 0.0, 0.2, 0.3],
])
PARAMS = {
    "dense": {"weights": jnp.array([[0.4, -0.3], [0.2, 0.7]]), "bias": jnp.array([0.1, -0.2])},
    "scale": jnp.array(1.5),
}
BATCH = jnp.array([[0.5, -0.2], [-0.7, 0.3], [0.2, 0.8]])


def mixed(x):
    """A function whose single-probe estimate has nonzero variance on every coordinate.

    x has two uses, so the separable-axis form (exact here for `MIX @ x` alone) is off.
    """
    weights = jnp.array([1.0, -0.7, 0.5, -1.3, 0.9, -0.4])
    return jnp.sum(weights * jnp.sin(2 * MIX @ x)) + 0.3 * jnp.sum(x**3)


def network(params, x):
    h = jnp.tanh(x @ params["dense"]["weights"] + params["dense"]["bias"])
    return jnp.sum(jnp.sin(params["scale"] * h))


def assert_same_structure(actual, expected):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected),
                    strict=True):
        assert a.shape == e.shape
        assert a.dtype == e.dtype


def test_dict_params_structure():
    diag = cpjax.cp_hessian_diag(network)(PARAMS, BATCH, key=KEY)
    assert_same_structure(diag, PARAMS)


def test_tuple_argnums_structure():
    diag = cpjax.cp_hessian_diag(network, argnums=(0, 1))(PARAMS, BATCH, key=KEY)
    assert isinstance(diag, tuple)
    assert len(diag) == 2
    assert_same_structure(diag[0], PARAMS)
    assert_same_structure(diag[1], BATCH)


def test_unsorted_argnums_structure():
    diag = cpjax.cp_hessian_diag(network, argnums=(1, 0))(PARAMS, BATCH, key=KEY)
    assert_same_structure(diag[0], BATCH)
    assert_same_structure(diag[1], PARAMS)


def test_unsorted_argnums_values():
    def separate(a, b):
        return jnp.sum(a**3) + jnp.sum(b**4)

    a, b = jnp.array([1.0, 2.0]), jnp.array([1.0, 2.0, 3.0])
    _, grad, diag = cpjax.cp_value_grad_and_hessian_diag(separate, argnums=(1, 0))(a, b, key=KEY)
    expected_grad = jax.grad(separate, argnums=(1, 0))(a, b)
    assert grad[0].shape == b.shape
    np.testing.assert_allclose(grad[0], expected_grad[0], rtol=1e-12)
    np.testing.assert_allclose(grad[1], expected_grad[1], rtol=1e-12)
    np.testing.assert_allclose(diag[0], 12 * b**2, rtol=1e-12)
    np.testing.assert_allclose(diag[1], 6 * a, rtol=1e-12)


def test_one_element_argnums_tuple():
    diag = cpjax.cp_hessian_diag(network, argnums=(0,))(PARAMS, BATCH, key=KEY)
    assert isinstance(diag, tuple)
    assert len(diag) == 1
    assert_same_structure(diag[0], PARAMS)


def test_negative_argnums():
    diag = cpjax.cp_hessian_diag(network, argnums=-1)(PARAMS, BATCH, key=KEY)
    assert_same_structure(diag, BATCH)


def test_float32_dtype_kept():
    x32 = X.astype(jnp.float32)
    diag = cpjax.cp_hessian_diag(mixed)(x32, key=KEY)
    assert diag.dtype == jnp.float32


def test_has_aux_returns_aux():
    def with_aux(params, x):
        h = x @ params["dense"]["weights"]
        return network(params, x), {"hidden": h, "count": jnp.arange(3)}

    diag, aux = cpjax.cp_hessian_diag(with_aux, has_aux=True)(PARAMS, BATCH, key=KEY)
    _, expected = with_aux(PARAMS, BATCH)
    assert_same_structure(aux, expected)
    np.testing.assert_allclose(aux["hidden"], expected["hidden"], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(aux["count"], expected["count"])
    assert_same_structure(diag, PARAMS)


def test_non_differentiated_arguments():
    """Integer arrays and Python numbers may be passed outside argnums."""

    def indexed(x, index, power):
        return jnp.sum(jnp.sin(x[index]) ** power)

    index = jnp.array([0, 2, 2, 5])
    diag = cpjax.cp_hessian_diag(indexed)(X, index, 3, key=KEY)
    exact = reference_diag(indexed, (X, index, 3))
    assert_unbiased(cpjax.cp_hessian_diag(indexed), (X, index, 3), exact, n=500)
    assert diag.shape == X.shape


def _weighted_cube(a, b, *, scale=1.0, mode="cube"):
    return jnp.sum(scale * a**3 * b) if mode == "cube" else jnp.sum(a * b)


@pytest.mark.parametrize("transform", [
    cpjax.cp_hessian_diag, cpjax.cp_hessian_trace, cpjax.cp_hessian,
    cpjax.cp_hessian_factors, cpjax.hutchinson_hessian_diag,
])
def test_keyword_arguments_passed_on(transform):
    """Keyword arguments reach the function, undifferentiated, as with jax.grad."""
    a, b = jnp.array([1.0, 2.0]), jnp.array([0.5, 3.0])
    by_keyword = transform(_weighted_cube)(a, b=b, scale=jnp.array(2.0), key=KEY)
    positional = transform(lambda a, b, s: _weighted_cube(a, b, scale=s))(
        a, b, jnp.array(2.0), key=KEY)
    jax.tree_util.tree_map(np.testing.assert_array_equal, by_keyword, positional)


def test_keyword_arguments_static_and_jitted():
    """Python keyword values stay static, and keyword arrays are traced under jax.jit."""
    a, b = jnp.array([1.0, 2.0]), jnp.array([0.5, 3.0])
    diag_fn = cpjax.cp_hessian_diag(_weighted_cube)
    np.testing.assert_array_equal(diag_fn(a, b=b, mode="linear", key=KEY), jnp.zeros(2))
    jitted = jax.jit(lambda a, b: diag_fn(a, b=b, key=KEY))
    np.testing.assert_allclose(jitted(a, b), 6 * a * b, rtol=1e-6)
    _, grad, _ = cpjax.cp_value_grad_and_hessian_diag(_weighted_cube)(a, b=b, key=KEY)
    np.testing.assert_allclose(grad, 3 * a**2 * b, rtol=1e-6)
    np.testing.assert_allclose(cpjax.exact_hessian_diag(_weighted_cube)(a, b=b), 6 * a * b,
                               rtol=1e-6)
    np.testing.assert_allclose(cpjax.becker_lecun_hessian_diag(_weighted_cube)(a, b=b),
                               6 * a * b, rtol=1e-6)
    hessian = cpjax.cp_hessian(_weighted_cube)(a, b=b, mode="linear", key=KEY)
    np.testing.assert_array_equal(hessian, jnp.zeros((2, 2)))


def test_same_key_same_estimate():
    first = cpjax.cp_hessian_diag(mixed)(X, key=KEY)
    second = cpjax.cp_hessian_diag(mixed)(X, key=KEY)
    np.testing.assert_array_equal(first, second)


def test_different_keys_differ():
    first = cpjax.cp_hessian_diag(mixed)(X, key=jax.random.key(1))
    second = cpjax.cp_hessian_diag(mixed)(X, key=jax.random.key(2))
    assert not np.allclose(first, second)


def test_legacy_uint32_key():
    diag = cpjax.cp_hessian_diag(mixed)(X, key=jax.random.PRNGKey(0))
    assert diag.shape == X.shape


def test_jit_composes():
    diag_fn = cpjax.cp_hessian_diag(network)
    jitted = jax.jit(diag_fn)(PARAMS, BATCH, key=KEY)
    eager = diag_fn(PARAMS, BATCH, key=KEY)
    for a, e in zip(jax.tree_util.tree_leaves(jitted), jax.tree_util.tree_leaves(eager),
                    strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12)


def test_vmap_over_inputs():
    diag_fn = cpjax.cp_hessian_diag(mixed)
    xs = jnp.stack([X, 0.5 * X, X[::-1], X + 0.3])
    batched = jax.vmap(lambda x: diag_fn(x, key=KEY))(xs)
    assert batched.shape == xs.shape
    for i in range(xs.shape[0]):
        np.testing.assert_allclose(batched[i], diag_fn(xs[i], key=KEY), rtol=1e-12, atol=1e-12)


def test_vmap_over_keys_and_inputs():
    diag_fn = cpjax.cp_hessian_diag(mixed)
    xs = jnp.stack([X, 0.5 * X, X[::-1]])
    keys = jax.random.split(KEY, 3)
    batched = jax.vmap(lambda x, k: diag_fn(x, key=k))(xs, keys)
    for i in range(xs.shape[0]):
        np.testing.assert_allclose(batched[i], diag_fn(xs[i], key=keys[i]), rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.parametrize("num_samples", [4])
def test_num_samples_unbiased(num_samples):
    estimator = cpjax.cp_hessian_diag(mixed, num_samples=num_samples)
    assert_unbiased(estimator, (X,), reference_diag(mixed, (X,)))


@functools.cache
def single_probe_variance(probe):
    return sample_variance(cpjax.cp_hessian_diag(mixed, probe=probe), (X,), n=2000, seed=1)


@pytest.mark.parametrize(
    ("num_samples", "probe"), [(4, "rademacher"), (16, "rademacher"), (4, "gaussian")]
)
def test_num_samples_divides_variance(num_samples, probe):
    """K probes average to a variance of about 1/K of one probe's, on every coordinate."""
    single = single_probe_variance(probe)
    averaged = sample_variance(
        cpjax.cp_hessian_diag(mixed, num_samples=num_samples, probe=probe), (X,), n=2000, seed=2
    )
    assert np.all(single > 1e-6)
    ratio = averaged / single
    assert np.all(ratio >= 0.5 / num_samples), ratio
    assert np.all(ratio <= 2.0 / num_samples), ratio


def product(x):
    return jnp.prod(1.5 + x)


def test_fallback_warning_names_primitive():
    with pytest.warns(cpjax.FallbackWarning, match="no curvature rule for primitive 'reduce_prod'"):
        cpjax.cp_hessian_diag(product)(X, key=KEY)


def test_fallback_warning_names_source_line():
    with pytest.warns(cpjax.FallbackWarning, match=r"test_api\.py:\d+"):
        cpjax.cp_hessian_diag(product)(X, key=KEY)


def test_while_loop_raises_curvature_error():
    def looped(x):
        def body(carry):
            y, i = carry
            return jnp.sin(y) * 1.1, i + 1

        y, _ = lax.while_loop(lambda carry: carry[1] < 3, body, (x, 0))
        return jnp.sum(y**2)

    with pytest.raises(cpjax.CurvatureError, match="while_loop"):
        cpjax.cp_hessian_diag(looped)(X, key=KEY)
