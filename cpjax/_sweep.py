"""The forward pass and the fused backward sweep of Curvature Propagation.

The backward sweep carries, for every variable, the cotangent ȳ (row by row, the ordinary
reverse-mode gradient) and the CP vectors T and U for `K` probes, stacked along a leading
axis: `K` rows in the `T = U` mode, `2K` rows (T first) otherwise. At each equation the
linear part (its VJP) is applied to ȳ and, batched, to every row of T and U; then the
equation's rule injects `F v` into T and `G v` into U for each dependent input.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from cpjax import _analysis, _probes, _schedule, _separable
from cpjax._errors import CurvatureError
from cpjax._trace import Program, Var, bind_node
from cpjax.rules import STACKED, Context, Curvature, StaticInfo, StructuredRule, rule_for
from cpjax.rules._base import vary_like, zero_rows
from cpjax.rules.binary import sum_to_shape


@dataclasses.dataclass
class Plan:
    """Decisions of the static analyses about a program, fixed at trace time."""

    program: Program
    deps: dict
    signs: dict
    infos: dict  # node index -> StaticInfo, for nodes the sweep visits
    kinds: dict  # node index -> Curvature
    symmetric: bool  # every injection is PSD: carry T only, U = T
    parts: frozenset = frozenset()  # slice nodes that split a leaf into parts (see _analysis)


def make_plan(program: Program, input_deps: list, output_signs: list, *, prune: bool,
              allow_symmetric: bool = True, leaves: bool = False) -> Plan:
    """Run the analyses and pick, for each equation, its rule's static curvature kind.

    `leaves` marks a program whose inputs are the differentiated leaves themselves, not
    values computed from them (as in a loop's body). Only there do slices of an input count
    as disjoint parts (`cpjax._analysis.leaf_parts` and `sliced_inputs`).
    """
    parts = _analysis.leaf_parts(program, input_deps) if leaves else {}
    deps = _analysis.dependencies(program, input_deps, parts)
    signs = _analysis.cotangent_signs(program, deps, output_signs)
    sliced = _analysis.sliced_inputs(program, deps) if leaves else {}
    infos, kinds = {}, {}
    for node in program.nodes:
        in_deps = tuple(_analysis.deps_of(deps, a) for a in node.invars)
        out_signs = tuple(signs.get(v, 0) for v in node.outvars)
        if not any(in_deps) or all(s == 0 for s in out_signs):
            continue
        if any(_is_complex(v.aval) for v in [*node.invars, *node.outvars]
               if _analysis.deps_of(deps, v) or v in deps):
            raise CurvatureError(
                f"cpjax does not support complex intermediate values yet: primitive "
                f"'{node.primitive.name}' at {node.where()} has a complex input or output that "
                "depends on the differentiated arguments. Write the computation with real "
                "arrays (real and imaginary parts), or use exact_hessian_diag or "
                "hutchinson_hessian_diag, which handle it."
            )
        if node.primitive is lax.while_p:
            raise CurvatureError(
                f"cpjax cannot differentiate through lax.while_loop at {node.where()}: its "
                "carry depends on the differentiated arguments, and a while loop cannot be "
                "run in reverse (jax.grad rejects it too). Use lax.scan, or lax.fori_loop "
                "with static start and stop values."
            )
        info = StaticInfo(in_deps, out_signs, prune, sliced.get(node.index, frozenset()))
        infos[node.index] = info
        if node.index < program.silent:
            kinds[node.index] = Curvature.NONE
        else:
            kinds[node.index] = rule_for(node).curvature(node, info)
    symmetric = allow_symmetric and all(k is not Curvature.INDEFINITE for k in kinds.values())
    return Plan(program, deps, signs, infos, kinds, symmetric, frozenset(parts))


def _is_complex(aval) -> bool:
    return jnp.issubdtype(getattr(aval, "dtype", jnp.float32), jnp.complexfloating)


@dataclasses.dataclass
class SweepResult:
    outvals: list  # primal outputs of the program
    grads: list  # per program input: ȳ, or None where it receives none
    rows: list  # per program input: stacked T (and U) rows, or None


# Primitives linear in all inputs together, and in each input alone (products). Their VJP
# is JAX's transpose rule, which traces faster than `jax.vjp` (0.11 against 0.15 s).
# NOTE: the transpose rules are JAX internals. Where they are missing, `jax.vjp` is used.
_JOINTLY_LINEAR = {lax.add_p, lax.sub_p, lax.neg_p, lax.broadcast_in_dim_p, lax.reduce_sum_p,
                   lax.reshape_p, lax.transpose_p, lax.squeeze_p, lax.concatenate_p, lax.pad_p}
_SEPARATELY_LINEAR = {lax.mul_p, lax.dot_general_p}
try:
    from jax._src.interpreters.ad import UndefinedPrimal, instantiate_zeros, primitive_transposes
except ImportError:
    primitive_transposes = {}


def _transpose_vjp(node, invals, dep_idx):
    """Return the VJP of a node that is linear in its dependent inputs, or None."""
    primitive = node.primitive
    if node.composite is not None or primitive.multiple_results:
        return None
    if primitive in _JOINTLY_LINEAR:
        groups = [list(dep_idx)]
    elif primitive in _SEPARATELY_LINEAR or (primitive is lax.div_p and dep_idx == [0]):
        groups = [[i] for i in dep_idx]
    else:
        return None
    transpose = primitive_transposes.get(primitive)
    if transpose is None:
        return None
    avals = [jax.typeof(x) for x in invals]

    def vjp_fn(cotangents):
        (cotangent,) = cotangents
        grads = {}
        for group in groups:
            args = [UndefinedPrimal(avals[i]) if i in group else x for i, x in enumerate(invals)]
            out = transpose(cotangent, *args, **node.eqn.params)
            for i in group:
                if out[i] is None:
                    grads[i] = jnp.zeros(avals[i].shape, avals[i].dtype)
                else:
                    grads[i] = instantiate_zeros(out[i])
        return tuple(grads[i] for i in dep_idx)

    return vjp_fn


def _linearize(node, invals, dep_idx):
    """Evaluate `node` and return its outputs and the VJP over its dependent inputs."""
    float_out = [_analysis.is_float(v.aval) for v in node.outvars]
    vjp_fn = _transpose_vjp(node, invals, dep_idx) if all(float_out) else None
    if vjp_fn is not None:
        return bind_node(node, invals), vjp_fn, float_out

    def f(*dep_vals):
        vals = list(invals)
        for i, val in zip(dep_idx, dep_vals, strict=True):
            vals[i] = val
        outs = bind_node(node, vals)
        floats = [o for o, fl in zip(outs, float_out, strict=True) if fl]
        others = [o for o, fl in zip(outs, float_out, strict=True) if not fl]
        return floats, others

    try:
        floats, vjp_fn, others = jax.vjp(f, *[invals[i] for i in dep_idx], has_aux=True)
    except Exception as err:  # JAX's message gives the reason; this adds the source line.
        raise CurvatureError(
            f"cpjax cannot differentiate primitive '{node.primitive.name}' at {node.where()} "
            f"with respect to the differentiated arguments: {err}"
        ) from err
    floats, others = iter(floats), iter(others)
    outs = [next(floats) if fl else next(others) for fl in float_out]
    return outs, vjp_fn, float_out


class _Accumulator:
    """Sums contributions per variable; absent means structurally zero."""

    def __init__(self):
        self.values = {}

    def add(self, var, value):
        if not isinstance(var, Var) or value is None:
            return
        old = self.values.get(var)
        if old is None:
            self.values[var] = value
        elif old.shape == value.shape and old.dtype == value.dtype:
            # `lax.add` directly, because `+` traces through a jit wrapper.
            self.values[var] = lax.add(old, value)
        else:
            self.values[var] = old + value

    def pop(self, var):
        return self.values.pop(var, None) if isinstance(var, Var) else None

    def get(self, var):
        return self.values.get(var) if isinstance(var, Var) else None


def forward(plan, invals):
    """Evaluate the program, linearizing the equations the sweep visits.

    Returns `(env, read, linear)`: the value of every variable, a reader for atoms, and for
    each visited node `(vals, outs, vjp_fn, dep_idx, float_out)`. A node whose rule has its
    own backward pass (`StructuredRule`) stores its residuals in place of `vjp_fn`.
    """
    env = {}

    def read(atom):
        return env[atom] if isinstance(atom, Var) else atom.val

    for v, x in zip(plan.program.invars, invals, strict=True):
        env[v] = x
    linear = {}
    for node in plan.program.nodes:
        vals = [read(a) for a in node.invars]
        info = plan.infos.get(node.index)
        rule = rule_for(node)
        if info is None:
            outs = bind_node(node, vals)
        elif isinstance(rule, StructuredRule):
            dep_idx = [i for i, d in enumerate(info.deps) if d]
            float_out = [_analysis.is_float(v.aval) for v in node.outvars]
            outs, residuals = rule.forward(node, vals)
            linear[node.index] = (vals, outs, residuals, dep_idx, float_out)
        else:
            dep_idx = [i for i, d in enumerate(info.deps) if d]
            outs, vjp_fn, float_out = _linearize(node, vals, dep_idx)
            linear[node.index] = (vals, outs, vjp_fn, dep_idx, float_out)
        for v, o in zip(node.outvars, outs, strict=True):
            env[v] = o
    return env, read, linear


@dataclasses.dataclass
class _SweepState:
    plan: Plan
    env: dict
    grads: _Accumulator
    rows: _Accumulator
    key: object
    num_samples: int
    probe: str
    separable: object
    node_key: object  # (key, node) -> the key of the node's probes
    node_seed: object = None  # (node, salt) -> seed of its Rademacher probes, or None

    @property
    def n_rows(self):
        return self.num_samples if self.plan.symmetric else 2 * self.num_samples


def sweep(plan: Plan, invals: list, out_cotangents: list, key, *, num_samples: int,
          probe: str, separable=None, out_rows=None, node_key=None) -> SweepResult:
    """Run the forward pass and the fused backward sweep.

    Args:
      plan: from `make_plan`.
      invals: values of the program's inputs.
      out_cotangents: ȳ for each program output, None where zero.
      key: PRNG key; each equation draws its probes from `_probes.fold(key, node.index)`.
      num_samples: K, the number of probes carried at once.
      probe: "rademacher" or "gaussian".
      separable: optional `cpjax._separable.SeparableLeaves` that takes over the diagonal of
        some leaves (see there); None for the plain estimator.
      out_rows: T (and U) rows arriving at each program output, None where zero (used when
        the program is the body of a loop).
      node_key: optional `(key, node) -> key` for each equation's probes; by default
        `_probes.fold(key, node.index)`. The body of a shard_map also folds in device indices.
    """
    env, read, linear = forward(plan, invals)
    node_seed = None
    if node_key is None:
        node_key, node_seed = _node_key_table(key, len(plan.program.nodes))
    state = _SweepState(plan, env, _Accumulator(), _Accumulator(), key, num_samples, probe,
                        separable, node_key, node_seed)
    out_rows = out_rows or [None] * len(out_cotangents)
    for v, ct, r in zip(plan.program.outvars, out_cotangents, out_rows, strict=True):
        if v in plan.deps:
            state.grads.add(v, ct)
            state.rows.add(v, r)
    for node in reversed(plan.program.nodes):
        if node.index in linear:
            _visit(state, node, linear[node.index])
    return SweepResult(
        outvals=[read(a) for a in plan.program.outvars],
        grads=[state.grads.get(v) for v in plan.program.invars],
        rows=[state.rows.get(v) for v in plan.program.invars],
    )


# Number of salts whose seeds `_node_key_table` puts in its table. Rules draw with salts 0
# and 1, except the composite and fallback rules of an equation with more than two
# dependent inputs.
_TABLED_SALTS = 2


def _node_key_table(key, num_nodes):
    """Return `(key, node) -> _probes.fold(key, node.index)` and `(node, salt) -> seed`.

    Both are read from tables made for every index at once, so each equation's key costs
    one slice. Folding for each equation and each salt gave the one-probe program of the
    suite's small transformer 4,004 HLO instructions before optimization, and the key table
    3,102. The seeds `_probes._seed(key, salt)` of salts 0 and 1, the only salts most rules
    use, are tabled as well. With them, and with keys formed only where a rule reads one,
    the equations cpjax traces for that transformer with ten probes fell from 2,283 to
    1,792, and tracing took 180 instead of 235 ms.
    """
    table = _probes.fold(key, jnp.arange(max(num_nodes, 1), dtype=jnp.uint32))
    seeds = _probes.seed_table(table, _TABLED_SALTS)

    def node_seed(node, salt):
        if salt >= _TABLED_SALTS:
            return None
        start = (node.index, salt)
        return lax.slice(seeds, start, (node.index + 1, salt + 1)).reshape(())

    return (lambda key, node: table[node.index]), node_seed


def _visit(state: _SweepState, node, linearized):
    """Propagate ȳ, T and U through one node and add its injections."""
    vals, outs, vjp_fn, dep_idx, float_out = linearized
    env = state.env
    float_vars = [v for v, fl in zip(node.outvars, float_out, strict=True) if fl]
    ybar = [state.grads.pop(v) for v in float_vars]
    tu = [state.rows.pop(v) for v in float_vars]
    if all(y is None for y in ybar) and all(t is None for t in tu):
        return
    if node.primitive is lax.conv_general_dilated_p and any(t is not None for t in tu):
        tu = _materialize(tu)
    ybar_full = [vary_like(jnp.zeros_like(env[v]), env[v]) if y is None else y
                 for v, y in zip(float_vars, ybar, strict=True)]
    arriving = next((t for t in tu if t is not None), None)  # rows from above, or None
    ybar_full = _gradient_waits_for_rows(state, node, ybar_full, arriving)
    rule = rule_for(node)
    ctx = Context(
        node=node, info=state.plan.infos[node.index], invals=vals, outvals=outs,
        ybar=_ybar_per_output(node, float_out, ybar),
        make_key=functools.partial(state.node_key, state.key, node),
        num_samples=state.num_samples,
        probe=state.probe, symmetric=state.plan.symmetric, kind=state.plan.kinds[node.index],
        seed=None if state.node_seed is None else functools.partial(state.node_seed, node),
    )
    if state.separable is not None:
        ctx.body_sites = state.separable.body_sites(node)
        ctx.add_diagonal = functools.partial(state.separable.add_body_diagonal, env=env)
    if isinstance(rule, StructuredRule):
        in_grads, in_rows = _call_rule(node, lambda: rule.backward(ctx, vjp_fn, ybar_full, tu))
        for k, i in enumerate(dep_idx):
            state.grads.add(node.invars[i], in_grads[k])
            state.rows.add(node.invars[i], in_rows[k])
        return
    in_grads = vjp_fn(ybar_full)
    in_rows = [None] * len(dep_idx)
    targets = list(range(len(dep_idx)))
    if state.separable is not None:
        targets = state.separable.row_targets(node, dep_idx, targets)
    diagonals = _diagonals_first(state, node, vals, tu, dep_idx)
    if targets and any(t is not None for t in tu):
        tu_full = [zero_rows(state.n_rows, env[v]) if t is None else t
                   for v, t in zip(float_vars, tu, strict=True)]
        if diagonals:
            tu_full = [_schedule.after(t, diagonals[0]) for t in tu_full]
        in_rows = _broadcast_operand_rows(node, vals, outs, dep_idx, targets, tu_full)
        if in_rows is None:
            in_rows = _replace_conv_kernel_rows(node, vals, dep_idx, targets, tu_full,
                                                jax.vmap(vjp_fn)(tu_full))
    for k, i in enumerate(dep_idx):
        state.grads.add(node.invars[i], in_grads[k])
        if k in targets:
            state.rows.add(node.invars[i], in_rows[k])
    if state.separable is not None and diagonals is None:
        state.separable.visit(node, vals, env, tu, dep_idx)
    if state.plan.kinds[node.index] is Curvature.NONE or all(y is None for y in ybar):
        return
    # Draw the probes once the rows from above exist, so that XLA does not form the
    # injection early and keep it alive (ten probes, 0.4M MLP: 22.8 -> 18.0 MiB).
    ctx.wait_for = arriving
    for i, fv, gv in _call_rule(node, lambda: rule.inject(ctx)):
        if state.plan.symmetric or gv is STACKED:
            state.rows.add(node.invars[i], fv)
        else:
            state.rows.add(node.invars[i], jnp.concatenate([fv, fv if gv is None else gv]))


def _gradient_waits_for_rows(state: _SweepState, node, ybar_full, arriving):
    """Return ȳ of a matrix product with a separable parameter, formed after its rows.

    The gradient needs no rows, so XLA's CPU backend ran the gradient's backward pass
    ahead of the rows' and kept the cotangents of layers further down alive until the rows
    arrived there. Held back at each such product, the two passes move down together.
    Peak memory of one probe on the suite's 10k MLP fell from 2.03 to 1.81 times
    value_and_grad's, and on its 10k transformer from 1.26 to 1.23 times. On the 0.5M
    transformer it rose from 1.455 to 1.475 times. Memory of the CNNs, of the other MLPs and
    of ten probes changed by 2.2 % or less, and run times by less than the noise (CNN,
    MLP and transformer at 10k and 0.5M, 30 interleaved rounds).
    """
    if arriving is None or not _is_separable_product(state, node):
        return ybar_full
    return [_schedule.after(y, arriving) for y in ybar_full]


def _is_separable_product(state: _SweepState, node) -> bool:
    """Return whether `node` is a matrix product with a parameter on a separable axis."""
    return (state.separable is not None and node.primitive is lax.dot_general_p
            and bool(state.separable.sites.get(node.index)))


def _diagonals_first(state: _SweepState, node, vals, tu, dep_idx):
    """Return the separable diagonals of a matrix product, formed before its rows' VJP, or None.

    The rows' VJP then waits for them (`_schedule.after`), so the per-example squares and
    T ⊙ U are freed before the VJP allocates its output. Left to itself, XLA's CPU backend
    scheduled the diagonal after the VJP. Peak memory of one probe on the suite's 10k MLP
    fell from 2.45 to 2.03 times value_and_grad's, and temporaries of ten probes on its
    0.4M MLP and transformer from 18.0 to 12.5 MiB and from 61.8 to 42.0 MiB. Run times
    changed by -8 % to +6 % (slower with one probe, faster with ten). On convolutions the
    same order cost 11 to 13 % of one probe's time, so they keep XLA's order.
    """
    if not _is_separable_product(state, node):
        return None
    return state.separable.visit(node, vals, state.env, tu, dep_idx)


def _materialize(rows):
    """Store the rows arriving at a convolution as one array before its products read them.

    Otherwise each reader of the rows (the input VJP, the kernel products, a bias's sums)
    recomputes them from their addends, the VJP rows from the layer above and the injected
    rows, so XLA's CPU backend keeps every addend alive. With the barrier, the
    temporaries of K = 10 on the suite's 10k and 0.4M CNNs fell from 38 to 27 MiB and from
    75 to 55 MiB. Before matrix products, or before every equation with a separable
    parameter, it saved no memory on the transformers and MLPs and ran up to 10 % slower, so
    it is not used there.

    NOTE: measured on a CPU only.
    """
    return list(lax.optimization_barrier(rows))


def _broadcast_operand_rows(node, vals, outs, dep_idx, targets, tu_full):
    """Return the rows' VJP of a product or quotient with a broadcast operand, or None.

    The VJP of such an operand sums the rows times a partial derivative over the
    broadcast axes. Written by JAX's rules, that sum reached XLA's CPU backend as a
    reduction fused with a broadcast product, which is slow (see `cpjax._reduce`). For the
    divisions of the suite's 10k transformer's layer norms it took 61 to 67 µs of one
    probe's 3.5 ms, against 4 to 7 µs for its other reductions of the same shape. Summed
    as a product with ones, one probe ran 5 % faster there and 3.5 % faster on the 0.5M
    transformer (same-process A/B).
    """
    if node.primitive not in (lax.mul_p, lax.div_p):
        return None
    (a, b), (y,), (rows,) = vals, outs, tu_full
    if all(vals[dep_idx[k]].shape == y.shape for k in targets):
        return None
    partials = (b, a) if node.primitive is lax.mul_p else (1 / b, -y / b)
    out = [None] * len(dep_idx)
    for k in targets:
        i = dep_idx[k]
        out[k] = sum_to_shape(rows * partials[i], vals[i].shape, lead=1, by_product=True)
    return out


def _replace_conv_kernel_rows(node, vals, dep_idx, targets, tu_full, in_rows):
    """Replace the kernel rows of an ungrouped convolution with a product of input patches.

    The vmapped VJP's kernel rows are then unused, so XLA removes them.
    """
    if (node.primitive is not lax.conv_general_dilated_p or 1 not in dep_idx
            or node.params["feature_group_count"] != 1
            or node.params["batch_group_count"] != 1):
        return in_rows
    k = dep_idx.index(1)
    if k not in targets:
        return in_rows
    in_rows = list(in_rows)
    in_rows[k] = _separable.conv_kernel_rows(node, vals, tu_full[0])
    return in_rows


def _call_rule(node, call):
    """Run a rule, naming the equation and the user's source line if it fails."""
    try:
        return call()
    except (CurvatureError, Warning):
        raise
    except Exception as err:
        raise CurvatureError(
            f"cpjax failed to form the local curvature of primitive '{node.primitive.name}' "
            f"at {node.where()}: {type(err).__name__}: {err}"
        ) from err


def _ybar_per_output(node, float_out, ybar_floats):
    it = iter(ybar_floats)
    return [next(it) if fl else None for fl in float_out]


def diagonal_from_rows(rows, num_samples, symmetric):
    """Average `T ⊙ U` over the probes."""
    if symmetric:
        return _probes.probe_mean(rows * rows)
    return _probes.probe_mean(rows[:num_samples] * rows[num_samples:])
