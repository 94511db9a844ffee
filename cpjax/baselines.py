"""Baselines for the Hessian diagonal: exact (one HVP per coordinate) and Hutchinson."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from cpjax import _checks, _probes
from cpjax._api import KeywordsLast, jit_per_shape


def _flat_objective(fun, args, argnums, has_aux):
    """Return `(f(v) -> scalar, v0, unravel, aux_fn)` over the raveled differentiated args."""
    diff = tuple(args[i] for i in argnums)
    v0, unravel_flat = ravel_pytree(diff)
    v0 = _replicated(v0)
    shardings = jax.tree_util.tree_map(lambda a: jax.typeof(a).sharding, diff)

    def unravel(v):
        return jax.tree_util.tree_map(_reshard_like, unravel_flat(v), shardings)

    def call(v):
        new_args = list(args)
        for i, a in zip(argnums, unravel(v), strict=True):
            new_args[i] = a
        out = fun(*new_args)
        return out if has_aux else (out, None)

    def f(v):
        return call(v)[0]

    return f, v0, unravel, call


def _replicated(v):
    """Gather a vector sharded over an explicit mesh axis onto every device.

    The baselines index single coordinates of the raveled arguments, which JAX rejects on
    an explicitly sharded vector without naming an output sharding.
    """
    sharding = getattr(jax.typeof(v), "sharding", None)
    if _is_explicitly_sharded(sharding):
        return jax.sharding.reshard(
            v, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
    return v


def _reshard_like(leaf, sharding):
    """Give an unraveled leaf back the explicit sharding its argument had."""
    if _is_explicitly_sharded(sharding):
        return jax.sharding.reshard(leaf, sharding)
    return leaf


def _is_explicitly_sharded(sharding) -> bool:
    return any(s is not None for s in getattr(sharding, "spec", ()))


def _hvp(f, v0):
    grad = jax.grad(f)
    return lambda d: jax.jvp(grad, (v0,), (d,))[1]


def _prepare(name, fun, args, argnums, has_aux):
    """Check the call and return argnums as a tuple; the output is checked by abstract tracing."""
    nums = _checks.normalize_argnums(name, argnums, len(args))
    _checks.check_differentiated(name, args, nums)
    return nums


def _check_output(name, call, v0, has_aux):
    out_shape = jax.eval_shape(call, v0)
    _checks.check_output(name, out_shape if has_aux else out_shape[0], has_aux)


def _package(argnums, unravel, flat_diag, has_aux, call, v0):
    parts = unravel(flat_diag)
    diag = parts[0] if isinstance(argnums, (int, np.integer)) else tuple(parts)
    if has_aux:
        return diag, call(v0)[1]
    return diag


def exact_hessian_diag(fun, argnums=0, has_aux=False, *, chunk_size=64):
    """Return a function computing the exact Hessian diagonal, one HVP per coordinate.

    The HVPs (forward-over-reverse) are batched `chunk_size` at a time with `lax.map`, so
    memory stays bounded while the cost grows linearly with the number of parameters. Use
    it as the reference for small and medium problems.

    Example:
      >>> import jax.numpy as jnp, cpjax
      >>> cpjax.exact_hessian_diag(lambda x: jnp.sum(x ** 3))(jnp.array([1.0, 2.0]))
      Array([ 6., 12.], dtype=float32)
    """
    name = "exact_hessian_diag"
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or (
            chunk_size < 1):
        raise ValueError(f"{name} requires chunk_size >= 1, got {chunk_size!r}.")
    with_keywords = KeywordsLast(fun)  # the call's keyword arguments travel as a last dict

    def impl(args, nums, key):
        f, v0, unravel, call = _flat_objective(with_keywords, args, nums, has_aux)
        _check_output(name, call, v0, has_aux)
        hvp = _hvp(f, v0)
        n = v0.size
        if n == 0:
            return _package(argnums, unravel, v0, has_aux, call, v0)

        def entry(i):
            return hvp(jnp.zeros_like(v0).at[i].set(1))[i]

        flat = jax.lax.map(entry, jnp.arange(n), batch_size=min(chunk_size, max(n, 1)))
        return _package(argnums, unravel, flat, has_aux, call, v0)

    run = jit_per_shape(impl)

    def diag_fn(*args, **kwargs):
        nums = _prepare(name, fun, args, argnums, has_aux)
        return run((*args, kwargs), nums, None)

    return diag_fn


def hutchinson_hessian_diag(fun, argnums=0, has_aux=False, *, num_samples=1,
                            probe="rademacher"):
    """Return a function estimating the Hessian diagonal as the mean of `v ⊙ (H v)`.

    Hutchinson's estimator (Bekas, Kokiopoulou and Saad, 2007, for the diagonal): one HVP
    per probe, unbiased for probes with identity covariance. It is the baseline CP is
    compared with at equal numbers of probes.

    Example:
      >>> import jax, jax.numpy as jnp, cpjax
      >>> f = lambda x: jnp.sum(x ** 3)
      >>> cpjax.hutchinson_hessian_diag(f)(jnp.array([1.0, 2.0]), key=jax.random.key(0))
      Array([ 6., 12.], dtype=float32)
    """
    name = "hutchinson_hessian_diag"
    _checks.check_options(name, num_samples, probe)
    with_keywords = KeywordsLast(fun)  # the call's keyword arguments travel as a last dict

    def impl(args, nums, key):
        f, v0, unravel, call = _flat_objective(with_keywords, args, nums, has_aux)
        _check_output(name, call, v0, has_aux)
        hvp = _hvp(f, v0)
        probes = _probes.draw(key, (num_samples, v0.size), v0.dtype, probe)
        flat = _probes.probe_mean(probes * jax.vmap(hvp)(probes))
        return _package(argnums, unravel, flat, has_aux, call, v0)

    run = jit_per_shape(impl)

    def diag_fn(*args, key=None, **kwargs):
        _checks.check_key(name, key)
        nums = _prepare(name, fun, args, argnums, has_aux)
        return run((*args, kwargs), nums, key)

    return diag_fn
