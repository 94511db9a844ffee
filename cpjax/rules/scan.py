"""scan (and `fori_loop` with a static trip count): a reverse scan carrying ȳ, T and U.

The forward pass runs the loop once, storing the carry that enters each step. The backward
pass is a scan in the opposite direction. Its state is the cotangent, T and U of the carry,
with running sums for the loop's constants. At each step the same interpreter sweeps the
body with fresh probes drawn from `_probes.fold(key, step)`, so the curvature injected at step
t travels back through steps t-1, ..., 0. Each step recomputes its body's
forward pass from the stored carry, as `jax.checkpoint` would.

Stacked layer weights, read slice by slice as `xs`, count as disjoint leaves within a step
(`cpjax._analysis.sliced_inputs`). Where the body uses such a slice over a separable batch
axis, each step forms the slice's diagonal in the separable-axis form, and the steps'
diagonals are stacked (`cpjax._separable._scan_sites`).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from cpjax import _probes
from cpjax.rules._base import Curvature, StructuredRule, vary_like, zero_rows


@functools.lru_cache(maxsize=128)
def _body_program(closed_jaxpr):
    from cpjax._trace import build_grouped_program

    return build_grouped_program(closed_jaxpr)


def _split(node, seq):
    nc, nk = node.params["num_consts"], node.params["num_carry"]
    return list(seq[:nc]), list(seq[nc:nc + nk]), list(seq[nc + nk:])


class ScanRule(StructuredRule):
    def _input_deps(self, node, info):
        """Dependencies of the body's inputs, the carry's found by iterating to a fixed point."""
        from cpjax import _analysis

        program = _body_program(node.params["jaxpr"])
        consts, carry, xs = _split(node, list(info.deps))
        carry = [frozenset(d) for d in carry]
        while True:
            deps = _analysis.dependencies(program, consts + carry + xs)
            new = [
                c | _analysis.deps_of(deps, out) if _analysis.is_float(out.aval) else c
                for c, out in zip(carry, program.outvars[:len(carry)], strict=True)
            ]
            if new == carry:
                break
            carry = new
        # Within one step, a sliced input's leaves stand for that step's slice, and the
        # carry's for earlier slices: disjoint entries, so they get different names.
        n_fixed = len(consts) + len(carry)
        xs = [frozenset(("slice", d) for d in deps) if n_fixed + m in info.sliced else deps
              for m, deps in enumerate(xs)]
        return consts + carry + xs

    def body_plan(self, node, info, allow_symmetric, silent=False):
        """Return the body's plan; with `silent`, no equation of the body injects curvature."""
        from cpjax._sweep import make_plan
        from cpjax._trace import Program

        program = _body_program(node.params["jaxpr"])
        if silent:
            program = Program(program.invars, program.nodes, program.outvars,
                              len(program.nodes))
        return make_plan(program, self._input_deps(node, info), [None] * len(program.outvars),
                         prune=info.prune, allow_symmetric=allow_symmetric)

    def curvature(self, node, info):
        kinds = set(self.body_plan(node, info, True).kinds.values())
        if Curvature.INDEFINITE in kinds:
            return Curvature.INDEFINITE
        return Curvature.PSD if Curvature.PSD in kinds else Curvature.NONE

    def forward(self, node, vals):
        consts, init, xs = _split(node, vals)
        body = jcore.jaxpr_as_fun(node.params["jaxpr"])
        n_carry = len(init)

        def step(carry, x):
            out = body(*consts, *carry, *x)
            return list(out[:n_carry]), (list(out[n_carry:]), list(carry))

        final, (ys, carries) = lax.scan(step, init, xs, length=node.params["length"],
                                        reverse=node.params["reverse"])
        return final + ys, carries

    def backward(self, ctx, carries, ybar, rows):
        from cpjax import _analysis

        node, info = ctx.node, ctx.info
        plan = self.body_plan(node, info, ctx.symmetric, silent=ctx.kind is Curvature.NONE)
        body_deps = self._input_deps(node, info)
        consts, init, xs = _split(node, ctx.invals)
        nc, nk = len(consts), len(init)
        n_rows = ctx.num_samples if ctx.symmetric else 2 * ctx.num_samples
        dep = [i for i, d in enumerate(body_deps) if d]
        outs = ctx.outvals
        # ȳ and rows per output, zeros where absent, the ys' rows with steps leading.
        float_out = [_analysis.is_float(v.aval) for v in node.outvars]
        it_y, it_r = iter(ybar), iter(rows)
        out_g, out_r = [], []
        for o, fl in zip(outs, float_out, strict=True):
            g, r = (next(it_y), next(it_r)) if fl else (None, None)
            out_g.append(g)
            out_r.append(None if g is None else (zero_rows(n_rows, o) if r is None else r))
        carry_g = [out_g[j] if j + nc in dep else None for j in range(nk)]
        carry_r = [out_r[j] if j + nc in dep else None for j in range(nk)]
        ys_g = out_g[nk:]
        ys_r = [None if r is None else jnp.moveaxis(r, 0, 1) for r in out_r[nk:]]
        const_g = [vary_like(jnp.zeros_like(consts[i]), consts[i]) if i in dep else None
                   for i in range(nc)]
        const_r = [zero_rows(n_rows, consts[i]) if i in dep else None for i in range(nc)]
        length = node.params["length"]
        # Leaves read slice by slice whose diagonal each step forms (`cpjax._separable`).
        sites = ctx.body_sites or {}
        body_leaves = next(iter(sites.values())).body if sites else None

        def step(state, inputs):
            carry_g, carry_r, const_g, const_r = state
            carry_t, x_t, y_g, y_r, t = inputs
            result = self._sweep_body(ctx, plan, consts + carry_t + x_t,
                                      carry_g + y_g, carry_r + y_r, t, body_leaves)
            grads = [_or_zeros(g, v, None) for g, v in zip(result.grads, consts + carry_t + x_t,
                                                            strict=True)]
            rws = [_or_zeros(r, v, n_rows) for r, v in zip(result.rows, consts + carry_t + x_t,
                                                            strict=True)]
            new_state = (
                [grads[nc + j] if j + nc in dep else None for j in range(nk)],
                [rws[nc + j] if j + nc in dep else None for j in range(nk)],
                [None if g is None else g + grads[i] for i, g in enumerate(const_g)],
                [None if r is None else r + rws[i] for i, r in enumerate(const_r)],
            )
            x_dep = [m for m in range(len(x_t)) if nc + nk + m in dep]
            per_step = ([grads[nc + nk + m] if m in x_dep else None for m in range(len(x_t))],
                        [rws[nc + nk + m] if m in x_dep and nc + nk + m not in sites else None
                         for m in range(len(x_t))],
                        [body_leaves.diagonal(i, ctx.num_samples) for i in sites])
            return new_state, per_step

        state = (
            [_or_zeros(g, x, None) if j + nc in dep else None
             for j, (g, x) in enumerate(zip(carry_g, init, strict=True))],
            [_or_zeros(r, x, n_rows) if j + nc in dep else None
             for j, (r, x) in enumerate(zip(carry_r, init, strict=True))],
            const_g, const_r,
        )
        steps = jnp.arange(length)
        (carry_g, carry_r, const_g, const_r), (xs_g, xs_r, diagonals) = lax.scan(
            step, state, (carries, xs, ys_g, ys_r, steps), reverse=not node.params["reverse"])
        for site, diagonal in zip(sites.values(), diagonals, strict=True):
            ctx.add_diagonal(site, diagonal)
        xs_r = [None if r is None else jnp.moveaxis(r, 1, 0) for r in xs_r]
        all_g = const_g + carry_g + xs_g
        all_r = const_r + carry_r + xs_r
        outer = [i for i, d in enumerate(info.deps) if d]
        return [all_g[i] for i in outer], [all_r[i] for i in outer]

    @staticmethod
    def _sweep_body(ctx, plan, invals, out_g, out_r, t, separable=None):
        from cpjax._sweep import sweep

        return sweep(plan, invals, out_g, _probes.fold(ctx.key, t),
                     num_samples=ctx.num_samples, probe=ctx.probe, out_rows=out_r,
                     separable=separable)


def _or_zeros(value, like, n_rows):
    if value is not None:
        return value
    if n_rows is None:
        return vary_like(jnp.zeros_like(like), like)
    return zero_rows(n_rows, like)


SCAN = ScanRule()
