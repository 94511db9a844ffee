"""Axis maps: how each input axis of an equation reaches its outputs, index for index.

`axis_map(node, i)` returns, for every axis of input `i`, one of:

* `(out_index, out_axis)`: element `k` along this axis only reaches element `k` along that
  output axis (elementwise ops, transposes, kept axes of reductions, free and batch axes of
  dot_general);
* `BROADCAST`: the axis has size 1 and is broadcast, so the input does not vary along it;
* `None`: elements along this axis are combined or moved (a reduction, a contraction, a
  shifted slice, a gather) — anything not known to keep indices apart.

The separable-axis analysis builds on these maps. `None` is always the safe value.
"""

from __future__ import annotations

from jax import lax
from jax._src import core as jax_core
from jax.extend.core import primitives as prims

from cpjax.rules import RULES
from cpjax.rules.binary import BinaryRule
from cpjax.rules.elementwise import ElementwiseRule

BROADCAST = "broadcast"

_ELEMENTWISE_LINEAR = frozenset({
    lax.add_p, prims.add_jaxvals_p, lax.sub_p, lax.neg_p, lax.convert_element_type_p,
    lax.copy_p, lax.max_p, lax.min_p, lax.abs_p, lax.select_n_p, lax.clamp_p, lax.sign_p,
    lax.floor_p, lax.ceil_p, lax.round_p, lax.stop_gradient_p, lax.reduce_precision_p,
    lax.rem_p, lax.nextafter_p, lax.optimization_barrier_p, lax.sharding_constraint_p,
    lax.device_put_p, lax.is_finite_p,
})
_REDUCTIONS = frozenset({
    lax.reduce_sum_p, lax.reduce_max_p, lax.reduce_min_p, lax.reduce_prod_p, lax.argmax_p,
    lax.argmin_p,
})
_CUMULATIVE = frozenset({
    lax.cumsum_p, lax.cumprod_p, lax.cummax_p, lax.cummin_p, lax.cumlogsumexp_p,
})


_COMPARISONS = frozenset({
    lax.eq_p, lax.ne_p, lax.lt_p, lax.le_p, lax.gt_p, lax.ge_p, lax.and_p, lax.or_p,
    lax.not_p,
})


def _primitive_is_elementwise(p) -> bool:
    return (p in _ELEMENTWISE_LINEAR or p in _COMPARISONS
            or isinstance(RULES.get(p), (ElementwiseRule, BinaryRule)))


def is_elementwise(node) -> bool:
    if node.composite is not None:
        return node.composite == "elementwise"
    return _primitive_is_elementwise(node.primitive)


def elementwise_jaxpr(jaxpr) -> bool:
    """Return whether every equation of `jaxpr` (nested calls included) acts elementwise.

    A broadcast of a scalar counts, so `jnp.where(x > 0, x, 0.0)` does.
    """
    for eqn in jaxpr.eqns:
        p = eqn.primitive
        if p is lax.broadcast_in_dim_p and eqn.invars[0].aval.ndim == 0:
            continue
        if p is jax_core.pvary_p:  # inside a shard_map: a value used per device, unchanged
            continue
        if p in (prims.jit_p, prims.custom_jvp_call_p, prims.closed_call_p):
            inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            if not elementwise_jaxpr(getattr(inner, "jaxpr", inner)):
                return False
            continue
        if not _primitive_is_elementwise(p):
            return False
    return True


def _elementwise(in_shape, out_shape):
    if len(in_shape) != len(out_shape):
        return [None] * len(in_shape)
    result = []
    for k, (n, m) in enumerate(zip(in_shape, out_shape, strict=True)):
        if n == m:
            result.append((0, k))
        else:
            result.append(BROADCAST if n == 1 else None)
    return result


def _broadcast_in_dim(node, in_shape, out_shape):
    dims = node.params["broadcast_dimensions"]
    return [
        (0, d) if out_shape[d] == n else BROADCAST for n, d in zip(in_shape, dims, strict=True)
    ]


def _reshape(in_shape, out_shape):
    """Carry an axis when its size and the product of the sizes before it both match."""
    out_prefix, prefix = {}, 1
    for k, m in enumerate(out_shape):
        out_prefix.setdefault((prefix, m), k)
        prefix *= m
    result, prefix = [], 1
    for n in in_shape:
        k = out_prefix.get((prefix, n))
        if k is not None:
            result.append((0, k))
        else:
            result.append(BROADCAST if n == 1 else None)
        prefix *= n
    return result


def _keep_axes(in_rank, dropped):
    result, j = [], 0
    for k in range(in_rank):
        if k in dropped:
            result.append(None)
        else:
            result.append((0, j))
            j += 1
    return result


def _dot_general(node, i, in_rank):
    (contract_l, contract_r), (batch_l, batch_r) = node.params["dimension_numbers"]
    contract = (contract_l, contract_r)[i]
    batch = (batch_l, batch_r)[i]
    other_rank = node.invars[1 - i].aval.ndim
    n_batch = len(batch_l)
    n_free_l = (in_rank if i == 0 else other_rank) - len(contract_l) - n_batch
    free = [k for k in range(in_rank) if k not in contract and k not in batch]
    offset = n_batch + (0 if i == 0 else n_free_l)
    result = [None] * in_rank
    for j, k in enumerate(batch):
        result[k] = (0, j)
    for j, k in enumerate(free):
        result[k] = (0, offset + j)
    return result


def _conv(node, i, rank):
    """Only the batch axis of the input image reaches the output index for index."""
    result = [None] * rank
    if i == 0 and node.params["batch_group_count"] == 1:
        specs = node.params["dimension_numbers"]
        result[specs.lhs_spec[0]] = (0, specs.out_spec[0])
    return result


def _slice(node, in_shape):
    starts = node.params["start_indices"]
    strides = node.params["strides"] or (1,) * len(in_shape)
    return [
        (0, k) if s == 0 and t == 1 else None for k, (s, t) in enumerate(zip(starts, strides,
                                                                             strict=True))
    ]


def _pad(node, i, in_shape):
    if i == 1:
        return []
    return [
        (0, k) if lo == 0 and interior == 0 else None
        for k, (lo, _, interior) in enumerate(node.params["padding_config"])
    ]


def _concatenate(node, i, in_rank):
    dim = node.params["dimension"]
    return [(0, k) if k != dim or i == 0 else None for k in range(in_rank)]


def axis_map(node, i) -> list:
    """Return the map of input `i`'s axes to output axes (see the module docstring)."""
    p = node.primitive
    in_shape = node.invars[i].aval.shape
    out_shape = node.outvars[0].aval.shape if node.outvars else ()
    rank = len(in_shape)
    if is_elementwise(node):
        return _elementwise(in_shape, out_shape)
    if p is lax.broadcast_in_dim_p:
        return _broadcast_in_dim(node, in_shape, out_shape) if i == 0 else []
    if p is lax.reshape_p:
        return _reshape(in_shape, out_shape) if i == 0 else []
    if p is lax.squeeze_p:
        return _keep_axes(rank, set(node.params["dimensions"]))
    if p is lax.transpose_p:
        perm = node.params["permutation"]
        result = [None] * rank
        for j, k in enumerate(perm):
            result[k] = (0, j)
        return result
    if p in _REDUCTIONS:
        return _keep_axes(rank, set(node.params["axes"]))
    if p in _CUMULATIVE:
        return [None if k == node.params["axis"] else (0, k) for k in range(rank)]
    if p is lax.sort_p:
        return [None if k == node.params["dimension"] else (i, k) for k in range(rank)]
    if p is lax.dot_general_p:
        return _dot_general(node, i, rank)
    if p is lax.conv_general_dilated_p:
        return _conv(node, i, rank)
    if p is lax.slice_p:
        return _slice(node, in_shape)
    if p is lax.pad_p:
        return _pad(node, i, in_shape)
    if p is lax.concatenate_p:
        return _concatenate(node, i, rank)
    if node.composite == "rowwise":
        return [(0, k) if k < rank - 1 else None for k in range(rank)]
    if node.composite in ("log_softmax", "softmax"):
        from cpjax.rules.composite import summed_axes

        axes = set(summed_axes(node.eqn))
        return [None if k in axes else (0, k) for k in range(rank)]
    if p is prims.custom_jvp_call_p and _custom_is_elementwise(node):
        return _elementwise(in_shape, out_shape)
    return [None] * rank


def _custom_is_elementwise(node) -> bool:
    """Return whether a custom_jvp_call's body is made of elementwise equations only."""
    out_shape = node.outvars[0].aval.shape
    same = all(v.aval.shape in ((), out_shape) for v in node.invars)
    return same and elementwise_jaxpr(node.params["call_jaxpr"].jaxpr)
