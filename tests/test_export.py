"""Static figure export (PNG, SVG, PDF) through Kaleido and a real headless Chromium; the study scripts' --export."""

from __future__ import annotations

import importlib.util
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import plotly.graph_objects as go
import pytest
from helpers import study_protocol

from gradalign import analysis as A
from gradalign import report as R
from gradalign.config import ConfigError
from gradalign.export import ExportUnavailable, find_browser, parse_formats, write_figures
from gradalign.study_file import write_study_file
from studies import batch_scaling, federated

_spec = importlib.util.spec_from_file_location("_synthetic_study", Path(__file__).with_name("test_analysis.py"))
_synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_synthetic)
synthetic_history, TARGET = _synthetic.synthetic_history, _synthetic.TARGET

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def browser():
    try:
        return find_browser()
    except ExportUnavailable as err:
        pytest.skip(f"no usable Chrome/Chromium for static export here ({err})")


def _figures():
    bars = go.Figure(go.Bar(x=["sgd", "gradalign"], y=[0.91, 0.95], name="accuracy"))
    lines = go.Figure(go.Scatter(x=[64, 128, 256], y=[300, 180, 120], mode="lines+markers", name="steps"))
    lines.update_layout(title={"text": "β and steps"}, xaxis_type="log")
    return [("fig-bars", "Bars.", bars), ("fig-lines", "Lines.", lines)]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", data[:16]
    return struct.unpack(">II", data[16:24])


def _check_file(path: Path, fmt: str) -> None:
    data = path.read_bytes()
    assert len(data) > 500, (path, len(data))
    if fmt == "png":
        assert data[:8] == PNG_MAGIC
    elif fmt == "svg":
        root = ET.fromstring(data)
        assert root.tag.rsplit("}", 1)[-1] == "svg" and root.findall(".//{*}path"), root.tag
    else:
        assert data.startswith(b"%PDF-") and b"%%EOF" in data[-1024:]


def _study_folder(out: Path, history, kind: str = "batch-scaling") -> Path:
    """A study folder as `run_plan` leaves it (study.json, one parquet per cell and phase), built without training."""
    for (cell, phase), part in history.groupby(["cell", "phase"]):
        (out / "cells" / cell).mkdir(parents=True, exist_ok=True)
        part.to_parquet(out / "cells" / cell / f"{phase}.parquet")
    write_study_file(out, study_protocol(kind=kind, target=TARGET), {})
    return out


def _federated_history():
    history = synthetic_history(seeds=2, epochs=5)
    history = history.replace({"algorithm": {"large_batch_sgd": "fedavg", "gradalign": "fedga"}})
    alpha = history["batch_size"] / 64.0
    return history.assign(
        alpha=alpha,
        partition="dirichlet",
        split="dirichlet:" + alpha.map("{:g}".format),
        local_steps=5,
        participation=0.5,
        label_tv=1.0 / (1.0 + alpha),
        setting="dirichlet:" + alpha.map("{:g}".format) + ", p=0.5, K=5",
        cell=history["algorithm"] + "-a" + alpha.map("{:g}".format),
    )


def test_formats_are_parsed_and_unknown_ones_refused_naming_the_valid_ones():
    assert parse_formats("png, SVG,pdf,png") == ("png", "svg", "pdf")
    assert parse_formats(["pdf"]) == ("pdf",)
    for bad, named in (("png,gif", "'gif'"), ("jpeg", "'jpeg'"), (" , ", "at least one")):
        with pytest.raises(ConfigError, match=named) as err:
            parse_formats(bad)
        assert "png, svg, pdf" in str(err.value)


def test_an_unknown_format_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="'gif'"):
        write_figures(_figures(), tmp_path / "figures", "png,gif")
    with pytest.raises(ConfigError, match="figure_id"):
        write_figures([("../escape", "", go.Figure())], tmp_path / "figures", "png")
    history = synthetic_history(seeds=2, epochs=5)
    with pytest.raises(ConfigError, match="'tiff'"):
        R.write_report(
            tmp_path / "report.html",
            history,
            A.summarize_cells(history, TARGET),
            summary={},
            warnings=[],
            provenance={},
            budget={},
            export=("png", "tiff"),
        )
    assert list(tmp_path.iterdir()) == []


def test_the_study_scripts_refuse_a_bad_format_or_a_missing_browser_before_training(tmp_path, capsys, monkeypatch):
    out = tmp_path / "never"
    with pytest.raises(SystemExit):
        batch_scaling.main(["--export", "png,bmp", "--out", str(out)])
    assert "--export" in capsys.readouterr().err
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))
    with pytest.raises(ExportUnavailable, match="apt-get install chromium"):
        find_browser()
    for main in (batch_scaling.main, federated.main):
        assert main(["--export", "pdf", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "no-such-chromium" in err and "apt-get install chromium" in err and "make browser" in err
    assert not out.exists()


def test_a_browser_that_does_not_start_is_refused_and_the_html_report_is_still_written(tmp_path, monkeypatch):
    false = Path("/bin/false")
    if not false.is_file():
        pytest.skip("no /bin/false to stand for a broken browser")
    monkeypatch.setenv("BROWSER_PATH", str(false))
    with pytest.raises(ExportUnavailable, match="exits with 1 on --version"):
        find_browser()
    history = synthetic_history(seeds=2, epochs=5)
    with pytest.raises(ExportUnavailable, match="figure export with '/bin/false' failed"):
        R.write_report(
            tmp_path / "report.html",
            history,
            A.summarize_cells(history, TARGET),
            summary={},
            warnings=[],
            provenance={},
            budget={},
            export=("png",),
            browser=str(false),
        )
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert 'data-figure="fig-accuracy"' in html and "Static copies" not in html
    assert list((tmp_path / "figures").iterdir()) == []


def test_figures_are_written_as_valid_png_svg_and_pdf_of_the_asked_size(tmp_path, browser):
    written = write_figures(
        _figures(), tmp_path / "figures", "png,svg,pdf", browser=browser, width=400, height=300, png_scale=2
    )
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "fig-bars.pdf",
        "fig-bars.png",
        "fig-bars.svg",
        "fig-lines.pdf",
        "fig-lines.png",
        "fig-lines.svg",
    ]
    for fig_id, files in written.items():
        assert list(files) == ["png", "svg", "pdf"]
        for fmt, path in files.items():
            assert path == tmp_path / "figures" / f"{fig_id}.{fmt}"
            _check_file(path, fmt)
        assert _png_size(files["png"]) == (800, 600)  # layout px x png_scale
        svg = ET.fromstring(files["svg"].read_bytes())
        assert (float(svg.get("width")), float(svg.get("height"))) == (400, 300)
    assert "gradalign" in written["fig-bars"]["svg"].read_text(encoding="utf-8")  # the axis labels are drawn


def test_a_figure_keeps_its_own_layout_height_unless_told(tmp_path, browser):
    tall = go.Figure(go.Scatter(y=[1, 3, 2]), layout={"height": 700})
    written = write_figures([("fig-tall", "", tall)], tmp_path, ["png"], browser=browser, png_scale=1)
    assert _png_size(written["fig-tall"]["png"]) == (900, 700)  # default width, the layout's height


def test_report_only_rebuild_exports_every_report_figure_in_every_format(tmp_path, browser, capsys):
    history = synthetic_history(seeds=2, epochs=5)
    out = _study_folder(tmp_path / "study", history)
    assert batch_scaling.main(["--report-only", "--out", str(out), "--export", "png,svg,pdf"]) == 0
    assert f"figures (png, svg, pdf): {out / 'figures'}" in capsys.readouterr().out
    html = (out / "report.html").read_text(encoding="utf-8")
    ids = re.findall(r'<figure class="plot" data-figure="([^"]+)"', html)
    assert ids == [
        "fig-accuracy",
        "fig-scaling",
        "fig-pareto-parallelism",
        "fig-pareto-time",
        "fig-alignment",
        "fig-hyperparameters",
        "fig-tuning",
    ]
    files = sorted(p.name for p in (out / "figures").iterdir())
    assert files == sorted(f"{i}.{fmt}" for i in ids for fmt in ("png", "svg", "pdf"))
    for name in files:
        _check_file(out / "figures" / name, name.rsplit(".", 1)[1])
        assert f'href="figures/{name}"' in html  # the report links its static copies
    assert (out / "summary.json").exists() and (out / "cells.csv").exists()


def test_federated_report_only_exports_its_own_figures_in_the_asked_formats_only(tmp_path, browser):
    out = _study_folder(tmp_path / "fed", _federated_history(), kind="federated")
    assert federated.main(["--report-only", "--out", str(out), "--export", "pdf"]) == 0
    html = (out / "report.html").read_text(encoding="utf-8")
    ids = re.findall(r'<figure class="plot" data-figure="([^"]+)"', html)
    assert "fig-communications" in ids and "fig-scaling" not in ids
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(f"{i}.pdf" for i in ids)


def test_a_report_without_export_writes_no_figure_files(tmp_path):
    out = _study_folder(tmp_path / "plain", synthetic_history(seeds=2, epochs=5))
    assert batch_scaling.main(["--report-only", "--out", str(out)]) == 0
    assert not (out / "figures").exists() and "Static copies" not in (out / "report.html").read_text()
