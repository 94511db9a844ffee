"""`cpjax._reduce.sum_axes` equals `jnp.sum` for every axis set, keepdims and dtype."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from cpjax._reduce import sum_axes

SHAPE = (2, 3, 4, 5)


@pytest.mark.parametrize("keepdims", [False, True])
def test_sum_axes_matches_jnp_sum(keepdims):
    x = jnp.asarray(np.random.default_rng(0).normal(size=SHAPE), jnp.float32)
    for count in range(len(SHAPE) + 1):
        for axes in itertools.combinations(range(len(SHAPE)), count):
            got = sum_axes(x, axes, keepdims=keepdims)
            want = jnp.sum(x, axis=axes, keepdims=keepdims)
            assert got.shape == want.shape, axes
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=str(axes))


def test_sum_axes_negative_axes():
    x = jnp.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_array_equal(sum_axes(x, (-1,)), jnp.sum(x, axis=-1))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float64])
def test_sum_axes_keeps_dtype(dtype):
    x = jnp.full((3, 64), 0.1, dtype)
    got = sum_axes(x, (1,))
    assert got.dtype == x.dtype
    # The sum of the entries in float64, rounded once to the input's dtype. 16-bit inputs
    # are summed in float32, so one rounding is all they may differ by. In float64 the
    # order of the additions may differ, by up to one rounding per entry.
    want = jnp.sum(x.astype(jnp.float64), axis=1).astype(dtype)
    roundings = 64 if dtype == jnp.float64 else 1
    np.testing.assert_allclose(got.astype(jnp.float64), want.astype(jnp.float64),
                               rtol=roundings * float(jnp.finfo(dtype).eps))
