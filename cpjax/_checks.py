"""Argument checks shared by every estimator, with messages in the style of `jax.grad`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cpjax._probes import PROBES


def check_options(name: str, num_samples, probe) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
        raise TypeError(
            f"{name} requires an integer num_samples, got {num_samples!r} of type "
            f"{type(num_samples).__name__}."
        )
    if num_samples < 1:
        raise ValueError(
            f"{name} requires num_samples >= 1, got num_samples={num_samples}. Each sample is "
            "one probe; pass num_samples=1 for a single-probe estimate."
        )
    if probe not in PROBES:
        expected = ", ".join(map(repr, PROBES))
        raise ValueError(f"{name} got an unknown probe {probe!r}; expected one of {expected}.")


def check_separable(name: str, separable) -> None:
    if not isinstance(separable, (bool, np.bool_)):
        raise TypeError(
            f"{name} requires separable to be True or False, got {separable!r}. True uses "
            "the per-example form where the function sums over independent examples."
        )


def check_chunk_size(name: str, sample_chunk_size) -> None:
    if sample_chunk_size is None:
        return
    if isinstance(sample_chunk_size, bool) or not isinstance(
            sample_chunk_size, (int, np.integer)) or sample_chunk_size < 1:
        raise ValueError(
            f"{name} requires sample_chunk_size to be None or an integer >= 1, got "
            f"{sample_chunk_size!r}. It is the number of probes carried in one sweep; "
            "None carries all num_samples at once."
        )


def normalize_argnums(name: str, argnums, n_args: int) -> tuple:
    """Return argnums as a tuple of non-negative ints, checked against the call."""
    single = isinstance(argnums, (int, np.integer))
    if not single and not isinstance(argnums, (tuple, list)):
        raise TypeError(f"{name}: argnums must be an int or a tuple of ints, got {argnums!r}.")
    nums = (argnums,) if single else tuple(argnums)
    if not nums:
        raise ValueError(f"{name} requires at least one argument to differentiate; argnums=().")
    for i in nums:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"{name}: argnums must be an int or a tuple of ints, got {argnums!r}.")
        if not -n_args <= i < n_args:
            raise ValueError(
                f"{name}: argnums={argnums!r} refers to argument {i}, but the function was "
                f"called with {n_args} positional argument(s)."
            )
    normalized = tuple(int(i) % n_args for i in nums)
    if len(set(normalized)) != len(normalized):
        raise ValueError(
            f"{name}: argnums={argnums!r} names the same argument twice; list each argument "
            "to differentiate once."
        )
    return normalized


@functools.lru_cache(maxsize=8)
def _raw_key_shape(impl: str) -> tuple:
    """Return the shape of `jax.random.PRNGKey(0)` under the default implementation `impl`.

    Computed, not traced: `jax.eval_shape` reuses a trace made under another default.
    """
    with jax.ensure_compile_time_eval():
        return jax.random.PRNGKey(0).shape


def check_key(name: str, key) -> None:
    if key is None:
        raise TypeError(
            f"{name} requires a PRNG key for its probes: call it as fn(*args, "
            "key=jax.random.key(0)). Use a fresh key (jax.random.split) for each new estimate."
        )
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise TypeError(
                f"{name} requires a single PRNG key, got an array of keys with shape "
                f"{key.shape}. For one estimate per key, map over the keys: "
                "jax.vmap(lambda k: fn(*args, key=k))(keys)."
            )
        return
    if dtype == jnp.uint32 and getattr(key, "shape", None) == _raw_key_shape(
            jax.config.jax_default_prng_impl):
        return
    raise TypeError(
        f"{name} requires key to be a PRNG key from jax.random.key(seed) or "
        f"jax.random.PRNGKey(seed), got {type(key).__name__} with dtype {dtype} and shape "
        f"{getattr(key, 'shape', None)}."
    )


def check_differentiated(name: str, args: tuple, argnums: tuple) -> None:
    """Raise unless every leaf of the differentiated arguments is a real float array."""
    for i in argnums:
        paths = jax.tree_util.tree_flatten_with_path(args[i])[0]
        for path, leaf in paths:
            where = f"argument {i}" + (jax.tree_util.keystr(path) if path else "")
            dtype = jnp.result_type(leaf)
            if jnp.issubdtype(dtype, jnp.complexfloating):
                raise TypeError(
                    f"{name} does not support complex inputs yet, but {where} has dtype "
                    f"{dtype}. Split it into real and imaginary parts (x.real, x.imag) and "
                    "differentiate with respect to those."
                )
            if not jnp.issubdtype(dtype, jnp.floating):
                raise TypeError(
                    f"{name} requires real floating-point inputs for the differentiated "
                    f"arguments (argnums={argnums if len(argnums) > 1 else argnums[0]}), but "
                    f"{where} has dtype {dtype}. Cast it to a float dtype "
                    "(x.astype(jnp.float32)) or leave it out of argnums."
                )


def check_output(name: str, out_shape, has_aux: bool, aux_option: bool = True):
    """Return the ShapeDtypeStruct of the scalar output, raising on anything else.

    `aux_option` is whether `name` takes `has_aux`, which the messages then suggest.
    """
    if has_aux:
        if not (isinstance(out_shape, (tuple, list)) and len(out_shape) == 2):
            raise TypeError(
                f"{name} with has_aux=True requires the function to return a pair "
                f"(output, aux), but it returned {jax.tree_util.tree_structure(out_shape)}."
            )
        out_shape = out_shape[0]
    if not hasattr(out_shape, "shape"):
        hint = (" If it returns extra values, pass has_aux=True and return (output, aux)."
                if aux_option else " Return the loss alone.")
        raise TypeError(
            f"{name} requires a function that returns a scalar array, but it returned "
            f"{jax.tree_util.tree_structure(out_shape)}.{hint}"
        )
    if out_shape.shape != ():
        hint = (", or pass has_aux=True to return other values alongside a scalar"
                if aux_option else "")
        raise TypeError(
            f"{name} requires a function with a scalar output, but the output has shape "
            f"{out_shape.shape}. Reduce it to a scalar (jnp.sum or jnp.mean){hint}."
        )
    if jnp.issubdtype(out_shape.dtype, jnp.complexfloating):
        raise TypeError(
            f"{name} does not support complex outputs yet; the output has dtype "
            f"{out_shape.dtype}. Return a real scalar (for example jnp.abs(z) ** 2)."
        )
    if not jnp.issubdtype(out_shape.dtype, jnp.floating):
        raise TypeError(
            f"{name} requires a real floating-point output, but the output has dtype "
            f"{out_shape.dtype}."
        )
    return out_shape
