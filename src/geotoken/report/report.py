"""One self-contained HTML file from a run folder's files (`geotoken report RUN_DIR`).

Input, either:
    a demo run folder   run.json (config, stage timings, `eval` {split: folder}, `samples`) + those folders
    an eval folder      what `geotoken evaluate` writes: metrics.json, predictions.csv, error_cdf.png,
                        map_<method>.png, reliability_<method>.png

Output: report.html with everything inlined (CSS, PNG/JPEG data URIs, inline SVG); no URL outside the file,
so it opens offline and can be mailed. The report is a pure function of the folder's files: optional parts
that are absent are listed under "Missing"; a file that is present but malformed is an error naming the
file, row and field (a report that silently drops half a table is worse than none).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geotoken.errors import GeoTokenError
from geotoken.geo import THRESHOLDS_KM
from geotoken.io import atomic_open

PREDICTION_COLUMNS = ("id", "lat", "lon", "pred_lat", "pred_lon", "error_km", "method", "strategy")
MAP_WIDTH = 1100  # px of the inlined maps (re-encoded as JPEG: 400 KB PNG -> ~100 KB)
MINIMAP_WIDTH = 720  # px of the Blue Marble behind the example maps (inlined once, reused by CSS)


# ---------------------------------------------------------------------------------------------- reading
def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise GeoTokenError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except UnicodeDecodeError as exc:
        raise GeoTokenError(f"{path}: not UTF-8 text ({exc})") from None


def _need(obj, key: str, kind: type | tuple, path: Path, where: str = ""):
    """obj[key], checked to be of `kind`; a clear error naming file and field otherwise."""
    name = f"{where}.{key}" if where else key
    if not isinstance(obj, dict) or key not in obj:
        raise GeoTokenError(f"{path}: missing field {name!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float, (int, float)):
        raise GeoTokenError(f"{path}: field {name!r} should be {_kind_name(kind)}, got {value!r:.80}")
    return value


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({dict: "an object", list: "a list", str: "a string"}.get(k, "a number") for k in kinds)


@dataclass
class MethodRow:
    label: str
    strategy: str
    n: int
    accuracy: dict[float, tuple[float, float | None, float | None]]  # km -> (value, lo, hi)
    median_km: tuple[float, float | None, float | None]
    seconds: float | None


def _estimate(obj, path: Path, where: str) -> tuple[float, float | None, float | None]:
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return float(obj), None, None
    value = _need(obj, "value", (int, float), path, where)
    lo, hi = obj.get("lo"), obj.get("hi")
    return (
        float(value),
        lo if isinstance(lo, (int, float)) else None,
        hi if isinstance(hi, (int, float)) else None,
    )


def read_metrics(path: Path) -> tuple[dict, list[float], list[MethodRow]]:
    """metrics.json -> (the whole object, thresholds in km, one row per method in file order)."""
    m = _read_json(path)
    if not isinstance(m, dict):
        raise GeoTokenError(f"{path}: expected a JSON object, got {type(m).__name__}")
    thresholds = [float(t) for t in m.get("thresholds_km", THRESHOLDS_KM)]
    methods = _need(m, "methods", dict, path)
    if not methods:
        raise GeoTokenError(f"{path}: field 'methods' is empty")
    rows = []
    for label, entry in methods.items():
        where = f"methods.{label}"
        acc = _need(entry, "accuracy", dict, path, where)
        accuracy = {}
        for t in thresholds:
            key = f"{t:g}"
            if key not in acc:
                raise GeoTokenError(f"{path}: missing field '{where}.accuracy.{key}' (threshold {t:g} km)")
            accuracy[t] = _estimate(acc[key], path, f"{where}.accuracy.{key}")
        median = entry.get("median_km")
        if median is None:
            raise GeoTokenError(f"{path}: missing field '{where}.median_km'")
        rows.append(
            MethodRow(
                label=str(label),
                strategy=str(entry.get("strategy", "")),
                n=int(entry.get("n", 0)),
                accuracy=accuracy,
                median_km=_estimate(median, path, f"{where}.median_km"),
                seconds=entry.get("seconds") if isinstance(entry.get("seconds"), (int, float)) else None,
            )
        )
    return m, thresholds, rows


def read_predictions(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """predictions.csv -> {method: {"lat", "lon", "pred_lat", "pred_lon", "error_km": float64 (n,)}} (strict)."""
    numeric = ("lat", "lon", "pred_lat", "pred_lon", "error_km")
    out: dict[str, dict[str, list[float]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[: len(PREDICTION_COLUMNS)]] != list(
            PREDICTION_COLUMNS
        ):
            raise GeoTokenError(
                f"{path}: header should start with {','.join(PREDICTION_COLUMNS)}, got {header}"
            )
        for row_no, row in enumerate(reader, start=2):
            if len(row) < len(PREDICTION_COLUMNS):
                raise GeoTokenError(
                    f"{path}, row {row_no}: {len(row)} fields, expected {len(PREDICTION_COLUMNS)}"
                )
            rec = dict(zip(PREDICTION_COLUMNS, row))
            cols = out.setdefault(rec["method"], {k: [] for k in numeric})
            for k in numeric:
                try:
                    v = float(rec[k])
                except ValueError:
                    raise GeoTokenError(
                        f"{path}, row {row_no}, field {k!r}: not a number: {rec[k]!r}"
                    ) from None
                if not math.isfinite(v) or (k == "error_km" and v < 0):
                    raise GeoTokenError(f"{path}, row {row_no}, field {k!r}: invalid value {rec[k]!r}")
                cols[k].append(v)
    return {m: {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()} for m, cols in out.items()}


# ---------------------------------------------------------------------------------------------- images
def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_uri(path: Path, max_width: int | None = None, jpeg: bool = False) -> str:
    """A PNG/JPEG file as a data URI; optionally shrunk and re-encoded as JPEG. Corrupt -> error naming it."""
    from PIL import Image, UnidentifiedImageError

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
    from PIL import Image

    im = im.convert("RGB") if jpeg else im
    if max_width and im.width > max_width:
        im = im.resize((max_width, round(im.height * max_width / im.width)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG" if jpeg else "PNG", quality=quality, optimize=True)
    return _data_uri(buf.getvalue(), "image/jpeg" if jpeg else "image/png")


def slug(label: str) -> str:
    """File-name form of a method label, as `geotoken.evaluate` names its map_<slug>.png files."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


# ---------------------------------------------------------------------------------------------- sections
@dataclass
class Report:
    """What goes into the page: HTML sections in order, and what was missing."""

    title: str
    sections: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    toc: list[tuple[str, str]] = field(default_factory=list)

    def add(self, anchor: str, heading: str, body: str) -> None:
        self.toc.append((anchor, heading))
        self.sections.append(f'<section id="{anchor}"><h2>{esc(heading)}</h2>\n{body}\n</section>')


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def _pct(e: tuple[float, float | None, float | None]) -> str:
    value, lo, hi = e
    ci = f"<small>[{100 * lo:.1f}, {100 * hi:.1f}]</small>" if lo is not None and hi is not None else ""
    return f"{100 * value:.1f} {ci}"


def _km(e: tuple[float, float | None, float | None]) -> str:
    value, lo, hi = e
    ci = f"<small>[{lo:,.0f}, {hi:,.0f}]</small>" if lo is not None and hi is not None else ""
    return f"{value:,.0f} {ci}"


def accuracy_table(rows: list[MethodRow], thresholds: list[float]) -> str:
    """Accuracy within each distance and median error per method; the best of each column in bold."""
    best_acc = {t: max(r.accuracy[t][0] for r in rows) for t in thresholds}
    best_med = min(r.median_km[0] for r in rows)
    head = "".join(f"<th>{t:g} km %</th>" for t in thresholds)
    lines = [
        '<table class="metrics"><thead><tr><th>method</th><th>strategy</th><th>n</th>'
        f"{head}<th>median km</th></tr></thead><tbody>"
    ]
    for r in rows:
        cells = "".join(
            f'<td class="{"best" if r.accuracy[t][0] == best_acc[t] and best_acc[t] > 0 else ""}">'
            f"{_pct(r.accuracy[t])}</td>"
            for t in thresholds
        )
        med = f'<td class="{"best" if r.median_km[0] == best_med else ""}">{_km(r.median_km)}</td>'
        kind = "geotoken" if r.label.startswith("geotoken") else "baseline"
        lines.append(
            f'<tr class="{kind}"><th>{esc(r.label)}</th><td class="strategy">{esc(r.strategy)}</td><td>{r.n}</td>{cells}{med}</tr>'
        )
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _figure(uri: str, caption: str, cls: str = "") -> str:
    return f'<figure class="{cls}"><img src="{uri}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'


def eval_section(report: Report, name: str, folder: Path) -> None:
    """Table, error CDF, map of the best method (others folded), reliability plots, per-method timings."""
    anchor = f"eval-{slug(name)}"
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        report.missing.append(f"{metrics_path} (evaluation '{name}' has no metrics; section left out)")
        return
    metrics, thresholds, rows = read_metrics(metrics_path)
    preds = None
    if (folder / "predictions.csv").is_file():
        preds = read_predictions(folder / "predictions.csv")
        unknown = sorted(set(preds) - {r.label for r in rows})
        if unknown:
            raise GeoTokenError(
                f"{folder / 'predictions.csv'}: method(s) {unknown} are not in {metrics_path}"
            )
    else:
        report.missing.append(f"{folder / 'predictions.csv'} (maps and CDF only from existing plots)")

    q, g = metrics.get("queries", {}), metrics.get("gallery", {})
    parts = [
        f'<p class="muted">{esc(folder)} · queries: {esc(q.get("rows", "?"))} · gallery: {esc(g.get("rows", "?"))}'
        f" · bootstrap: {esc(metrics.get('bootstrap', {}).get('n_boot', '?'))} resamples, 95% intervals in brackets</p>",
        accuracy_table(rows, thresholds),
    ]
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        cdf = folder / "error_cdf.png"
        if not cdf.is_file() and preds:
            from geotoken.evaluate.plots import plot_error_cdf

            cdf = plot_error_cdf(
                {m: p["error_km"] for m, p in preds.items()}, Path(tmp) / "cdf.png", thresholds
            )
        if cdf.is_file():
            figures.append(_figure(image_uri(cdf), "error CDF: share of images within x km", "cdf"))
        else:
            report.missing.append(f"{folder / 'error_cdf.png'} (no error CDF for '{name}')")
        # the map of the method with the lowest median error, prefer GeoToken rows
        ranked = sorted(rows, key=lambda r: (not r.label.startswith("geotoken"), r.median_km[0]))
        maps = []
        for r in ranked:
            path = folder / f"map_{slug(r.label)}.png"
            if not path.is_file() and not maps and preds and r.label in preds:  # draw the first only
                from geotoken.evaluate.plots import plot_world_map

                p = preds[r.label]
                path = plot_world_map(
                    *(p[k] for k in ("lat", "lon", "pred_lat", "pred_lon")),
                    Path(tmp) / f"map_{slug(r.label)}.png",
                    title=f"{r.label}: predictions vs truth ({len(p['lat'])} images)",
                )
            if path.is_file():
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
        else:
            report.missing.append(f"{folder}/map_*.png (no world map for '{name}')")
        parts.append(f'<div class="figures">{"".join(figures)}</div>')
        if len(maps) > 1:
            others = "".join(
                _figure(image_uri(p, MAP_WIDTH // 2, jpeg=True), lab, "small") for lab, p in maps[1:]
            )
            parts.append(
                f'<details><summary>maps of the other methods</summary><div class="grid">{others}</div></details>'
            )
    parts += paired_details(metrics, thresholds, metrics_path) + calibration_details(metrics)
    rel = sorted(folder.glob("reliability_*.png"))
    if rel:
        figs = "".join(_figure(image_uri(p), p.stem.removeprefix("reliability_"), "small") for p in rel)
        parts.append(
            f'<details><summary>calibration (reliability diagrams)</summary><div class="grid">{figs}</div></details>'
        )
    timing = [(r.label, r.seconds) for r in rows if r.seconds is not None]
    if timing:
        body = "".join(f"<tr><th>{esc(label)}</th><td>{s:,.3f}</td></tr>" for label, s in timing)
        parts.append(f"<details><summary>time per method (s)</summary><table>{body}</table></details>")
    report.add(anchor, f"Evaluation: {name}", "\n".join(parts))


def _signed_pct(e) -> str:
    value, lo, hi = e
    ci = f"<small>[{100 * lo:+.1f}, {100 * hi:+.1f}]</small>" if lo is not None and hi is not None else ""
    cls = "sig" if lo is not None and hi is not None and (lo > 0 or hi < 0) else ""
    return f'<td class="{cls}">{100 * value:+.1f} {ci}</td>'


def paired_details(metrics: dict, thresholds: list[float], path: Path) -> list[str]:
    """metrics.json `paired`: a - b on the same images, with bootstrap intervals (bold: excludes 0)."""
    pairs = metrics.get("paired") or []
    if not isinstance(pairs, list):
        raise GeoTokenError(f"{path}: field 'paired' should be a list, got {pairs!r:.80}")
    rows = []
    for i, pair in enumerate(pairs):
        where = f"paired[{i}]"
        diff = _need(pair, "accuracy_diff", dict, path, where)
        cells = ""
        for t in thresholds:
            if f"{t:g}" not in diff:
                raise GeoTokenError(f"{path}: missing field '{where}.accuracy_diff.{t:g}'")
            cells += _signed_pct(_estimate(diff[f"{t:g}"], path, f"{where}.accuracy_diff.{t:g}"))
        med = _estimate(_need(pair, "median_km_diff", (dict, int, float), path, where), path, where)
        rows.append(
            f"<tr><th>{esc(pair.get('a'))} &minus; {esc(pair.get('b'))}</th>{cells}<td>{med[0]:+,.0f}</td></tr>"
        )
    if not rows:
        return []
    head = "".join(f"<th>{t:g} km pp</th>" for t in thresholds)
    return [
        "<details><summary>paired differences (same images; percentage points, 95% intervals; "
        'bold: the interval excludes 0)</summary><table class="metrics paired">'
        f"<thead><tr><th>a &minus; b</th>{head}<th>median km</th></tr></thead>{''.join(rows)}</table></details>"
    ]


def calibration_details(metrics: dict) -> list[str]:
    """Per GeoToken row: accuracy vs mean calibrated confidence and ECE of P(within r km)."""
    rows = []
    for label, m in metrics["methods"].items():
        cal = m.get("calibration") if isinstance(m, dict) else None
        if not isinstance(cal, dict):
            continue
        for key, c in cal.items():
            if key.startswith("within_") and isinstance(c, dict):
                vals = [c.get(k) for k in ("accuracy", "mean_confidence", "ece_raw", "ece")]
                cells = "".join(
                    f"<td>{100 * v:.1f}</td>" if isinstance(v, (int, float)) else "<td></td>" for v in vals
                )
                rows.append(
                    f"<tr><th>{esc(label)}</th><td>{esc(key.removeprefix('within_'))}</td>{cells}</tr>"
                )
    if not rows:
        return []
    return [
        '<details><summary>calibration of P(within r) (%)</summary><table class="metrics"><thead><tr><th>method</th>'
        "<th>r</th><th>accuracy</th><th>mean confidence</th><th>ECE raw</th><th>ECE</th></tr></thead>"
        f"{''.join(rows)}</table></details>"
    ]


def _kv_table(d: dict) -> str:
    rows = []
    for k, v in d.items():
        text = v if isinstance(v, str) else json.dumps(v)
        rows.append(f"<tr><th>{esc(k)}</th><td><code>{esc(text)}</code></td></tr>")
    return f'<table class="kv">{"".join(rows)}</table>'


def _relocate(path: str, old_root: str | None, root: Path) -> Path:
    """A path written into run.json, found again if the run folder was moved or copied since."""
    p = Path(path)
    if not p.is_absolute():
        return root / p
    if old_root:  # prefer the copy inside this folder
        try:
            moved = root / p.relative_to(old_root)
        except ValueError:
            return p
        if moved.exists() or not p.exists():
            return moved
    return p


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


def examples_section(report: Report, samples: list, root: Path, old_root: str | None, path: Path) -> None:
    """A few photos with their top-k candidates and per-level confidence (from run.json's `samples`)."""
    from geotoken.data.images import open_image

    cards = []
    for i, s in enumerate(samples):
        where = f"samples[{i}]"
        cands = _need(s, "candidates", list, path, where)
        for j, c in enumerate(cands):
            for key in ("lat", "lon"):
                _need(c, key, (int, float), path, f"{where}.candidates[{j}]")
        img_html = '<div class="noimg">image not available</div>'
        ref = s.get("image")
        if ref:
            file_part, sep, member = str(ref).partition("#")
            ref = os.fspath(_relocate(file_part, old_root, root)) + sep + member
            try:
                img = open_image(ref)
                img.thumbnail((360, 360))
                img_html = f'<img class="photo" src="{pil_uri(img, jpeg=True)}" alt="{esc(s.get("id", ""))}">'
            except GeoTokenError as exc:
                report.missing.append(f"example image {ref} ({exc})")
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
    report.add("examples", "Example photos and their top-k candidates", "\n".join(cards))


def run_sections(report: Report, root: Path) -> None:
    """Sections of a demo run folder (run.json)."""
    path = root / "run.json"
    summary = _read_json(path)
    if not isinstance(summary, dict):
        raise GeoTokenError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    old_root = summary.get("run_dir")
    evals = summary.get("eval")
    if evals is None:
        report.missing.append(f"{path}: field 'eval' (no evaluation in this run)")
        evals = {}
    if not isinstance(evals, dict):
        raise GeoTokenError(f"{path}: field 'eval' should be an object {{split: folder}}, got {evals!r:.80}")
    for name, folder in evals.items():
        if not isinstance(folder, str):
            raise GeoTokenError(f"{path}: field 'eval.{name}' should be a folder path, got {folder!r:.80}")
        eval_section(report, str(name), _relocate(folder, old_root, root))
    samples = summary.get("samples")
    if samples:
        if not isinstance(samples, list):
            raise GeoTokenError(f"{path}: field 'samples' should be a list, got {samples!r:.80}")
        examples_section(report, samples, root, old_root, path)
    else:
        report.missing.append(f"{path}: field 'samples' (no example photos)")
    parts = []
    if isinstance(summary.get("config"), dict):
        parts.append("<h3>configuration</h3>" + _kv_table(summary["config"]))
    else:
        report.missing.append(f"{path}: field 'config'")
    timings = summary.get("timings_s")
    if isinstance(timings, dict):
        stages = summary.get("stages") if isinstance(summary.get("stages"), dict) else {}
        body = "".join(
            f"<tr><th>{esc(k)}</th><td>{v:,.2f}</td><td><code>{esc((stages.get(k) or {}).get('folder', ''))}</code></td></tr>"
            for k, v in timings.items()
            if isinstance(v, (int, float))
        )
        total = summary.get("total_s")
        foot = (
            f"<tr><th>this run, total</th><td>{total:,.2f}</td><td></td></tr>"
            if isinstance(total, (int, float))
            else ""
        )
        parts.append(
            "<h3>stage timings (s, when each stage was built)</h3>"
            f'<table class="kv"><thead><tr><th>stage</th><th>seconds</th><th>folder</th></tr></thead>{body}{foot}</table>'
        )
    else:
        report.missing.append(f"{path}: field 'timings_s'")
    extra = {k: summary[k] for k in ("bundle", "align_metrics") if k in summary}
    if extra:
        parts.append(
            f"<details><summary>more (bundle, alignment metrics)</summary><pre>{esc(json.dumps(extra, indent=1))}</pre></details>"
        )
    report.add("config", "Run configuration and timings", "\n".join(parts))


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
    from PIL import Image

    from geotoken.assets import basemap_image

    with Image.open(basemap_image("bmng")) as im:
        im.draft("RGB", (MINIMAP_WIDTH, MINIMAP_WIDTH // 2))
        uri = pil_uri(im.convert("RGB").resize((MINIMAP_WIDTH, MINIMAP_WIDTH // 2)), jpeg=True, quality=80)
    return f':root{{--basemap:url("{uri}")}}'


def build_report(run_dir: str | os.PathLike) -> str:
    """The report's HTML text for a demo run folder (run.json) or an evaluation folder (metrics.json)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise GeoTokenError(f"{root}: no such folder")
    report = Report(title=f"GeoToken report: {root.resolve().name}")
    if (root / "run.json").is_file():
        run_sections(report, root)
    elif (root / "metrics.json").is_file():
        eval_section(report, root.name, root)
        report.missing.append(
            f"{root / 'run.json'} (an evaluation folder: no run configuration, timings or examples)"
        )
    else:
        raise GeoTokenError(
            f"{root}: neither run.json (a `geotoken demo` run) nor metrics.json (`geotoken evaluate`)"
        )
    if report.missing:
        items = "".join(f"<li>{esc(m)}</li>" for m in report.missing)
        report.sections.append(
            f'<section class="missing" id="missing"><h2>Missing</h2><ul>{items}</ul></section>'
        )
        report.toc.append(("missing", "Missing"))
    toc = "".join(f'<a href="#{a}">{esc(h)}</a>' for a, h in report.toc)
    css = CSS + (_basemap_css() if 'class="minimap"' in "".join(report.sections) else "")
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(report.title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{css}</style></head>\n<body>'
        f"<header><h1>{esc(report.title)}</h1><p>{esc(root.resolve())}</p></header>"
        f"<nav>{toc}</nav><main>\n" + "\n".join(report.sections) + "\n</main></body></html>\n"
    )


def write_report(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write the report (default RUN_DIR/report.html) atomically; return its path."""
    text = build_report(run_dir)
    out = Path(output) if output is not None else Path(run_dir) / "report.html"
    with atomic_open(out, "w", encoding="utf-8") as f:
        f.write(text)
    return out
