"""Tracing a function to a flat program of equations that the sweep walks.

`jax.make_jaxpr` gives a closed jaxpr whose equations may hold nested jaxprs (jit, remat,
closed_call). The sweep wants one flat list, so calls whose body is an ordinary program are
inlined, with every variable renamed: the same jitted function may be called twice and then
its jaxpr's variables would otherwise collide. Equations with their own differentiation
rule (custom_jvp_call, custom_vjp_call, cond, scan, while) stay whole.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from typing import Any

import jax
import jax.extend.core.primitives as prims
import numpy as np
from jax._src import core as jax_core
from jax._src import source_info_util
from jax.extend import core as jcore

# Calls whose body is inlined into the caller's program.
INLINED_CALLS = frozenset({prims.jit_p, prims.closed_call_p, prims.remat_p, prims.call_p})


@dataclasses.dataclass(eq=False)
class Var:
    """A variable of the flat program, numbered in order of creation."""

    id: int
    aval: Any

    def __repr__(self):
        return f"v{self.id}:{self.aval.str_short()}"


@dataclasses.dataclass(eq=False)
class Lit:
    """A constant of the flat program: a jaxpr literal or a closed-over value."""

    val: Any
    aval: Any


@dataclasses.dataclass(eq=False)
class Node:
    """One equation of the flat program.

    `eqn` is the original `JaxprEqn`; its primitive and params are what the forward pass
    binds. `composite` names a composite rule (for example "log_softmax") when the node
    stands for a whole `jax.nn` function kept as one call. `caller` locates an equation
    inside a JAX library function (`jnp.cumprod` is a jitted function): the user's line of
    the innermost inlined call that has one, or else the line where the user called cpjax.
    """

    index: int
    eqn: Any
    invars: list
    outvars: list
    composite: str | None = None
    caller: str = ""

    @property
    def primitive(self):
        return self.eqn.primitive

    @property
    def params(self):
        return self.eqn.params

    def where(self) -> str:
        """Return the user's source line of this equation, as `file:line (function)`.

        For an equation inside a JAX library function, the line that calls the function.
        """
        where = user_line(self.eqn.source_info)
        if where:
            return where
        if self.caller:
            return f"{self.caller}, inside a JAX library function"
        return "an unknown source line (inside a JAX library function)"


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _is_user_file(file_name: str) -> bool:
    """Return whether a source file is the user's: neither JAX's nor cpjax's."""
    return (source_info_util.is_user_filename(file_name)
            and not file_name.startswith(_PACKAGE_DIR))


def user_line(source_info) -> str:
    """Return `file:line:column (function)` of the innermost frame outside JAX and cpjax.

    cpjax's own frames are skipped too, so that an equation of a function that cpjax
    calls directly (a `jax.shard_map`-wrapped loss) is reported where the user called
    cpjax. Returns "" when there is no such frame.
    """
    for frame in source_info_util.user_frames(source_info.traceback):
        if _is_user_file(frame.file_name):
            column = f":{frame.start_column}" if frame.start_column else ""
            return f"{frame.file_name}:{frame.start_line}{column} ({frame.function_name})"
    return ""


def _user_python_frame():
    """Return `(frame, stacklevel)` of the innermost Python frame in the user's code.

    The level counts from the function that calls this one (level 1). Returns
    `(None, 1)` when every frame is JAX's or cpjax's.
    """
    frame, level = sys._getframe(2), 1
    while frame is not None:
        if _is_user_file(frame.f_code.co_filename):
            return frame, level
        frame, level = frame.f_back, level + 1
    return None, 1


def user_stacklevel() -> int:
    """Return the `stacklevel` at which `warnings.warn` names the user's code.

    The caller of this function passes it on to `warnings.warn`. A warning raised while
    cpjax traces a function then shows the user's file and line, and Python's default
    filter shows it once per such line.
    """
    return _user_python_frame()[1]


def entry_line() -> str:
    """Return `file:line (function)` of the innermost Python frame in the user's code.

    Called while cpjax traces a function, this is the line where the user called cpjax.
    """
    frame, _ = _user_python_frame()
    if frame is None:
        return ""
    return f"{frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_code.co_name})"


@dataclasses.dataclass
class Program:
    """A flat program: input variables, nodes in execution order, output atoms.

    The first `silent` nodes inject no curvature (the model part of a Gauss-Newton
    product, see `Composition`).
    """

    invars: list
    nodes: list
    outvars: list
    silent: int = 0


def _is_composite_call(eqn) -> str | None:
    """Return the composite rule's name when `eqn` is a jit call we treat as one node."""
    # Imported here to avoid a cycle: the composite rules import this module.
    from cpjax.rules.composite import match_composite

    if eqn.primitive is not prims.jit_p:
        return None
    return match_composite(eqn)


class _Builder:
    def __init__(self):
        self.nodes = []
        self._ids = itertools.count()

    def new_var(self, aval) -> Var:
        return Var(next(self._ids), aval)

    def inline(self, jaxpr, consts, in_atoms, caller: str = "") -> list:
        """Append the equations of `jaxpr` with its inputs bound to `in_atoms`.

        `caller` is the user's line of the innermost call that has one (see `Node.caller`).
        """
        env = {}
        for v, c in zip(jaxpr.constvars, consts, strict=True):
            env[v] = Lit(c, v.aval)
        for v, a in zip(jaxpr.invars, in_atoms, strict=True):
            env[v] = a

        def read(atom):
            if isinstance(atom, jcore.Literal):
                return Lit(atom.val, atom.aval)
            return env[atom]

        for eqn in jaxpr.eqns:
            ins = [read(a) for a in eqn.invars]
            composite = _is_composite_call(eqn)
            if eqn.primitive in INLINED_CALLS and composite is None:
                inner = _inner_closed_jaxpr(eqn)
                outs = self.inline(inner.jaxpr, inner.consts, ins,
                                   user_line(eqn.source_info) or caller)
            else:
                outs = [self.new_var(v.aval) for v in eqn.outvars]
                self.nodes.append(Node(len(self.nodes), eqn, ins, outs, composite, caller))
            for v, a in zip(eqn.outvars, outs, strict=True):
                env[v] = a
        return [read(a) for a in jaxpr.outvars]


def _inner_closed_jaxpr(eqn):
    params = eqn.params
    inner = params.get("jaxpr", params.get("call_jaxpr"))
    if isinstance(inner, jcore.ClosedJaxpr):
        return inner
    return jcore.ClosedJaxpr(inner, ())


def build_program(closed_jaxpr, caller: str = "") -> Program:
    """Flatten `closed_jaxpr` into a `Program`, inlining plain calls (see `Node.caller`)."""
    builder = _Builder()
    invars = [builder.new_var(v.aval) for v in closed_jaxpr.jaxpr.invars]
    outs = builder.inline(closed_jaxpr.jaxpr, closed_jaxpr.consts, invars, caller)
    return Program(invars, builder.nodes, outs)


def build_grouped_program(closed_jaxpr) -> Program:
    """Flatten `closed_jaxpr` like `build_program`, then group softmaxes and chains.

    Used for the bodies of loops and branches, so that they get the same grouped nodes as
    the top-level program. Inside a shard_map body nothing is grouped: a group is traced
    on its own, outside the shard_map, and its values would lose the record of the mesh
    axes along which they differ between devices.
    """
    program = build_program(closed_jaxpr)
    if any(varying_axes(v.aval) for node in program.nodes for v in node.outvars):
        return program
    return _fuse_groups(program)


def varying_axes(x) -> frozenset:
    """Return the mesh axes along which a value (or abstract value) differs between devices.

    Outside a shard_map, or with `check_vma=False`, the set is empty.
    """
    aval = x if isinstance(x, jax_core.AbstractValue) else jax.typeof(x)
    return frozenset(getattr(getattr(aval, "mat", None), "varying", ()))


def variable_uses(program: Program) -> dict:
    """Map each variable to its uses: `(node, input index)`, or `(None, 0)` for an output."""
    uses = {}
    for node in program.nodes:
        for i, atom in enumerate(node.invars):
            if isinstance(atom, Var):
                uses.setdefault(atom, []).append((node, i))
    for atom in program.outvars:
        if isinstance(atom, Var):
            uses.setdefault(atom, []).append((None, 0))
    return uses


def bind_node(node: Node, invals: list) -> list:
    """Evaluate one node on concrete or traced inputs and return its outputs as a list."""
    eqn = node.eqn
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    with source_info_util.user_context(eqn.source_info.traceback), eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


def replace_nodes(program: Program, replacements: dict, dropped: set) -> Program:
    """Return `program` with node `i` replaced by `replacements[i]` and `dropped` removed.

    Nodes are renumbered in order; the silent prefix keeps every node it held.
    """
    nodes, silent = [], 0
    for node in program.nodes:
        if node.index in dropped:
            continue
        nodes.append(replacements.get(node.index, node))
        if node.index < program.silent:
            silent = len(nodes)
    for index, node in enumerate(nodes):
        node.index = index
    return Program(program.invars, nodes, program.outvars, silent)


def call_node(x: Var, group: list, name: str, composite: str) -> Node:
    """Return one node that calls a jitted function named `name` running `group` on `x`.

    `group` lists nodes in program order, and `x` is their only variable input from outside
    the group. The call returns the last node's output and carries that node's source line.
    """

    def run(value):
        env = {x: value}
        for node in group:
            args = [env[a] if isinstance(a, Var) else a.val for a in node.invars]
            env[node.outvars[0]] = bind_node(node, args)[0]
        return env[group[-1].outvars[0]]

    run.__name__ = run.__qualname__ = name
    closed = jax.make_jaxpr(jax.jit(run))(jax.ShapeDtypeStruct(x.aval.shape, x.aval.dtype))
    (eqn,) = closed.jaxpr.eqns
    eqn = eqn.replace(source_info=group[-1].eqn.source_info)
    return Node(group[-1].index, eqn, [x], list(group[-1].outvars), composite=composite,
                caller=group[-1].caller)


@dataclasses.dataclass(frozen=True)
class Composition:
    """`loss_fn(model_fn(*args[:-1]), *args[-1])`, traced with the model's nodes silent.

    Injecting curvature only in the loss gives the generalised Gauss-Newton matrix
    `Jᵀ ∇²loss J` in place of the Hessian.
    """

    model_fn: Any
    loss_fn: Any

    def __call__(self, *args):
        return self.loss_fn(self.model_fn(*args[:-1]), *args[-1])

    def trace(self, flat_args, in_tree):
        args = jax.tree_util.tree_unflatten(in_tree, flat_args)
        model_args, loss_args = args[:-1], tuple(args[-1])
        n_model = len(jax.tree_util.tree_leaves(model_args))
        model_tree = jax.tree_util.tree_structure(model_args)
        loss_tree = jax.tree_util.tree_structure(loss_args)

        def model_flat(leaves):
            return self.model_fn(*jax.tree_util.tree_unflatten(model_tree, leaves))

        model_jaxpr, z_shape, model_traced = _make_jaxpr(model_flat, flat_args[:n_model])
        z_leaves, z_tree = jax.tree_util.tree_flatten(z_shape)
        n_z = len(z_leaves)

        def loss_flat(leaves):
            z = jax.tree_util.tree_unflatten(z_tree, leaves[:n_z])
            return self.loss_fn(z, *jax.tree_util.tree_unflatten(loss_tree, leaves[n_z:]))

        loss_jaxpr, out_shape, loss_traced = _make_jaxpr(loss_flat,
                                                         z_leaves + flat_args[n_model:])
        builder = _Builder()
        model_vars = [builder.new_var(v.aval) for v in model_jaxpr.jaxpr.invars]
        loss_vars = [builder.new_var(v.aval) for v in loss_jaxpr.jaxpr.invars[n_z:]]
        caller = entry_line()
        z_atoms = builder.inline(model_jaxpr.jaxpr, model_jaxpr.consts, model_vars, caller)
        silent = len(builder.nodes)
        outs = builder.inline(loss_jaxpr.jaxpr, loss_jaxpr.consts, z_atoms + loss_vars, caller)
        # Positions of flat_args: traced leaves get their variables, Python values placeholders.
        positions = dict(zip(model_traced, model_vars, strict=True))
        positions.update(zip([n_model + i - n_z for i in loss_traced[n_z:]], loss_vars,
                             strict=True))
        invars = [positions.get(i, Var(-1 - i, None)) for i in range(len(flat_args))]
        program = Program(invars, builder.nodes, outs, silent)
        return _fuse_groups(program), out_shape


def _make_jaxpr(fun, leaves: list):
    """Return `make_jaxpr` of `fun(leaves)` with only the array leaves traced.

    Python values stay concrete, as `jax.grad` keeps them. Returns the closed jaxpr, the
    output's shapes and the positions of the traced leaves.
    """
    traced = [i for i, x in enumerate(leaves) if _is_array(x)
              or isinstance(x, jax.ShapeDtypeStruct)]

    def flat_fun(*arrays):
        merged = list(leaves)
        for i, array in zip(traced, arrays, strict=True):
            merged[i] = array
        return _check_array_outputs(fun(merged))

    closed, out_shape = jax.make_jaxpr(flat_fun, return_shape=True)(
        *[leaves[i] for i in traced])
    return closed, out_shape, traced


def trace_program(fun, flat_args: list, in_tree) -> tuple[Program, Any]:
    """Trace `fun` (taking the unflattened args) to a flat `Program` and its output tree."""
    if isinstance(fun, Composition):
        return fun.trace(flat_args, in_tree)
    closed, out_shape, traced = _make_jaxpr(
        lambda leaves: fun(*jax.tree_util.tree_unflatten(in_tree, leaves)), flat_args)
    program = _fuse_groups(build_program(closed, caller=entry_line()))
    # Placeholder variables for the concrete leaves keep positions aligned with flat_args.
    positions = dict(zip(traced, program.invars, strict=True))
    program.invars = [positions.get(i, Var(-1 - i, None)) for i in range(len(flat_args))]
    return program, out_shape


def _check_array_outputs(out):
    """Return `out`, raising a `TypeError` that names any leaf that is not an array."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
        if not (hasattr(leaf, "aval")
                or isinstance(leaf, (int, float, complex, np.ndarray, np.generic))):
            raise TypeError(
                f"cpjax traces the function with jax.jit, so every value it returns (aux "
                f"included) must be an array, but output{jax.tree_util.keystr(path)} is a "
                f"{type(leaf).__name__}: {leaf!r}. Return it some other way, or as an array."
            )
    return out


def _fuse_groups(program: Program) -> Program:
    """Keep written-out softmaxes, then elementwise chains, as one node each."""
    # Imported here because both modules import this one.
    from cpjax._chains import fuse_elementwise_chains
    from cpjax._softmax import fuse_softmax

    return fuse_elementwise_chains(fuse_softmax(program))


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))
