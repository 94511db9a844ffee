"""Elementwise chains: groups of elementwise equations on one input, kept as one node.

JAX inlines `jax.nn.gelu` (tanh form) as eight equations on one input `x`. Three of them are
nonlinear (a cube, a tanh and a product with `x`), and the product's 2 × 2 block needs two
probe draws. Inlined, CP injects four times into rows of `x`'s shape and carries T and U
back through every step. The whole chain is one elementwise function `y = φ(x)` with local
curvature `ȳ φ''(x)`. Replaced by one jit call, which the composite elementwise rule
handles, it injects once from the exact `φ''` and runs fewer, larger fusions. Where the
steps' curvatures have opposite signs, the parts that cancel in `φ''` add no variance.

A chain is fused when four conditions hold. Every equation in it is elementwise on arrays of
one shape. Its only variable input from outside the chain is `x`, and its other operands are
scalar literals. Only its last output is used outside it. It has at least two nonlinear
equations.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from cpjax._trace import Node, Program, Var, call_node, replace_nodes, variable_uses

# Elementwise primitives whose local curvature is zero; the others in a chain count as
# nonlinear. A product counts as linear when one operand is a literal.
_LINEAR = frozenset({
    lax.add_p, lax.sub_p, lax.neg_p, lax.convert_element_type_p, lax.copy_p,
})


def fuse_elementwise_chains(program: Program) -> Program:
    """Return `program` with each fusible elementwise chain replaced by one node."""
    uses = variable_uses(program)
    fused = {}  # index of a chain's last node -> (its outside input, the chain)
    dropped = set()
    for x, chain in _groups(program):
        if _worth_fusing(x, chain, uses):
            fused[chain[-1].index] = (x, chain)
            dropped.update(node.index for node in chain[:-1])
    if not fused:
        return program
    return replace_nodes(program, {i: _fused_node(*group) for i, group in fused.items()},
                         dropped)


def _fusible(node) -> bool:
    """Return whether `node` can join a chain: elementwise, one float output, same shapes."""
    from cpjax._axes import _primitive_is_elementwise

    if node.composite is not None or len(node.outvars) != 1:
        return False
    if not _primitive_is_elementwise(node.primitive) or node.primitive is lax.stop_gradient_p:
        return False
    out = node.outvars[0].aval
    if not jnp.issubdtype(out.dtype, jnp.floating) or out.ndim == 0:
        return False
    for atom in node.invars:
        if isinstance(atom, Var):
            if atom.aval.shape != out.shape:
                return False
        elif jnp.ndim(atom.val) != 0:
            return False
    return True


def _groups(program):
    """Group fusible nodes by the one outside variable they depend on, in program order."""
    root = {}  # output of a grouped node -> the outside variable of its group
    groups = {}
    for node in program.nodes:
        if not _fusible(node):
            continue
        roots = {root.get(a, a) for a in node.invars if isinstance(a, Var)}
        if len(roots) != 1:
            continue
        key = (roots.pop(), node.index < program.silent)
        root[node.outvars[0]] = key[0]
        groups.setdefault(key, []).append(node)
    return [(x, chain) for (x, _), chain in groups.items()]


def _worth_fusing(x, chain, uses) -> bool:
    """Check that `chain` reads only `x`, only its last output leaves it, and it is nonlinear."""
    if len(chain) < 2:
        return False
    members = {node.index for node in chain}
    inside = {x} | {node.outvars[0] for node in chain}
    if any(isinstance(a, Var) and a not in inside for node in chain for a in node.invars):
        return False
    for node in chain[:-1]:
        readers = [user for user, _ in uses.get(node.outvars[0], [])]
        if not readers or any(user is None or user.index not in members for user in readers):
            return False
    nonlinear = sum(1 for node in chain if _is_nonlinear(node))
    return nonlinear >= 2


def _is_nonlinear(node) -> bool:
    if node.primitive in _LINEAR:
        return False
    if node.primitive is lax.mul_p:
        return all(isinstance(a, Var) for a in node.invars)
    return True


def _fused_node(x, chain) -> Node:
    """Return one node calling a jitted function that runs `chain` on its outside input `x`."""
    return call_node(x, chain, "elementwise_chain", "elementwise")
