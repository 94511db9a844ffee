"""Accuracy and cost of Hessian-diagonal estimators on digits, after Martens et al. 2012.

Follows the diagonal-accuracy study of Martens, Sutskever and Swersky, "Estimating the
Hessian by Back-propagating Curvature" (ICML 2012). The model is a tanh MLP
(64 -> hidden -> 10) with softmax cross-entropy on a batch of scikit-learn's 8x8 digits. The
network and the batch are fixed, and each seed draws a new stream of probes. The methods:

* Curvature Propagation (CP) with Rademacher probes, with the separable batch axis and in
  the paper's form (pruned), and CP with Gaussian probes (separable batch axis).
* Hutchinson's estimator `v * (H v)` with Rademacher probes.
* The Gauss-Newton (GGN) diagonal by Monte Carlo: CP with curvature injected only in the
  loss. Like the paper, the study measures it against the exact Hessian diagonal, of which
  it is a biased estimate. Its error against the exact GGN diagonal is reported too.
* Becker and LeCun's deterministic, biased approximation, and the exact diagonal (one
  Hessian-vector product per parameter), for their cost.

Outputs: the relative error of the mean of K single-probe estimates against the exact
diagonal, versus K (`paper.png`) and versus the wall time of K probes (`paper_time.png`,
modelled from measured calls of one probe and of a vmapped chunk of probes). Also the
variance of a single-probe estimate per coordinate (`paper_variance.png`), every number in
`paper.json`, and markdown tables on stdout.

Run from the repository root:

    python benchmarks/paper.py [--quick] [--seeds 3] [--max-probes 1000] [--batch 1797]
                               [--hidden 32] [--timing-repeats 5]

`--quick` changes the defaults to a small run (200 examples, hidden width 16, 1 seed, 30
probes, 3 timing repeats) whose time goes mostly to compiling. Flags given with it still
take precedence.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _common import (
    cross_entropy,
    describe_machine,
    describe_source,
    init_mlp_params,
    mlp_logits,
)
from jax.flatten_util import ravel_pytree
from sklearn.datasets import load_digits
from sklearn.preprocessing import StandardScaler

import cpjax

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
PROBE_COUNTS = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000)
# Defaults of the sizing flags for the full study and for `--quick`.
FULL_DEFAULTS = {"seeds": 3, "max_probes": 1000, "batch": 1797, "hidden": 32,
                 "timing_repeats": 5}
QUICK_DEFAULTS = {"seeds": 1, "max_probes": 30, "batch": 200, "hidden": 16,
                  "timing_repeats": 3}

# Timed calls of each one-probe function per round of `time_estimators`.
SINGLE_CALLS_PER_ROUND = 5

CP_SEPARABLE = "CP, separable batch axis"
CP_PAPER = "CP as in the paper, pruned"
CP_GAUSSIAN = "CP, separable, Gaussian probes"
HUTCHINSON = "Hutchinson"
GGN_MC = "GGN by Monte Carlo (biased)"
BECKER_LECUN = "Becker-LeCun (deterministic, biased)"
EXACT = "exact diagonal"
# GGN_MC's error against the exact GGN diagonal instead of the exact Hessian diagonal.
GGN_MC_VS_GGN = "GGN by Monte Carlo, against the exact GGN"

# Distinct line styles, so that two estimators giving equal errors still show both lines.
LINE_STYLES = {
    CP_SEPARABLE: {"marker": "o", "linestyle": "-", "color": "C0"},
    CP_PAPER: {"marker": "s", "linestyle": "--", "markersize": 4, "color": "C1"},
    CP_GAUSSIAN: {"marker": "D", "linestyle": ":", "markersize": 4, "color": "C4"},
    HUTCHINSON: {"marker": "^", "linestyle": "-", "color": "C2"},
    GGN_MC: {"marker": "v", "linestyle": "-", "color": "C3"},
    GGN_MC_VS_GGN: {"marker": "v", "linestyle": ":", "color": "C3", "alpha": 0.5},
    BECKER_LECUN: {"marker": "", "linestyle": "-.", "color": "grey"},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="use the small defaults " + _describe_defaults(QUICK_DEFAULTS)
                             + ", a run that mostly compiles")
    parser.add_argument("--seeds", type=int,
                        help="number of independent probe streams averaged (default 3)")
    parser.add_argument("--max-probes", type=int,
                        help="largest number of probes K averaged (default 1000)")
    parser.add_argument("--batch", type=int,
                        help="number of digits examples in the loss (default 1797, the whole "
                             "set)")
    parser.add_argument("--hidden", type=int,
                        help="width of the tanh hidden layer (default 32)")
    parser.add_argument("--timing-repeats", type=int,
                        help="rounds of timing; each round times every estimator in "
                             f"{SINGLE_CALLS_PER_ROUND} one-probe calls and one vmapped call of "
                             "--chunk probes, and the medians are kept (default 5)")
    parser.add_argument("--chunk", type=int, default=100,
                        help="single-probe estimates drawn per jitted vmapped call (default 100)")
    parser.add_argument("--no-progress", action="store_true",
                        help="do not show the progress bar (which needs tqdm)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output folder for paper.png, paper_time.png, paper_variance.png "
                             f"and paper.json (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    for name, value in (QUICK_DEFAULTS if args.quick else FULL_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("seeds", "max_probes", "batch", "hidden", "timing_repeats", "chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, "
                         f"got {getattr(args, name)}")
    return args


def _describe_defaults(defaults: dict) -> str:
    flags = ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in defaults.items())
    return f"({flags})"


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
    return cross_entropy(mlp_logits(params, inputs), labels)


def _positional_key(diag_fn):
    """Adapt `diag_fn(params, inputs, labels, key=key)` to take the key by position."""
    return lambda params, inputs, labels, key: diag_fn(params, inputs, labels, key=key)


def _ggn_monte_carlo():
    ggn_fn = cpjax.cp_ggn_diag(mlp_logits, cross_entropy)
    return lambda params, inputs, labels, key: ggn_fn(params, inputs, loss_args=(labels,),
                                                      key=key)


# Column name -> factory of a single-probe estimator `diag_fn(params, inputs, labels, key)`.
ESTIMATORS = {
    CP_SEPARABLE: lambda: _positional_key(cpjax.cp_hessian_diag(mlp_loss, separable=True)),
    CP_PAPER: lambda: _positional_key(cpjax.cp_hessian_diag(mlp_loss, separable=False)),
    CP_GAUSSIAN: lambda: _positional_key(cpjax.cp_hessian_diag(mlp_loss, separable=True,
                                                            probe="gaussian")),
    HUTCHINSON: lambda: _positional_key(cpjax.hutchinson_hessian_diag(mlp_loss)),
    GGN_MC: _ggn_monte_carlo,
}


def make_chunk_sampler(estimator, params, inputs, labels):
    """Return `keys -> (len(keys), n)`, an array of flat single-probe estimates.

    The parameters and data are arguments of the jitted program, not constants, so that XLA
    cannot compute the key-independent parts (forward pass, gradient) at compile time,
    which would make the timing too short.
    """

    def estimate(params, inputs, labels, key):
        return ravel_pytree(estimator(params, inputs, labels, key))[0]

    jitted = jax.jit(jax.vmap(estimate, in_axes=(None, None, None, 0)))
    return lambda keys: jitted(params, inputs, labels, keys)


def draw_estimates(name, sampler, key, references, probe_counts, chunk, progress):
    """Draw `probe_counts[-1]` single-probe estimates and measure the running means.

    The estimates are drawn `chunk` at a time, so memory stays at one chunk however large
    the largest K is. Returns `(errors, moments)`: `errors[ref][i]` is the relative error
    of the mean of the first `probe_counts[i]` estimates against `references[ref]`, and
    `moments` holds the count and the sums of `d` and `d²` per coordinate, with `d` the
    estimate minus the first reference. Raises FloatingPointError if an estimate is not
    finite.
    """
    max_probes = probe_counts[-1]
    shift = next(iter(references.values()))
    norms = {ref: np.linalg.norm(exact) for ref, exact in references.items()}
    errors = {ref: {} for ref in references}
    running_sum, drawn = np.zeros_like(shift), 0
    moments = {"count": 0, "sum": np.zeros_like(shift), "sum_of_squares": np.zeros_like(shift)}
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
                for ref, exact in references.items():
                    errors[ref][k] = float(np.linalg.norm(mean - exact) / norms[ref])
        deviations = estimates - shift
        moments["count"] += size
        moments["sum"] += deviations.sum(axis=0)
        moments["sum_of_squares"] += np.square(deviations).sum(axis=0)
        running_sum, drawn = cumulative[-1], drawn + size
        progress.update(size)
    return {ref: [errors[ref][k] for k in probe_counts] for ref in references}, moments


def coordinate_variance(moments) -> np.ndarray:
    """Return the unbiased per-coordinate sample variance from `draw_estimates` moments."""
    count = moments["count"]
    mean = moments["sum"] / count
    if count < 2:
        return np.full_like(mean, np.nan)
    return (moments["sum_of_squares"] - count * np.square(mean)) / (count - 1)


def time_calls(calls: dict, repeats: int, calls_per_round: dict | None = None,
               seed: int = 0) -> dict:
    """Return name -> median wall time in seconds of `calls[name]()`.

    Every call runs once untimed first, to compile. Then `repeats` rounds each call every
    function `calls_per_round.get(name, 1)` times, in a new random order, so that changes
    in machine load fall on all of them alike.
    """
    for call in calls.values():
        jax.block_until_ready(call())
    calls_per_round = calls_per_round or {}
    schedule = [name for name in calls for _ in range(calls_per_round.get(name, 1))]
    rng = np.random.default_rng(seed)
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for index in rng.permutation(len(schedule)):
            name = schedule[index]
            started = time.perf_counter()
            jax.block_until_ready(calls[name]())
            times[name].append(time.perf_counter() - started)
    return {name: float(np.median(values)) for name, values in times.items()}


def make_single_probe_call(estimator, params, inputs, labels):
    """Return a no-argument function that computes one jitted single-probe estimate.

    As in `make_chunk_sampler`, the parameters and data are arguments of the jitted program.
    """
    jitted = jax.jit(lambda p, x, y, k: ravel_pytree(estimator(p, x, y, k))[0])
    key = jax.random.key(12345)
    return lambda: jitted(params, inputs, labels, key)


def time_estimators(single_calls: dict, samplers: dict, becker_lecun, chunk: int,
                    repeats: int) -> tuple[dict, dict]:
    """Return `(one_probe, per_extra_probe)`: median seconds per estimator.

    `one_probe[name]` is the time of one call that draws one probe. `per_extra_probe[name]`
    is the slope of a straight line through that time and the time of one sampler call,
    which draws `chunk` probes in one vmapped program. There the forward pass and gradient
    are computed once for all probes. Becker-LeCun (a no-argument call) goes in
    `one_probe` only.
    """
    keys = jax.random.split(jax.random.key(12345), chunk)
    calls = {("one", name): call for name, call in single_calls.items()}
    calls.update({("chunk", name): (lambda sampler=sampler: sampler(keys))
                  for name, sampler in samplers.items()})
    calls[("one", BECKER_LECUN)] = becker_lecun
    # A one-probe call takes milliseconds, so more samples of it cost little and make its
    # median steadier on a machine shared with other work.
    seconds = time_calls(calls, repeats, {name: SINGLE_CALLS_PER_ROUND for name in calls
                                          if name[0] == "one"})
    one_probe = {name: seconds[("one", name)] for name in [*single_calls, BECKER_LECUN]}
    per_extra_probe = {}
    for name in samplers:
        slope = (seconds[("chunk", name)] - one_probe[name]) / max(chunk - 1, 1)
        # Noise on a loaded machine can make the slope negative for tiny models.
        per_extra_probe[name] = max(slope, 0.0)
    return one_probe, per_extra_probe


def modelled_seconds(record, name, probes):
    """Return the modelled wall time of `probes` probes of estimator `name` in one call."""
    single_probe_seconds = record["seconds_one_probe"][name]
    extra_seconds = record["seconds_per_extra_probe"][name]
    return single_probe_seconds + (np.asarray(probes) - 1) * extra_seconds


def compute_timed(fn, *args):
    """Compile `jax.jit(fn)` for `args`, then return `(result, seconds of one call)`."""
    compiled = jax.jit(fn).lower(*args).compile()
    started = time.perf_counter()
    result = jax.block_until_ready(compiled(*args))
    return result, time.perf_counter() - started


def parameter_groups(params) -> dict:
    """Return leaf name -> slice of that leaf in the vector `ravel_pytree(params)` gives."""
    groups, start = {}, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "".join(str(getattr(entry, "key", entry)) for entry in path)
        groups[name] = slice(start, start + leaf.size)
        start += leaf.size
    return groups


def summarize_variance(variance: np.ndarray, exact: np.ndarray, groups: dict) -> dict:
    """Return the single-probe variance relative to the exact diagonal, overall and per leaf.

    `total` and each group's value are `Σ variance / Σ exact²` over the coordinates, which is
    the expected squared relative error of one unbiased estimate. The quantiles are of
    `variance / exact²` over the coordinates where the exact value is not zero.
    """
    nonzero = exact != 0
    ratios = variance[nonzero] / np.square(exact[nonzero])
    levels = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
    return {
        "total": float(variance.sum() / np.square(exact).sum()),
        "per_group": {name: float(variance[part].sum() / np.square(exact[part]).sum())
                      for name, part in groups.items()},
        "ratio_quantiles": {f"{level:g}": float(np.quantile(ratios, level)) for level in levels},
    }


def first_count_below(probe_counts, errors, threshold):
    """Return the first K of `probe_counts` whose error is below `threshold`, else None."""
    return next((k for k, error in zip(probe_counts, errors, strict=True) if error < threshold),
                None)


def _compact(values) -> list:
    return [float(f"{value:.6g}") for value in np.asarray(values).tolist()]


def compute_references(params, inputs, labels):
    """Return the exact Hessian and GGN diagonals (flat), each with the seconds of one call."""
    exact_fn = cpjax.exact_hessian_diag(mlp_loss)
    exact, exact_seconds = compute_timed(lambda p, x, y: ravel_pytree(exact_fn(p, x, y))[0],
                                         params, inputs, labels)
    exact_ggn_fn = cpjax.exact_ggn_diag(mlp_logits, cross_entropy)
    exact_ggn, exact_ggn_seconds = compute_timed(
        lambda p, x, y: ravel_pytree(exact_ggn_fn(p, x, loss_args=(y,)))[0],
        params, inputs, labels)
    exact, exact_ggn = np.asarray(exact), np.asarray(exact_ggn)
    if not (np.all(np.isfinite(exact)) and np.all(np.isfinite(exact_ggn))):
        raise FloatingPointError("the exact Hessian or GGN diagonal contains non-finite values")
    return (exact, exact_seconds), (exact_ggn, exact_ggn_seconds)


class _NoProgress(contextlib.nullcontext):
    def update(self, count):
        del count


def _progress_bar(total: int, show: bool):
    """Return a tqdm bar on stderr, or a stand-in that shows nothing when `show` is false."""
    if not show:
        return _NoProgress()
    from tqdm import tqdm  # in the bench extra, so only a run with a progress bar needs it

    return tqdm(total=total, unit="probe", desc="estimates", file=sys.stderr)


def measure_estimators(params, inputs, labels, exact, exact_ggn, *, seeds, probe_counts,
                       chunk, progress):
    """Draw every estimator's probes; return the errors, variances and compiled calls.

    Returns a dict with `errors` (name -> per-seed errors against the exact Hessian
    diagonal), `errors_vs_ggn` (per-seed errors of GGN_MC against the exact GGN diagonal),
    `variances` (name -> per-coordinate variance of one estimate, pooled over the seeds),
    and `samplers` and `single_calls` for `time_estimators`.
    """
    out = {"errors": {}, "errors_vs_ggn": [], "variances": {}, "samplers": {},
           "single_calls": {}}
    bar = _progress_bar(len(ESTIMATORS) * seeds * probe_counts[-1], progress)
    with bar:
        for name, factory in ESTIMATORS.items():
            estimator = factory()
            sampler = make_chunk_sampler(estimator, params, inputs, labels)
            out["samplers"][name] = sampler
            out["single_calls"][name] = make_single_probe_call(estimator, params, inputs,
                                                               labels)
            references = {"hessian": exact}
            if name == GGN_MC:
                references["ggn"] = exact_ggn
            out["errors"][name], pooled = [], None
            for seed in range(seeds):
                errors, moments = draw_estimates(name, sampler, jax.random.key(seed + 1),
                                                 references, probe_counts, chunk, bar)
                out["errors"][name].append(errors["hessian"])
                if name == GGN_MC:
                    out["errors_vs_ggn"].append(errors["ggn"])
                pooled = moments if pooled is None else {
                    key: pooled[key] + moments[key] for key in moments}
            out["variances"][name] = coordinate_variance(pooled)
    return out


def run_study(*, batch, hidden, seeds, max_probes, chunk=100, timing_repeats=5,
              progress=True) -> dict:
    """Run the whole study and return its JSON-ready record (without command and wall time).

    Turns on float64 (`jax_enable_x64`), so that float32 rounding (about 1e-7 relative per
    operation) in the exact reference or in the sums over many estimates does not enter the
    errors measured.
    """
    jax.config.update("jax_enable_x64", True)
    inputs, labels = load_batch(batch)
    params = init_mlp_params(jax.random.key(0), (inputs.shape[1], hidden, 10))
    (exact, exact_seconds), (exact_ggn, exact_ggn_seconds) = compute_references(
        params, inputs, labels)
    probe_counts = [k for k in PROBE_COUNTS if k < max_probes] + [max_probes]
    measured = measure_estimators(params, inputs, labels, exact, exact_ggn, seeds=seeds,
                                  probe_counts=probe_counts, chunk=chunk, progress=progress)
    per_seed, per_seed_vs_ggn = measured["errors"], measured["errors_vs_ggn"]
    variances = measured["variances"]
    mean_errors = {name: np.mean(runs, axis=0).tolist() for name, runs in per_seed.items()}

    becker_lecun_fn = cpjax.becker_lecun_hessian_diag(mlp_loss)
    becker_lecun = jax.jit(lambda p, x, y: ravel_pytree(becker_lecun_fn(p, x, y))[0])
    becker_lecun_error = float(np.linalg.norm(np.asarray(becker_lecun(params, inputs, labels))
                                              - exact) / np.linalg.norm(exact))
    mean_errors[BECKER_LECUN] = [becker_lecun_error] * len(probe_counts)
    mean_errors[GGN_MC_VS_GGN] = np.mean(per_seed_vs_ggn, axis=0).tolist()

    one_probe, per_extra_probe = time_estimators(
        measured["single_calls"], measured["samplers"],
        lambda: becker_lecun(params, inputs, labels),
        min(chunk, max_probes), timing_repeats)
    one_probe[EXACT] = exact_seconds
    groups = parameter_groups(params)
    return {
        "setup": (f"digits, batch {batch}, tanh MLP {inputs.shape[1]}-{hidden}-10, "
                  f"{exact.size} parameters, float64, mean over {seeds} seed"
                  + "s" * (seeds > 1)),
        "batch": batch, "hidden": hidden, "seeds": seeds, "num_parameters": int(exact.size),
        "probe_counts": probe_counts,
        "exact_diag_norm": float(np.linalg.norm(exact)),
        "exact_ggn_relative_difference": float(np.linalg.norm(exact_ggn - exact)
                                               / np.linalg.norm(exact)),
        "mean_relative_error": mean_errors,
        "relative_error_per_seed": per_seed,
        "ggn_mc_relative_error_vs_exact_ggn_per_seed": per_seed_vs_ggn,
        "first_k_below_becker_lecun": {
            name: first_count_below(probe_counts, mean_errors[name], becker_lecun_error)
            for name in ESTIMATORS},
        "seconds_one_probe": one_probe,
        "seconds_per_extra_probe": per_extra_probe,
        "exact_ggn_seconds": exact_ggn_seconds,
        "timing": (f"jax.jit, float64; the {EXACT} and the exact GGN: one call after "
                   f"compiling; the others: median of interleaved calls, "
                   f"{timing_repeats * SINGLE_CALLS_PER_ROUND} of one probe and "
                   f"{timing_repeats} of a chunk. "
                   f"A call of K probes is modelled as one single-probe call plus K - 1 "
                   f"times the extra time per probe of a vmapped call of "
                   f"{min(chunk, max_probes)} probes"),
        "variance": {name: summarize_variance(variance, exact, groups)
                     for name, variance in variances.items()},
        "per_coordinate": {
            "note": "variance: the unbiased sample variance of one single-probe estimate per "
                    "coordinate, pooled over the seeds. Coordinates are in the order of "
                    "ravel_pytree(params).",
            "groups": {name: [part.start, part.stop] for name, part in groups.items()},
            "exact_hessian_diag": _compact(exact),
            "exact_ggn_diag": _compact(exact_ggn),
            "variance": {name: _compact(variance) for name, variance in variances.items()},
        },
    }


def format_error_table(record) -> str:
    """Return the markdown table of mean relative errors, one row per K."""
    errors = record["mean_relative_error"]
    names = list(errors)
    lines = ["| K | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for i, k in enumerate(record["probe_counts"]):
        cells = " | ".join(f"{errors[name][i]:.4g}" for name in names)
        lines.append(f"| {k} | {cells} |")
    return "\n".join(lines)


def format_cost_table(record) -> str:
    """Return the markdown table of wall times and of the first K that beats Becker-LeCun."""
    one_probe = record["seconds_one_probe"]
    per_extra_probe = record["seconds_per_extra_probe"]
    first_below = record["first_k_below_becker_lecun"]
    errors = record["mean_relative_error"]
    lines = ["| method | ms, one probe (one call) | ms per extra probe | error at largest K | "
             "first K below Becker-LeCun | its modelled time (ms) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in ESTIMATORS:
        k = first_below[name]
        passed = (f"{k} | {modelled_seconds(record, name, k) * 1e3:.3g}" if k
                  else "not reached | -")
        lines.append(f"| {name} | {one_probe[name] * 1e3:.3g} | "
                     f"{per_extra_probe[name] * 1e3:.3g} | {errors[name][-1]:.4g} | {passed} |")
    lines.append(f"| {BECKER_LECUN} | {one_probe[BECKER_LECUN] * 1e3:.3g} | - | "
                 f"{errors[BECKER_LECUN][0]:.4g} | - | - |")
    lines.append(f"| {EXACT} | {one_probe[EXACT] * 1e3:.4g} | - | 0 | - | - |")
    return "\n".join(lines)


def format_variance_table(record) -> str:
    """Return the markdown table of single-probe variance relative to the exact diagonal."""
    variance = record["variance"]
    groups = list(record["per_coordinate"]["groups"])
    lines = ["| estimator | Σ var / Σ exact² | " + " | ".join(groups)
             + " | median var / exact² |", "|---|---:|" + "---:|" * (len(groups) + 1)]
    for name, summary in variance.items():
        cells = " | ".join(f"{summary['per_group'][group]:.3g}" for group in groups)
        lines.append(f"| {name} | {summary['total']:.3g} | {cells} | "
                     f"{summary['ratio_quantiles']['0.5']:.3g} |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def figure_error_vs_probes(record):
    """Return a figure of the mean relative error against the number of probes K."""
    plt = _pyplot()
    probe_counts = record["probe_counts"]
    errors = record["mean_relative_error"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, values in errors.items():
        ax.loglog(probe_counts, values, label=name, **LINE_STYLES.get(name, {"marker": "o"}))
    # The error of a mean of K independent unbiased estimates falls as K^(-1/2).
    first = errors[HUTCHINSON][0]
    ax.loglog(probe_counts, [first / math.sqrt(k) for k in probe_counts], "k:", lw=1,
              label=r"$\propto K^{-1/2}$")
    ax.set_xlabel("number of probes K")
    return _finish_error_figure(fig, ax, record)


def _finish_error_figure(fig, ax, record):
    """Label the relative-error axis, add the setup as title, grid and legend; return `fig`."""
    ax.set_ylabel(r"$\|\bar d_K - d\|_2 \,/\, \|d\|_2$")
    ax.set_title(record["setup"], fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure_error_vs_time(record):
    """Return a figure of the mean relative error against the modelled wall time of K probes."""
    plt = _pyplot()
    probe_counts = record["probe_counts"]
    errors = record["mean_relative_error"]
    one_probe = record["seconds_one_probe"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name in ESTIMATORS:
        ax.loglog(modelled_seconds(record, name, probe_counts), errors[name], label=name,
                  **LINE_STYLES[name])
    ax.loglog([one_probe[BECKER_LECUN]], [errors[BECKER_LECUN][0]], "*", color="grey",
              markersize=12, label=BECKER_LECUN)
    ax.axvline(one_probe[EXACT], color="k", linestyle="--", lw=1,
               label=f"{EXACT} (error 0), {one_probe[EXACT]:.3g} s")
    ax.set_xlabel("wall time of K probes (s): one call plus K - 1 extra probes")
    return _finish_error_figure(fig, ax, record)


def figure_variance(record):
    """Return a figure of the single-probe variance relative to the exact diagonal.

    Left: `variance / exact²` per coordinate, sorted, over the coordinates where the exact
    value is not zero. Right: `Σ variance / Σ exact²` per parameter leaf.
    """
    plt = _pyplot()
    coordinates = record["per_coordinate"]
    exact = np.asarray(coordinates["exact_hessian_diag"])
    nonzero = exact != 0
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    for name, variance in coordinates["variance"].items():
        ratios = np.sort(np.asarray(variance)[nonzero] / np.square(exact[nonzero]))
        fraction = (np.arange(ratios.size) + 0.5) / ratios.size
        style = {key: value for key, value in LINE_STYLES[name].items()
                 if key in ("color", "linestyle")}
        left.semilogy(fraction, ratios, label=name, **style)
    left.set_xlabel("fraction of coordinates (sorted)")
    left.set_ylabel(r"variance of one estimate / exact$^2$")
    left.set_title(f"{int(nonzero.sum())} coordinates with a nonzero exact value", fontsize=8)
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)

    groups = list(coordinates["groups"])
    names = list(record["variance"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [record["variance"][name]["per_group"][group] for group in groups]
        right.bar(np.arange(len(groups)) + (i - (len(names) - 1) / 2) * width, values, width,
                  label=name, color=LINE_STYLES[name]["color"])
    right.set_yscale("log")
    right.set_xticks(np.arange(len(groups)), groups)
    right.set_ylabel(r"$\sum$ variance / $\sum$ exact$^2$ over the leaf")
    right.set_title("per parameter leaf", fontsize=8)
    right.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle(record["setup"], fontsize=9)
    fig.tight_layout()
    return fig


FIGURES = {"paper.png": figure_error_vs_probes, "paper_time.png": figure_error_vs_time,
           "paper_variance.png": figure_variance}


def main(argv=None) -> None:
    args = parse_args(argv)
    machine = describe_machine()
    command = "python " + shlex.join(sys.argv if argv is None else ["benchmarks/paper.py", *argv])
    started = time.perf_counter()
    record = run_study(batch=args.batch, hidden=args.hidden, seeds=args.seeds,
                       max_probes=args.max_probes, chunk=args.chunk,
                       timing_repeats=args.timing_repeats, progress=not args.no_progress)
    wall_time = time.perf_counter() - started

    print(f"Command: `{command}`\n")
    print(f"Relative error ||mean_K - exact||_2 / ||exact||_2 against the exact Hessian "
          f"diagonal, except the last column ({record['setup']}). The exact GGN diagonal is "
          f"{record['exact_ggn_relative_difference']:.4g} away from the exact Hessian "
          f"diagonal in the same measure.\n")
    print(format_error_table(record))
    print(f"\nWall time ({record['timing']}).\n")
    print(format_cost_table(record))
    print("\nVariance of one single-probe estimate, relative to the exact Hessian diagonal "
          "(GGN by Monte Carlo: about its own mean).\n")
    print(format_variance_table(record))
    print(f"\nMachine: {machine}")
    print(f"cpjax source: {describe_source()}")
    print(f"Total wall time (after Python imports): {wall_time:.1f} s")

    import matplotlib

    matplotlib.use("Agg")
    plt = _pyplot()
    args.out.mkdir(parents=True, exist_ok=True)
    for filename, make_figure in FIGURES.items():
        fig = make_figure(record)
        fig.savefig(args.out / filename, dpi=150)
        plt.close(fig)
    record = {"command": command, "machine": machine, "cpjax_source": describe_source(),
              "wall_time_s": wall_time, **record}
    (args.out / "paper.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"Wrote {', '.join(FIGURES)} and paper.json to {args.out}")


if __name__ == "__main__":
    main()
