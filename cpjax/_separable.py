"""Separable axes, and the per-example diagonal at parameters that contract over them.

A batch loss is a sum over examples that do not interact, so the Hessian with respect to an
intermediate `z` (batch × features) has no block coupling two examples: `E[T_z[b] U_z[b']ᵀ] = 0`
for `b ≠ b'`. At a parameter `W` used once, as in `z = h @ W`, the plain estimate
`T_W ⊙ U_W` with `T_W = Σ_b h_b ⊗ T_z[b]` contains every product of two different examples:
zero in mean, but almost all of the variance. `Σ_b (h_b ∘ h_b) ⊗ (T_z[b] ∘ U_z[b])` has the
same mean and costs one matrix product, whatever the number of probes.

The analysis (`separable_classes`) is static. Axes of variables are grouped into classes of
axes that are index-aligned: an elementwise op joins its input's and output's axes, a
transpose permutes them, a matrix product keeps its batch and free axes. A class is *mixed*
when an equation before the end of the curvature combines different indices along it. Such
an equation injects curvature or has outputs with curvature downstream. Mixing comes from a
reduction or contraction over the class (batch statistics, a softmax over the batch), a
shift, a gather, or two axes of the same class in one array (similarities between
examples). Equations after the last curvature, such as the final sum or mean, may combine
freely because the Hessian downstream of them is zero.

Only mixing downstream of a parameter's use matters: `T_z` at `z = h @ W` is formed from the
curvature injected after `z`, so examples (or positions) combined before `z`, by attention
in an earlier layer for instance, do not couple its rows. An axis of `z` is separable at
that use when no equation downstream of it mixes the axis's class.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax._src import core as jax_core
from jax._src.shard_map import shard_map_p
from jax.extend.core import primitives as prims

from cpjax import _axes, _probes, _schedule
from cpjax._reduce import sum_axes
from cpjax._trace import Var, bind_node, variable_uses
from cpjax.rules import Curvature

# Single-use equations that only permute or relabel a parameter on its way to its use.
# Inside a shard_map, `pvary` marks a parameter shared by all devices as used per device.
# Its VJP sums over those devices, so the chain also adds up the devices' diagonals.
_PERMUTATIONS = frozenset({
    lax.transpose_p, lax.reshape_p, lax.convert_element_type_p, lax.copy_p, lax.squeeze_p,
    jax_core.pvary_p,
})


class _UnionFind:
    def __init__(self):
        self.parent = {}

    def find(self, x):
        root = self.parent.setdefault(x, x)
        if root != x:
            root = self.parent[x] = self.find(root)
        return root

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb


@dataclasses.dataclass
class SeparableAxes:
    """Result of the analysis: axis classes, which are mixed, which nodes are free."""

    classes: _UnionFind
    mixed_at: dict  # node index -> classes that the node mixes
    free: set  # indices of nodes after the last curvature

    def separable(self, var, axis, downstream) -> bool:
        """Return whether no node in `downstream` (node indices) mixes the axis's class."""
        root = self.classes.find((var, axis))
        return not any(root in self.mixed_at.get(n, ()) for n in downstream)


def _free_nodes(plan) -> set:
    """Nodes whose outputs have zero downstream Hessian and that inject nothing."""
    curved_vars = set()  # variables with some curvature downstream
    free = set()
    for node in reversed(plan.program.nodes):
        if node.index not in plan.infos:
            continue
        if plan.kinds[node.index] is Curvature.NONE and not any(
            v in curved_vars for v in node.outvars
        ):
            free.add(node.index)
            continue
        for atom in node.invars:
            if isinstance(atom, Var) and atom in plan.deps:
                curved_vars.add(atom)
    return free


def separable_classes(plan, num_carry=None) -> SeparableAxes:
    """Group axes into index-aligned classes and find the mixed ones (see module docs).

    With `num_carry = (number of constants, number of carried values)`, the program is the
    body of a scan: later steps follow every equation, so none is free, and each carried
    value's axes join the same axes of the value that the step returns in its place.
    """
    free = _free_nodes(plan) if num_carry is None else set()
    classes, constraints = _UnionFind(), []
    if num_carry is not None:
        n_consts, n_carry = num_carry
        for j in range(n_carry):
            carry_in = plan.program.invars[n_consts + j]
            carry_out = plan.program.outvars[j]
            if isinstance(carry_out, Var):
                for k in range(carry_in.aval.ndim):
                    classes.union((carry_in, k), (carry_out, k))
    for node in plan.program.nodes:
        if node.index not in plan.infos or node.index in free:
            continue
        for i, atom in enumerate(node.invars):
            if not (isinstance(atom, Var) and atom in plan.deps):
                continue
            for k, target in enumerate(_axes.axis_map(node, i)):
                if atom.aval.shape[k] == 1 or target == _axes.BROADCAST:
                    continue
                if target is None:
                    constraints.append((node.index, (atom, k)))
                else:
                    classes.union((atom, k), (node.outvars[target[0]], target[1]))
    mixed_at = {}
    for index, key in constraints:
        mixed_at.setdefault(index, set()).add(classes.find(key))
    for node in plan.program.nodes:
        if node.index in plan.infos and node.index not in free:
            for var in [*node.invars, *node.outvars]:
                if isinstance(var, Var):
                    mixed_at.setdefault(node.index, set()).update(
                        _repeated_classes(classes, var))
    return SeparableAxes(classes, mixed_at, free)


def _downstream(node, uses) -> set:
    """Indices of `node` and of every node that reads its outputs, directly or not."""
    seen, stack = {node.index}, [node]
    while stack:
        for var in stack.pop().outvars:
            for user, _ in uses.get(var, []):
                if user is not None and user.index not in seen:
                    seen.add(user.index)
                    stack.append(user)
    return seen


def _repeated_classes(classes, var) -> set:
    """Classes that occur on two axes of one array (e.g. a similarity matrix of examples)."""
    seen, repeated = set(), set()
    for k, n in enumerate(var.aval.shape):
        if n == 1:
            continue
        c = classes.find((var, k))
        (repeated if c in seen else seen).add(c)
    return repeated


@dataclasses.dataclass
class _Site:
    """A parameter's single use that contracts over separable axes."""

    position: int  # flat argument position of the leaf
    node: object  # the contracting equation
    input_index: int  # which input of `node` carries the parameter
    chain: list  # permutation equations from the leaf to `node`, in program order
    axes: tuple  # contracted output axes that are separable
    other_axes: tuple  # contracted output axes that are not (summed before the product)
    body: object = None  # at a shard_map or scan: the SeparableLeaves of its body


class SeparableLeaves:
    """Per-example diagonal estimates at the parameters where the batch axis separates.

    The sweep calls `row_targets` so that it does not propagate T and U into these
    parameters, and `visit` at each equation, which forms the diagonal at a site.
    """

    def __init__(self, plan, sites, axes=None):
        self.plan = plan
        self.axes = axes  # the SeparableAxes the sites were found with
        self.sites = {}  # node index -> sites at that node (both operands of a product)
        for site in sites:
            self.sites.setdefault(site.node.index, []).append(site)
        self.by_position = {s.position: s for s in sites}
        self.diagonals = {}

    @classmethod
    def build(cls, plan, positions, num_samples=1, num_carry=None):
        """Return the separable sites of `plan`, or None when there are none.

        `num_carry` marks the body of a scan (see `separable_classes`).
        """
        axes = separable_classes(plan, num_carry)
        uses = variable_uses(plan.program)
        # In a scan's body, the next step follows every equation.
        everything = None if num_carry is None else {n.index for n in plan.program.nodes}
        sites, body_uses = [], {}
        for position in positions:
            use = _single_use(uses, plan.program.invars[position])
            if use is None:
                sites.extend(_slice_sites(plan, axes, uses, position, num_samples, everything))
                continue
            if use[0].primitive in (shard_map_p, lax.scan_p):
                body_uses.setdefault(use[0], []).append((position, *use[1:]))
                continue
            site = _find_site(plan, axes, uses, position, *use, num_samples, everything)
            if site is not None:
                sites.append(site)
        for node, leaf_uses in body_uses.items():
            find = _shard_map_sites if node.primitive is shard_map_p else _scan_sites
            sites.extend(find(plan, axes, uses, node, leaf_uses, num_samples))
        return cls(plan, sites, axes) if sites else None

    def has(self, position) -> bool:
        return position in self.by_position

    def row_targets(self, node, dep_idx, targets):
        site_inputs = {site.input_index for site in self.sites.get(node.index, [])}
        return [k for k in targets if dep_idx[k] not in site_inputs]

    def visit(self, node, vals, env, tu, dep_idx):
        """Form and return the diagonal at each site of `node` (none without rows)."""
        if tu[0] is None:
            return []
        return [self._visit_site(node, site, vals, env, tu[0])
                for site in self.sites.get(node.index, []) if site.body is None]

    def body_sites(self, node) -> dict:
        """Return `{input index: site}` for the sites in the body of a shard_map or scan."""
        return {site.input_index: site for site in self.sites.get(node.index, [])
                if site.body is not None}

    def add_body_diagonal(self, site, diag, env):
        """Store the diagonal that a shard_map's or scan's body formed for `site`'s leaf."""
        self._store(site, self._through_chain(site, diag, env))

    def _visit_site(self, node, site, vals, env, rows):
        k, symmetric = self.plan_samples(rows), self.plan.symmetric
        if node.primitive in _LINEAR_ELEMENTWISE:
            scale = _LINEAR_ELEMENTWISE[node.primitive](vals, site.input_index)
            diag = _broadcast_diagonal(node, site, scale * rows, k, symmetric)
        elif node.primitive is lax.broadcast_in_dim_p:
            diag = _broadcast_diagonal(node, site, rows, k, symmetric)
        elif node.primitive is lax.conv_general_dilated_p and site.other_axes:
            diag = _conv_per_example_diagonal(node, vals, rows, symmetric)
        elif site.other_axes:
            diag = _dot_per_example_diagonal(node, site, vals, *_split(rows, k, symmetric))
        else:
            diag = _dot_general_diagonal(node, site, vals, *_split(rows, k, symmetric))
        diag = self._through_chain(site, diag, env)
        self._store(site, diag)
        return diag

    def _store(self, site, diag):
        """Add a site's diagonal to its leaf's: a leaf read by slices has one site per slice."""
        old = self.diagonals.get(site.position)
        self.diagonals[site.position] = diag if old is None else old + diag

    @staticmethod
    def _through_chain(site, diag, env):
        """Carry a diagonal from the site's operand back to the leaf, through its chain."""
        for chain_node in reversed(site.chain):
            x = env[chain_node.invars[0]]
            diag = jax.vjp(lambda z, n=chain_node: bind_node(n, [z])[0], x)[1](
                diag.astype(env[chain_node.outvars[0]].dtype))[0]
        return diag

    def plan_samples(self, rows):
        return rows.shape[0] if self.plan.symmetric else rows.shape[0] // 2

    def diagonal(self, position, num_samples):
        diag = self.diagonals.get(position)
        if diag is None:
            var = self.plan.program.invars[position]
            return jnp.zeros(var.aval.shape, var.aval.dtype)
        return diag


def _single_use(uses, var):
    """Return `(node, input index, chain)` of a leaf's only use after permutations, or None."""
    chain = []
    while True:
        var_uses = uses.get(var, [])
        if len(var_uses) != 1 or var_uses[0][0] is None:
            return None
        node, i = var_uses[0]
        if node.primitive in _PERMUTATIONS or _adds_unit_axes(node):
            chain.append(node)
            var = node.outvars[0]
            continue
        return node, i, chain


def _slice_sites(plan, axes, uses, position, num_samples, downstream):
    """Return one site per slice of a leaf read through static slices that do not overlap.

    Each slice is a part of the leaf of its own (`cpjax._analysis.dependencies`), so its
    diagonal is formed where it is used, and the chain's slice puts it in place. Where one
    slice has no site, the leaf keeps its rows for all of them.
    """
    readers = [node for node, _ in uses.get(plan.program.invars[position], [])]
    if not readers or any(node is None or node.index not in plan.parts for node in readers):
        return []
    sites = []
    for reader in readers:
        use = _single_use(uses, reader.outvars[0])
        if use is None or use[0].primitive in (shard_map_p, lax.scan_p):
            return []
        node, i, chain = use
        site = _find_site(plan, axes, uses, position, node, i, [reader, *chain], num_samples,
                          downstream)
        if site is None:
            return []
        sites.append(site)
    return sites


def _find_site(plan, axes, uses, position, node, i, chain, num_samples, downstream=None):
    """Return the site of a leaf's use by `node`, or None if it is not separable there.

    `downstream` lists the nodes that follow the use, by default those reading its output.
    """
    if node.index not in plan.infos or node.index in axes.free:
        return None
    contracted = _contracted_axes(node, i)
    if contracted is None:
        return None
    out = node.outvars[0]
    contracted = [a for a in contracted if out.aval.shape[a] > 1]
    if downstream is None:
        downstream = _downstream(node, uses)
    separable = tuple(a for a in contracted if axes.separable(out, a, downstream))
    other = tuple(a for a in contracted if not axes.separable(out, a, downstream))
    if not separable:
        return None
    if node.primitive is lax.dot_general_p and other and not (
            len(separable) == 1
            and num_samples * out.aval.shape[separable[0]] * node.invars[i].aval.size
            <= PER_EXAMPLE_LIMIT):
        return None
    if node.primitive is lax.conv_general_dilated_p and other and not _fits_per_example(
            node, i, out, num_samples):
        return None
    return _Site(position, node, i, chain, separable, other)


def _shard_map_sites(plan, axes, uses, node, leaf_uses, num_samples):
    """Return the sites of leaves passed to a shard_map and used separably in its body.

    The body is swept on each device (`cpjax.rules.sharding`), so its own analysis decides,
    with the body's batch axis holding the device's examples. That is valid only when the
    Hessian downstream of the shard_map's outputs is zero: no T or U rows arrive there, and
    nothing outside combines the examples that the body keeps apart. Collectives in the body
    (`psum`, `all_gather`, `ppermute`) map no axis, so before the last curvature they count as
    mixing every axis of their operands. The devices' diagonals are summed by the VJP of
    the body's `pvary` (see `_PERMUTATIONS`).
    """
    from cpjax.rules.sharding import body_plan

    if node.index not in plan.infos or node.index in axes.free:
        return []
    later = _downstream(node, uses) - {node.index}
    if any(n in plan.infos and n not in axes.free for n in later):
        return []
    body = body_plan(node, plan.infos[node.index], plan.symmetric)
    leaves = SeparableLeaves.build(body, [i for _, i, _ in leaf_uses], num_samples)
    if leaves is None:
        return []
    return [_Site(position, node, i, chain, (), (), body=leaves)
            for position, i, chain in leaf_uses if leaves.has(i)]


def _scan_sites(plan, axes, uses, node, leaf_uses, num_samples):
    """Return the sites of leaves that a scan reads slice by slice, used separably in its body.

    Each step forms the diagonal of its own slice (`cpjax.rules.scan`). The body's analysis
    decides, with every equation of the body downstream (later steps run it again), and a
    separable axis must also stay unmixed after the scan, wherever it reaches the scan's
    outputs.
    """
    from cpjax.rules.scan import SCAN

    info = plan.infos.get(node.index)
    if info is None or node.index in axes.free:
        return []
    leaf_uses = [use for use in leaf_uses if use[1] in info.sliced]
    if not leaf_uses:
        return []
    n_consts, n_carry = node.params["num_consts"], node.params["num_carry"]
    # The same plan as the scan's backward pass: silent in the model part of a GGN.
    body = SCAN.body_plan(node, info, plan.symmetric,
                          silent=plan.kinds[node.index] is Curvature.NONE)
    leaves = SeparableLeaves.build(body, [i for _, i, _ in leaf_uses], num_samples,
                                   num_carry=(n_consts, n_carry))
    if leaves is None:
        return []
    later = _downstream(node, uses) - {node.index}
    sites = []
    for position, i, chain in leaf_uses:
        site = leaves.by_position.get(i)
        if site is not None and _unmixed_after_scan(site, leaves, node, n_carry, axes, later):
            sites.append(_Site(position, node, i, chain, (), (), body=leaves))
    return sites


def _unmixed_after_scan(site, leaves, node, n_carry, axes, later) -> bool:
    """Return whether the site's separable axes stay unmixed by the nodes after the scan."""
    if site.body is not None:
        return False  # a nested loop or shard_map: not followed further
    out = site.node.outvars[0]
    roots = {leaves.axes.classes.find((out, a)) for a in site.axes}
    for j, body_out in enumerate(leaves.plan.program.outvars):
        if not isinstance(body_out, Var):
            continue
        for k in range(body_out.aval.ndim):
            if leaves.axes.classes.find((body_out, k)) not in roots:
                continue
            outer_axis = k if j < n_carry else k + 1  # stacked outputs gain the step axis
            if not axes.separable(node.outvars[j], outer_axis, later):
                return False
    return True


# Largest K·B·|W| for which a parameter's per-example cotangents are formed (a convolution
# kernel, or a matrix product that also contracts over a mixed axis); above it the parameter
# keeps the ordinary product (float32: 256 MiB for T and as much for U).
PER_EXAMPLE_LIMIT = 2**26


def _fits_per_example(node, i, out, num_samples):
    """Return whether per-example kernel cotangents for the batch axis fit the size limit."""
    if i != 1 or node.params["batch_group_count"] != 1:
        return False
    batch = out.aval.shape[node.params["dimension_numbers"].out_spec[0]]
    kernel = node.invars[1].aval.size
    return num_samples * batch * kernel <= PER_EXAMPLE_LIMIT


def _adds_unit_axes(node) -> bool:
    """Return whether `node` is a broadcast_in_dim that only inserts axes of size 1."""
    return (node.primitive is lax.broadcast_in_dim_p
            and node.outvars[0].aval.size == node.invars[0].aval.size)


# Elementwise equations linear in each operand: the parameter's cotangent is d ⊙ ȳ summed
# over the axes it is broadcast along, with d = ∂y/∂operand given here.
_LINEAR_ELEMENTWISE = {
    lax.add_p: lambda vals, i: 1,
    prims.add_jaxvals_p: lambda vals, i: 1,
    lax.sub_p: lambda vals, i: 1 if i == 0 else -1,
    lax.mul_p: lambda vals, i: vals[1 - i],
}


def _contracted_axes(node, i):
    """Output axes that the parameter's VJP sums over, or None for an unsupported use."""
    out_rank = node.outvars[0].aval.ndim
    if node.primitive is lax.broadcast_in_dim_p and i == 0:
        in_shape = node.invars[0].aval.shape
        kept_axes = {
            d for n, d in zip(in_shape, node.params["broadcast_dimensions"], strict=True)
            if n == node.outvars[0].aval.shape[d]
        }
        return [a for a in range(out_rank) if a not in kept_axes]
    if node.primitive in _LINEAR_ELEMENTWISE:
        in_shape, out_shape = node.invars[i].aval.shape, node.outvars[0].aval.shape
        if len(in_shape) != len(out_shape):  # a scalar operand
            return list(range(out_rank))
        return [a for a in range(out_rank) if in_shape[a] == 1]
    if node.primitive is lax.conv_general_dilated_p:
        if i != 1:
            return None
        feature = node.params["dimension_numbers"].out_spec[1]
        return [a for a in range(out_rank) if a != feature]
    if node.primitive is lax.dot_general_p:
        other = 1 - i
        return [target[1] for target in _axes.axis_map(node, other)
                if target is not None and target != _axes.BROADCAST
                and _is_free_axis(node, other, target)]
    return None


def _is_free_axis(node, operand, target):
    (_, _), (batch_l, _) = node.params["dimension_numbers"]
    return target[1] >= len(batch_l)


def _split(rows, k, symmetric):
    """Return `(T, U)` from stacked rows: the same rows twice where T = U, else halves."""
    return (rows, rows) if symmetric else (rows[:k], rows[k:])


def _broadcast_diagonal(node, site, rows, k, symmetric):
    """`Σ_b (Σ_n T)(Σ_n U)` over separable axes b, after summing non-separable ones n.

    The sums over n run on the stacked T and U rows, which are split only afterwards.
    Summed separately, T and U were each stored by XLA's CPU backend as a copy of the rows.
    On the suite's 10k CNN those copies were 3.7 of the 10.7 MiB of one probe's temporaries,
    and 36 of 77 MiB at K = 10.
    """
    if site.other_axes:
        other = tuple(a + 1 for a in site.other_axes)  # axis 0 indexes the probes
        if node.primitive is lax.mul_p:
            # The rows are scaled by the other factor here, and XLA's fused reduction of
            # such a product is slow (see `cpjax._reduce`): one probe on the suite's 10k
            # transformer ran 2 to 7 % faster this way. Elsewhere, as for the biases of
            # its CNN, the product with ones was up to 1.8 times slower, so jnp.sum stays.
            rows = sum_axes(rows, other, keepdims=True)
        else:
            rows = jnp.sum(rows, axis=other, keepdims=True)
    t, u = _split(rows, k, symmetric)
    prod = jnp.sum(_probes.probe_mean(t * u), axis=site.axes, keepdims=True)
    # Every contracted axis now has size 1 and the rest are the operand's, in order.
    return prod.reshape(node.invars[site.input_index].aval.shape)


def _conv_per_example_diagonal(node, vals, rows, symmetric):
    """`mean_k Σ_b T_W[b] ∘ U_W[b]` from each example's own kernel cotangent.

    Used where the spatial axes are not separable: positions within an example interact,
    so only the products of different examples can be dropped. Each example's kernel
    cotangent is its patches contracted with its output cotangent over the output
    positions: a batched matrix product over the examples for all probes at once (a
    vmapped VJP of the convolution runs as a grouped convolution, several times slower on
    CPU). Large products run over chunks of examples (see `_example_chunk`).
    """
    x, w = vals
    specs = node.params["dimension_numbers"]
    if node.params["feature_group_count"] != 1:
        k = rows.shape[0] if symmetric else rows.shape[0] // 2
        return _conv_per_example_by_vjp(node, vals, rows[:k], rows[-k:])
    dtype = node.outvars[0].aval.dtype
    rows = _rows_by_position(node, rows).astype(dtype)
    num_rows, batch, _, features = rows.shape
    half = num_rows if symmetric else num_rows // 2

    def chunk_sum(x_chunk, rows_chunk):
        # The patches wait for the rows (see `_schedule.after`). Otherwise the first convolution's
        # were held from the forward pass on (10k CNN, one probe: 5.58 against 4.99 MiB).
        patches = _patches(node, _schedule.after(x_chunk.astype(dtype), rows_chunk))

        def kernel_cotangents(r):  # (batch, probes, out features, in features · window)
            return lax.dot_general(r, patches, (((2,), (1,)), ((1,), (0,))))

        # Written as two products and one reduction, XLA's CPU backend fuses them into
        # one kernel.
        t_w = kernel_cotangents(rows_chunk[:half])
        u_w = t_w if symmetric else kernel_cotangents(rows_chunk[half:])
        return jnp.sum(t_w * u_w, axis=(0, 1))

    in_window = w.shape[specs.rhs_spec[1]] * math.prod(w.shape[a] for a in specs.rhs_spec[2:])
    size = _example_chunk(batch, num_rows * features * in_window, rows[:, 0].size)
    prod = _sum_over_chunks(chunk_sum, (x, rows), (specs.lhs_spec[0], 1), size,
                            (features, in_window), dtype)
    prod = prod / half
    # (out features, in features, window...) in the kernel's own axis order
    canonical = prod.reshape(features, -1, *(w.shape[a] for a in specs.rhs_spec[2:]))
    return jnp.transpose(canonical, _inverse_permutation(specs.rhs_spec)).astype(w.dtype)


# A per-example product whose cotangents or rows have more than CHUNK_ABOVE entries in all
# runs in a loop over chunks of examples, each with at most CHUNK_ENTRIES entries of either
# where the batch size allows. In a micro-benchmark on two CPU cores, chunks ran the
# convolution kernel products of 10 and 100 probes 1.8 to 4 times faster. Chunking where
# the rows are the larger array (a first layer's kernel, with few input channels) also
# keeps their copies in the products' layout small: at K = 100 it cut the temporaries of
# the suite's 10k and 0.4M CNNs from 406 to 264 MiB and from 810 to 525 MiB, and their
# time by 4 to 5 %. At one probe, chunking above 2**21 entries rather than 2**22 cut the
# temporaries of the 10k CNN from 6.6 to 5.6 MiB and of the 0.4M CNN from 13.8 to
# 11.4 MiB. On the 10M transformer they fell from 32.9 to 9.3 MiB, and one probe ran 10 %
# faster. The CNNs took 10 % longer to compile.
# NOTE: both thresholds were measured on a CPU only. On an accelerator the loop may cost
# more than it saves.
CHUNK_ABOVE = 2**21
CHUNK_ENTRIES = 2**21


def _sum_over_chunks(chunk_sum, operands, axes, size, shape, dtype):
    """Return `chunk_sum(*operands)`, summed over chunks of `size` examples if that is smaller.

    `axes` gives each operand's example axis, and `shape` the shape of the sum. The chunks
    run in a `lax.scan` and are summed in at least float32.
    """
    batch = operands[0].shape[axes[0]]
    if size == batch:
        return chunk_sum(*operands)

    def body(total, start):
        chunks = [lax.dynamic_slice_in_dim(operand, start, size, axis=axis)
                  for operand, axis in zip(operands, axes, strict=True)]
        return total + chunk_sum(*chunks).astype(total.dtype), None

    total, _ = lax.scan(body, jnp.zeros(shape, _sum_dtype(dtype)), jnp.arange(0, batch, size))
    return total


def _sum_dtype(dtype):
    """Return the dtype that sums over chunks accumulate in: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def _example_chunk(batch, per_example, rows_per_example):
    """Return how many examples to process at once: `batch`, or a divisor of it.

    `per_example` counts the entries of one example's cotangents, for every row, and
    `rows_per_example` those of its rows.
    """
    largest = max(per_example, rows_per_example)
    if batch * largest <= CHUNK_ABOVE:
        return batch
    fitting = max(1, CHUNK_ENTRIES // largest)
    return max(d for d in range(1, min(batch, fitting) + 1) if batch % d == 0)


def _rows_by_position(node, rows):
    """Return a convolution's output rows as `(rows, batch, output positions, out features)`.

    An output with its features last, such as NHWC, needs no copy.
    """
    specs = node.params["dimension_numbers"]
    out_batch, out_features, *out_spatial = (a + 1 for a in specs.out_spec)
    rows = jnp.transpose(rows, (0, out_batch, *out_spatial, out_features))
    return rows.reshape(*rows.shape[:2], -1, rows.shape[-1])


def _patches(node, x):
    """Return each example's input patches, `(batch, output positions, in features · window)`.

    The window index runs fastest, matching the kernel in `(out, in, window...)` order.
    The slices are stacked one window axis at a time, after the features. XLA's CPU
    backend fused these stacks (three slices each for a 3 × 3 window) into one kernel.
    The nine slices of that window stacked at once were each stored, and then their
    concatenation as well. With the stacks, one probe's temporaries on the suite's 10k
    CNN fell from 6.95 to 6.64 MiB, and its time by 14 % (9 % on the 0.4M CNN).
    Compiling took 12 to 16 % less.
    """
    params = node.params
    specs = params["dimension_numbers"]
    window = [node.invars[1].aval.shape[a] for a in specs.rhs_spec[2:]]
    out_shape = node.outvars[0].aval.shape
    out_spatial = [out_shape[a] for a in specs.out_spec[2:]]
    rhs_dilation = params["rhs_dilation"] or (1,) * len(window)
    padded = _padded_channels_last(node, x)

    def window_slice(offset):  # (batch, out spatial..., in features)
        start = [0] + [o * d for o, d in zip(offset, rhs_dilation, strict=True)] + [0]
        limit = [padded.shape[0]] + [
            s + (n - 1) * stride + 1
            for s, n, stride in zip(start[1:-1], out_spatial, params["window_strides"],
                                    strict=True)
        ] + [padded.shape[-1]]
        return lax.slice(padded, start, limit, [1, *params["window_strides"], 1])

    def stacked(offset):
        if len(offset) == len(window):
            return window_slice(offset)
        parts = [stacked((*offset, o)) for o in range(window[len(offset)])]
        return jnp.stack(parts, axis=padded.ndim)

    patches = stacked(())  # (batch, out spatial..., in features, window...)
    return patches.reshape(patches.shape[0], -1, math.prod(patches.shape[padded.ndim - 1:]))


def _padded_channels_last(node, x):
    """Return the input as `(batch, spatial..., in features)`, padded and dilated."""
    params = node.params
    specs = params["dimension_numbers"]
    x = jnp.transpose(x, (specs.lhs_spec[0], *specs.lhs_spec[2:], specs.lhs_spec[1]))
    lhs_dilation = params["lhs_dilation"] or (1,) * (x.ndim - 2)
    config = [(0, 0, 0)] + [
        (lo, hi, d - 1) for (lo, hi), d in zip(params["padding"], lhs_dilation, strict=True)
    ] + [(0, 0, 0)]
    return lax.pad(x, jnp.zeros((), x.dtype), config)


def conv_kernel_rows(node, vals, rows):
    """Return the kernel cotangent of each row of output cotangents, `(rows, *kernel shape)`.

    The result equals a vmapped VJP of an ungrouped convolution with respect to its kernel.
    It is one matrix product of the rows with the input patches, over the examples and the
    output positions. XLA's CPU backend ran the vmapped VJP 1.5 to 2 times slower.
    """
    x, w = vals
    specs = node.params["dimension_numbers"]
    dtype = node.outvars[0].aval.dtype
    patches = _patches(node, x.astype(dtype))  # (batch, positions, in features · window)
    rows = _rows_by_position(node, rows).astype(dtype)
    rows = rows.reshape(rows.shape[0], -1, rows.shape[-1])
    patches = patches.reshape(-1, patches.shape[-1])
    kernels = lax.dot_general(rows, patches, (((1,), (0,)), ((), ())))  # (rows, out, in · window)
    # (rows, out features, in features, window...), then the kernel's own axis order
    canonical = kernels.reshape(*kernels.shape[:2], -1, *(w.shape[a] for a in specs.rhs_spec[2:]))
    order = _inverse_permutation(specs.rhs_spec)
    return jnp.transpose(canonical, (0, *(a + 1 for a in order))).astype(w.dtype)


def _inverse_permutation(perm):
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return tuple(inverse)


def _conv_per_example_by_vjp(node, vals, t, u):
    """Return the per-example diagonal by a vmapped VJP (grouped convolutions)."""
    x, w = vals
    specs = node.params["dimension_numbers"]
    x_batch, out_batch = specs.lhs_spec[0], specs.out_spec[0]
    dtype = node.outvars[0].aval.dtype

    def kernel_cotangent(x_b, ct_b):
        x_one = jnp.expand_dims(x_b, x_batch)
        ct_one = jnp.expand_dims(ct_b, out_batch).astype(dtype)
        return jax.vjp(lambda kernel: bind_node(node, [x_one, kernel])[0], w)[1](ct_one)[0]

    per_example = jax.vmap(kernel_cotangent, in_axes=(x_batch, out_batch))
    per_probe = jax.vmap(per_example, in_axes=(None, 0))
    t_w, u_w = per_probe(x, t), per_probe(x, u)
    return _probes.leading_sum(t_w * u_w, 2, 1.0 / t.shape[0])


def _dot_per_example_diagonal(node, site, vals, t, u):
    """Return `mean_k Σ_b T_W[b] ∘ U_W[b]` for a product over a separable and a mixed axis.

    Each example `b` of the one separable axis gets its own cotangent of `W`, which sums
    over the mixed axes within `b` (the positions of a sequence that a later attention
    combines, say). The per-example cotangents come from one `dot_general` of the other
    operand with the rows, batched over `b`. They stay in that product's axis order until
    they are summed, so only the sum (the size of `W`) is permuted into `W`'s axis order.
    A vmapped VJP of `dot_general` permutes each example's cotangent instead. On the
    suite's 10M-parameter transformer that took a quarter of a probe's time. Large products
    run over chunks of examples (see `_example_chunk`).
    """
    i, out_axis = site.input_index, site.axes[0]
    dtype = node.outvars[0].aval.dtype
    dims, order, probe_axis = _per_example_dims(node, i, out_axis)
    x_axis = dims[1][0][0]

    def chunk_sum(x_chunk, t_chunk, u_chunk):
        def per_example(rows):  # (b, W batch..., W contracting..., probes, W free...)
            return lax.dot_general(x_chunk.astype(dtype), rows.astype(dtype), dims)

        t_w = per_example(t_chunk)
        u_w = t_w if u_chunk is t_chunk else per_example(u_chunk)
        return _probes.leading_sum(jnp.moveaxis(t_w * u_w, probe_axis, 0), 2, 1.0 / num_probes)

    num_probes = t.shape[0]
    x = vals[1 - i]
    batch = x.shape[x_axis]
    num_rows = t.shape[0] if u is t else t.shape[0] + u.shape[0]
    size = _example_chunk(batch, num_rows * vals[i].size, num_rows * t[0].size // batch)
    shape = [vals[i].shape[a] for a in order]
    if u is t:
        total = _sum_over_chunks(lambda x, t: chunk_sum(x, t, t), (x, t),
                                 (x_axis, out_axis + 1), size, shape, dtype)
    else:
        total = _sum_over_chunks(chunk_sum, (x, t, u), (x_axis, out_axis + 1, out_axis + 1),
                                 size, shape, dtype)
    return jnp.transpose(total.astype(dtype), _inverse_permutation(order))


def _free_axes(node, i):
    """Axes of operand `i` of a `dot_general` that are neither batch nor contracting."""
    (contract_l, contract_r), (batch_l, batch_r) = node.params["dimension_numbers"]
    contract, batch = (contract_l, batch_l) if i == 0 else (contract_r, batch_r)
    return [a for a in range(node.invars[i].aval.ndim) if a not in contract and a not in batch]


def _per_example_dims(node, i, out_axis):
    """Dimension numbers of `dot_general(x, rows)` giving per-example cotangents of `W`.

    `W` is operand `i` and `x` is the other one. `rows` has a leading probe axis before the
    output's axes. `out_axis` is the separable output axis, a free axis of `x`.

    Returns the dimension numbers, `order` and the probe axis of the result. `order` lists
    the axis of `W` at each position of the result after the example axis, the probe axis
    left out.
    """
    (contract_l, contract_r), (batch_l, batch_r) = node.params["dimension_numbers"]
    w_contract, x_contract = (contract_l, contract_r) if i == 0 else (contract_r, contract_l)
    w_batch, x_batch = (batch_l, batch_r) if i == 0 else (batch_r, batch_l)
    x_free = _free_axes(node, 1 - i)
    w_free = _free_axes(node, i)
    # Output positions: batch axes, then the free axes of the left operand, then the right's.
    n_batch = len(batch_l)
    lhs_free = _free_axes(node, 0)
    x_out = [n_batch + k if i == 1 else n_batch + len(lhs_free) + k for k in range(len(x_free))]
    example = x_out.index(out_axis)
    x_sum = [a for k, a in enumerate(x_free) if k != example]
    rows_sum = [x_out[k] + 1 for k in range(len(x_free)) if k != example]
    dims = ((tuple(x_sum), tuple(rows_sum)),
            ((x_free[example], *x_batch), (out_axis + 1, *(b + 1 for b in range(n_batch)))))
    # Result: example, W's batch axes, x's contracting axes in x's order (paired with W's),
    # then the rows' remaining axes in order: the probes, then W's free axes.
    pair = dict(zip(x_contract, w_contract, strict=True))
    order = [*w_batch, *(pair[a] for a in sorted(x_contract)), *w_free]
    return dims, order, 1 + len(w_batch) + len(w_contract)


def _dot_general_diagonal(node, site, vals, t, u):
    """`VJP_W(o ∘ o, mean_k T_k ∘ U_k)`: the per-example squares in one matrix product.

    The squares are formed after the rows' product (see `_schedule.after`). Formed from the
    forward pass's values alone, they were scheduled with the forward pass and held
    through the backward sweep. One probe on the suite's 10k and 0.4M MLPs then had 1.50
    and 2.38 MiB of temporaries, against 1.25 and 2.01 MiB in this order.
    """
    i = site.input_index
    ct = _probes.probe_mean(t * u)
    other = _schedule.after(vals[1 - i], ct)
    squared = [None, None]
    squared[1 - i] = other * other

    def product(w):
        operands = list(squared)
        operands[i] = w
        return bind_node(node, operands)[0]

    return jax.vjp(product, vals[i])[1](ct.astype(node.outvars[0].aval.dtype))[0]
