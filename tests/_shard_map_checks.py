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
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import cpjax
from tests.helpers import (
    assert_unbiased,
    cp_plan,
    reference_diag,
    sample_variance,
    separable_sites,
)

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
    params, _, _, xs, labels_s = mlp_inputs()
    key = jax.random.key(7)
    for loss, args in [(collective_loss, (w, x)), (data_parallel_loss, (params, xs, labels_s))]:
        estimator = cpjax.cp_hessian_diag(loss, num_samples=4)
        eager = estimator(*args, key=key)
        jitted = jax.jit(lambda args, k, f=estimator: f(*args, key=k))(args, key)
        for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


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


def mlp_cross_entropy(params, x, labels, activation=jnp.tanh):
    """Summed softmax cross-entropy of an MLP over the examples it is given, over 32."""
    h = activation(x @ params["w1"] + params["b1"])
    log_probs = jax.nn.log_softmax(h @ params["w2"] + params["b2"])
    return -jnp.sum(jnp.take_along_axis(log_probs, labels[:, None], axis=1)) / 32


def data_parallel_loss(params, x, labels, activation=jnp.tanh):
    """The same loss with the examples split over the devices and the weights replicated."""

    def body(params, x, labels):
        return jax.lax.psum(mlp_cross_entropy(params, x, labels, activation), "x")

    return jax.shard_map(body, mesh=eight_devices(), in_specs=(P(), P("x"), P("x")),
                         out_specs=P())(params, x, labels)


def mlp_inputs():
    k = jax.random.split(jax.random.key(10), 6)
    params = {"w1": jax.random.normal(k[0], (4, 6)) / 2,
              "b1": jax.random.normal(k[1], (6,)) / 10,
              "w2": jax.random.normal(k[2], (6, 3)) / 2,
              "b2": jax.random.normal(k[3], (3,)) / 10}
    x = jax.random.normal(k[4], (32, 4))
    labels = jax.random.randint(k[5], (32,), 0, 3)
    sharding = NamedSharding(eight_devices(), P("x"))
    return params, x, labels, jax.device_put(x, sharding), jax.device_put(labels, sharding)


def summed_variance(estimator, args, n=2000, seed=3):
    return float(np.sum(sample_variance(estimator, args, n, seed)))


def check_data_parallel_body_separable():
    """Inside the shard_map the weights get the separable-axis form, as on one device.

    Summed single-probe variances over 2,000 probes (float64): 0.101 with the separable
    form in the body, 0.099 on one device and 3.05 with `separable=False` in the body. The
    bounds below (factors of 1.5 and 10) leave far more room than the sampling error of a
    variance from 2,000 draws (a few per cent).
    """
    params, x, labels, xs, labels_s = mlp_inputs()
    exact = reference_diag(mlp_cross_entropy, (params, x, labels))
    args = (params, xs, labels_s)
    assert_unbiased(cpjax.cp_hessian_diag(data_parallel_loss), args, exact)
    in_body = summed_variance(cpjax.cp_hessian_diag(data_parallel_loss), args)
    one_device = summed_variance(cpjax.cp_hessian_diag(mlp_cross_entropy), (params, x, labels))
    plain = summed_variance(cpjax.cp_hessian_diag(data_parallel_loss, separable=False), args)
    assert in_body < 1.5 * one_device, (in_body, one_device)
    assert in_body < plain / 10, (in_body, plain)


def check_data_parallel_separable_sites():
    """The analysis finds every weight in the body, and none where curvature follows."""
    params, _, _, xs, labels_s = mlp_inputs()
    args = (params, xs, labels_s)
    assert sorted(separable_sites(data_parallel_loss, args)) == [
        "[0]['b1']", "[0]['b2']", "[0]['w1']", "[0]['w2']"]
    assert separable_sites(lambda *a: jnp.sin(data_parallel_loss(*a)), args) == {}


def check_relu_body_one_vector():
    """A ReLU MLP's cross-entropy in the body: every injection is PSD, so T = U.

    The cotangent's sign is followed through the body's `psum` and the division by a
    constant that JAX marks with `pvary`.
    """
    params, x, labels, xs, labels_s = mlp_inputs()
    loss = functools.partial(data_parallel_loss, activation=jax.nn.relu)
    args = (params, xs, labels_s)
    with warnings.catch_warnings():
        # `jax.nn.relu`'s custom JVP rule does not trace alone inside the body. Because
        # JAX defines it, it counts as piecewise linear and needs no generic rule.
        warnings.simplefilter("error", cpjax.FallbackWarning)
        assert cp_plan(loss, args)[0].symmetric
    assert sorted(separable_sites(loss, args)) == [
        "[0]['b1']", "[0]['b2']", "[0]['w1']", "[0]['w2']"]
    exact = reference_diag(functools.partial(mlp_cross_entropy, activation=jax.nn.relu),
                           (params, x, labels))
    assert_unbiased(cpjax.cp_hessian_diag(loss), args, exact)


def check_scan_in_body_unbiased():
    """A scan over micro-batches inside the body, its carry differing between devices."""
    w, _ = inputs()
    x = jax.random.normal(jax.random.key(1), (32, 3))

    def local(w, x):
        def step(total, batch):
            return total + jnp.sum(jnp.tanh(batch @ w) ** 2), None

        init = jax.lax.pcast(jnp.zeros((), x.dtype), "x", to="varying")
        total, _ = jax.lax.scan(step, init, x.reshape(2, -1, x.shape[-1]))
        return jax.lax.psum(total, "x")

    def loss(w, x):
        return jax.shard_map(local, mesh=eight_devices(), in_specs=(P(), P("x")),
                             out_specs=P())(w, x)

    exact = reference_diag(lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2), (w, x))
    args = (w, jax.device_put(x, NamedSharding(eight_devices(), P("x"))))
    assert_unbiased(cpjax.cp_hessian_diag(loss), args, exact)


def check_curvature_after_body_unbiased():
    """Curvature after the shard_map: the body's weights keep the plain rows."""
    params, x, labels, xs, labels_s = mlp_inputs()

    def loss(params, x, labels):
        return jnp.sin(data_parallel_loss(params, x, labels))

    exact = reference_diag(lambda *a: jnp.sin(mlp_cross_entropy(*a)), (params, x, labels))
    assert_unbiased(cpjax.cp_hessian_diag(loss), (params, xs, labels_s), exact)


def check_statistics_over_devices_unbiased():
    """A psum of per-device sums before the nonlinearity couples the devices' examples.

    `w1` is used before that coupling, so it keeps the plain rows. The others are used
    after it and get the separable form.
    """
    params, x, labels, xs, labels_s = mlp_inputs()

    def centred(params, x, labels, total):
        z = x @ params["w1"]
        h = jnp.tanh(z - total(jnp.sum(z, axis=0)) / 32 + params["b1"])
        log_probs = jax.nn.log_softmax(h @ params["w2"] + params["b2"])
        return -jnp.sum(jnp.take_along_axis(log_probs, labels[:, None], axis=1)) / 32

    def loss(params, x, labels):
        def body(params, x, labels):
            return jax.lax.psum(centred(params, x, labels, lambda s: jax.lax.psum(s, "x")), "x")

        return jax.shard_map(body, mesh=eight_devices(), in_specs=(P(), P("x"), P("x")),
                             out_specs=P())(params, x, labels)

    exact = reference_diag(lambda *a: centred(*a, lambda s: s), (params, x, labels))
    args = (params, xs, labels_s)
    assert sorted(separable_sites(loss, args)) == ["[0]['b1']", "[0]['b2']", "[0]['w2']"]
    assert_unbiased(cpjax.cp_hessian_diag(loss), args, exact)


def check_weights_split_over_devices_unbiased():
    """Weights split by output feature, examples on every device: no sum over devices."""
    params, x, _, _, _ = mlp_inputs()
    # Auto axes: with Explicit ones, the test's ravel of the split estimate would need
    # an output sharding.
    mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2],
                         axis_types=(jax.sharding.AxisType.Auto,))
    w = params["w1"]

    def local(w, x):
        return jnp.sum(jnp.tanh(x @ w) ** 2) / 32

    def loss(w, x):
        body = lambda w, x: jax.lax.psum(local(w, x), "x")  # noqa: E731
        return jax.shard_map(body, mesh=mesh, in_specs=(P(None, "x"), P()), out_specs=P())(w, x)

    args = (jax.device_put(w, NamedSharding(mesh, P(None, "x"))), x)
    assert list(separable_sites(loss, args)) == ["[0]"]
    assert_unbiased(cpjax.cp_hessian_diag(loss), args, reference_diag(local, (w, x)))


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
