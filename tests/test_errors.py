"""Argument checks: each mistake raises one exception type with a message naming the fix."""

import jax
import jax.numpy as jnp
import pytest

import cpjax

X = jnp.array([0.1, 0.2, 0.3])
KEY = jax.random.key(0)


def cube_sum(x):
    return jnp.sum(x**3)


# The three random estimators share every check below. exact_hessian_diag shares the ones
# that need no key, tested at the end.
ESTIMATORS = [
    pytest.param(cpjax.cp_hessian_diag, id="cp_hessian_diag"),
    pytest.param(cpjax.cp_value_grad_and_hessian_diag, id="cp_value_grad_and_hessian_diag"),
    pytest.param(cpjax.hutchinson_hessian_diag, id="hutchinson_hessian_diag"),
]


@pytest.mark.parametrize("transform", ESTIMATORS)
def test_non_scalar_output(transform):
    with pytest.raises(TypeError, match=r"requires a function with a scalar output.*shape \(3,\)"):
        transform(lambda x: x**2)(X, key=KEY)


@pytest.mark.parametrize("transform", ESTIMATORS)
def test_integer_argument(transform):
    with pytest.raises(TypeError, match="requires real floating-point inputs.*dtype int"):
        transform(cube_sum)(jnp.array([1, 2, 3]), key=KEY)


@pytest.mark.parametrize("transform", ESTIMATORS)
def test_boolean_argument(transform):
    with pytest.raises(TypeError, match="requires real floating-point inputs.*dtype bool"):
        transform(lambda x: jnp.sum(x))(jnp.array([True, False]), key=KEY)


@pytest.mark.parametrize("transform", ESTIMATORS)
def test_missing_key(transform):
    with pytest.raises(TypeError, match=r"requires a PRNG key for its probes.*key=jax\.random"):
        transform(cube_sum)(X)


@pytest.mark.parametrize("transform", ESTIMATORS)
def test_key_not_prng_key(transform):
    with pytest.raises(TypeError, match="requires key to be a PRNG key.*got int"):
        transform(cube_sum)(X, key=3)


@pytest.mark.parametrize("transform", ESTIMATORS)
def test_zero_num_samples(transform):
    with pytest.raises(ValueError, match="requires num_samples >= 1, got num_samples=0"):
        transform(cube_sum, num_samples=0)


@pytest.mark.parametrize("transform", ESTIMATORS)
def test_float_num_samples(transform):
    with pytest.raises(TypeError, match="requires an integer num_samples, got 2.0"):
        transform(cube_sum, num_samples=2.0)


@pytest.mark.parametrize("transform", ESTIMATORS)
def test_unknown_probe(transform):
    with pytest.raises(ValueError, match="unknown probe 'foo'; expected one of 'rademacher'"):
        transform(cube_sum, probe="foo")


@pytest.mark.parametrize("transform", ESTIMATORS)
def test_complex_input(transform):
    with pytest.raises(TypeError, match="does not support complex inputs.*complex128"):
        transform(lambda z: jnp.sum(jnp.abs(z) ** 2))(X + 1j, key=KEY)


@pytest.mark.parametrize("transform", ESTIMATORS)
def test_has_aux_without_pair(transform):
    with pytest.raises(TypeError, match=r"has_aux=True requires the function to return a pair"):
        transform(cube_sum, has_aux=True)(X, key=KEY)


@pytest.mark.parametrize("transform", ESTIMATORS)
def test_has_aux_with_triple(transform):
    with pytest.raises(TypeError, match=r"return a pair \(output, aux\).*\(\*, \*, \*\)"):
        transform(lambda x: (cube_sum(x), x, x), has_aux=True)(X, key=KEY)


@pytest.mark.parametrize("transform", ESTIMATORS)
def test_argnums_out_of_range(transform):
    with pytest.raises(ValueError, match="argnums=3 refers to argument 3"):
        transform(cube_sum, argnums=3)(X, key=KEY)


@pytest.mark.parametrize("transform", ESTIMATORS)
def test_integer_output(transform):
    with pytest.raises(TypeError, match="requires a real floating-point output.*int"):
        transform(lambda x: cube_sum(x).astype(jnp.int32))(X, key=KEY)


def test_not_callable():
    with pytest.raises(TypeError, match="requires a callable as its first argument, got 3"):
        cpjax.cp_hessian_diag(3)


def test_exact_integer_argument():
    with pytest.raises(TypeError, match="exact_hessian_diag requires real floating-point"):
        cpjax.exact_hessian_diag(cube_sum)(jnp.array([1, 2, 3]))


def test_exact_non_scalar_output():
    with pytest.raises(TypeError, match="exact_hessian_diag requires a function with a scalar"):
        cpjax.exact_hessian_diag(lambda x: x**2)(X)


def test_exact_invalid_chunk_size():
    with pytest.raises(ValueError, match="requires chunk_size >= 1, got 0"):
        cpjax.exact_hessian_diag(cube_sum, chunk_size=0)


def test_complex_intermediate_rejected():
    x = jnp.array([0.3, -0.7, 0.5])
    with pytest.raises(cpjax.CurvatureError, match="complex intermediate values"):
        cpjax.cp_hessian_diag(lambda x: jnp.sum(jnp.real(jnp.exp(1j * x))))(
            x, key=jax.random.key(0))


def test_duplicate_argnums_rejected():
    x = jnp.array([0.3, -0.7])
    with pytest.raises(ValueError, match="names the same argument twice"):
        cpjax.cp_hessian_diag(lambda a, b: jnp.sum(a**3 * b), argnums=(0, 0))(
            x, x, key=jax.random.key(0))


def test_python_arguments_stay_concrete():
    x = jnp.array([0.3, -0.7])

    def f(x, mode, power):
        return jnp.sum(x**power) if mode == "power" else jnp.sum(x)

    diag = cpjax.cp_hessian_diag(f)(x, "power", 3, key=jax.random.key(0))
    assert jnp.allclose(diag, 6 * x)


def test_cp_hessian_missing_key():
    with pytest.raises(TypeError, match="cp_hessian requires a PRNG key"):
        cpjax.cp_hessian(lambda x: jnp.sum(x**3))(jnp.ones(2))


def test_ggn_negative_argnums_model_argument():
    w, x, y = jnp.ones((3, 2)) / 3, jnp.ones((4, 3)), jnp.zeros((4, 2))

    def model(w, x):
        return jnp.tanh(x @ w)

    def loss(z, y):
        return 0.5 * jnp.sum((z - y) ** 2)

    diag = cpjax.cp_ggn_diag(model, loss, argnums=-1)(w, x, loss_args=(y,),
                                                      key=jax.random.key(0))
    assert diag.shape == x.shape
    with pytest.raises(ValueError, match="argnums=2"):
        cpjax.cp_ggn_diag(model, loss, argnums=2)(w, x, loss_args=(y,), key=jax.random.key(0))


def test_library_function_names_callers_line():
    """An equation inside a jitted JAX function is reported at the line that calls it."""
    def product_sum(x):
        return jnp.sum(jnp.cumprod(x))

    with pytest.warns(cpjax.FallbackWarning,
                      match=r"test_errors\.py:\d+:\d+ \(.*product_sum\), inside a JAX library"):
        cpjax.cp_hessian_diag(product_sum)(X, key=KEY)

    def fft_power(x):
        return jnp.sum(jnp.abs(jnp.fft.fft(x)) ** 2)

    with pytest.raises(cpjax.CurvatureError, match=r"test_errors\.py:\d+:\d+ \(.*fft_power\)"):
        cpjax.cp_hessian_diag(fft_power)(X, key=KEY)


@pytest.mark.parametrize("transform", ESTIMATORS)
def test_batch_of_keys(transform):
    keys = jax.random.split(KEY, 2)
    with pytest.raises(TypeError, match=r"requires a single PRNG key.*shape \(2,\).*jax\.vmap"):
        transform(cube_sum)(X, key=keys)


@pytest.mark.parametrize("transform", ESTIMATORS)
def test_float_argnums(transform):
    with pytest.raises(TypeError, match="argnums must be an int or a tuple of ints, got 1.0"):
        transform(cube_sum, argnums=1.0)(X, key=KEY)


@pytest.mark.parametrize("transform", ESTIMATORS[:2])
def test_separable_not_bool(transform):
    with pytest.raises(TypeError, match="requires separable to be True or False, got 'yes'"):
        transform(cube_sum, separable="yes")


def test_cp_hessian_names_itself():
    with pytest.raises(ValueError, match="^cp_hessian requires num_samples >= 1"):
        cpjax.cp_hessian(cube_sum, num_samples=0)


def test_non_array_aux():
    with pytest.raises(TypeError, match=r"must be an array, but output\[1\] is a str"):
        cpjax.cp_hessian_diag(lambda x: (cube_sum(x), "note"), has_aux=True)(X, key=KEY)


def test_direct_call_located_at_caller():
    """A library function passed to cpjax directly is reported where cpjax is called."""
    with pytest.warns(cpjax.FallbackWarning,
                      match=r"reduce_prod' \(at [^)]*test_errors\.py:\d+ \(test_direct_call"):
        cpjax.cp_hessian_diag(jnp.prod)(X, key=KEY)


def test_warning_located_in_users_file():
    """Python's warning location is the user's call, not a line of cpjax."""
    with pytest.warns(cpjax.FallbackWarning) as record:
        cpjax.cp_hessian_diag(lambda x: jnp.sum(jnp.cumprod(x)))(X, key=KEY)
    assert record[0].filename == __file__
