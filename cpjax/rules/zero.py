"""Primitives with zero local curvature.

Linear maps (add, reshape, gather, cumsum, ...) have `M = 0` exactly. Piecewise-linear maps
(max, abs, sort, select_n, clamp, ...) have `M = 0` almost everywhere, which is also what
`jax.hessian` returns for them. Primitives with a zero derivative (floor, sign, comparisons)
are listed too: their outputs never carry a cotangent.
"""

from __future__ import annotations

from jax import lax
from jax.extend.core import primitives as prims

from cpjax.rules._base import Rule, register

LINEAR = (
    lax.add_p, prims.add_jaxvals_p, lax.sub_p, lax.neg_p, lax.reshape_p, lax.broadcast_in_dim_p,
    lax.transpose_p, lax.reduce_sum_p, lax.slice_p, lax.pad_p, lax.concatenate_p, lax.gather_p,
    lax.scatter_add_p, lax.scatter_sub_p, lax.dynamic_slice_p, lax.dynamic_update_slice_p,
    lax.convert_element_type_p, lax.copy_p, lax.cumsum_p, lax.squeeze_p, lax.rev_p,
    lax.reduce_precision_p, lax.optimization_barrier_p, lax.sharding_constraint_p,
    lax.device_put_p, lax.split_p, lax.reduce_window_sum_p, lax.psum_p, lax.all_gather_p,
    lax.ppermute_p, lax.all_to_all_p,
    lax.tile_p, lax.stack_p, lax.unstack_p, lax.select_and_scatter_add_p,
    lax.ragged_all_to_all_p,
)

PIECEWISE_LINEAR = (
    lax.max_p, lax.min_p, lax.abs_p, lax.select_n_p, lax.clamp_p, lax.sort_p, lax.reduce_max_p,
    lax.reduce_min_p, lax.cummax_p, lax.cummin_p, lax.scatter_p, lax.scatter_max_p,
    lax.scatter_min_p, lax.rem_p, lax.top_k_p, lax.reduce_window_max_p, lax.reduce_window_min_p,
    lax.select_and_gather_add_p, lax.pmax_p, lax.pmin_p, lax.nextafter_p, lax.approx_top_k_p,
    lax.select_and_scatter_p,
)

ZERO_DERIVATIVE = (
    lax.stop_gradient_p, lax.floor_p, lax.ceil_p, lax.round_p, lax.sign_p, lax.is_finite_p,
    lax.argmax_p, lax.argmin_p, lax.iota_p, lax.eq_p, lax.ne_p, lax.lt_p, lax.le_p, lax.gt_p,
    lax.ge_p, lax.and_p, lax.or_p, lax.not_p, lax.xor_p, lax.reduce_and_p, lax.reduce_or_p,
    lax.population_count_p, lax.clz_p, lax.shift_left_p, lax.shift_right_logical_p,
    lax.shift_right_arithmetic_p, lax.bitcast_convert_type_p, lax.rng_bit_generator_p,
    prims.random_bits_p, prims.random_seed_p, prims.random_split_p, prims.random_fold_in_p,
    prims.threefry2x32_p, lax.axis_index_p, lax.after_all_p, lax.create_token_p,
    lax.dce_sink_p, lax.eq_to_p, lax.le_to_p, lax.lt_to_p, lax.mulhi_p, lax.reduce_xor_p,
    lax.rng_uniform_p,
)

register(Rule(), *LINEAR, *PIECEWISE_LINEAR, *ZERO_DERIVATIVE)
