"""Softmax written out as primitives, kept as one node.

JAX 0.10 emits `jax.nn.softmax` inline: a shift by the stopped maximum, then

    g = exp(f),   h = sum(g) over the softmax axes,   i = broadcast(h),   p = g / i.

Inlined, the exponential injects one probe of the row's shape and the quotient's 2 × 2 block
two more, and their curvatures largely cancel. Kept as one node, the curvature has an exact
per-row form (the composite rule in `cpjax.rules.composite`) that needs one probe. The
rewrite also takes `exp(f) / sum(exp(f))` written by hand.

Four nodes are fused when each intermediate stays inside the group: the exponential's
output is read only by the sum and the quotient, the sum's only by the broadcast, and the
broadcast's only by the quotient. The broadcast must also put the sum back in place of the
axes it summed, at size 1 (as `keepdims=True` gives) or at full size.
"""

from __future__ import annotations

from jax import lax

from cpjax._trace import Program, Var, call_node, replace_nodes, variable_uses


def fuse_softmax(program: Program) -> Program:
    """Return `program` with each written-out softmax replaced by one node."""
    uses = variable_uses(program)
    producers = {v: node for node in program.nodes for v in node.outvars}
    fused, dropped = {}, set()
    for node in program.nodes:
        group = _softmax_group(node, producers, uses, program.silent)
        if group is not None:
            x, nodes = group
            fused[node.index] = call_node(x, nodes, "softmax", "softmax")
            dropped.update(n.index for n in nodes[:-1])
    if not fused:
        return program
    return replace_nodes(program, fused, dropped)


def _softmax_group(div, producers, uses, silent):
    """Return `(f, [exp, sum, broadcast, div])` when `div` ends a softmax, else None."""
    if div.primitive is not lax.div_p or not all(isinstance(a, Var) for a in div.invars):
        return None
    g, i = div.invars
    exp, broadcast = producers.get(g), producers.get(i)
    if exp is None or exp.primitive is not lax.exp_p or not isinstance(exp.invars[0], Var):
        return None
    if broadcast is None or broadcast.primitive is not lax.broadcast_in_dim_p:
        return None
    total = producers.get(broadcast.invars[0])
    if total is None or total.primitive is not lax.reduce_sum_p or total.invars[0] is not g:
        return None

    shape, axes = g.aval.shape, total.params["axes"]
    kept_axes = tuple(k for k in range(len(shape)) if k not in axes)
    # The sum comes back along its axes at size 1 (the quotient then broadcasts it) or at
    # full size.
    allowed_sizes = [(1, n) if k in axes else (n,) for k, n in enumerate(shape)]
    out_shape = broadcast.params["shape"]
    if (len(out_shape) != len(shape) or div.outvars[0].aval.shape != shape
            or any(n not in sizes for n, sizes in zip(out_shape, allowed_sizes, strict=True))
            or tuple(broadcast.params["broadcast_dimensions"]) != kept_axes):
        return None

    group = [exp, total, broadcast, div]
    if len({n.index < silent for n in group}) != 1:
        return None
    readers = {g: {total.index, div.index}, total.outvars[0]: {broadcast.index},
               i: {div.index}}
    for v, allowed in readers.items():
        users = uses.get(v, [])
        if any(user is None or user.index not in allowed for user, _ in users):
            return None
    return exp.invars[0], group
