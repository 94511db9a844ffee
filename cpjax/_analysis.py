"""Static analyses of a flat program, run once at trace time.

* `dependencies`: which differentiated leaves each variable depends on. Equations with no
  dependent input are evaluated and skipped by the sweep, and cross blocks between inputs
  with disjoint leaf sets are dropped for the diagonal.
* `sliced_inputs`: the `xs` inputs of scans that carry leaves slice by slice, so that within
  one step the slice and the carry depend on disjoint entries of those leaves.
* `cotangent_signs`: the sign of each variable's cotangent where it is known at trace
  time. A log_softmax whose cotangent is negative (a cross-entropy loss) or a square whose
  cotangent is positive injects a positive semi-definite curvature; when every injection
  is, the sweep carries a single vector (T = U).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import core as jax_core
from jax._src.lax import parallel
from jax.extend.core import primitives as prims

from cpjax._trace import Lit, Program, Var, variable_uses
from cpjax.rules.zero import ZERO_DERIVATIVE

_NO_DEPS = frozenset()


def is_float(aval) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def deps_of(deps: dict, atom) -> frozenset:
    return deps.get(atom, _NO_DEPS) if isinstance(atom, Var) else _NO_DEPS


def dependencies(program: Program, input_deps: list, parts: dict | None = None) -> dict:
    """Map each variable to the frozenset of leaves it depends on (absent: none).

    `parts`, from `leaf_parts`, gives the slices of split leaves their own dependencies.
    """
    deps = {}
    for v, d in zip(program.invars, input_deps, strict=True):
        if d and is_float(v.aval):
            deps[v] = frozenset(d)
    parts = parts or {}
    for node in program.nodes:
        if node.primitive in ZERO_DERIVATIVE:
            continue
        union = parts.get(node.index) or frozenset().union(
            *(deps_of(deps, a) for a in node.invars))
        if not union:
            continue
        for v in node.outvars:
            if is_float(v.aval):
                deps[v] = union
    return deps


def leaf_parts(program: Program, input_deps: list) -> dict:
    """Map each static slice of a split leaf to the dependencies of its part.

    A leaf read only through static slices that do not overlap (`w[0]`, `w[1]`, ... of
    stacked layer weights) is split. Each slice then depends on its own part of the leaf,
    so pruning treats the parts as separate leaves. The program's inputs must be the leaves
    themselves, not values computed from them.
    """
    inputs = set(program.invars)
    if not any(node.primitive is lax.slice_p and node.invars[0] in inputs
               for node in program.nodes):
        return {}
    uses = variable_uses(program)
    parts = {}
    for v, leaf_deps in zip(program.invars, input_deps, strict=True):
        readers = [node for node, _ in uses.get(v, [])]
        if (not leaf_deps or not is_float(v.aval) or len(readers) < 2
                or any(n is None or n.primitive is not lax.slice_p for n in readers)):
            continue
        boxes = [(n.params["start_indices"], n.params["limit_indices"]) for n in readers]
        if any(_boxes_overlap(a, b) for k, a in enumerate(boxes) for b in boxes[k + 1:]):
            continue
        for node, box in zip(readers, boxes, strict=True):
            parts[node.index] = frozenset(("part", d, *box) for d in leaf_deps)
    return parts


def _boxes_overlap(a, b) -> bool:
    (start_a, limit_a), (start_b, limit_b) = a, b
    return all(max(sa, sb) < min(la, lb)
               for sa, la, sb, lb in zip(start_a, limit_a, start_b, limit_b, strict=True))


# Linear maps that pass a cotangent on with non-negative coefficients: the sign is kept.
_SIGN_KEEPING = frozenset({
    lax.add_p, prims.add_jaxvals_p, lax.reduce_sum_p, lax.broadcast_in_dim_p, lax.reshape_p,
    lax.transpose_p, lax.squeeze_p, lax.convert_element_type_p, lax.copy_p, lax.slice_p,
    lax.pad_p, lax.concatenate_p, lax.gather_p, lax.dynamic_slice_p, lax.dynamic_update_slice_p,
    lax.select_n_p, lax.cumsum_p, lax.reduce_max_p, lax.reduce_min_p, lax.max_p, lax.min_p,
    lax.sort_p, lax.clamp_p, lax.scatter_add_p, lax.rev_p, lax.reduce_precision_p,
    lax.optimization_barrier_p, lax.sharding_constraint_p, lax.device_put_p,
    # Collectives inside a shard_map move, copy or add cotangents between devices.
    parallel.psum_p, parallel.psum_invariant_p, parallel.all_gather_p,
    parallel.all_gather_invariant_p, parallel.reduce_scatter_p, parallel.ppermute_p,
    parallel.all_to_all_p, parallel.pbroadcast_p, jax_core.pvary_p,
    # Increasing elementwise functions: ct_x = ȳ φ'(x) with φ' > 0.
    lax.exp_p, lax.exp2_p, lax.expm1_p, lax.log_p, lax.log1p_p, lax.tanh_p, lax.logistic_p,
    lax.sqrt_p, lax.cbrt_p, lax.atan_p, lax.asinh_p, lax.sinh_p, lax.erf_p, lax.erf_inv_p,
    lax.asin_p, lax.atanh_p,
})
# Decreasing elementwise functions flip the sign.
_SIGN_FLIPPING = frozenset({lax.neg_p, lax.rsqrt_p, lax.acos_p, lax.erfc_p})


def constant_sign(atom):
    """Return +1 or -1 when every entry of a constant atom has that sign, else None."""
    if not isinstance(atom, Lit):
        return None
    try:
        value = np.asarray(atom.val)
    except Exception:  # a tracer closed over from an outer transformation
        return None
    if value.dtype.kind not in "fiu" or value.size == 0:
        return None
    if np.all(value > 0):
        return 1
    if np.all(value < 0):
        return -1
    return None


def _combine(a, b):
    if a == 0:
        return b
    if b == 0 or a == b:
        return a
    return None


def _input_sign(node, i, out_sign, deps, constants):
    """Sign of the cotangent that `node` passes to its input `i`."""
    p = node.primitive
    if out_sign is None:
        return None
    if p in _SIGN_KEEPING:
        return out_sign
    if p in _SIGN_FLIPPING:
        return -out_sign
    if p is lax.sub_p:
        return out_sign if i == 0 else -out_sign
    if p is lax.mul_p or (p is lax.div_p and i == 0):
        other = node.invars[1 - i]
        if deps_of(deps, other):
            return None
        s = constant_sign(constants.get(other, other))
        return None if s is None else s * out_sign
    if p is lax.integer_pow_p and node.params["y"] % 2 == 1 and node.params["y"] > 0:
        return out_sign if node.params["y"] == 1 else None
    return None


def cotangent_signs(program: Program, deps: dict, output_signs: list) -> dict:
    """Map each dependent variable to its static cotangent sign: ±1, 0 (none) or None."""
    signs = {}
    # Inside a shard_map, JAX marks a constant used with per-device values by a `pvary`.
    constants = {node.outvars[0]: node.invars[0] for node in program.nodes
                 if node.primitive is jax_core.pvary_p and len(node.invars) == 1
                 and isinstance(node.invars[0], Lit)}
    for v, s in zip(program.outvars, output_signs, strict=True):
        if isinstance(v, Var) and v in deps:
            signs[v] = _combine(signs.get(v, 0), s)
    for node in reversed(program.nodes):
        out_signs = [signs.get(v, 0) for v in node.outvars]
        if all(s == 0 for s in out_signs):
            continue
        single = out_signs[0] if len(out_signs) == 1 else None
        for i, atom in enumerate(node.invars):
            if not deps_of(deps, atom):
                continue
            s = _input_sign(node, i, single, deps, constants) if len(out_signs) == 1 else None
            signs[atom] = _combine(signs.get(atom, 0), s)
    return signs


# Equations that move or relabel each entry of their one input to one entry of the output.
_ONE_TO_ONE = frozenset({
    lax.transpose_p, lax.reshape_p, lax.convert_element_type_p, lax.copy_p, lax.squeeze_p,
    lax.rev_p, lax.neg_p,
})


def sliced_inputs(program: Program, deps: dict) -> dict:
    """Map each scan node's index to the `xs` inputs that hold leaves slice by slice.

    Step t of a scan reads slice t of each `xs` input, and its carry depends only on the
    slices of earlier steps. When an `xs` input is a leaf moved entry by entry (a
    transpose, a reshape), and no other input of the scan depends on its leaves, step t's
    slice and its carry depend on disjoint entries of those leaves. Pruning may then drop
    their cross blocks inside the body (`cpjax.rules.scan`), as for disjoint leaves. The
    program's inputs must be the leaves themselves.
    """
    scans = [node for node in program.nodes if node.primitive is lax.scan_p]
    if not scans:
        return {}
    uses = variable_uses(program)
    producers = {v: node for node in program.nodes for v in node.outvars}
    inputs = set(program.invars)
    result = {}
    for node in scans:
        first_xs = node.params["num_consts"] + node.params["num_carry"]
        candidates = {i for i in range(first_xs, len(node.invars))
                      if _moved_program_input(node.invars[i], uses, producers, inputs)}
        others = frozenset().union(*(deps_of(deps, a) for i, a in enumerate(node.invars)
                                     if i not in candidates))
        sliced = frozenset(i for i in candidates
                           if deps_of(deps, node.invars[i]) and not
                           deps_of(deps, node.invars[i]) & others)
        if sliced:
            result[node.index] = sliced
    return result


def _moved_program_input(atom, uses, producers, inputs) -> bool:
    """Return whether `atom` is a program input, moved entry by entry, with no other use."""
    while isinstance(atom, Var):
        if len(uses.get(atom, [])) != 1:
            return False
        if atom in inputs:
            return True
        node = producers.get(atom)
        if node is None or node.primitive not in _ONE_TO_ONE or len(node.invars) != 1:
            return False
        atom = node.invars[0]
    return False
