"""Full-Hessian quantities from the CP vectors: factors, the whole matrix, the trace.

With `E[T Uᵀ] = H`, every entry is estimated by `T_a U_b`, the matrix by the symmetrised
`(T Uᵀ + U Tᵀ)/2` and the trace (the Laplacian) by `⟨T, U⟩`. Entries off the diagonal need
every cross block, so the factors are computed without the pruning of disjoint leaves. The
trace only needs the diagonal, so it keeps both the pruning and the separable-axis form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from cpjax import _checks
from cpjax._api import _transform


def _single(argnums) -> bool:
    return isinstance(argnums, (int, np.integer))


def cp_hessian_factors(fun, argnums=0, has_aux=False, *, num_samples=1, probe="rademacher"):
    """Return a function giving the CP vectors T and U, `num_samples` of each.

    `E[T Uᵀ] = ∇²fun`, so an entry `(a, b)` is estimated by `mean_k T_k[a] U_k[b]`, a block by
    an outer product of slices, and a rank-K sketch of the Hessian by the stacked vectors,
    without forming the matrix. When every local curvature is positive semi-definite the
    sweep carries one vector and `U` equals `T`.

    Returns:
      `fn(*args, key)` returning `(T, U)`, each with the structure of `args[argnums]` and a
      leading axis of `num_samples` on every leaf (`((T, U), aux)` with `has_aux=True`).

    Example:
      >>> import jax, jax.numpy as jnp, cpjax
      >>> f = lambda x: x[0] * x[1]
      >>> t, u = cpjax.cp_hessian_factors(f, num_samples=4)(jnp.ones(2), key=jax.random.key(0))
      >>> t.shape
      (4, 2)
    """
    run, config = _transform("cp_hessian_factors", fun, argnums, has_aux, num_samples, probe,
                             separable=False, estimator="cp_factors")

    def factors_fn(*args, key=None, **kwargs):
        _, aux, _, pairs = run(args, key, kwargs)
        ts = [jax.tree_util.tree_map(lambda p: p[0], tree, is_leaf=_is_pair) for tree in pairs]
        us = [jax.tree_util.tree_map(lambda p: p[1], tree, is_leaf=_is_pair) for tree in pairs]
        out = (ts[0], us[0]) if _single(argnums) else (tuple(ts), tuple(us))
        return (out, aux) if config.has_aux else out

    return factors_fn


def _is_pair(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and all(hasattr(p, "shape") for p in x)


def cp_hessian(fun, argnums=0, has_aux=False, *, num_samples=1, probe="rademacher"):
    """Return a function estimating the whole Hessian, shaped like `jax.hessian`'s output.

    The estimate is `mean_k (T_k U_kᵀ + U_k T_kᵀ) / 2`: unbiased and symmetric, of rank at
    most 2K. It forms the n × n matrix, so it is meant for small problems. For large ones, use
    `cp_hessian_factors` and form only the entries you need.

    Example:
      >>> import jax, jax.numpy as jnp, cpjax
      >>> f = lambda x: jnp.sum(x ** 3)
      >>> h = cpjax.cp_hessian(f)(jnp.array([1.0, 2.0]), key=jax.random.key(0))
      >>> h.shape
      (2, 2)
    """
    _checks.check_options("cp_hessian", num_samples, probe)
    factors = cp_hessian_factors(fun, argnums, has_aux, num_samples=num_samples, probe=probe)

    def hessian_fn(*args, key=None, **kwargs):
        _checks.check_key("cp_hessian", key)
        out = factors(*args, key=key, **kwargs)
        (t, u), aux = out if has_aux else (out, None)
        t_flat = jax.vmap(lambda tree: ravel_pytree(tree)[0])(t)
        u_flat = jax.vmap(lambda tree: ravel_pytree(tree)[0])(u)
        matrix = (t_flat.T @ u_flat + u_flat.T @ t_flat) / (2 * num_samples)
        diff = args[argnums] if _single(argnums) else tuple(args[i] for i in argnums)
        hessian = _unravel_matrix(matrix, diff)
        return (hessian, aux) if has_aux else hessian

    return hessian_fn


def _unravel_matrix(matrix, tree):
    """Split an n × n matrix into `jax.hessian`'s nested structure for the pytree `tree`."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    sizes = [int(np.size(x)) for x in leaves]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    rows = []
    for i, a in enumerate(leaves):
        blocks = []
        for j, b in enumerate(leaves):
            block = matrix[offsets[i]:offsets[i + 1], offsets[j]:offsets[j + 1]]
            blocks.append(block.reshape(jnp.shape(a) + jnp.shape(b)))
        rows.append(jax.tree_util.tree_unflatten(treedef, blocks))
    return jax.tree_util.tree_unflatten(treedef, rows)


def cp_hessian_trace(fun, argnums=0, has_aux=False, *, num_samples=1, probe="rademacher",
                     separable=True):
    """Return a function estimating the trace of the Hessian (the Laplacian) by CP.

    The estimate is the sum of `cp_hessian_diag`'s estimate, `⟨T, U⟩` averaged over probes,
    with the same pruning and separable-axis form, and is unbiased like it.

    Example:
      >>> import jax, jax.numpy as jnp, cpjax
      >>> f = lambda x: jnp.sum(x ** 3)
      >>> cpjax.cp_hessian_trace(f)(jnp.array([1.0, 2.0]), key=jax.random.key(0))
      Array(18., dtype=float32)
    """
    run, config = _transform("cp_hessian_trace", fun, argnums, has_aux, num_samples, probe,
                             separable)

    def trace_fn(*args, key=None, **kwargs):
        _, aux, _, diags = run(args, key, kwargs)
        trace = sum(jnp.sum(d) for d in jax.tree_util.tree_leaves(diags))
        return (trace, aux) if config.has_aux else trace

    return trace_fn
