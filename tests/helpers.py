"""Shared references and statistical checks for the cpjax tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from cpjax._api import _diff_positions
from cpjax._separable import SeparableLeaves
from cpjax._sweep import make_plan
from cpjax._trace import trace_program


def _diff_args(args, argnums):
    if isinstance(argnums, int):
        return args[argnums]
    return tuple(args[i] for i in argnums)


def reference_diag(fun, args, argnums=0):
    """Return the diagonal of the float64 `jax.hessian`, shaped like `args[argnums]`.

    The differentiated arguments are raveled into one vector, so pytree leaves and tuple
    argnums get the diagonal of the full Hessian, cross-leaf blocks included.
    """
    args = tuple(args)
    for leaf in jax.tree_util.tree_leaves(_diff_args(args, argnums)):
        assert leaf.dtype == jnp.float64, f"reference needs float64 inputs, got {leaf.dtype}"
    flat, unravel = ravel_pytree(_diff_args(args, argnums))
    numbers = (argnums,) if isinstance(argnums, int) else tuple(argnums)

    def flat_fun(v):
        new_args = list(args)
        parts = (unravel(v),) if isinstance(argnums, int) else unravel(v)
        for i, part in zip(numbers, parts, strict=True):
            new_args[i] = part
        return fun(*new_args)

    return unravel(jnp.diagonal(jax.jit(jax.hessian(flat_fun))(flat)))


def draw_estimates(estimator, args, n, seed):
    """Return an `(n, d)` float64 array of raveled estimates, one per key of `split(seed, n)`."""
    keys = jax.random.split(jax.random.key(seed), n)

    # Array arguments enter as operands, not as constants that XLA would fold at compile
    # time (for a max-pool model that folding took a minute). Python values stay as they are.
    leaves, tree = jax.tree_util.tree_flatten(tuple(args))
    is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]
    arrays = [leaf for leaf, a in zip(leaves, is_array, strict=True) if a]

    def one(key, arrays):
        it = iter(arrays)
        merged = [next(it) if a else leaf for leaf, a in zip(leaves, is_array, strict=True)]
        return ravel_pytree(estimator(*jax.tree_util.tree_unflatten(tree, merged), key=key))[0]

    draws = jax.jit(jax.vmap(one, in_axes=(0, None)))(keys, arrays)
    return np.asarray(draws, dtype=np.float64)


def assert_unbiased(estimator, args, exact, n=2000, z=6.0, seed=20120626, atol=1e-9):
    """Assert that single-probe estimates average to `exact` on every coordinate.

    `estimator(*args, key=key)` must return one estimate shaped like `exact`, normally from
    num_samples=1 (with num_samples=K each draw is a K-probe average). It runs under
    `jax.vmap` over the `n` keys of `jax.random.split(jax.random.key(seed), n)`. The seed is
    fixed (20120626 by default), so every run draws the same probes. Each coordinate passes
    when `|mean - exact| <= z * SE + atol`, with `SE = std / sqrt(n)` and `z = 6` by default.
    The absolute slack `atol` covers coordinates whose estimate has zero variance.
    """
    samples = draw_estimates(estimator, args, n, seed)
    target = np.asarray(ravel_pytree(exact)[0], dtype=np.float64)
    assert samples.shape == (n, target.size), (samples.shape, target.shape)
    assert np.all(np.isfinite(samples)), "estimates contain NaN or inf"

    mean = samples.mean(axis=0)
    standard_error = samples.std(axis=0, ddof=1) / np.sqrt(n)
    error = np.abs(mean - target)
    bound = z * standard_error + atol
    bad = np.flatnonzero(error > bound)
    assert bad.size == 0, (
        f"biased at coordinates {bad.tolist()}: mean {mean[bad]}, exact {target[bad]}, "
        f"|error| {error[bad]}, bound {bound[bad]} (z={z}, n={n}, seed={seed})"
    )


def sample_variance(estimator, args, n, seed):
    """Return the per-coordinate sample variance of `n` estimates."""
    return draw_estimates(estimator, args, n, seed).var(axis=0, ddof=1)


def run_notebook_small(path, figure_dir):
    """Execute a notebook's code cells in one namespace, at its small size.

    The first code cell must define `SMALL` and `FIGURE_DIR`; they are set to True and to
    `figure_dir` before the other cells run. No Jupyter kernel is needed. The caller sets
    the working folder and restores `sys.path` (a notebook may extend it).
    """
    import json

    import matplotlib.pyplot as plt

    notebook = json.loads(path.read_text())
    cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert any(cell["cell_type"] == "markdown" for cell in notebook["cells"])
    namespace = {"__name__": "__main__"}
    exec(compile("".join(cells[0]["source"]), "cell 1", "exec"), namespace)
    assert "SMALL" in namespace, "the first code cell must define the SMALL switch"
    namespace["SMALL"] = True
    namespace["FIGURE_DIR"] = str(figure_dir)
    try:
        for number, cell in enumerate(cells[1:], start=2):
            exec(compile("".join(cell["source"]), f"cell {number}", "exec"), namespace)
    finally:
        plt.close("all")
    return namespace


def cp_plan(fun, args, argnums=0):
    """Return the sweep's plan of `fun` at `args` and the flat positions of the leaves."""
    flat, tree = jax.tree_util.tree_flatten(args)
    program, _ = trace_program(fun, flat, tree)
    positions = _diff_positions(args, (argnums,))
    deps = [{positions[i]} if i in positions else set() for i in range(len(flat))]
    plan = make_plan(program, deps, [1] + [0] * (len(program.outvars) - 1), prune=True,
                     leaves=True)
    return plan, positions


def separable_sites(fun, args, argnums=0):
    """Return {leaf path: separable output axes} for the parameters the analysis accepts."""
    plan, positions = cp_plan(fun, args, argnums)
    leaves = SeparableLeaves.build(plan, positions)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(args)[0]]
    if leaves is None:
        return {}
    return {paths[pos]: site.axes for pos, site in leaves.by_position.items()}
