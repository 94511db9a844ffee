"""The generic rule for a primitive without a curvature rule of its own.

It uses the "simple" factorisation `F = M`, `G = I`: `T += M v` with `M v` a Hessian-vector
product of `⟨ȳ, φ(x)⟩` computed by autodiff, and `U += v`. Each equation becomes a local
Hutchinson estimator: unbiased, but with a much larger variance than a structured rule, so
the first use of each primitive is reported by a warning.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from cpjax._trace import user_stacklevel
from cpjax.rules._base import Curvature, Rule

# Differentiable primitives of jax.lax that use the generic rule on purpose, and why.
FALLBACK_PRIMITIVES = {
    "cumprod": "a product along an axis couples every pair of its elements; no factor of its "
               "curvature is cheaper than the Hessian-vector product",
    "cumlogsumexp": "a cumulative log-sum-exp couples every pair of elements up to each "
                    "position; a structured rule is future work",
    "reduce_prod": "a product over an axis couples every pair of its elements",
    "scatter-mul": "multiplies scattered updates into the operand: bilinear with an index map",
    "reduce": "a reduction with a user-defined computation: the rule depends on that jaxpr",
    "reduce_window": "a windowed reduction with a user-defined computation",
    "igamma": "incomplete gamma function: second derivatives in a, x have no short form",
    "igammac": "complementary incomplete gamma function, as igamma",
    "igamma_grad_a": "derivative of igamma in a, used inside igamma's own derivatives",
    "polygamma": "polygamma(m, x) with m a float array: the rule in x alone is future work",
    "zeta": "Hurwitz zeta function: the rule in x alone is future work",
    "regularized_incomplete_beta": "incomplete beta function: no short closed form",
    "stage": "an internal staging primitive with no documented derivative",
}


class FallbackWarning(UserWarning):
    """A primitive had no curvature rule and the generic high-variance rule was used."""


def _warn_once(node) -> None:
    """Warn that `node` uses the generic rule.

    The message names the primitive and the user's source line, so Python's default warning
    filter shows it once per call site.
    """
    name = node.primitive.name
    warnings.warn(
        f"cpjax has no curvature rule for primitive '{name}' (at {node.where()}); it uses "
        "the generic rule F = M, G = I with a Hessian-vector product per probe, which is "
        "unbiased but has a much larger variance.",
        FallbackWarning,
        stacklevel=user_stacklevel(),
    )


class FallbackRule(Rule):
    """`F v = M v` by reverse-over-reverse autodiff, `G v = v`."""

    def curvature(self, node, info):
        if all(s == 0 for s in info.out_signs) or not any(info.deps):
            return Curvature.NONE
        return Curvature.INDEFINITE

    def inject(self, ctx):
        from cpjax._trace import bind_node

        node, info = ctx.node, ctx.info
        if all(y is None for y in ctx.ybar):
            return []
        _warn_once(node)
        dep_idx = [i for i in range(len(node.invars)) if info.dependent(i)]
        ybar = [
            jnp.zeros_like(o) if y is None else y
            for o, y in zip(ctx.outvals, ctx.ybar, strict=True)
        ]
        float_out = [jnp.issubdtype(o.dtype, jnp.inexact) for o in ctx.outvals]

        def pairing(*dep_vals):
            vals = list(ctx.invals)
            for i, val in zip(dep_idx, dep_vals, strict=True):
                vals[i] = val
            outs = bind_node(node, vals)
            terms = [
                jnp.vdot(y, o).real
                for y, o, f in zip(ybar, outs, float_out, strict=True)
                if f
            ]
            return sum(terms)

        primals = [ctx.invals[i] for i in dep_idx]
        grad_fn = jax.grad(pairing, argnums=tuple(range(len(dep_idx))))

        def hvp(*vs):
            def inner(*xs):
                grads = grad_fn(*xs)
                return sum(jnp.vdot(g, v) for g, v in zip(grads, vs, strict=True))

            return jax.grad(inner, argnums=tuple(range(len(dep_idx))))(*primals)

        probes = [ctx.draw(p.shape, p.dtype, salt=k) for k, p in enumerate(primals)]
        mv = jax.vmap(hvp)(*probes)
        return [(i, m, v) for i, m, v in zip(dep_idx, mv, probes, strict=True)]


FALLBACK = FallbackRule()
