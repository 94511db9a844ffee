"""Single-probe variance of CP and Hutchinson on a small two-block transformer, in float64.

Prints `Σ var / Σ exact²` over all parameters for `cp_hessian_diag` (separable batch axis),
the same with the attention's softmax left as primitives, the same with elementwise chains
left unfused, and `hutchinson_hessian_diag`, from `--draws` single-probe estimates each,
against the exact diagonal of `exact_hessian_diag`. Also prints
the largest gap between the mean of the draws and the exact diagonal, in standard errors, as
a check that every estimator is unbiased. The model is `transformer_logits` of `_common.py`:
pre-layer-norm blocks with attention and a GELU MLP, next-token cross-entropy on random
tokens. The layer norms give CP most of its variance on it (see the README).

Run from the repository root:

    python benchmarks/transformer_variance.py [--draws 256] [--width 16] [--blocks 2]
"""

from __future__ import annotations

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import (  # noqa: E402
    cross_entropy,
    describe_machine,
    init_transformer_params,
    transformer_logits,
)

import cpjax  # noqa: E402
from cpjax import _chains, _softmax  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=256,
                        help="single-probe estimates per estimator (default 256)")
    parser.add_argument("--width", type=int, default=16, help="model width (default 16)")
    parser.add_argument("--blocks", type=int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--heads", type=int, default=2, help="attention heads (default 2)")
    parser.add_argument("--vocab", type=int, default=16, help="vocabulary size (default 16)")
    parser.add_argument("--context", type=int, default=8, help="tokens per sequence (default 8)")
    parser.add_argument("--batch", type=int, default=8, help="sequences (default 8)")
    args = parser.parse_args(argv)
    if args.draws < 2:
        parser.error(f"--draws must be at least 2, got {args.draws}")
    if args.width % args.heads:
        parser.error(f"--width ({args.width}) must be a multiple of --heads ({args.heads})")
    return args


def flatten(tree, leading: int = 0) -> np.ndarray:
    """Concatenate the leaves of `tree`, keeping `leading` axes (0 or 1)."""
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
    if leading:
        return np.concatenate([x.reshape(x.shape[0], -1) for x in leaves], axis=1)
    return np.concatenate([x.ravel() for x in leaves])


def variance_ratio(estimator, args, exact, draws):
    """Return `Σ var / Σ exact²` and the largest `|mean − exact| / SE` of single-probe draws."""
    sample = jax.jit(jax.vmap(lambda key: estimator(*args, key=key)))
    estimates = flatten(sample(jax.random.split(jax.random.key(7), draws)), leading=1)
    variance = estimates.var(axis=0, ddof=1)
    standard_error = np.sqrt(variance / draws)
    gap = np.abs(estimates.mean(axis=0) - exact)
    z = np.max(np.where(standard_error > 0, gap / np.maximum(standard_error, 1e-300), 0.0))
    return variance.sum() / np.sum(exact**2), z


def main(argv=None) -> None:
    args = parse_args(argv)
    key_params, key_tokens = jax.random.split(jax.random.key(0))
    params = jax.tree.map(lambda a: a.astype(jnp.float64),
                          init_transformer_params(key_params, args.vocab, args.context,
                                                  args.width, blocks=args.blocks))
    tokens = jax.random.randint(key_tokens, (args.batch, args.context + 1), 0, args.vocab)

    def loss(params, tokens):
        return cross_entropy(transformer_logits(params, tokens, args.heads), tokens[:, 1:])

    started = time.perf_counter()
    exact = flatten(cpjax.exact_hessian_diag(loss)(params, tokens))
    print(f"{args.blocks}-block transformer, width {args.width}, {args.heads} heads, "
          f"vocabulary {args.vocab}, {args.batch} sequences of {args.context} tokens, "
          f"{exact.size:,} parameters, float64; {args.draws} single-probe draws each.\n")
    print("| estimator | Σ var / Σ exact² | largest bias / SE |")
    print("|---|---:|---:|")
    ratio, z = variance_ratio(cpjax.cp_hessian_diag(loss), (params, tokens), exact, args.draws)
    print(f"| CP, separable batch axis | {ratio:.3g} | {z:.1f} |")
    for label, module, name in (("attention softmax inlined", _softmax, "fuse_softmax"),
                                ("elementwise chains unfused", _chains,
                                 "fuse_elementwise_chains")):
        rewrite = getattr(module, name)
        setattr(module, name, lambda program: program)  # trace without this rewrite
        try:
            ratio, z = variance_ratio(cpjax.cp_hessian_diag(loss), (params, tokens), exact,
                                      args.draws)
        finally:
            setattr(module, name, rewrite)
        print(f"| CP, {label} | {ratio:.3g} | {z:.1f} |")
    ratio, z = variance_ratio(cpjax.hutchinson_hessian_diag(loss), (params, tokens), exact,
                              args.draws)
    print(f"| Hutchinson | {ratio:.3g} | {z:.1f} |")
    print(f"\nMachine: {describe_machine()}")
    print(f"Total wall time (after Python imports): {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
