"""Composition with jit, vmap, grad, sharding and low-precision dtypes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpjax
from tests.helpers import assert_unbiased


def smooth(x):
    return jnp.sum(jnp.tanh(x) ** 2) + jnp.sum(jnp.exp(x) * x)


def test_jit_no_retrace_same_shapes():
    traces = []

    def f(x):
        traces.append(1)
        return jnp.sum(jnp.sin(x) ** 3)

    estimator = cpjax.cp_hessian_diag(f)
    for i in range(3):
        estimator(jnp.ones(3) * i, key=jax.random.key(i))
    assert len(traces) == 1


def test_vmap_equals_loop():
    xs = jnp.arange(12.0).reshape(4, 3) / 7
    keys = jax.random.split(jax.random.key(0), 4)
    estimator = cpjax.cp_hessian_diag(smooth)
    batched = jax.vmap(lambda x, k: estimator(x, key=k))(xs, keys)
    looped = jnp.stack([estimator(xs[i], key=keys[i]) for i in range(4)])
    assert jnp.allclose(batched, looped, rtol=1e-12, atol=1e-12)


def test_outer_jit_matches_eager():
    x = jnp.linspace(-1, 1, 5)
    estimator = cpjax.cp_hessian_diag(smooth, num_samples=3)
    eager = estimator(x, key=jax.random.key(4))
    jitted = jax.jit(lambda x, k: estimator(x, key=k))(x, jax.random.key(4))
    assert jnp.allclose(eager, jitted, rtol=1e-12, atol=1e-12)


def energy(x, theta):
    return jnp.sum(jnp.tanh(theta * x) ** 2) + theta**2 * jnp.sum(jnp.sin(x))


def test_grad_of_estimate_unbiased():
    """The gradient of the estimate in theta averages to the gradient of the exact diagonal."""
    x = jnp.array([0.3, -0.6, 0.9])
    estimator = cpjax.cp_hessian_diag(energy)

    def exact_sum(theta):
        return jnp.sum(jnp.diagonal(jax.hessian(energy)(x, theta)))

    def grad_of_estimate(theta, key):
        return jax.grad(lambda t: jnp.sum(estimator(x, t, key=key)))(theta)

    assert_unbiased(grad_of_estimate, (1.3,), jax.grad(exact_sum)(1.3))


def test_grad_finite_at_zero_curvature():
    x = jnp.array([0.0, 1.0, -1.0])

    def relu_energy(x, theta):
        return jnp.sum(jax.nn.relu(theta * x) ** 2) + jnp.sum(jnp.abs(x) * theta)

    estimator = cpjax.cp_hessian_diag(relu_energy)
    grad = jax.grad(lambda t: jnp.sum(estimator(x, t, key=jax.random.key(0))))(1.0)
    assert np.isfinite(float(grad))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16])
def test_dtype_kept(dtype):
    x = jnp.linspace(-1, 1, 4).astype(dtype)
    value, grad, diag = cpjax.cp_value_grad_and_hessian_diag(smooth)(x, key=jax.random.key(0))
    assert diag.dtype == dtype
    assert grad.dtype == dtype
    assert value.dtype == dtype
    assert np.all(np.isfinite(np.asarray(diag, dtype=np.float32)))


def test_bfloat16_mean_close():
    x = jnp.linspace(-1, 1, 4)
    exact = jnp.diagonal(jax.hessian(smooth)(x))
    estimate = cpjax.cp_hessian_diag(smooth, num_samples=2000)(x.astype(jnp.bfloat16),
                                                              key=jax.random.key(1))
    assert jnp.allclose(estimate.astype(jnp.float64), exact, atol=0.3, rtol=0.1)


@pytest.mark.parametrize("separable", [True, False])
def test_float16_many_probes_finite(separable):
    """The probe sum exceeds float16's range; the mean must not (it did: -inf)."""
    x = jnp.linspace(-1, 1, 5).astype(jnp.float16)

    def fun(x):
        return jnp.sum(jnp.sin(3 * x))

    estimate = cpjax.cp_hessian_diag(fun, num_samples=20000, separable=separable)(
        x, key=jax.random.key(2))
    exact = -9 * jnp.sin(3 * x.astype(jnp.float32))
    assert np.allclose(np.asarray(estimate, np.float32), exact, rtol=0.01, atol=0.01)


SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    import cpjax
    jax.config.update("jax_enable_x64", True)
    assert len(jax.devices()) == 8
    mesh = jax.make_mesh((8,), ("data",))

    def loss(w, x):
        return jnp.mean(jnp.tanh(x @ w) ** 2) + jnp.sum(w ** 4)

    w = jnp.linspace(-1, 1, 12).reshape(4, 3)
    x = jnp.linspace(-2, 2, 256).reshape(64, 4)
    key = jax.random.key(0)
    reference = cpjax.cp_hessian_diag(loss)(w, x, key=key)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ws = jax.device_put(w, NamedSharding(mesh, P()))
    sharded = jax.jit(cpjax.cp_hessian_diag(loss))(ws, xs, key=key)
    print(float(jnp.max(jnp.abs(sharded - reference))))
""")


def test_sharded_inputs_match_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True,
                         env=env, timeout=300, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-12
