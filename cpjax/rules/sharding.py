"""shard_map: the body's curvature, formed on each device by a sweep inside a shard_map.

The linear part of a shard_map equation comes from JAX's VJP of the whole equation. Its
local curvature is the CP estimate of the body: the body is swept on every device (forward
and backward, with the equation's output cotangents and T = U = 0 at its outputs) inside a
shard_map over the same mesh, and the rows it injects at the body's inputs are assembled
with the inputs' own partition specs, with the probe axis in front and unsharded.

Probes. An equation in the body stands for one equation per device where its output differs
between devices, and for a single equation where the output is the same on all of them
(after a `psum`, say). With `check_vma=True`, JAX records the mesh axes along which each
value varies. The sweep folds the device's index along those axes, and only those, into the
equation's key. Shared values thus get shared probes and per-device values independent ones, which
keeps the estimate unbiased. The draws depend on the device layout, so an estimate whose
curvature comes from per-device equations differs from the one-device estimate for the same
key and agrees with it in mean. Where all curvature comes from shared values, it is equal.

Separable axes. A leaf passed to the shard_map and used once in the body, such as the
weights of a data-parallel model, gets the separable-axis form of `cpjax._separable`. The
body's own analysis finds it. Each device sums over its own examples, and the VJP of the
body's `pvary` sums over the devices. This needs zero curvature after the shard_map (see
`_separable._shard_map_sites`). Other inputs get rows, as described above.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax._src import core as jax_core
from jax._src.lax import parallel
from jax.extend import core as jcore
from jax.sharding import PartitionSpec

from cpjax import _probes
from cpjax._errors import CurvatureError
from cpjax._trace import varying_axes
from cpjax.rules._base import Curvature, Rule, register, zero_rows

# Collectives and device-type casts are linear: no curvature of their own.
COLLECTIVES = (
    parallel.psum_invariant_p, parallel.all_gather_invariant_p, parallel.reduce_scatter_p,
    parallel.pbroadcast_p, jax_core.pvary_p,
)
register(Rule(), *COLLECTIVES)


def body_plan(node, info, symmetric_allowed):
    """Return the sweep's plan of a shard_map's body (see `cpjax._sweep.make_plan`)."""
    from cpjax._sweep import make_plan
    from cpjax._trace import build_program

    # Not grouped: a grouped call is traced outside the shard_map, so its values would lose
    # the record of the mesh axes they vary over, and the body's VJPs reject that.
    program = build_program(jcore.ClosedJaxpr(node.params["jaxpr"], ()))
    return make_plan(program, list(info.deps), list(info.out_signs), prune=info.prune,
                     allow_symmetric=symmetric_allowed)


def device_key(key, node):
    """Return the key of a body equation: its index, then the device's index per varying axis."""
    key = _probes.fold(key, node.index)
    axes = frozenset().union(*(varying_axes(v.aval) for v in node.outvars))
    for axis in sorted(axes, key=str):
        key = _probes.fold(key, lax.axis_index(axis))
    return key


class ShardMapRule(Rule):
    def curvature(self, node, info):
        if not node.params.get("check_vma", True):
            raise CurvatureError(
                f"cpjax needs to know which values inside the shard_map at {node.where()} "
                "differ between devices, and that shard_map was called with "
                "check_vma=False. Call jax.shard_map with check_vma=True (the default)."
            )
        if not any(info.deps) or all(s == 0 for s in info.out_signs):
            return Curvature.NONE
        kinds = set(body_plan(node, info, True).kinds.values())
        if Curvature.INDEFINITE in kinds:
            return Curvature.INDEFINITE
        return Curvature.PSD if Curvature.PSD in kinds else Curvature.NONE

    def inject(self, ctx):
        from cpjax._sweep import sweep

        node, params = ctx.node, ctx.node.params
        sites = ctx.body_sites or {}
        # The separable analysis made the body's plan; its sites refer to that plan's variables.
        body = next(iter(sites.values())).body if sites else None
        plan = body.plan if body else body_plan(node, ctx.info, ctx.symmetric)
        dep = [i for i, d in enumerate(ctx.info.deps) if d and i not in sites]
        ybar = [jnp.zeros_like(o) if y is None else y
                for o, y in zip(ctx.outvals, ctx.ybar, strict=True)]
        n_rows = ctx.num_samples if ctx.symmetric else 2 * ctx.num_samples
        in_specs = tuple(params["in_specs"])

        def body_fn(operands, ybar, key):
            result = sweep(plan, list(operands), list(ybar), key, num_samples=ctx.num_samples,
                           probe=ctx.probe, node_key=device_key, separable=body)
            rows = []
            for i in dep:
                r = result.rows[i]
                rows.append(zero_rows(n_rows, operands[i]) if r is None else r)
            diagonals = [_check_devices(body.diagonal(i, ctx.num_samples), in_specs[i], node)
                         for i in sites]
            return rows, diagonals

        row_specs = [PartitionSpec(None, *in_specs[i]) for i in dep]
        diagonal_specs = [in_specs[i] for i in sites]
        rows, diagonals = jax.shard_map(
            body_fn, mesh=params["mesh"], in_specs=(in_specs, tuple(params["out_specs"]),
                                                    PartitionSpec()),
            out_specs=(row_specs, diagonal_specs), axis_names=params["manual_axes"]
            if "manual_axes" in params else params["newly_manual_axes"], check_vma=True,
        )(tuple(ctx.invals), tuple(ybar), ctx.key)
        for site, diagonal in zip(sites.values(), diagonals, strict=True):
            ctx.add_diagonal(site, diagonal)
        k = ctx.num_samples
        if ctx.symmetric:
            return [(i, r, None) for i, r in zip(dep, rows, strict=True)]
        return [(i, r[:k], r[k:]) for i, r in zip(dep, rows, strict=True)]


def _check_devices(diagonal, spec, node):
    """Check that a leaf's diagonal varies over no mesh axis that the leaf's spec leaves out.

    The VJP of the body's `pvary` sums the devices' parts over the axes it names. A part
    still varying over another axis would need a sum whose correctness the analysis has not
    shown, so it is an error and not a guess.
    """
    named = {a for entry in spec if entry is not None
             for a in (entry if isinstance(entry, tuple) else (entry,))}
    extra = varying_axes(diagonal) - named
    if extra:
        raise CurvatureError(
            f"cpjax formed a diagonal inside the shard_map at {node.where()} that differs "
            f"between devices along mesh axes {sorted(extra, key=str)}, which the "
            "parameter's partition spec does not name. Pass separable=False to use the "
            "ordinary estimate for this function."
        )
    return diagonal


SHARD_MAP = ShardMapRule()
