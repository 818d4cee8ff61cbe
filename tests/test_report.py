"""Figures (checked on their data) and the self-contained HTML report, including a real headless-browser render."""

from __future__ import annotations

import html
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from plotly.offline import get_plotlyjs

from gradalign import analysis as A
from gradalign import figures as F
from gradalign import report as R

_spec = importlib.util.spec_from_file_location("_synthetic_study", Path(__file__).with_name("test_analysis.py"))
_synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_synthetic)
synthetic_history, TARGET = _synthetic.synthetic_history, _synthetic.TARGET

SECTIONS = ("overview", "budget", "figures", "cells", "significance", "warnings", "provenance")
FIGURE_IDS = (
    "fig-accuracy",
    "fig-scaling",
    "fig-pareto-parallelism",
    "fig-pareto-time",
    "fig-alignment",
    "fig-hyperparameters",
)
RANGES = {"lr": (1e-3, 1.0), "beta": (1e-4, 1.0)}


@pytest.fixture(scope="module")
def history():
    return synthetic_history(epochs=30)


@pytest.fixture(scope="module")
def cells(history):
    return A.summarize_cells(history, TARGET)


@pytest.fixture(scope="module")
def report_path(history, cells, tmp_path_factory):
    warnings = A.edge_warnings(A.best_trials(history[history["phase"] == "tune"]), RANGES, tol=0.1)
    return R.write_report(
        tmp_path_factory.mktemp("report") / "study.html",
        history,
        cells,
        summary={"target": TARGET, "finding": "gradalign keeps <accuracy> up to B=512"},
        warnings=warnings,
        provenance={"command": "python -m studies.batch_scaling --smoke-test"},
        budget={"epochs": 30, "counted in": "examples", "seeds": 3},
        title="Synthetic batch-scaling study",
        verdict=[
            "Large-batch SGD stays within 1 point of <b>small-batch SGD</b> up to B = 256.",
            "GradAlign − large-batch SGD at B = 512: +5.0 points.",
        ],
    )


def _trace(fig, name):
    matches = [t for t in fig.data if t.name == name]
    assert len(matches) == 1, [t.name for t in fig.data]
    return matches[0]


def test_accuracy_figure_shows_cell_means_with_std_and_n(cells):
    fig = F.accuracy_vs_x(cells)
    assert {t.name for t in fig.data} == {"gradalign", "large_batch_sgd"}
    expected = cells[cells["algorithm"] == "gradalign"].sort_values("batch_size")
    trace = _trace(fig, "gradalign")
    assert list(trace.x) == expected["batch_size"].tolist()
    assert np.allclose(trace.y, expected["acc_mean"])
    assert np.allclose(trace.error_y.array, expected["acc_std"])
    assert [row[0] for row in trace.customdata] == expected["n_seeds"].tolist()
    assert fig.layout.xaxis.type == "log" and list(fig.layout.xaxis.tickvals) == [64, 128, 256, 512, 1024]


def test_scaling_figure_draws_points_fit_perfect_scaling_and_critical_batches(cells, history):
    fits = A.fit_critical_batches(cells)
    fig = F.steps_vs_batch(cells, fits=fits, noise={"gradalign": 250.0})
    points = _trace(fig, "large_batch_sgd")
    assert list(points.x) == [64, 128, 256, 512]  # B=1024 never reached the target
    perfect = _trace(fig, "perfect scaling (S ∝ 1/B)")
    assert np.allclose(np.asarray(perfect.y) * np.asarray(perfect.x), perfect.x[0] * perfect.y[0])
    fit = fits["gradalign"]
    curve = _trace(fig, "gradalign fit")
    assert np.allclose(curve.y, fit["S_min"] * (1 + fit["B_crit"] / np.asarray(curve.x)))
    star = [t for t in fig.data if t.name.startswith("gradalign B_crit=") and t.mode == "markers"][0]
    assert star.x[0] == pytest.approx(fit["B_crit"]) and star.y[0] == pytest.approx(2 * fit["S_min"])
    predicted = [t for t in fig.data if "B_simple" in t.name]
    assert len(predicted) == 1 and predicted[0].x[0] == 250.0
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"


def test_pareto_figure_front_matches_analysis(cells):
    fig = F.pareto_figure(cells, x="batch_size", y="acc_mean")
    front = A.pareto_front(cells, x="batch_size", y="acc_mean")
    assert list(_trace(fig, "Pareto front").x) == front["batch_size"].tolist()
    timed = F.pareto_figure(cells, x="wall_time_mean", y="acc_mean", maximize_x=False)
    front = A.pareto_front(cells, x="wall_time_mean", y="acc_mean", maximize_x=False)
    assert np.allclose(_trace(timed, "Pareto front").x, front["wall_time_mean"])


def test_alignment_figure_has_one_line_per_cell_and_metric(history):
    fig = F.alignment_over_training(history)
    assert len(fig.data) == 2 * 2 * 5  # metrics x algorithms x batch sizes
    seeds = history[
        (history["phase"] == "seed") & (history["algorithm"] == "gradalign") & (history["batch_size"] == 256)
    ]
    mean_v = seeds.groupby("evaluation")["grad_variance"].mean()
    line = [t for t in fig.data if t.name == "batch_size=256" and np.allclose(t.y, mean_v)]
    assert len(line) == 1


def test_hyperparameter_figure_shows_chosen_values(cells):
    fig = F.hyperparameters_vs_x(cells)
    lr = [t for t in fig.data if t.name == "gradalign" and t.xaxis == "x"][0]
    assert np.allclose(lr.y, cells[cells["algorithm"] == "gradalign"].sort_values("batch_size")["lr"])
    assert not [t for t in fig.data if t.name == "large_batch_sgd" and t.xaxis == "x2"]  # no beta for SGD


def test_report_is_self_contained_with_every_section_and_figure(report_path):
    text = Path(report_path).read_text(encoding="utf-8")
    assert Path(report_path).exists() and text.startswith("<!DOCTYPE html>")
    assert not re.search(r"<script[^>]+src=", text), "every script must be inline"
    assert text.count(get_plotlyjs()) == 1, "plotly.js must be embedded exactly once"
    outside = text.replace(get_plotlyjs(), "")  # the bundle itself names a CDN for geo maps, never fetched here
    assert "cdn.plot.ly" not in outside and not re.search(r"src=[\"']?https?:", outside)
    for section in SECTIONS:
        assert f'<section id="{section}">' in text
    for fig_id in FIGURE_IDS:
        assert f'id="{fig_id}"' in text
    assert "python -m studies.batch_scaling --smoke-test" in text and "abc1234" in text
    assert "gradalign keeps &lt;accuracy&gt;" in text  # user text is escaped
    assert "at the upper edge of" in text and "significant at 0.05" in text
    verdict = text.index('<div id="verdict"')  # the verdict opens the report, before tables and figures
    assert verdict < text.index('<section id="figures">') and verdict < text.index('<section id="cells">')
    assert "of &lt;b&gt;small-batch SGD&lt;/b&gt; up to B = 256" in text


def test_report_degrades_on_partial_and_federated_studies(history, tmp_path):
    tune_only = history[history["phase"] == "tune"]
    path = R.write_report(
        tmp_path / "partial.html",
        tune_only,
        A.summarize_cells(tune_only, TARGET),
        summary={},
        warnings=[],
        provenance={},
        budget={},
    )
    text = path.read_text(encoding="utf-8")
    assert "No cells." in text and "No warnings." in text
    fed = history.replace({"algorithm": {"large_batch_sgd": "fedavg", "gradalign": "fedga"}})
    fed = fed.assign(alpha=fed["batch_size"] / 1024, partition="dirichlet")
    fed_cells = A.summarize_cells(fed, TARGET, group=("algorithm", "alpha"))
    path = R.write_report(
        tmp_path / "fed.html",
        fed,
        fed_cells,
        summary={"target": TARGET},
        warnings=[],
        provenance={},
        budget={},
        title="Federated study",
        x="alpha",
    )
    text = path.read_text(encoding="utf-8")
    assert 'id="fig-accuracy"' in text and 'id="fig-scaling"' not in text
    assert "fedga" in text and "fedavg" in text and "significant at 0.05" in text


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


# Appended to <head>: records JS errors (uncaught, rejected promises, console.error) and, after load, writes
# what each plotly div rendered into a <pre> that --dump-dom then prints.
_PROBE = """<script>
window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push("error: " + e.message); });
window.addEventListener("unhandledrejection", function (e) { window.__errors.push("rejection: " + e.reason); });
(function () { var original = console.error; console.error = function () {
  window.__errors.push("console.error: " + Array.prototype.join.call(arguments, " "));
  return original.apply(console, arguments); }; })();
window.addEventListener("load", function () { setTimeout(function () {
  var figures = Array.prototype.map.call(document.querySelectorAll(".plotly-graph-div"), function (d) {
    return {id: d.id, svg: d.querySelectorAll("svg.main-svg").length, traces: (d.data || []).length}; });
  var pre = document.createElement("pre"); pre.id = "render-probe";
  pre.textContent = JSON.stringify({errors: window.__errors, figures: figures,
                                    plotly: typeof Plotly === "undefined" ? null : Plotly.version});
  document.body.appendChild(pre); }, 1000); });
</script>"""


@pytest.mark.timeout(120)
def test_report_renders_in_headless_chromium_without_js_errors(report_path, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed (CI: apt-get update && apt-get install -y chromium)")
    probed = tmp_path / "probed.html"
    probed.write_text(
        Path(report_path).read_text(encoding="utf-8").replace("<head>", "<head>" + _PROBE, 1), encoding="utf-8"
    )
    run = subprocess.run(
        [
            browser,
            "--headless=new",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=15000",
            "--dump-dom",
            probed.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    match = re.search(r'<pre id="render-probe">(.*?)</pre>', run.stdout, re.S)
    assert match, f"no probe output (rc={run.returncode}); stderr tail:\n{run.stderr[-2000:]}"
    probe = json.loads(html.unescape(match.group(1)))
    assert probe["errors"] == [] and probe["plotly"], probe
    assert 'id="verdict"' in run.stdout and run.stdout.index('id="verdict"') < run.stdout.index("data-figure=")
    rendered = {f["id"]: f for f in probe["figures"]}
    for fig_id in FIGURE_IDS:
        assert rendered[fig_id]["svg"] > 0 and rendered[fig_id]["traces"] > 0, rendered
    console = [
        line for line in run.stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)
    ]
    assert console == [], console


def test_report_shows_comparison_records_and_critical_batch_intervals(history, cells, tmp_path):
    from gradalign.comparisons import comparison_records
    from gradalign.critical_batch import critical_batch_intervals

    trials = A.trial_table(history, TARGET, phase="seed")
    records = comparison_records(trials, x="batch_size", pairs=[("gradalign", "large_batch_sgd")], tolerance=0.01)
    table = R.comparison_table(records)
    assert list(table.columns[:4]) == ["a", "b", "x", "metric"] and len(table) == 5 and table["paired"].all()
    fits = critical_batch_intervals(trials, ["gradalign", "large_batch_sgd"], n_resamples=100)["fits"]
    critical = R.critical_batch_table(fits, {}).set_index("algorithm")
    assert critical.loc["large_batch_sgd", "B_crit low"] <= critical.loc["large_batch_sgd", "B_crit (fit)"]
    assert critical.loc["large_batch_sgd", "B_crit (fit)"] <= critical.loc["large_batch_sgd", "B_crit high"]
    path = R.write_report(
        tmp_path / "records.html",
        history,
        cells,
        summary={"target": TARGET},
        warnings=[],
        provenance={},
        budget={},
        significance_table=table,
        fits=fits,
    )
    text = path.read_text(encoding="utf-8")
    assert "Comparisons over seeds (paired t-test where the seeds are shared, else Welch)" in text
    assert "B_crit low" in text and '<td class="text">better</td>' in text  # GradAlign at B >= 256


def test_the_tuning_figure_shows_every_trial_the_range_and_the_chosen_configuration():
    from gradalign.analysis import tuning_trials
    from gradalign.figures import tuning_figure

    history = synthetic_history(seeds=2, epochs=5)
    trials = tuning_trials(history)
    tuned = history[history["phase"] == "tune"]
    assert len(trials) == tuned.groupby("trial_id").ngroups and set(trials["phase"]) == {"tune"}
    for cell, part in trials.groupby("cell"):  # exactly one tuning trial is the configuration the seed runs ran
        seeded = history[(history["cell"] == cell) & (history["phase"] == "seed")]
        [chosen] = part.loc[part["chosen"], "lr"]
        assert chosen == pytest.approx(seeded["lr"].iloc[0])
    ranges = {"gradalign": {"lr": (1e-3, 10.0)}, "large_batch_sgd": {"lr": (1e-3, 10.0)}}
    fig = tuning_figure(trials, ranges)
    stars = [t for t in fig.data if t.name == "chosen"]
    assert len(stars) == trials["cell"].nunique()
    assert sorted({s["x0"] for s in fig.layout.shapes}) == [1e-3, 10.0]  # the range's bounds, in every panel
    assert len(fig.layout.shapes) == 2 * trials["cell"].nunique()
