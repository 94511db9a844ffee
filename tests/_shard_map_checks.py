"""Checks of cpjax inside `jax.shard_map`, run on 8 host CPU devices by test_shard_map.py.

JAX fixes the number of host devices when it starts, so these checks run in a separate
process, `python -m tests._shard_map_checks` with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` set by the test. It prints one JSON
object: for each check, "ok" or the failure message.
"""

from __future__ import annotations

import functools
import json
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import cpjax
from tests.helpers import assert_unbiased

RING = [(i, (i + 1) % 8) for i in range(8)]


@functools.cache
def eight_devices():
    return jax.make_mesh((8,), ("x",))


def collective_loss(w, x):
    """A loss whose body uses psum, all_gather and ppermute on per-device values."""

    def body(w, x):
        h = jnp.tanh(x @ w)
        shared = jax.lax.psum(jnp.sum(h ** 2), "x")
        gathered = jax.lax.all_gather(h, "x", tiled=True)
        neighbour = jax.lax.ppermute(h, "x", RING)
        return (jnp.sin(shared) + jax.lax.psum(jnp.sum(gathered ** 3), "x") / 8
                + jax.lax.psum(jnp.sum(neighbour * h), "x"))

    return jax.shard_map(body, mesh=eight_devices(), in_specs=(P(), P("x")), out_specs=P())(w, x)


def shared_curvature_loss(mesh):
    """A loss whose only non-linear equation acts on a value shared by all devices."""

    def loss(w, x):
        def body(w, x):
            s = jax.lax.psum(jnp.sum(x @ w, axis=0), "x")
            return jnp.sum(jnp.tanh(s) ** 2)

        return jax.shard_map(body, mesh=mesh, in_specs=(P(), P("x")), out_specs=P())(w, x)

    return loss


def inputs(mesh=None):
    mesh = mesh or eight_devices()
    w = jax.random.normal(jax.random.key(0), (3, 2)) / 2
    x = jax.random.normal(jax.random.key(1), (16, 3))
    return w, jax.device_put(x, NamedSharding(mesh, P("x")))


def check_unbiased_replicated_weights():
    w, x = inputs()
    exact = cpjax.exact_hessian_diag(collective_loss)(w, x)
    reference = jnp.diagonal(jax.hessian(collective_loss)(w, x).reshape(6, 6)).reshape(3, 2)
    np.testing.assert_allclose(exact, reference, rtol=1e-10, atol=1e-10)
    assert_unbiased(cpjax.cp_hessian_diag(collective_loss), (w, x), exact)


def check_unbiased_sharded_inputs():
    w, x = inputs()
    exact = cpjax.exact_hessian_diag(collective_loss, argnums=1)(w, x)
    assert_unbiased(cpjax.cp_hessian_diag(collective_loss, argnums=1), (w, x), exact)


def check_value_and_grad_exact():
    w, x = inputs()
    value, grad, _ = cpjax.cp_value_grad_and_hessian_diag(collective_loss)(
        w, x, key=jax.random.key(2))
    with jax.set_mesh(eight_devices()):
        ref_value, ref_grad = jax.value_and_grad(collective_loss)(w, x)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-12)


def check_shared_curvature_equals_one_device():
    one_device = jax.make_mesh((1,), ("x",), devices=jax.devices()[:1])
    key = jax.random.key(5)
    estimator = cpjax.cp_hessian_diag(shared_curvature_loss(eight_devices()), num_samples=3)
    many = estimator(*inputs(), key=key)
    single = cpjax.cp_hessian_diag(shared_curvature_loss(one_device), num_samples=3)(
        *inputs(one_device), key=key)
    np.testing.assert_allclose(np.asarray(many), np.asarray(single), rtol=1e-12, atol=1e-14)


def check_jit_matches_eager():
    w, x = inputs()
    estimator = cpjax.cp_hessian_diag(collective_loss, num_samples=4)
    key = jax.random.key(7)
    eager = estimator(w, x, key=key)
    jitted = jax.jit(lambda w, x, k: estimator(w, x, key=k))(w, x, key)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-12, atol=1e-12)


def check_softmax_and_gelu_in_body_unbiased():
    """A softmax and a GELU inside the body, which cpjax keeps as separate equations there."""
    def loss(w, x):
        def body(w, x):
            h = x @ w
            return jax.lax.psum(jnp.sum(jnp.sin(jax.nn.softmax(h, axis=-1))
                                        + jax.nn.gelu(h) ** 2), "x")

        return jax.shard_map(body, mesh=eight_devices(), in_specs=(P(), P("x")),
                             out_specs=P())(w, x)

    w, x = inputs()
    assert_unbiased(cpjax.cp_hessian_diag(loss), (w, x), cpjax.exact_hessian_diag(loss)(w, x))


def check_unchecked_shard_map_rejected():
    def loss(w, x):
        body = lambda w, x: jax.lax.psum(jnp.sum(jnp.tanh(x @ w)), "x")  # noqa: E731
        return jax.shard_map(body, mesh=eight_devices(), in_specs=(P(), P("x")), out_specs=P(),
                             check_vma=False)(w, x)

    try:
        cpjax.cp_hessian_diag(loss)(*inputs(), key=jax.random.key(0))
    except cpjax.CurvatureError as err:
        assert "check_vma=True" in str(err), str(err)
        assert "_shard_map_checks.py" in str(err), str(err)
        return
    raise AssertionError("no error for a shard_map with check_vma=False")


CHECKS = [value for name, value in sorted(globals().items()) if name.startswith("check_")]


def main():
    jax.config.update("jax_enable_x64", True)
    assert len(jax.devices()) == 8, f"run with {len(jax.devices())} devices; set XLA_FLAGS"
    results = {}
    for check in CHECKS:
        try:
            check()
            results[check.__name__] = "ok"
        except Exception:
            results[check.__name__] = traceback.format_exc()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
