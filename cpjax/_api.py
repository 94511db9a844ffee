"""Public Curvature Propagation transforms: argument handling, pytrees and jit.

Each public function is thin: it checks its arguments, traces the function to a flat
program once per shape, and reads what it needs off one sweep (`cpjax._sweep`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from cpjax import _becker_lecun as _becker_lecun_sweep
from cpjax import _checks, _probes, _sweep
from cpjax._separable import SeparableLeaves
from cpjax._trace import trace_program


@dataclasses.dataclass(frozen=True)
class _Config:
    name: str
    argnums: tuple
    has_aux: bool
    num_samples: int
    probe: str
    separable: bool
    # "cp": diagonal; "cp_factors": the T and U rows themselves, every cross block kept;
    # "becker_lecun": the deterministic diagonal.
    estimator: str = "cp"
    # Probes per sweep when the diagonal is formed in chunks (None: all K in one sweep).
    sample_chunk_size: int | None = None
    # Whether the public function takes has_aux, which error messages then suggest.
    aux_option: bool = True


def _is_dynamic(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic)) or hasattr(leaf, "aval")


class _Static:
    """Hashable wrapper for the non-array leaves and tree structure of a call."""

    def __init__(self, tree, static_leaves):
        self.tree = tree
        self.static_leaves = static_leaves  # tuple of (position, value)

    def _key(self):
        return (self.tree, tuple((i, type(v), v) for i, v in self.static_leaves))

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, _Static) and self._key() == other._key()


def _split_call(args, argnums):
    """Split flat leaves into traced arrays and static Python values (kept concrete)."""
    flat, tree = jax.tree_util.tree_flatten(args)
    diff_positions = _diff_positions(args, argnums)
    dynamic, static = [], []
    for i, leaf in enumerate(flat):
        if i in diff_positions:
            dynamic.append(jnp.asarray(leaf))
        elif _is_dynamic(leaf):
            dynamic.append(leaf)
        else:
            static.append((i, leaf))
    return dynamic, _Static(tree, tuple(static))


def _merge_call(dynamic, static: _Static):
    fixed = dict(static.static_leaves)
    it = iter(dynamic)
    n = static.tree.num_leaves
    return [fixed[i] if i in fixed else next(it) for i in range(n)]


def jit_per_shape(impl):
    """Return `run(args, argnums, key)` that calls `impl(args, argnums, key)` jit-compiled.

    Array leaves are traced and Python leaves (ints, strings) stay concrete, as `jax.grad`
    keeps its non-differentiated arguments. One compilation serves every call with the same
    shapes. An unhashable Python leaf makes every call trace anew instead.
    """

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def jitted(dynamic, static, argnums, key):
        args = jax.tree_util.tree_unflatten(static.tree, _merge_call(dynamic, static))
        return impl(args, argnums, key)

    def run(args, argnums, key):
        dynamic, static = _split_call(args, argnums)
        try:
            hash(static)
        except TypeError:
            return impl(args, argnums, key)
        return jitted(dynamic, static, argnums, key)

    return run


def _diff_positions(args, argnums) -> dict:
    """Map flat leaf position -> index among the differentiated leaves, in argnums order."""
    starts, start = [], 0
    for arg in args:
        starts.append(start)
        start += len(jax.tree_util.tree_leaves(arg))
    positions, count = {}, 0
    for i in argnums:
        for j in range(starts[i], starts[i] + len(jax.tree_util.tree_leaves(args[i]))):
            positions[j] = count
            count += 1
    return positions


def _run_sweep(fun, config: _Config, argnums: tuple, args, key):
    """Trace, plan and sweep; return (value, aux, grads, diag) with diff args' structure."""
    flat, tree = jax.tree_util.tree_flatten(args)
    program, out_shape = trace_program(fun, flat, tree)
    _checks.check_output(config.name, out_shape, config.has_aux, config.aux_option)
    positions = _diff_positions(args, argnums)
    input_deps = [{positions[i]} if i in positions else set() for i in range(len(flat))]
    output_signs = [1] + [0] * (len(program.outvars) - 1)
    prune = config.estimator != "cp_factors"
    plan = _sweep.make_plan(program, input_deps, output_signs, prune=prune, leaves=True)
    out_cts = [jnp.ones((), out_shape[0].dtype if config.has_aux else out_shape.dtype)]
    out_cts += [None] * (len(program.outvars) - 1)

    if config.estimator == "becker_lecun":
        outvals, grads, diags = _becker_lecun(plan, flat, out_cts)
    else:
        outvals, grads, diags = _curvature_propagation(plan, flat, out_cts, key, config,
                                                       positions)
    in_order = sorted(positions, key=positions.get)  # flat positions in argnums order
    grads = [_zeros_if_none(grads[i], flat[i]) for i in in_order]
    diags = [_zeros_if_none(diags[i], flat[i]) for i in in_order]
    aux = None
    if config.has_aux:
        aux_tree = jax.tree_util.tree_structure(out_shape[1])
        aux = jax.tree_util.tree_unflatten(aux_tree, outvals[1:])
    return outvals[0], aux, _unflatten_like(args, argnums, grads), _unflatten_like(
        args, argnums, diags)


def _zeros_if_none(value, like):
    if isinstance(value, tuple):
        return value
    return jnp.zeros_like(like) if value is None else value.astype(like.dtype)


def _split_rows(rows, like, num_samples, symmetric):
    """Return `(T, U)`, each with a leading axis of `num_samples` probes."""
    if rows is None:
        rows = jnp.zeros((num_samples, *jnp.shape(like)), jnp.result_type(like))
        return rows, rows
    rows = rows.astype(jnp.result_type(like))
    if symmetric:
        return rows, rows
    return rows[:num_samples], rows[num_samples:]


def _curvature_propagation(plan, flat, out_cts, key, config, positions):
    chunk = config.sample_chunk_size
    if config.estimator == "cp" and chunk is not None and chunk < config.num_samples:
        return _chunked_diagonal(plan, flat, out_cts, key, config, positions)
    separable = None
    if config.separable:
        separable = SeparableLeaves.build(plan, positions, config.num_samples)
    result = _sweep.sweep(plan, flat, out_cts, key, num_samples=config.num_samples,
                          probe=config.probe, separable=separable)
    if config.estimator == "cp_factors":
        return result.outvals, result.grads, [
            _split_rows(rows, flat[i], config.num_samples, plan.symmetric)
            if i in positions else None  # a leaf not differentiated, maybe a Python value
            for i, rows in enumerate(result.rows)
        ]
    diags = []
    for i, rows in enumerate(result.rows):
        if separable is not None and separable.has(i):
            diags.append(separable.diagonal(i, config.num_samples))
        elif rows is None:
            diags.append(None)
        else:
            diags.append(_sweep.diagonal_from_rows(rows, config.num_samples, plan.symmetric))
    return result.outvals, result.grads, diags


def _chunked_diagonal(plan, flat, out_cts, key, config, positions):
    """Average the diagonal over chunks of `sample_chunk_size` probes, one sweep per chunk.

    The first chunk also gives the value and the gradient. The other full chunks run in a
    `lax.scan` that keeps only the running sum, so memory is that of one chunk. A last,
    smaller chunk covers the remainder. Chunk `i` draws its probes from `_probes.fold(key, i)`,
    so the estimate differs from the one-sweep estimate for the same key but has the same
    distribution.
    """
    size, total = config.sample_chunk_size, config.num_samples
    n_full, remainder = divmod(total, size)

    def one_chunk(index, num_samples):
        chunk_config = dataclasses.replace(config, num_samples=num_samples,
                                           sample_chunk_size=None)
        return _curvature_propagation(plan, flat, out_cts, _probes.fold(key, index),
                                      chunk_config, positions)

    def weighted(diags, num_samples):
        # Chunks are summed in at least float32, and the caller casts to the input's dtype.
        return [None if d is None else d.astype(jnp.promote_types(d.dtype, jnp.float32))
                * (num_samples / total) for d in diags]

    outvals, grads, diags = one_chunk(0, size)
    diags = weighted(diags, size)

    def body(acc, index):
        step = weighted(one_chunk(index, size)[2], size)
        return [a if d is None else a + d for a, d in zip(acc, step, strict=True)], None

    if n_full > 1:
        diags, _ = jax.lax.scan(body, diags, jnp.arange(1, n_full))
    if remainder:
        rest = weighted(one_chunk(n_full, remainder)[2], remainder)
        diags = [a if d is None else a + d for a, d in zip(diags, rest, strict=True)]
    return outvals, grads, diags


def _becker_lecun(plan, flat, out_cts):
    env, read, linear = _sweep.forward(plan, flat)
    grads, diags = _becker_lecun_sweep.sweep_diagonal(plan, flat, out_cts, (env, linear))
    return [read(a) for a in plan.program.outvars], grads, diags


def _unflatten_like(args, argnums, leaves):
    out, it = [], iter(leaves)
    for i in argnums:
        tree = jax.tree_util.tree_structure(args[i])
        out.append(jax.tree_util.tree_unflatten(tree, [next(it) for _ in range(tree.num_leaves)]))
    return out


class KeywordsLast:
    """Wrapper calling `fun(*args[:-1], **args[-1])`: keyword arguments as a last dict.

    The estimators take keyword arguments as `jax.grad` does: passed on to `fun` and not
    differentiated. As a last argument, their arrays are traced and their Python values
    stay static, like those of the positional arguments.
    """

    def __init__(self, fun):
        self.fun = fun

    def __call__(self, *args):
        return self.fun(*args[:-1], **args[-1])


def _make_runner(fun, config: _Config):
    """Return `run(args, key, kwargs) -> (value, aux, grads, diags)`, jit-compiled per shape."""
    # The function to trace, by whether the call has keyword arguments. A Gauss-Newton
    # `Composition` never gets any, and must reach `trace_program` unwrapped.
    targets = {False: fun, True: KeywordsLast(fun)}

    @functools.partial(jax.jit, static_argnums=(2, 3, 4))
    def jitted(dynamic, key, static, argnums, keywords):
        args = jax.tree_util.tree_unflatten(static.tree, _merge_call(dynamic, static))
        return _run_sweep(targets[keywords], config, argnums, args, key)

    def run(args, key, kwargs=None):
        if config.estimator != "becker_lecun":
            _checks.check_key(config.name, key)
        argnums = _checks.normalize_argnums(config.name, config.argnums, len(args))
        _checks.check_differentiated(config.name, args, argnums)
        keywords = bool(kwargs)
        if keywords:
            args = (*args, kwargs)
        dynamic, static = _split_call(args, argnums)
        try:
            hash(static)
        except TypeError:  # an unhashable Python leaf: trace on every call instead
            return _run_sweep(targets[keywords], config, argnums, args, key)
        return jitted(dynamic, key, static, argnums, keywords)

    return run


def _pack(config, argnums_in, value, aux, grads, diags):
    single = isinstance(argnums_in, (int, np.integer))
    grads = grads[0] if single else tuple(grads)
    diags = diags[0] if single else tuple(diags)
    return ((value, aux) if config.has_aux else value), grads, diags


def _transform(name, fun, argnums, has_aux, num_samples, probe, separable, estimator="cp",
               sample_chunk_size=None, aux_option=True):
    _checks.check_options(name, num_samples, probe)
    _checks.check_separable(name, separable)
    _checks.check_chunk_size(name, sample_chunk_size)
    if not callable(fun):
        raise TypeError(f"{name} requires a callable as its first argument, got {fun!r}.")
    config = _Config(name, argnums, bool(has_aux), int(num_samples), probe, bool(separable),
                     estimator, sample_chunk_size and int(sample_chunk_size), aux_option)
    return _make_runner(fun, config), config


def cp_value_grad_and_hessian_diag(fun, argnums=0, has_aux=False, *, num_samples=1,
                                   probe="rademacher", separable=True, sample_chunk_size=None):
    """Return a function giving the value, the gradient and a CP estimate of the Hessian diagonal.

    All three come from one forward pass and one fused backward sweep that carries the
    cotangent together with the Curvature Propagation vectors T and U (Martens, Sutskever
    and Swersky, "Estimating the Hessian by Back-propagating Curvature", ICML 2012).

    Args:
      fun: function returning a real scalar (or `(scalar, aux)` with `has_aux=True`).
      argnums: int or tuple of ints: the positional arguments to differentiate.
      has_aux: whether `fun` returns a pair `(output, aux)`.
      num_samples: K, the number of probes averaged, carried along a leading axis in one
        sweep.
      probe: "rademacher" (the default, never worse than Gaussian) or "gaussian".
      separable: use the separable-axis form of the estimate at parameters that contract
        over independent examples (see `cp_hessian_diag`).
      sample_chunk_size: carry at most this many probes in one sweep. With fewer than
        `num_samples`, the diagonal is averaged over chunks swept one after another, which
        bounds memory by one chunk's rows at the cost of more sequential work (default
        None: all probes in one sweep).

    Returns:
      `fn(*args, key)` returning `(value, grad, diag)`, with `value` replaced by
      `(value, aux)` when `has_aux=True`. `grad` and `diag` have the structure of
      `args[argnums]` (a tuple of such for a tuple `argnums`).

    Example:
      >>> import jax, jax.numpy as jnp, cpjax
      >>> f = lambda x: jnp.sum(jnp.sin(x))
      >>> value, grad, diag = cpjax.cp_value_grad_and_hessian_diag(f)(
      ...     jnp.array([0.5, 1.0]), key=jax.random.key(0))
      >>> bool(jnp.allclose(diag, -jnp.sin(jnp.array([0.5, 1.0]))))
      True
    """
    run, config = _transform("cp_value_grad_and_hessian_diag", fun, argnums, has_aux,
                             num_samples, probe, separable,
                             sample_chunk_size=sample_chunk_size)

    def value_grad_and_diag(*args, key=None, **kwargs):
        return _pack(config, argnums, *run(args, key, kwargs))

    return value_grad_and_diag


def cp_hessian_diag(fun, argnums=0, has_aux=False, *, num_samples=1, probe="rademacher",
                    separable=True, sample_chunk_size=None):
    """Return a function estimating the Hessian diagonal of `fun` by Curvature Propagation.

    The estimate is unbiased: its mean over probes is `diag(∇²fun)`. The cost is one
    forward pass and one backward pass carrying the cotangent and the vectors T and U
    (about two gradient evaluations for one probe), jit-compiled once per shape.

    Departures from the paper (Martens, Sutskever and Swersky, ICML 2012), each keeping
    the estimate unbiased and lowering its variance:

    * equations that are linear in their dependent inputs inject nothing, and cross
      blocks between inputs that depend on disjoint sets of leaves are dropped;
    * when every injected curvature is positive semi-definite, a single vector is carried
      (T = U) and the estimate is never negative;
    * with `separable=True`, a parameter used once to contract over a batch axis of
      independent examples (the weights of `h @ W`, a bias added to every row) gets the
      per-example form `Σ_b (h_b ∘ h_b) ⊗ (T_b ∘ U_b)`, which drops the zero-mean
      products of different examples. The batch axis must stay independent from there to
      the output: batch statistics, a softmax over the batch or similarities between
      examples downstream of a parameter's use switch the form off for that parameter
      (mixing upstream of it does not). The positions of a sequence count as examples for
      the layers after the last attention. A convolution kernel whose spatial positions
      interact downstream (a flatten into a dense layer), or a matrix product that also
      contracts over a mixed axis (a sequence axis before an attention), gets per-example
      cotangents over its batch axis instead, when `K · batch · parameter size` is at
      most `cpjax._separable.PER_EXAMPLE_LIMIT`. Above it, the ordinary product. Large
      per-example products run over chunks of examples, one chunk at a time.

    Args:
      fun: function returning a real scalar (or `(scalar, aux)` with `has_aux=True`).
      argnums: int or tuple of ints: the positional arguments to differentiate.
      has_aux: whether `fun` returns a pair `(output, aux)`.
      num_samples: K, the number of probes averaged in one sweep.
      probe: "rademacher" or "gaussian".
      separable: use the separable-axis form where it applies (default True).
      sample_chunk_size: carry at most this many probes in one sweep. With fewer than
        `num_samples`, the diagonal is averaged over chunks swept one after another, which
        bounds memory by one chunk's rows at the cost of more sequential work (default
        None: all probes in one sweep).

    Returns:
      `diag_fn(*args, key)`, where `key` is a required keyword-only PRNG key. The result
      has the structure of `args[argnums]` (a tuple for a tuple `argnums`); with
      `has_aux=True` it is `(diag, aux)`.

    Example:
      >>> import jax, jax.numpy as jnp, cpjax
      >>> f = lambda x: jnp.sum(x ** 3)
      >>> diag = cpjax.cp_hessian_diag(f)(jnp.array([1.0, 2.0]), key=jax.random.key(0))
      >>> jnp.round(diag, 4)  # 6 x; one probe is exact here, the Hessian being diagonal
      Array([ 6., 12.], dtype=float32)
    """
    run, config = _transform("cp_hessian_diag", fun, argnums, has_aux, num_samples, probe,
                             separable, sample_chunk_size=sample_chunk_size)

    def diag_fn(*args, key=None, **kwargs):
        value, aux, _, diags = run(args, key, kwargs)
        diags = diags[0] if isinstance(argnums, (int, np.integer)) else tuple(diags)
        return (diags, aux) if config.has_aux else diags

    return diag_fn


def becker_lecun_hessian_diag(fun, argnums=0, has_aux=False):
    """Return a function computing Becker and LeCun's approximation of the Hessian diagonal.

    Deterministic and cheap (one extra linear backward pass), but biased: it drops every
    off-diagonal term while back-propagating the diagonal (Becker & LeCun, 1988). It is the
    baseline that pruned CP as stated in the paper loses to at small numbers of probes.

    Args:
      fun: function returning a real scalar (or `(scalar, aux)` with `has_aux=True`).
      argnums: int or tuple of ints: the positional arguments to differentiate.
      has_aux: whether `fun` returns a pair `(output, aux)`.

    Returns:
      `fn(*args)` returning the approximate diagonal with the structure of
      `args[argnums]` (`(diag, aux)` with `has_aux=True`).

    Example:
      >>> import jax.numpy as jnp, cpjax
      >>> f = lambda x: jnp.sum(jnp.exp(x))
      >>> cpjax.becker_lecun_hessian_diag(f)(jnp.zeros(2))
      Array([1., 1.], dtype=float32)
    """
    name = "becker_lecun_hessian_diag"
    if not callable(fun):
        raise TypeError(f"{name} requires a callable as its first argument, got {fun!r}.")
    config = _Config(name, argnums, bool(has_aux), 1, "rademacher", False, "becker_lecun")
    run = _make_runner(fun, config)

    def diag_fn(*args, **kwargs):
        _, aux, _, diags = run(args, None, kwargs)
        diags = diags[0] if isinstance(argnums, (int, np.integer)) else tuple(diags)
        return (diags, aux) if config.has_aux else diags

    return diag_fn
