"""Static copies of the report's figures (PNG, SVG, PDF) for papers, through Plotly's own exporter, Kaleido.

Kaleido (v1) renders with a Chrome or Chromium that is already installed; it never downloads one here. The browser
is the one `BROWSER_PATH` names, else the first Chrome / Chromium that Kaleido's own search finds (Debian's
`/usr/bin/chromium` included). One browser session renders every figure in every format. MathJax is left out
(Kaleido would fetch it from a CDN; the figures use no LaTeX), and plotly.js comes from the installed plotly.

    browser = find_browser()        # raises ExportUnavailable, saying how to get one, before any long work
    write_figures(figures, out / "figures", ("png", "pdf"), browser=browser)
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

import plotly.graph_objects as go

from .config import ConfigError

__all__ = ["FORMATS", "ExportUnavailable", "find_browser", "parse_formats", "write_figures"]

FORMATS = ("png", "svg", "pdf")
DEFAULT_WIDTH = 900  # layout px, for figures whose layout sets no width (the report's are responsive)
DEFAULT_HEIGHT = 500
PNG_SCALE = 2.0  # PNG pixels per layout px; SVG and PDF are vector, written at scale 1
RENDER_TIMEOUT_S = 120.0  # per figure, inside Kaleido
_HOW_TO_GET_ONE = (
    "install one (Debian/Ubuntu: `apt-get install chromium`, or `make browser` in this repository), "
    "or set BROWSER_PATH to a Chrome or Chromium executable"
)
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ExportUnavailable(RuntimeError):
    """Static export cannot work here (no Kaleido, no usable browser) or a figure failed to render."""


def parse_formats(formats: str | Iterable[str]) -> tuple[str, ...]:
    """'png,svg' or ['png', 'svg'] -> ('png', 'svg'): lower-cased, duplicates dropped; unknown ones refused."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    names = tuple(dict.fromkeys(str(f).strip().lower() for f in items if str(f).strip()))
    unknown = [f for f in names if f not in FORMATS]
    if unknown or not names:
        reason = f"unknown format {unknown[0]!r}" if unknown else "name at least one format"
        raise ConfigError("export", formats, f"{reason}; valid formats: {', '.join(FORMATS)} (comma-separated)")
    return names


def find_browser() -> str:
    """The Chrome / Chromium Kaleido will drive, checked to start (`--version`); else ExportUnavailable saying how
    to get one. Also refuses when Kaleido (>= 1) is not installed."""
    _require_kaleido()
    from choreographer.browsers import Chromium

    named = os.environ.get("BROWSER_PATH")
    path = named or Chromium.find_browser(skip_local=False)
    if not path:
        raise ExportUnavailable(f"static figure export needs Chrome or Chromium and none was found: {_HOW_TO_GET_ONE}")
    where = f"BROWSER_PATH={named!r}" if named else f"the browser at {path!r}"
    if not (Path(path).is_file() and os.access(path, os.X_OK)):
        raise ExportUnavailable(f"{where} is not an executable file: {_HOW_TO_GET_ONE}")
    try:
        probe = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ExportUnavailable(f"{where} does not start ({err}): {_HOW_TO_GET_ONE}") from None
    if probe.returncode != 0:
        raise ExportUnavailable(
            f"{where} exits with {probe.returncode} on --version "
            f"({(probe.stderr or probe.stdout).strip()[-300:]}): {_HOW_TO_GET_ONE}"
        )
    return str(path)


def write_figures(
    figures: Sequence[tuple[str, str, go.Figure]],
    folder: str | Path,
    formats: str | Iterable[str],
    *,
    browser: str | None = None,
    width: int | None = None,
    height: int | None = None,
    png_scale: float = PNG_SCALE,
) -> dict[str, dict[str, Path]]:
    """Write each (figure_id, caption, figure) as `folder/<figure_id>.<format>`, all in one browser session.

    Formats, figure ids and the browser are checked before anything is written. `width` / `height` (layout px)
    override the figure's own layout size (default: its layout's, else 900 x 500). Returns
    {figure_id: {format: path}}.
    """
    formats = parse_formats(formats)
    for fig_id, _, _ in figures:
        if not _SAFE_ID.match(str(fig_id)):
            raise ConfigError("figure_id", fig_id, "must be a plain file name (letters, digits, '.', '_', '-')")
    browser = browser or find_browser()
    folder = Path(folder)
    specs, written = [], {}
    for fig_id, _, fig in figures:
        layout = fig.layout
        size = {"width": width or layout.width or DEFAULT_WIDTH, "height": height or layout.height or DEFAULT_HEIGHT}
        for fmt in formats:
            path = folder / f"{fig_id}.{fmt}"
            written.setdefault(fig_id, {})[fmt] = path
            specs.append(
                {"fig": fig, "path": path, "opts": {"format": fmt, **size, "scale": png_scale if fmt == "png" else 1}}
            )
    if not specs:
        return written
    folder.mkdir(parents=True, exist_ok=True)
    for spec in specs:  # a stale copy must not pass for a new one
        spec["path"].unlink(missing_ok=True)
    _render(specs, browser)
    return written


def _render(specs: list[dict], browser: str) -> None:
    """One Kaleido session (one browser) for every spec; a failed render raises ExportUnavailable naming it."""
    import kaleido

    options = {"path": browser, "mathjax": False, "timeout": RENDER_TIMEOUT_S}
    try:
        errors = kaleido.write_fig_from_object_sync(specs, kopts=options, cancel_on_error=False)
    except Exception as err:  # the browser failed to start or died: nothing was rendered
        raise ExportUnavailable(f"figure export with {browser!r} failed: {err}") from err
    missing = [str(s["path"]) for s in specs if not Path(s["path"]).is_file()]
    if errors or missing:
        detail = "; ".join(str(e) for e in errors) if errors else "no error reported"
        raise ExportUnavailable(
            f"{len(missing)} of {len(specs)} figure files were not written "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): {detail}"
        )


def _require_kaleido() -> None:
    try:
        version = importlib.metadata.version("kaleido")
    except importlib.metadata.PackageNotFoundError:
        raise ExportUnavailable("static figure export needs Kaleido: pip install 'kaleido>=1.5'") from None
    if int(version.split(".")[0]) < 1:
        raise ExportUnavailable(
            f"static figure export needs Kaleido >= 1 (installed: {version}): pip install --upgrade 'kaleido>=1.5'"
        )
