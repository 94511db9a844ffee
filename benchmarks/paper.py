"""Accuracy of Hessian-diagonal estimators versus the number of probes, on real data.

Follows the diagonal-accuracy study of Martens, Sutskever and Swersky, "Estimating the
Hessian by Back-propagating Curvature" (ICML 2012): the relative error of the mean of K
single-probe estimates against the exact diagonal, for Curvature Propagation (CP) and for
Hutchinson's estimator. The model is a tanh MLP (64 -> hidden -> 10) with softmax
cross-entropy on a batch of scikit-learn's 8x8 digits. The network and the batch are fixed,
and each seed draws a new stream of probes.

Run from the repository root:

    python benchmarks/paper.py [--seeds 3] [--max-probes 1000] [--batch 1797] [--hidden 32]

It prints a markdown table and writes `paper.png` and `paper.json` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _common import describe_machine, describe_source, init_mlp_params
from jax.flatten_util import ravel_pytree
from sklearn.datasets import load_digits
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

import cpjax

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
PROBE_COUNTS = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000)

BECKER_LECUN = "Becker-LeCun (deterministic, biased)"
# Column name -> single-probe estimator factory. Each returns `diag_fn(*args, key)`.
ESTIMATORS = {
    "CP, separable batch axis": lambda loss: cpjax.cp_hessian_diag(loss, separable=True),
    "CP as in the paper, pruned": lambda loss: cpjax.cp_hessian_diag(loss, separable=False),
    "Hutchinson": lambda loss: cpjax.hutchinson_hessian_diag(loss),
}
# Distinct line styles, so that two estimators giving equal errors still show both lines.
LINE_STYLES = {
    "CP, separable batch axis": {"marker": "o", "linestyle": "-"},
    "CP as in the paper, pruned": {"marker": "s", "linestyle": "--", "markersize": 4},
    "Hutchinson": {"marker": "^", "linestyle": "-"},
    BECKER_LECUN: {"marker": "", "linestyle": "-.", "color": "grey"},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3,
                        help="number of independent probe streams averaged (default 3)")
    parser.add_argument("--max-probes", type=int, default=1000,
                        help="largest number of probes K averaged (default 1000)")
    parser.add_argument("--batch", type=int, default=1797,
                        help="number of digits examples in the loss (default 1797, the whole "
                             "set)")
    parser.add_argument("--hidden", type=int, default=32,
                        help="width of the tanh hidden layer (default 32)")
    parser.add_argument("--chunk", type=int, default=100,
                        help="single-probe estimates drawn per jitted vmapped call (default 100)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output folder for paper.png and paper.json (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    for name in ("seeds", "max_probes", "batch", "hidden", "chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, "
                         f"got {getattr(args, name)}")
    return args


def load_batch(batch: int):
    """Return `batch` digits images (pixels standardized over the whole set) and labels."""
    digits = load_digits()
    if batch > len(digits.target):
        raise ValueError(f"--batch must be at most {len(digits.target)} (the size of the "
                         f"digits set), got {batch}")
    # Three pixels are 0 in every image. StandardScaler divides them by 1, so they stay 0.
    pixels = StandardScaler().fit_transform(digits.data)
    order = np.random.default_rng(0).permutation(len(digits.target))[:batch]
    return jnp.asarray(pixels[order]), jnp.asarray(digits.target[order])




def mlp_loss(params, inputs, labels):
    """Return the mean softmax cross-entropy of the tanh MLP 64 -> hidden -> 10."""
    hidden = jnp.tanh(inputs @ params["w1"] + params["b1"])
    logits = hidden @ params["w2"] + params["b2"]
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def make_chunk_sampler(estimator, params, inputs, labels):
    """Return a jitted `keys -> (len(keys), n)` array of flat single-probe estimates."""

    def estimate(key):
        diag = estimator(params, inputs, labels, key=key)
        return ravel_pytree(diag)[0]

    return jax.jit(jax.vmap(estimate))


def relative_errors(name, sampler, key, exact, probe_counts, chunk, progress):
    """Return the relative error of the running mean of single-probe estimates at each K.

    The estimates are drawn `chunk` at a time, so memory stays at one chunk however large
    the largest K is. Raises FloatingPointError if an estimate is not finite.
    """
    max_probes = probe_counts[-1]
    exact_norm = np.linalg.norm(exact)
    errors, running_sum, drawn = {}, np.zeros_like(exact), 0
    for start in range(0, max_probes, chunk):
        size = min(chunk, max_probes - start)
        keys = jax.random.split(jax.random.fold_in(key, start), size)
        estimates = np.asarray(sampler(keys))
        if not np.all(np.isfinite(estimates)):
            bad = int(np.sum(~np.all(np.isfinite(estimates), axis=1)))
            raise FloatingPointError(f"{name}: {bad} of the single-probe estimates "
                                     f"{start}..{start + size - 1} contain NaN or inf")
        cumulative = running_sum + np.cumsum(estimates, axis=0)
        for k in probe_counts:
            if drawn < k <= drawn + size:
                mean = cumulative[k - drawn - 1] / k
                errors[k] = float(np.linalg.norm(mean - exact) / exact_norm)
        running_sum, drawn = cumulative[-1], drawn + size
        progress.update(size)
    return [errors[k] for k in probe_counts]


def format_table(probe_counts, mean_errors) -> str:
    names = list(mean_errors)
    lines = ["| K | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for i, k in enumerate(probe_counts):
        cells = " | ".join(f"{mean_errors[name][i]:.4g}" for name in names)
        lines.append(f"| {k} | {cells} |")
    return "\n".join(lines)


def plot_errors(path: Path, probe_counts, mean_errors, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, errors in mean_errors.items():
        ax.loglog(probe_counts, errors, label=name, **LINE_STYLES.get(name, {"marker": "o"}))
    # The error of a mean of K independent unbiased estimates falls as K^(-1/2).
    first = mean_errors["Hutchinson"][0]
    ax.loglog(probe_counts, [first / math.sqrt(k) for k in probe_counts], "k:", lw=1,
              label=r"$\propto K^{-1/2}$")
    ax.set_xlabel("number of probes K")
    ax.set_ylabel(r"$\|\bar d_K - d\|_2 \,/\, \|d\|_2$")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)






def main(argv=None) -> None:
    args = parse_args(argv)
    machine = describe_machine()
    # float64, so that float32 rounding (about 1e-7 relative per operation) in the exact
    # reference or in the sums over 1000 estimates does not enter the errors measured.
    jax.config.update("jax_enable_x64", True)
    command = "python " + shlex.join(sys.argv if argv is None else ["benchmarks/paper.py", *argv])
    started = time.perf_counter()

    inputs, labels = load_batch(args.batch)
    params = init_mlp_params(jax.random.key(0), (inputs.shape[1], args.hidden, 10))
    exact_tree = jax.jit(cpjax.exact_hessian_diag(mlp_loss))(params, inputs, labels)
    exact = np.asarray(ravel_pytree(exact_tree)[0])
    if not np.all(np.isfinite(exact)):
        raise FloatingPointError("the exact Hessian diagonal contains non-finite values")

    probe_counts = [k for k in PROBE_COUNTS if k < args.max_probes] + [args.max_probes]
    per_seed = {name: [] for name in ESTIMATORS}
    total = len(ESTIMATORS) * args.seeds * args.max_probes
    with tqdm(total=total, unit="probe", desc="estimates", file=sys.stderr) as progress:
        for name, factory in ESTIMATORS.items():
            sampler = make_chunk_sampler(factory(mlp_loss), params, inputs, labels)
            for seed in range(args.seeds):
                errors = relative_errors(name, sampler, jax.random.key(seed + 1), exact,
                                         probe_counts, args.chunk, progress)
                per_seed[name].append(errors)
    mean_errors = {name: np.mean(runs, axis=0).tolist() for name, runs in per_seed.items()}
    approximation = jax.jit(cpjax.becker_lecun_hessian_diag(mlp_loss))(params, inputs, labels)
    error = float(np.linalg.norm(np.asarray(ravel_pytree(approximation)[0]) - exact)
                  / np.linalg.norm(exact))
    mean_errors[BECKER_LECUN] = [error] * len(probe_counts)
    wall_time = time.perf_counter() - started

    setup = (f"digits, batch {args.batch}, tanh MLP {inputs.shape[1]}-{args.hidden}-10, "
             f"{exact.size} parameters, float64, mean over {args.seeds} seeds")
    print(f"Command: `{command}`\n")
    print(f"Relative error ||mean_K - exact||_2 / ||exact||_2 ({setup}).\n")
    print(format_table(probe_counts, mean_errors))
    print(f"\nMachine: {machine}")
    print(f"cpjax source: {describe_source()}")
    print(f"Total wall time (after Python imports): {wall_time:.1f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    plot_errors(args.out / "paper.png", probe_counts, mean_errors, setup)
    record = {
        "command": command, "setup": setup, "machine": machine,
        "cpjax_source": describe_source(),
        "wall_time_s": wall_time, "probe_counts": probe_counts,
        "exact_diag_norm": float(np.linalg.norm(exact)),
        "mean_relative_error": mean_errors, "relative_error_per_seed": per_seed,
    }
    (args.out / "paper.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"Wrote {args.out / 'paper.png'} and {args.out / 'paper.json'}")


if __name__ == "__main__":
    main()
