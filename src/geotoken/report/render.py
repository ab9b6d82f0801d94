"""Rendering what `geotoken.report.read` read into one self-contained HTML page.

Everything is inlined (CSS, PNG/JPEG data URIs, inline SVG); no URL outside the file, so the page opens
offline and can be mailed. Plots an evaluation folder lacks are drawn from its predictions.csv.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from geotoken.assets import basemap_image
from geotoken.errors import GeoTokenError
from geotoken.evaluate.metrics import Estimate, PairedComparison
from geotoken.evaluate.plots import plot_error_cdf, plot_world_map
from geotoken.evaluate.runs import slug
from geotoken.report.read import Evaluation, Example, MethodRow, Metrics, RunFolder, RunSummary

MAP_WIDTH = 1100  # px of the inlined maps (re-encoded as JPEG: 400 KB PNG -> ~100 KB)
MINIMAP_WIDTH = 720  # px of the Blue Marble behind the example maps (inlined once, reused by CSS)


# ---------------------------------------------------------------------------------------------- images
def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_uri(path: Path, max_width: int | None = None, jpeg: bool = False) -> str:
    """A PNG/JPEG file as a data URI; optionally shrunk and re-encoded as JPEG. Corrupt -> error naming it."""
    if max_width is None and not jpeg and path.suffix.lower() == ".png":
        data = path.read_bytes()
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            raise GeoTokenError(f"{path}: not a PNG file")
        return _data_uri(data, "image/png")
    try:
        with Image.open(path) as im:
            return pil_uri(im, max_width, jpeg)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise GeoTokenError(f"{path}: cannot read image ({exc})") from None


def pil_uri(im, max_width: int | None = None, jpeg: bool = True, quality: int = 82) -> str:
    im = im.convert("RGB") if jpeg else im
    if max_width and im.width > max_width:
        im = im.resize((max_width, round(im.height * max_width / im.width)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG" if jpeg else "PNG", quality=quality, optimize=True)
    return _data_uri(buf.getvalue(), "image/jpeg" if jpeg else "image/png")


# ---------------------------------------------------------------------------------------------- sections
@dataclass
class Page:
    """What goes into the page: HTML sections in order and their table of contents."""

    title: str
    sections: list[str] = field(default_factory=list)
    toc: list[tuple[str, str]] = field(default_factory=list)

    def add(self, anchor: str, heading: str, body: str) -> None:
        self.toc.append((anchor, heading))
        self.sections.append(f'<section id="{anchor}"><h2>{esc(heading)}</h2>\n{body}\n</section>')


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def _pct(e: Estimate) -> str:
    return f"{100 * e.value:.1f} <small>[{100 * e.lo:.1f}, {100 * e.hi:.1f}]</small>"


def _km(e: Estimate) -> str:
    return f"{e.value:,.0f} <small>[{e.lo:,.0f}, {e.hi:,.0f}]</small>"


def _signed_pct(e: Estimate) -> str:
    cls = "sig" if e.lo > 0 or e.hi < 0 else ""
    return (
        f'<td class="{cls}">{100 * e.value:+.1f} <small>[{100 * e.lo:+.1f}, {100 * e.hi:+.1f}]</small></td>'
    )


def accuracy_table(rows: list[MethodRow], thresholds: list[float]) -> str:
    """Accuracy within each distance and median error per method; the best of each column in bold."""
    best_acc = {t: max(r.metrics.accuracy[t].value for r in rows) for t in thresholds}
    best_med = min(r.metrics.median_km.value for r in rows)
    head = "".join(f"<th>{t:g} km %</th>" for t in thresholds)
    lines = [
        '<table class="metrics"><thead><tr><th>method</th><th>strategy</th><th>n</th>'
        f"{head}<th>median km</th></tr></thead><tbody>"
    ]
    for r in rows:
        m = r.metrics
        cells = "".join(
            f'<td class="{"best" if m.accuracy[t].value == best_acc[t] and best_acc[t] > 0 else ""}">'
            f"{_pct(m.accuracy[t])}</td>"
            for t in thresholds
        )
        med = f'<td class="{"best" if m.median_km.value == best_med else ""}">{_km(m.median_km)}</td>'
        kind = "geotoken" if r.label.startswith("geotoken") else "baseline"
        lines.append(
            f'<tr class="{kind}"><th>{esc(r.label)}</th><td class="strategy">{esc(r.strategy)}</td><td>{m.n}</td>{cells}{med}</tr>'
        )
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _figure(uri: str, caption: str, cls: str = "") -> str:
    return f'<figure class="{cls}"><img src="{uri}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'


def eval_section(page: Page, ev: Evaluation) -> None:
    """Table, error CDF, map of the best method (others folded), reliability plots, per-method timings."""
    metrics, rows, preds = ev.metrics, ev.metrics.rows, ev.predictions
    thresholds = metrics.thresholds
    parts = [
        f'<p class="muted">{esc(ev.folder)} · queries: {esc(metrics.queries_rows)} · gallery: {esc(metrics.gallery_rows)}'
        f" · 95% intervals in brackets: {esc(metrics.intervals)} ({esc(metrics.n_boot)} resamples)</p>",
        accuracy_table(rows, thresholds),
    ]
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        cdf = ev.cdf
        if cdf is None and preds:
            cdf = plot_error_cdf(
                {m: p["error_km"] for m, p in preds.items()}, Path(tmp) / "cdf.png", thresholds
            )
        if cdf is not None:
            figures.append(_figure(image_uri(cdf), "error CDF: share of images within x km", "cdf"))
        # the map of the method with the lowest median error, prefer GeoToken rows
        ranked = sorted(rows, key=lambda r: (not r.label.startswith("geotoken"), r.metrics.median_km.value))
        maps = []
        for r in ranked:
            path = ev.maps.get(r.label)
            if path is None and not maps and preds and r.label in preds:  # draw the first only
                p = preds[r.label]
                path = plot_world_map(
                    *(p[k] for k in ("lat", "lon", "pred_lat", "pred_lon")),
                    Path(tmp) / f"map_{slug(r.label)}.png",
                    title=f"{r.label}: predictions vs truth ({len(p['lat'])} images)",
                )
            if path is not None:
                maps.append((r.label, path))
        if maps:
            label, path = maps[0]
            figures.append(
                _figure(
                    image_uri(path, MAP_WIDTH, jpeg=True),
                    f"{label}: predictions (red) vs truth (green)",
                    "map",
                )
            )
        parts.append(f'<div class="figures">{"".join(figures)}</div>')
        if len(maps) > 1:
            others = "".join(
                _figure(image_uri(p, MAP_WIDTH // 2, jpeg=True), lab, "small") for lab, p in maps[1:]
            )
            parts.append(
                f'<details><summary>maps of the other methods</summary><div class="grid">{others}</div></details>'
            )
    parts += paired_details(metrics.pairs, thresholds) + calibration_details(metrics)
    if ev.reliability:
        figs = "".join(
            _figure(image_uri(p), p.stem.removeprefix("reliability_"), "small") for p in ev.reliability
        )
        parts.append(
            f'<details><summary>calibration (reliability diagrams)</summary><div class="grid">{figs}</div></details>'
        )
    timing = [(r.label, r.seconds) for r in rows if r.seconds is not None]
    if timing:
        body = "".join(f"<tr><th>{esc(label)}</th><td>{s:,.3f}</td></tr>" for label, s in timing)
        parts.append(f"<details><summary>time per method (s)</summary><table>{body}</table></details>")
    page.add(f"eval-{slug(ev.name)}", f"Evaluation: {ev.name}", "\n".join(parts))


def paired_details(pairs: list[PairedComparison], thresholds: list[float]) -> list[str]:
    """metrics.json `paired`: a - b on the same images, with 95% intervals (bold: excludes 0)."""
    rows = [
        f"<tr><th>{esc(p.a)} &minus; {esc(p.b)}</th>{''.join(_signed_pct(p.accuracy[t]) for t in thresholds)}"
        f"<td>{p.median_km.value:+,.0f}</td></tr>"
        for p in pairs
    ]
    if not rows:
        return []
    head = "".join(f"<th>{t:g} km pp</th>" for t in thresholds)
    return [
        "<details><summary>paired differences (same images; percentage points, 95% intervals; "
        'bold: the interval excludes 0)</summary><table class="metrics paired">'
        f"<thead><tr><th>a &minus; b</th>{head}<th>median km</th></tr></thead>{''.join(rows)}</table></details>"
    ]


def calibration_details(metrics: Metrics) -> list[str]:
    """Per GeoToken row: accuracy vs mean calibrated confidence and ECE of P(within r km)."""
    rows = []
    for r in metrics.rows:
        mark = " *" if r.calibrated_for else ""
        for key, vals in r.calibration:
            cells = "".join(f"<td>{100 * v:.1f}</td>" if v is not None else "<td></td>" for v in vals)
            rows.append(
                f"<tr><th>{esc(r.label)}{mark}</th><td>{esc(key.removeprefix('within_'))}</td>{cells}</tr>"
            )
    if not rows:
        return []
    starred = [(r.label, r.calibrated_for) for r in metrics.rows if r.calibrated_for and r.calibration]
    items = "".join(
        f"<li>{esc(label)}: calibrated under {esc(', '.join(f'{k} {v}' for k, v in fitted.items()))}</li>"
        for label, fitted in starred
    )
    note = (
        '<p class="muted">* searched otherwise than the calibration was fitted under: its temperatures do not '
        f'calibrate that search (geotoken calibrate with it does)</p><ul class="muted">{items}</ul>'
        if starred
        else ""
    )
    return [
        '<details><summary>calibration of P(within r) (%)</summary><table class="metrics"><thead><tr><th>method</th>'
        "<th>r</th><th>accuracy</th><th>mean confidence</th><th>ECE raw</th><th>ECE</th></tr></thead>"
        f"{''.join(rows)}</table>{note}</details>"
    ]


def _kv_table(d: dict) -> str:
    rows = []
    for k, v in d.items():
        text = v if isinstance(v, str) else json.dumps(v)
        rows.append(f"<tr><th>{esc(k)}</th><td><code>{esc(text)}</code></td></tr>")
    return f'<table class="kv">{"".join(rows)}</table>'


def _minimap_svg(true_latlon, candidates: list[dict]) -> str:
    """Inline SVG over the shared Blue Marble background: truth (green ring), candidates numbered (red)."""
    items = []
    if true_latlon:
        lat, lon = true_latlon
        items.append(
            f'<circle class="truth" cx="{lon + 180:.3f}" cy="{90 - lat:.3f}" r="3.2"><title>truth</title></circle>'
        )
        for c in candidates[:1]:  # the error as a line from truth to the best candidate
            items.append(
                f'<line x1="{lon + 180:.3f}" y1="{90 - lat:.3f}" x2="{c["lon"] + 180:.3f}" y2="{90 - c["lat"]:.3f}"/>'
            )
    for i, c in reversed(list(enumerate(candidates))):
        x, y = c["lon"] + 180, 90 - c["lat"]
        items.append(
            f'<circle class="cand" cx="{x:.3f}" cy="{y:.3f}" r="{3 if i == 0 else 2.2}"><title>#{i + 1}</title></circle>'
            f'<text x="{x:.3f}" y="{y:.3f}">{i + 1}</text>'
        )
    return f'<svg class="minimap" viewBox="0 0 360 180" role="img" aria-label="candidates on a world map">{"".join(items)}</svg>'


def _place(p) -> str:
    if not isinstance(p, dict):
        return str(p or "")
    return ", ".join(str(p[k]) for k in ("city", "region", "country") if p.get(k))


def examples_section(page: Page, examples: list[Example]) -> None:
    """A few photos with their top-k candidates and per-level confidence (from run.json's `samples`)."""
    cards = []
    for i, ex in enumerate(examples):
        s, cands = ex.record, ex.record["candidates"]
        img_html = '<div class="noimg">image not available</div>'
        if ex.image is not None:
            img = ex.image.copy()
            img.thumbnail((360, 360))
            img_html = f'<img class="photo" src="{pil_uri(img, jpeg=True)}" alt="{esc(s.get("id", ""))}">'
        true = s.get("true")
        rows = []
        for j, c in enumerate(cands):
            levels = c.get("level_confidence") or []
            bars = "".join(
                f'<span title="level {lv}: {100 * v:.1f}%"><i style="height:{max(1.0, 100 * v):.0f}%"></i></span>'
                for lv, v in enumerate(levels)
                if isinstance(v, (int, float))
            )
            prob = c.get("probability")
            prob_txt = (
                f"{100 * prob:.1f}%" if isinstance(prob, (int, float)) and math.isfinite(prob) else "n/a"
            )
            rows.append(
                f"<tr><td>{j + 1}</td><td>{prob_txt}</td><td>{c['lat']:.3f}, {c['lon']:.3f}</td>"
                f"<td>{esc(_place(c.get('place')))}</td><td><code>{esc(c.get('cell', ''))}</code></td>"
                f'<td><div class="levels">{bars}</div></td></tr>'
            )
        err = s.get("error_km")
        head = f"<b>{esc(s.get('id', f'example {i + 1}'))}</b>"
        if true:
            head += f" · truth {true[0]:.3f}, {true[1]:.3f}"
        if isinstance(err, (int, float)):
            head += f" · error of #1: {err:,.0f} km"
        table = (
            '<table class="cands"><thead><tr><th>#</th><th title="calibrated probability">P</th><th>lat, lon</th>'
            f"<th>place</th><th>S2 cell</th><th>per-level confidence</th></tr></thead>{''.join(rows)}</table>"
        )
        cards.append(
            f'<div class="example"><p>{head}</p><div class="example-body">{img_html}'
            f"{_minimap_svg(true, cands)}</div>{table}</div>"
        )
    page.add("examples", "Example photos and their top-k candidates", "\n".join(cards))


def config_section(page: Page, summary: RunSummary) -> None:
    """run.json's configuration, stage timings and the rest (bundle, alignment metrics)."""
    parts = []
    if summary.config is not None:
        parts.append("<h3>configuration</h3>" + _kv_table(summary.config))
    if summary.timings is not None:
        stages = summary.stages

        def built(k: str) -> str:  # what building the stage took, the run that reused it or not
            v = (stages.get(k) or {}).get("built_seconds")
            return f"{v:,.2f}" if isinstance(v, (int, float)) else ""

        body = "".join(
            f"<tr><th>{esc(k)}</th><td>{built(k)}</td><td>{v:,.2f}</td>"
            f"<td><code>{esc((stages.get(k) or {}).get('folder', ''))}</code></td></tr>"
            for k, v in summary.timings.items()
            if isinstance(v, (int, float))
        )
        total = summary.total
        foot = (
            f"<tr><th>total</th><td></td><td>{total:,.2f}</td><td></td></tr>"
            if isinstance(total, (int, float))
            else ""
        )
        parts.append(
            "<h3>stage timings (s: building each stage, and this run, which reuses finished stages)</h3>"
            '<table class="kv"><thead><tr><th>stage</th><th>built in</th><th>this run</th><th>folder</th></tr></thead>'
            f"{body}{foot}</table>"
        )
    if summary.extra:
        parts.append(
            f"<details><summary>more (bundle, alignment metrics)</summary><pre>{esc(json.dumps(summary.extra, indent=1))}</pre></details>"
        )
    page.add("config", "Run configuration and timings", "\n".join(parts))


# ---------------------------------------------------------------------------------------------- page
CSS = """
body{margin:0;font:14px/1.45 system-ui,sans-serif;color:#1d2330;background:#f4f6f9}
header{background:#0f2a44;color:#fff;padding:14px 24px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#b9c6d6}nav{padding:8px 24px;background:#e3e9f1}nav a{margin-right:14px;color:#0f2a44}
main{padding:8px 24px 40px;max-width:1400px}section{background:#fff;border-radius:8px;padding:6px 18px 16px;margin:16px 0;
box-shadow:0 1px 3px rgba(0,0,0,.08)}h2{font-size:18px;border-bottom:1px solid #e3e9f1;padding-bottom:6px}
table{border-collapse:collapse;margin:8px 0}th,td{padding:4px 8px;border-bottom:1px solid #edf0f4;text-align:left;vertical-align:top}
table.metrics td{text-align:right;white-space:nowrap}table.metrics td.strategy{text-align:left;white-space:normal}table.metrics td.best{font-weight:700;background:#eaf6ea}
table.metrics tr.geotoken th{color:#a5361b}table.paired td.sig{font-weight:700}small{color:#7a8699}.muted{color:#68758a}
.figures{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}figure{margin:8px 0}figure img{max-width:100%;display:block}
figure.map img{width:760px}figure.cdf img{width:520px}figure.small img{width:420px}figcaption{color:#68758a;font-size:12px}
.grid{display:flex;flex-wrap:wrap;gap:12px}code{font-size:12px}
.example{border-top:1px solid #edf0f4;padding:8px 0}.example-body{display:flex;gap:16px;align-items:flex-start;flex-wrap:wrap}
.example img.photo{width:240px;height:auto;border-radius:4px;image-rendering:auto}.noimg{width:240px;height:160px;background:#e3e9f1;display:flex;
align-items:center;justify-content:center;color:#68758a}
svg.minimap{width:480px;height:240px;background-size:100% 100%;border-radius:4px;background-image:var(--basemap)}
svg.minimap circle.truth{fill:none;stroke:#3cff6e;stroke-width:1.2}svg.minimap circle.cand{fill:#ff3b30;stroke:#fff;stroke-width:.5}
svg.minimap line{stroke:#ffd000;stroke-width:.6;stroke-dasharray:2 1}svg.minimap text{font-size:3.2px;fill:#fff;text-anchor:middle;
dominant-baseline:central;font-weight:700}
.levels{display:flex;gap:2px;height:20px;align-items:flex-end}.levels span{width:8px;height:100%;background:#e3e9f1;display:flex;
align-items:flex-end}.levels i{display:block;width:100%;background:#3f7fbf}
.missing{background:#fff7e6;border-left:4px solid #f0a020}pre{white-space:pre-wrap;font-size:12px}
"""


def _basemap_css() -> str:
    """The Blue Marble image once, as a CSS variable that every example's SVG map uses as background."""
    with Image.open(basemap_image("bmng")) as im:
        im.draft("RGB", (MINIMAP_WIDTH, MINIMAP_WIDTH // 2))
        uri = pil_uri(im.convert("RGB").resize((MINIMAP_WIDTH, MINIMAP_WIDTH // 2)), jpeg=True, quality=80)
    return f':root{{--basemap:url("{uri}")}}'


def render_report(run: RunFolder) -> str:
    """The report's HTML text for what `read_run` read."""
    root = run.root
    page = Page(title=f"GeoToken report: {root.resolve().name}")
    for name, text in run.tables:  # the paper's layout first: both test sets side by side, the paper's rows
        page.add(f"table-{slug(name)}", f"Table I ({name})", f'<pre class="table">{esc(text)}</pre>')
    for ev in run.evaluations:
        eval_section(page, ev)
    if run.examples is not None:
        examples_section(page, run.examples)
    if run.summary is not None:
        config_section(page, run.summary)
    if run.missing:
        items = "".join(f"<li>{esc(m)}</li>" for m in run.missing)
        page.sections.append(
            f'<section class="missing" id="missing"><h2>Missing</h2><ul>{items}</ul></section>'
        )
        page.toc.append(("missing", "Missing"))
    toc = "".join(f'<a href="#{a}">{esc(h)}</a>' for a, h in page.toc)
    css = CSS + (_basemap_css() if 'class="minimap"' in "".join(page.sections) else "")
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(page.title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{css}</style></head>\n<body>'
        f"<header><h1>{esc(page.title)}</h1><p>{esc(root.resolve())}</p></header>"
        f"<nav>{toc}</nav><main>\n" + "\n".join(page.sections) + "\n</main></body></html>\n"
    )
