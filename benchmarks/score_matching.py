"""Score matching on whitened natural-image patches: exact, CP, Hutchinson and sliced.

Trains one energy model per method and patch size with `cpjax.score_matching`, from the
same initialization, with Adam, the same learning rate and the same sequence of
mini-batches, for the same budget of training wall time. The methods differ only in how the
Laplacian term of Hyvärinen's objective is computed: exactly (one HVP per input
dimension), by Curvature Propagation, by Hutchinson's estimator, or by sliced score
matching (which also projects the gradient term). Every method is scored by the exact
objective on held-out patches.

The methods train in rounds. In each round, in a new random order, every method runs
steps until its own training clock reaches the round's share of the budget, so that drifts
in machine load fall on all methods alike. Held-out evaluations run between rounds, off the
clocks. A separate table times one training step per method, interleaved the same way, and
reports medians. A last table gives the standard deviation of one estimate of the objective
per stochastic method, at the initial parameters and at CP-SM's final ones.

Run from the repository root:

    python benchmarks/score_matching.py [--budget 30] [--patch-sizes 8 16] [--model student_t]

`--quick` runs a small version in about a minute. The script prints markdown tables and
writes `score_matching.json`, `score_matching.png` (held-out objective versus training
time) and `score_matching_filters.png` (learned filters) to `--out`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from _common import describe_machine, describe_source, load_average

from cpjax import score_matching as sm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
LABELS = {"exact": "exact SM", "cp": "CP-SM", "hutchinson": "Hutchinson-SM",
          "sliced": "sliced SM"}
COLORS = {"exact": "black", "cp": "tab:red", "hutchinson": "tab:blue", "sliced": "tab:green"}
SPREAD_POINTS, SPREAD_DRAWS = 64, 64  # held-out patches and probe draws per patch
MODELS = {
    "student_t": (sm.init_student_t_experts, sm.student_t_experts_energy),
    "gaussian_rbm": (sm.init_gaussian_rbm, sm.gaussian_rbm_energy),
    "mlp": (lambda key, dim, width: sm.init_mlp_energy(key, dim, (width, width)),
            sm.mlp_energy),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    experiment = parser.add_argument_group("experiment")
    experiment.add_argument("--budget", type=float, default=30.0,
                            help="training wall time per method and patch size, in seconds "
                                 "(default 30)")
    experiment.add_argument("--patch-sizes", type=int, nargs="+", default=[8, 16],
                            help="sides of the square patches in pixels (default 8 16)")
    experiment.add_argument("--num-train", type=int, default=50_000,
                            help="training patches (default 50000)")
    experiment.add_argument("--num-test", type=int, nargs="+", default=[2000, 500],
                            help="held-out patches, one number per patch size or one for all "
                                 "(default 2000 500: the exact objective at d = 256 is "
                                 "costly)")
    experiment.add_argument("--rounds", type=int, default=10,
                            help="training rounds, each followed by a held-out evaluation "
                                 "(default 10)")
    experiment.add_argument("--repeats", type=int, default=15,
                            help="timed calls per method in the step-time table (default 15)")
    experiment.add_argument("--seed", type=int, default=0,
                            help="seed of the data, the initialization and the probes "
                                 "(default 0)")
    experiment.add_argument("--quick", action="store_true",
                            help="small run: 8x8 patches only, 5 s budget, 4 rounds, "
                                 "5 repeats, 500 held-out patches")

    model = parser.add_argument_group("model and training")
    model.add_argument("--model", choices=sorted(MODELS), default="student_t",
                       help="energy model (default student_t, a product of Student-t experts)")
    model.add_argument("--width", type=int, default=None,
                       help="number of experts, hidden units or MLP layer width "
                            "(default: the input dimension d)")
    model.add_argument("--batch", type=int, default=128, help="mini-batch size (default 128)")
    model.add_argument("--learning-rate", type=float, default=3e-3,
                       help="Adam learning rate (default 3e-3)")
    model.add_argument("--num-samples", type=int, default=1,
                       help="probes per data point for the stochastic methods (default 1)")

    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    if args.quick:
        args.patch_sizes, args.budget, args.rounds, args.repeats = [8], 5.0, 4, 5
        args.num_test = [500]
    if len(args.num_test) not in (1, len(args.patch_sizes)):
        parser.error(f"--num-test takes one number or one per patch size "
                     f"({len(args.patch_sizes)}), got {len(args.num_test)}")
    for name in ("batch", "num_samples", "num_train", "rounds", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, "
                         f"got {getattr(args, name)}")
    if args.width is not None and args.width < 1:
        parser.error(f"--width must be at least 1, got {args.width}")
    if args.budget <= 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    return args


def make_step(energy, estimator, optimizer, num_samples):
    """Return a jitted `step(params, state, train, indices, key) -> (params, state, loss)`."""
    loss = sm.score_matching_loss(energy, estimator, num_samples=num_samples)

    def step(params, state, train, indices, key):
        batch = jnp.take(train, indices, axis=0)
        value, grads = jax.value_and_grad(loss)(params, batch, key=key)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    return jax.jit(step)


def make_evaluator(energy, test, chunk=128):
    """Return `evaluate(params)`: the exact objective at every held-out patch, as a NumPy array."""
    objective = jax.jit(jax.vmap(sm.score_matching_objective(energy, "exact"), (None, 0)))
    chunks = [jnp.asarray(test[i:i + chunk]) for i in range(0, len(test), chunk)]

    def evaluate(params):
        return np.concatenate([np.asarray(objective(params, c), np.float64) for c in chunks])

    return evaluate


def mean_and_standard_error(values):
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size))


def make_spread(energy, points, draws, seed):
    """Return `spread(params)`: per estimator, the standard deviation of one estimate of J.

    The deviation is over `draws` probe draws at each of `points` and is then averaged over
    the points. It isolates the estimator's own noise from the noise of mini-batches.
    """
    functions = {}
    for name in ("cp", "hutchinson", "sliced"):
        objective = jax.vmap(sm.score_matching_objective(energy, name), (None, 0, 0))

        def estimates(params, keys, objective=objective):
            return jax.vmap(lambda key: objective(
                params, points, jax.random.split(key, points.shape[0])))(keys)

        functions[name] = jax.jit(estimates)
    keys = jax.random.split(jax.random.key(seed), draws)

    def spread(params):
        return {name: float(np.mean(np.std(np.asarray(f(params, keys), np.float64), axis=0,
                                           ddof=1)))
                for name, f in functions.items()}

    return spread


def batch_indices(seed, step, num_train, batch):
    """Return the mini-batch of training step `step`, the same for every method."""
    return np.random.default_rng([seed, step]).integers(0, num_train, batch)


def time_steps(steps, params, state, train, batch, repeats, seed):
    """Return method -> median seconds of one step, in a new random order per repeat."""
    indices = jnp.asarray(batch_indices(seed, 0, train.shape[0], batch))
    key = jax.random.key(seed)
    times = {name: [] for name in steps}
    order = np.random.default_rng(seed)
    for _ in range(repeats):
        for index in order.permutation(len(steps)):
            name = list(steps)[index]
            started = time.perf_counter()
            jax.block_until_ready(steps[name](params, state, train, indices, key))
            times[name].append(time.perf_counter() - started)
    return {name: float(np.median(values)) for name, values in times.items()}


def train_interleaved(steps, params, state, train, evaluate, args, progress):
    """Train every method for `args.budget` seconds of its own clock, in interleaved rounds.

    Returns method -> dict with the final params, the held-out objective per patch at the
    end ("values") and the history of
    (training seconds, steps, held-out mean, held-out standard error).
    """
    initial = mean_and_standard_error(evaluate(params))
    runs = {name: {"params": params, "state": state, "clock": 0.0, "steps": 0,
                   "history": [(0.0, 0, *initial)]} for name in steps}
    base_key = jax.random.key(args.seed + 1)
    order = np.random.default_rng(args.seed + 2)
    for round_index in range(1, args.rounds + 1):
        target = args.budget * round_index / args.rounds
        for index in order.permutation(len(steps)):
            name = list(steps)[index]
            run = runs[name]
            while run["clock"] < target:
                indices = batch_indices(args.seed, run["steps"], train.shape[0], args.batch)
                key = jax.random.fold_in(base_key, run["steps"])
                started = time.perf_counter()
                run["params"], run["state"], loss = steps[name](
                    run["params"], run["state"], train, jnp.asarray(indices), key)
                jax.block_until_ready(loss)
                run["clock"] += time.perf_counter() - started
                run["steps"] += 1
            if not np.all([np.isfinite(leaf).all()
                           for leaf in jax.tree_util.tree_leaves(run["params"])]):
                raise FloatingPointError(f"{name}: parameters became NaN or inf after "
                                         f"{run['steps']} steps; lower --learning-rate.")
            run["values"] = evaluate(run["params"])
            run["history"].append((run["clock"], run["steps"],
                                   *mean_and_standard_error(run["values"])))
        progress(round_index, runs)
    return runs


def format_step_table(step_times, batch) -> str:
    lines = ["| d | " + " | ".join(f"{LABELS[m]} ms" for m in sm.ESTIMATORS)
             + " | exact / CP | Hutchinson / CP |",
             "|---:|" + "---:|" * (len(sm.ESTIMATORS) + 2)]
    for dim, times in step_times.items():
        cells = " | ".join(f"{1e3 * times[m]:.1f}" for m in sm.ESTIMATORS)
        lines.append(f"| {dim} | {cells} | {times['exact'] / times['cp']:.1f} "
                     f"| {times['hutchinson'] / times['cp']:.2f} |")
    return "\n".join(lines)


def format_spread_table(spreads) -> str:
    names = ("cp", "hutchinson", "sliced")
    lines = ["| d | parameters | " + " | ".join(LABELS[n] for n in names) + " |",
             "|---:|---|" + "---:|" * len(names)]
    for dim, by_params in spreads.items():
        for parameters_label, values in by_params.items():
            cells = " | ".join(f"{values[n]:.2f}" for n in names)
            lines.append(f"| {dim} | {parameters_label} | {cells} |")
    return "\n".join(lines)


def format_result_table(results) -> str:
    """Tabulate the final held-out objective, with each method's paired difference to CP-SM."""
    lines = ["| d | method | steps | train s | ms per step | held-out J at start "
             "| held-out J at end ± SE | minus CP-SM ± paired SE |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for dim, runs in results.items():
        for name in sm.ESTIMATORS:
            history = runs[name]["history"]
            seconds, steps, mean, se = history[-1]
            difference = runs[name]["values"] - runs["cp"]["values"]
            paired = ("—" if name == "cp" else
                      "{:+.3f} ± {:.3f}".format(*mean_and_standard_error(difference)))
            lines.append(f"| {dim} | {LABELS[name]} | {steps} | {seconds:.1f} "
                         f"| {1e3 * seconds / steps:.2f} | {history[0][2]:.3f} "
                         f"| {mean:.3f} ± {se:.3f} | {paired} |")
    return "\n".join(lines)


def plot_objective(path: Path, results, title: str) -> None:
    """Plot the held-out objective against training wall time (top) and steps (bottom)."""
    fig, axes = plt.subplots(2, len(results), figsize=(5.5 * len(results), 7.5), squeeze=False)
    for column, (dim, runs) in enumerate(results.items()):
        side = int(round(np.sqrt(dim)))
        for row, (index, label) in enumerate([(0, "training wall time (s)"),
                                              (1, "training steps")]):
            ax = axes[row, column]
            for name in sm.ESTIMATORS:
                history = np.array(runs[name]["history"])
                ax.errorbar(history[:, index], history[:, 2], yerr=history[:, 3], marker="o",
                            markersize=3, capsize=2, color=COLORS[name], label=LABELS[name])
            ax.set_xlabel(label)
            ax.set_ylabel("exact score-matching objective, held out")
            ax.set_title(f"{side}×{side} patches, d = {dim}")
            if row == 1:
                ax.set_xscale("symlog", linthresh=10)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def filter_mosaic(filters, count=64):
    """Tile up to `count` filters, largest norm first, each scaled to [-1, 1], into one image."""
    filters = np.asarray(filters)
    side = int(round(np.sqrt(filters.shape[0])))
    order = np.argsort(-np.linalg.norm(filters, axis=0))[:count]
    columns = int(np.ceil(np.sqrt(order.size)))
    rows = int(np.ceil(order.size / columns))
    mosaic = np.full((rows * (side + 1) + 1, columns * (side + 1) + 1), np.nan)
    for position, index in enumerate(order):
        tile = filters[:, index].reshape(side, side)
        tile = tile / max(np.abs(tile).max(), 1e-12)
        r, c = divmod(position, columns)
        top, left = 1 + r * (side + 1), 1 + c * (side + 1)
        mosaic[top:top + side, left:left + side] = tile
    return mosaic


def plot_filters(path: Path, results, title: str) -> None:
    fig, axes = plt.subplots(len(results), len(sm.ESTIMATORS),
                             figsize=(3.2 * len(sm.ESTIMATORS), 3.7 * len(results)),
                             squeeze=False, layout="constrained")
    for row, (dim, runs) in zip(axes, results.items(), strict=True):
        for ax, name in zip(row, sm.ESTIMATORS, strict=True):
            filters = sm.first_layer_filters(runs[name]["params"])
            ax.imshow(filter_mosaic(filters), cmap="gray", vmin=-1, vmax=1)
            ax.set_title(f"{LABELS[name]}, d = {dim}, {runs[name]['steps']} steps", fontsize=9)
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=130)
    plt.close(fig)






def run_patch_size(patch_size, num_test, args, log):
    """Time the steps and train all methods on one patch size.

    Returns (step times, runs, estimator spreads at the initial and CP-SM's final params).
    """
    data = sm.load_whitened_patches(patch_size, args.num_train, num_test, seed=args.seed)
    dim = patch_size * patch_size
    init, energy = MODELS[args.model]
    params = init(jax.random.key(args.seed), dim, args.width or dim)
    optimizer = optax.adam(args.learning_rate)
    state = optimizer.init(params)
    train = jnp.asarray(data.train)
    steps = {name: make_step(energy, name, optimizer, args.num_samples)
             for name in sm.ESTIMATORS}
    evaluate = make_evaluator(energy, data.test)

    compile_started = time.perf_counter()
    indices = jnp.asarray(batch_indices(args.seed, 0, train.shape[0], args.batch))
    for step in steps.values():
        jax.block_until_ready(step(params, state, train, indices, jax.random.key(0)))
    log(f"d = {dim}: compiled the four steps in {time.perf_counter() - compile_started:.1f} s")

    step_times = time_steps(steps, params, state, train, args.batch, args.repeats, args.seed)
    log(f"d = {dim}: median step ms " + ", ".join(
        f"{name} {1e3 * t:.1f}" for name, t in step_times.items()))

    def progress(round_index, runs):
        log(f"d = {dim}: round {round_index}/{args.rounds}: " + ", ".join(
            f"{name} {run['steps']} steps J {run['history'][-1][2]:.3f}"
            for name, run in runs.items()))

    runs = train_interleaved(steps, params, state, train, evaluate, args, progress)

    spread = make_spread(energy, jnp.asarray(data.test[:SPREAD_POINTS]), SPREAD_DRAWS,
                         args.seed + 3)
    spreads = {"initial": spread(params), "CP-SM's final": spread(runs["cp"]["params"])}
    return step_times, runs, spreads


def main(argv=None) -> None:
    args = parse_args(argv)
    machine = describe_machine()
    command = "python " + shlex.join(
        sys.argv if argv is None else ["benchmarks/score_matching.py", *argv])
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    num_tests = args.num_test * len(args.patch_sizes) if len(args.num_test) == 1 else args.num_test
    step_times, results, spreads = {}, {}, {}
    for patch_size, num_test in zip(args.patch_sizes, num_tests, strict=True):
        dim = patch_size * patch_size
        step_times[dim], results[dim], spreads[dim] = run_patch_size(patch_size, num_test,
                                                                     args, log)
    wall_time = time.perf_counter() - started
    load_end = load_average()

    width = args.width or "d"
    setup = (f"{args.model} energy, width {width}, Adam lr {args.learning_rate}, batch "
             f"{args.batch}, {args.num_samples} probe(s) per point, float32, "
             f"{args.budget:g} s of training per method, held-out patches {num_tests}")
    print(f"Command: `{command}`\n")
    print(f"Median wall time of one training step (loss, θ-gradient and Adam update; "
          f"{args.repeats} interleaved calls; {setup}).\n")
    print(format_step_table(step_times, args.batch))
    print("\nExact score-matching objective on held-out whitened patches after the same "
          "training wall time (lower is better; ± is the standard error over held-out "
          "patches).\n")
    print(format_result_table(results))
    print(f"\nStandard deviation of one single-probe estimate of J(θ; x), over "
          f"{SPREAD_DRAWS} probe draws, averaged over {SPREAD_POINTS} held-out patches.\n")
    print(format_spread_table(spreads))
    print(f"\nMachine: {machine}; 1-minute load average {load_end:.2f} at the end")
    print(f"cpjax source: {describe_source()}")
    print(f"Total wall time (after Python imports): {wall_time:.1f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    plot_objective(args.out / "score_matching.png", results, setup)
    plot_filters(args.out / "score_matching_filters.png", results,
                 f"first-layer filters in whitened space, largest norm first ({setup})")
    record = {
        "command": command, "setup": setup, "machine": machine, "load_end": load_end,
        "cpjax_source": describe_source(), "wall_time_s": wall_time,
        "step_seconds": {str(d): t for d, t in step_times.items()},
        "estimate_std": {str(d): s for d, s in spreads.items()},
        "history": {str(d): {name: run["history"] for name, run in runs.items()}
                    for d, runs in results.items()},
    }
    (args.out / "score_matching.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"Wrote {args.out / 'score_matching.png'}, {args.out / 'score_matching_filters.png'} "
          f"and {args.out / 'score_matching.json'}")


if __name__ == "__main__":
    main()
