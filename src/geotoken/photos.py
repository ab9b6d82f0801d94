"""Photo files in, one answer per file out: folders walked for images, streamed a batch at a time, written
as CSV or JSON lines (`geotoken predict DIR/ -o predictions.csv`, resumable after a kill), for any
predictor (a GeoToken `Geolocator` or the built-in `GeoCLIPPredictor`)."""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from geotoken.bundle import bundle_state
from geotoken.data.images import exif_gps, list_images, open_image
from geotoken.errors import GeoTokenError
from geotoken.geo import haversine_km
from geotoken.io import exclusive, read_json, write_json
from geotoken.predict import Geolocator
from geotoken.prediction import Prediction
from geotoken.pretrained import GeoCLIPPredictor
from geotoken.search.mllm import fell_back

PREDICTION_FORMATS = (".csv", ".jsonl")  # `write_predictions`: by the output's extension
CSV_COLUMNS = ("file", "lat", "lon", "probability", "probability_within_km", "cell", "city", "country",
               "exif_lat", "exif_lon", "exif_distance_km", "note", "error")  # fmt: skip


@dataclass
class PhotoResult:
    """One photo file's answer: its `Prediction` and EXIF GPS (with the distance to the top candidate) if it
    has one, or the one-line reason it could not be read."""

    file: str
    prediction: Prediction | None = None
    exif_gps: dict | None = None  # {"lat", "lon", "distance_km"}
    error: str | None = None

    def to_dict(self) -> dict:
        """The JSON form: {"file", **Prediction.to_dict(), "exif_gps"?} or {"file", "error"}."""
        if self.prediction is None:
            return {"file": self.file, "error": self.error}
        gps = {"exif_gps": self.exif_gps} if self.exif_gps else {}
        return {"file": self.file, **self.prediction.to_dict(), **gps}

    def csv_row(self) -> list:
        """One row under `CSV_COLUMNS`: the top candidate (empty fields for an unreadable file)."""
        if self.prediction is None:
            return [self.file, *[""] * (len(CSV_COLUMNS) - 2), self.error]
        c, gps = self.prediction.candidates[0], self.exif_gps or {}
        return [self.file, f"{c.lat:.6f}", f"{c.lon:.6f}", f"{c.probability:.6f}", f"{c.probability_within_km:g}",
                c.cell, c.place.get("city") or "", c.place.get("country") or "",
                *(gps.get(key, "") for key in ("lat", "lon", "distance_km")), self.prediction.note, ""]  # fmt: skip


def photo_gps(image, prediction: Prediction) -> dict | None:
    """The photo's own EXIF GPS and its distance in km to the top candidate, if it has one."""
    gps = exif_gps(image)
    if gps is None:
        return None
    km = float(haversine_km(gps[0], gps[1], prediction.lat, prediction.lon))
    return {"lat": gps[0], "lon": gps[1], "distance_km": round(km, 3)}


def predict_photos(
    geo: Geolocator | GeoCLIPPredictor,
    photos: Iterable[str | os.PathLike],
    top_k: int = 5,
    batch_size: int = 16,
    *,
    skip_bad: bool = False,
    on_error: Callable[[str, str], None] | None = None,
    progress: bool = False,
    strategy: str | None = None,
    select: str | None = None,
    **options,
) -> Iterator[PhotoResult]:
    """Photo files (folders stand for the images under them, see `list_images`) -> one `PhotoResult` each,
    in order, read and predicted `batch_size` at a time: nothing is held beyond one batch.

    An unreadable file raises GeoTokenError naming it, unless `skip_bad`: then it yields a result with its
    `error` (and calls `on_error(file, error)`) and the others still run. `options` go to `geo.predict`."""
    if batch_size < 1:
        raise GeoTokenError(f"batch_size must be >= 1, got {batch_size}")
    refs = list_images(photos)
    with tqdm(total=len(refs), desc="predict", unit="photo", disable=not progress) as bar:
        for start in range(0, len(refs), batch_size):
            paths = refs[start : start + batch_size]
            images: list = []
            for p in paths:
                try:
                    images.append(open_image(p))
                except (GeoTokenError, OSError) as exc:
                    if not skip_bad:
                        raise GeoTokenError(
                            f"{exc} (pass --skip-bad to record unreadable photos and go on)"
                        ) from None
                    images.append(str(exc))
                    if on_error is not None:
                        on_error(p, str(exc))
            good = [im for im in images if not isinstance(im, str)]
            preds = iter(
                geo.predict(
                    good, top_k=top_k, strategy=strategy, select=select, batch_size=batch_size, **options
                )
                if good
                else []
            )
            for p, im in zip(paths, images, strict=True):
                if isinstance(im, str):
                    yield PhotoResult(p, error=im)
                else:
                    pred = next(preds)
                    yield PhotoResult(p, pred, photo_gps(im, pred))
            bar.update(len(paths))


def write_predictions(
    geo: Geolocator | GeoCLIPPredictor,
    photos: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    top_k: int = 5,
    batch_size: int = 16,
    **kwargs,
) -> dict:
    """Predict photo files (`predict_photos`, same keywords) into `out`: `.csv` (one row per photo,
    `CSV_COLUMNS`: the top candidate, EXIF GPS, error) or `.jsonl` (one `PhotoResult.to_dict()` per line).
    Returns {"path", "photos", "failed", "resumed"}.

    Resumable: rows go to `OUT.partial` as each batch finishes (its job, the model and the options, in
    `OUT.partial.json`), and the finished file replaces `out` in one rename. Run again after a kill, the same
    job goes on after the last whole row; another job (other options or model, other photos) starts over.
    An unreadable file without `skip_bad` stops it with the rows so far kept for the rerun."""
    out = Path(out)
    kind = out.suffix.lower()
    if kind not in PREDICTION_FORMATS:
        raise GeoTokenError(f"{out}: the output must end in {' or '.join(PREDICTION_FORMATS)}")
    refs = list_images(photos)
    partial, job_file = out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.json")
    search = {k: v for k, v in kwargs.items() if k not in ("skip_bad", "on_error", "progress")}
    job = {"format": PARTIAL_FORMAT, "model": geo.info(), "search": search}
    if getattr(geo, "root", None) is not None:  # recalibrated or retrained in place: another model
        job["bundle_files"] = bundle_state(geo.root)
    if kind == ".jsonl":  # a CSV row is the top candidate only, whatever top_k
        job["top_k"] = top_k
    job = json.loads(json.dumps(job, default=str))  # as it reads back from the file
    with exclusive(out.with_name(out.name + ".lock"), str(out)):  # one job at a time on `out`
        done, failed, fell = _write_rows(
            geo, refs, out, kind, partial, job_file, job, top_k, batch_size, **kwargs
        )
    return {"path": out, "photos": len(refs), "failed": failed, "resumed": done, "fell_back": fell}


def _write_rows(
    geo, refs, out, kind, partial, job_file, job, top_k, batch_size, **kwargs
) -> tuple[int, int, int]:
    """`write_predictions` under its lock: (rows resumed, unreadable photos in the whole output, photos of
    this run whose MLLM answer could not be used: they kept the model's own choice, their note says why)."""
    resumed = _resume_point(partial, job_file, job, kind, refs)
    out.parent.mkdir(parents=True, exist_ok=True)
    if resumed is None:  # a fresh start
        write_json(job_file, job)
        with open(partial, "w", newline="", encoding="utf-8") as f:
            if kind == ".csv":
                csv.writer(f).writerow(CSV_COLUMNS)
        resumed = 0, 0
    (done, failed), fell = resumed, 0
    with open(partial, "a", newline="", encoding="utf-8") as f:
        writer = csv.writer(f) if kind == ".csv" else None
        batch = 0
        for result in predict_photos(geo, refs[done:], top_k, batch_size, **kwargs):
            failed += result.error is not None
            fell += result.prediction is not None and fell_back(result.prediction.note)
            if writer is not None:
                writer.writerow(result.csv_row())
            else:
                f.write(json.dumps(result.to_dict()) + "\n")
            batch += 1
            if batch == batch_size:  # a batch is whole in the file before the next one is read: a kill
                f.flush()  # loses at most the batch in flight
                batch = 0
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it the output
    os.replace(partial, out)
    job_file.unlink(missing_ok=True)
    return done, failed, fell


PARTIAL_FORMAT = "geotoken/partial-predictions/1"


def _changed_files(there, now) -> str:
    """The bundle files that differ between two `bundle_state` listings, named."""
    there, now = there if isinstance(there, dict) else {}, now if isinstance(now, dict) else {}
    names = sorted(k for k in set(there) | set(now) if there.get(k) != now.get(k))
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"the bundle's files changed since ({shown})"


def _resume_point(
    partial: Path, job_file: Path, job: dict, kind: str, refs: list[str]
) -> tuple[int, int] | None:
    """(how many of `refs` `partial` already holds, in order, for this `job`; how many of those are rows of
    unreadable photos), a torn last line cut off; or None to start over (no partial file, another job, or
    rows of other photos: then a warning says why, and how many rows are given up)."""
    if not partial.is_file() or not job_file.is_file():
        return None
    data = partial.read_bytes()
    try:
        old = read_json(job_file)
    except GeoTokenError:
        old = None
    if old != job:
        return _start_over(partial, data, kind, f"it was written by another job ({_job_changes(old, job)})")
    whole = data[: data.rfind(b"\n") + 1]  # rows end in a newline; the last one may be torn
    try:
        text = whole.decode("utf-8")
        if kind == ".csv":
            rows = list(csv.reader(io.StringIO(text, newline="")))
            if not rows or tuple(rows[0]) != CSV_COLUMNS or any(len(r) != len(CSV_COLUMNS) for r in rows[1:]):
                return _start_over(
                    partial, data, kind, f"its rows are not this version's columns {','.join(CSV_COLUMNS)}"
                )
            files, failed = [r[0] for r in rows[1:]], sum(1 for r in rows[1:] if r[-1])
        else:
            objs = [json.loads(line) for line in text.splitlines()]
            files, failed = [o["file"] for o in objs], sum("error" in o for o in objs)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        return _start_over(partial, data, kind, f"it cannot be read ({type(exc).__name__}: {exc})")
    if files != refs[: len(files)]:
        i = next((i for i, (a, b) in enumerate(zip(files, refs)) if a != b), len(refs))
        now = refs[i] if i < len(refs) else "no photo (fewer photos now)"
        return _start_over(
            partial,
            data,
            kind,
            f"its photos differ from this job's from row {i + 1}: {files[i]} there, {now} now",
        )
    if len(whole) < len(data):
        with open(partial, "r+b") as f:
            f.truncate(len(whole))
    return len(files), failed


def _start_over(partial: Path, data: bytes, kind: str, why: str) -> None:
    """Warn that the rows in `partial` (its bytes: `data`) are given up, and why."""
    rows = data.count(b"\n") - (kind == ".csv")  # less the header
    warnings.warn(f"{partial}: starting over, {max(rows, 0)} earlier rows given up: {why}", stacklevel=4)


def _job_changes(old, new: dict) -> str:
    """What differs between the job that wrote a partial output and this one, as `key old there, new now`."""
    if not isinstance(old, dict):
        return "its job file cannot be read"
    flat = {}
    for side, job in (("there", old), ("now", new)):
        for key, value in job.items():
            for name, v in value.items() if isinstance(value, dict) and key == "search" else [(key, value)]:
                flat.setdefault(name, {})[side] = v
    changes = [
        "another model"
        if name == "model"
        else _changed_files(v.get("there"), v.get("now"))
        if name == "bundle_files"
        else f"{name} {v.get('there', 'unset')} there, {v.get('now', 'unset')} now"
        for name, v in flat.items()
        if v.get("there") != v.get("now")
    ]
    return "; ".join(changes) or "another job"
