"""The paper-reproduction study: `benchmarks/paper.py` and its notebook run at a tiny size.

Both compile every estimator once, so each test takes several seconds, mostly compiling.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_notebook_small

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
NOTEBOOK = ROOT / "notebooks" / "paper_reproduction.ipynb"
FIGURES = ("paper.png", "paper_time.png", "paper_variance.png")
TINY = ["--batch", "48", "--hidden", "6", "--seeds", "2", "--max-probes", "4", "--chunk", "2",
        "--timing-repeats", "1", "--no-progress"]


@pytest.fixture
def paper(monkeypatch):
    """Import benchmarks/paper.py as the module `paper`, with benchmarks/ on sys.path."""
    pytest.importorskip("sklearn")
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import paper

    return paper


def test_quick_defaults_yield_to_flags(paper):
    args = paper.parse_args(["--quick", "--seeds", "2"])
    assert args.seeds == 2
    assert args.batch == paper.QUICK_DEFAULTS["batch"]
    assert args.max_probes == paper.QUICK_DEFAULTS["max_probes"]
    full = paper.parse_args([])
    assert full.batch == paper.FULL_DEFAULTS["batch"]


def test_flags_below_one_rejected(paper, capsys):
    with pytest.raises(SystemExit):
        paper.parse_args(["--timing-repeats", "0"])
    assert "--timing-repeats must be at least 1" in capsys.readouterr().err


def test_script_writes_figures_and_json(paper, tmp_path, capsys):
    paper.main([*TINY, "--out", str(tmp_path)])
    printed = capsys.readouterr().out

    for name in FIGURES:
        assert (tmp_path / name).stat().st_size > 0, name
    record = json.loads((tmp_path / "paper.json").read_text())
    assert record["probe_counts"] == [1, 3, 4]
    assert record["num_parameters"] == 64 * 6 + 6 + 6 * 10 + 10

    stochastic = list(paper.ESTIMATORS)
    errors = record["mean_relative_error"]
    assert set(errors) == {*stochastic, paper.BECKER_LECUN, paper.GGN_MC_VS_GGN}
    for name, values in errors.items():
        assert len(values) == 3, name
        assert np.all(np.isfinite(values)), name
    for name in stochastic:
        assert len(record["relative_error_per_seed"][name]) == 2, name
    assert len(record["ggn_mc_relative_error_vs_exact_ggn_per_seed"]) == 2
    # GGN by Monte Carlo cannot come closer to the Hessian diagonal than the exact GGN does,
    # up to the sampling noise of 4 probes.
    assert errors[paper.GGN_MC][-1] > 0.5 * record["exact_ggn_relative_difference"]

    seconds = record["seconds_one_probe"]
    assert set(seconds) == {*stochastic, paper.BECKER_LECUN, paper.EXACT}
    assert all(value > 0 for value in seconds.values()), seconds
    assert set(record["seconds_per_extra_probe"]) == set(stochastic)

    coordinates = record["per_coordinate"]
    assert list(coordinates["groups"]) == ["b1", "b2", "w1", "w2"]
    assert len(coordinates["exact_hessian_diag"]) == record["num_parameters"]
    for name in stochastic:
        variance = np.asarray(coordinates["variance"][name])
        assert variance.shape == (record["num_parameters"],), name
        assert np.all(variance >= 0), name
        assert set(record["variance"][name]["per_group"]) == {"b1", "b2", "w1", "w2"}, name

    assert "| K |" in printed
    assert "first K below Becker-LeCun" in printed
    assert "Σ var / Σ exact²" in printed


def test_notebook_runs_small(tmp_path, monkeypatch):
    """Execute the notebook's code cells in order, with its small-size switch on."""
    pytest.importorskip("sklearn")
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")

    # Jupyter starts a notebook in its own folder. The notebook puts benchmarks/ on
    # sys.path, and monkeypatch restores sys.path afterwards.
    monkeypatch.chdir(NOTEBOOK.parent)
    monkeypatch.setattr(sys, "path", list(sys.path))
    namespace = run_notebook_small(NOTEBOOK, tmp_path)

    for name in FIGURES:
        assert (tmp_path / name).stat().st_size > 0, name
    record = namespace["record"]
    assert record["batch"] == namespace["STUDY"]["batch"]
    assert record["probe_counts"][-1] == namespace["STUDY"]["max_probes"]
