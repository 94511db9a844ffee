"""cond and switch: the curvature of the branch that runs, chosen on device.

The linear part of a cond comes from JAX's VJP of the whole equation. Its local curvature is
the CP estimate of the branch taken: each branch is swept on its own (forward and backward,
with the cond's output cotangent and T = U = 0 at its outputs), and `lax.switch` picks the
branch's injected rows at run time, so only one branch is executed.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from cpjax.rules._base import Curvature, Rule, zero_rows


def _branch_plan(branch, info, symmetric_allowed):
    from cpjax._sweep import make_plan
    from cpjax._trace import build_grouped_program

    program = build_grouped_program(branch)
    return make_plan(
        program, list(info.deps[1:]), list(info.out_signs), prune=info.prune,
        allow_symmetric=symmetric_allowed,
    )


class CondRule(Rule):
    def curvature(self, node, info):
        if not any(info.deps[1:]) or all(s == 0 for s in info.out_signs):
            return Curvature.NONE
        kinds = set()
        for branch in node.params["branches"]:
            kinds.update(_branch_plan(branch, info, True).kinds.values())
        if Curvature.INDEFINITE in kinds:
            return Curvature.INDEFINITE
        return Curvature.PSD if Curvature.PSD in kinds else Curvature.NONE

    def inject(self, ctx):
        from cpjax._sweep import sweep

        node, info = ctx.node, ctx.info
        index, operands = ctx.invals[0], ctx.invals[1:]
        dep = [i for i, d in enumerate(info.deps[1:]) if d]
        ybar = [
            jnp.zeros_like(o) if y is None else y
            for o, y in zip(ctx.outvals, ctx.ybar, strict=True)
        ]
        n_rows = ctx.num_samples if ctx.symmetric else 2 * ctx.num_samples
        plans = [_branch_plan(b, info, ctx.symmetric) for b in node.params["branches"]]

        def make_branch(plan):
            def run(operands, ybar, key):
                result = sweep(plan, list(operands), list(ybar), key,
                               num_samples=ctx.num_samples, probe=ctx.probe)
                out = []
                for i in dep:
                    rows = result.rows[i]
                    if rows is None:
                        rows = zero_rows(n_rows, operands[i])
                    out.append(rows)
                return out

            return run

        rows = lax.switch(index, [make_branch(p) for p in plans], operands, ybar, ctx.key)
        k = ctx.num_samples
        if ctx.symmetric:
            return [(i + 1, r, None) for i, r in zip(dep, rows, strict=True)]
        return [(i + 1, r[:k], r[k:]) for i, r in zip(dep, rows, strict=True)]


COND = CondRule()
