"""`geotoken predict DIR/ -o predictions.csv|.jsonl`: folders walked recursively, one row per photo, renamed
into place when whole and resumed after a kill; unreadable files stop it (exit 2, no output file) or, with
--skip-bad, are recorded; memory stays bounded over 1,000 photos (`predict_photos` streams). GeoCLIP on a
tiny random CLIP, and a bundle."""

import csv
import io
import json
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from geotoken.cli import main
from geotoken.data.images import list_images
from geotoken.errors import GeoTokenError
from geotoken.photos import CSV_COLUMNS, predict_photos, write_predictions

torch.set_num_threads(1)


pytestmark = pytest.mark.usefixtures("offline_hub")  # GeoCLIP fixtures: tests/conftest.py


def jpeg(seed: int, gps: tuple[float, float] | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    if gps:
        ifd = exif.get_ifd(ExifTags.IFD.GPSInfo)
        ifd[ExifTags.GPS.GPSLatitudeRef], ifd[ExifTags.GPS.GPSLatitude] = "N", (48.0, 51.0, 24.0)
        ifd[ExifTags.GPS.GPSLongitudeRef], ifd[ExifTags.GPS.GPSLongitude] = "E", (2.0, 21.0, 0.0)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, exif=exif)
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    """photos/ with nested JPEGs (one with EXIF GPS), a non-image file, a hidden file and a corrupt JPEG."""
    root = tmp_path / "photos"
    for rel, seed in (("b.jpg", 1), ("a/z.JPG", 2), ("a/deeper/m.jpeg", 3), ("c/x.jpg", 4)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(jpeg(seed, gps=(48.8567, 2.35) if rel == "b.jpg" else None))
    (root / "notes.txt").write_text("not a photo")
    (root / ".hidden.jpg").write_bytes(b"x")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def test_list_images_walks_folders_sorted(folder, tmp_path):
    refs = list_images([folder, "shard.tar#k.jpg"])
    rel = [str(p)[len(str(folder)) + 1 :] for p in refs[:-1]]
    assert rel == ["a/broken.jpg", "a/deeper/m.jpeg", "a/z.JPG", "b.jpg", "c/x.jpg"]
    assert refs[-1] == "shard.tar#k.jpg" and list_images([folder]) == refs[:-1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(GeoTokenError, match="empty: no image files"):
        list_images([tmp_path / "empty"])


def test_cli_folder_to_csv_and_jsonl_geoclip(shipped, clip_dir, folder, tmp_path, capsys):
    base = ["predict", str(folder), "--model", "geoclip", "--clip", str(clip_dir), "--top-k", "3"]
    out = tmp_path / "out" / "predictions.csv"
    # without --skip-bad: a clear error naming the corrupt file, exit 2, no output; the rows before it are
    # kept for the rerun (broken.jpg is the first photo: none here)
    assert main([*base, "-o", str(out)]) == 2
    [err] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert err.startswith("geotoken predict: error:") and "broken.jpg" in err and "--skip-bad" in err
    assert not out.exists() and sorted(p.name for p in out.parent.glob("*")) == [
        "predictions.csv.partial", "predictions.csv.partial.json"]  # fmt: skip

    assert main([*base, "-o", str(out), "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "wrote 5 predictions (1 unreadable)" in captured.out
    assert sorted(p.name for p in out.parent.glob("*")) == ["predictions.csv"]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [r["file"] for r in rows] == list_images([folder])
    bad = [r for r in rows if r["error"]]
    assert [r["file"] for r in bad] == [str(folder / "a" / "broken.jpg")] and bad[0]["lat"] == ""
    good = {r["file"]: r for r in rows if not r["error"]}
    assert len(good) == 4 and all(
        -90 <= float(r["lat"]) <= 90 and len(r["cell"]) == 11 for r in good.values()
    )
    assert all(0 < float(r["probability"]) <= 1 and r["country"] for r in good.values())
    tagged = good[str(folder / "b.jpg")]
    assert (
        float(tagged["exif_lat"]) == pytest.approx(48.8567, abs=1e-3)
        and float(tagged["exif_distance_km"]) >= 0
    )
    assert good[str(folder / "c" / "x.jpg")]["exif_lat"] == ""

    jl = tmp_path / "predictions.jsonl"
    assert main([*base, "-o", str(jl), "--skip-bad"]) == 0
    capsys.readouterr()
    objs = [json.loads(line) for line in jl.read_text().splitlines()]
    assert [o["file"] for o in objs] == [r["file"] for r in rows]
    by_file = {o["file"]: o for o in objs}
    assert set(by_file[str(folder / "a" / "broken.jpg")]) == {"file", "error"}
    first = by_file[str(folder / "b.jpg")]
    assert first["strategy"] == "geoclip" and len(first["candidates"]) == 3 and "exif_gps" in first
    assert first["lat"] == pytest.approx(float(tagged["lat"]), abs=1e-6)

    assert main([*base, "-o", str(tmp_path / "p.txt")]) == 2
    assert "must end in .csv or .jsonl" in capsys.readouterr().err


def test_cli_folder_with_a_bundle(random_bundle, folder, tmp_path, capsys):
    bundle = random_bundle(gallery_rows=64, k=3, image_size=32)
    (folder / "a" / "broken.jpg").unlink()
    out = tmp_path / "bundle.jsonl"
    args = ["predict", str(folder), "--model", str(bundle), "--top-k", "2", "--strategy", "greedy"]
    assert main([*args, "-o", str(out), "--batch-size", "3"]) == 0
    assert "wrote 4 predictions (0 unreadable)" in capsys.readouterr().out
    objs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [o["file"] for o in objs] == list_images([folder]) and len(objs) == 4
    assert all(o["strategy"] == "greedy" and 1 <= len(o["candidates"]) <= 2 for o in objs)
    # on the terminal, a folder works the same way
    assert main([*args, "--json"]) == 0
    assert [r["file"] for r in json.loads(capsys.readouterr().out)] == [o["file"] for o in objs]


def test_write_predictions_library(geo, folder, tmp_path):
    seen = []
    done = write_predictions(geo, [folder], tmp_path / "p.csv", 2, 2, skip_bad=True, on_error=lambda p, e: seen.append(p))  # fmt: skip
    assert done["photos"] == 5 and done["failed"] == 1 and seen == [str(folder / "a" / "broken.jpg")]
    with pytest.raises(GeoTokenError, match="broken.jpg"):
        list(predict_photos(geo, [folder], 2, 2))
    # a second job on the same output while one runs is refused: resuming it would interleave their rows
    from geotoken.io import exclusive

    out = tmp_path / "q.jsonl"
    with exclusive(tmp_path / "q.jsonl.lock", "the first"):
        with pytest.raises(
            GeoTokenError, match=r"q.jsonl: another process is writing it \(it holds .*q.jsonl.lock\)"
        ):
            write_predictions(geo, [folder], out, 2, 2, skip_bad=True)
        assert not out.exists() and not (tmp_path / "q.jsonl.partial").exists()
    assert write_predictions(geo, [folder], out, 2, 2, skip_bad=True)["photos"] == 5
    assert sorted(p.name for p in tmp_path.glob("q.jsonl*")) == ["q.jsonl"]  # no lock file left


def test_predicting_1000_photos_keeps_memory_bounded(geo, tmp_path):
    """Peak Python allocations while predicting 1,000 files into a CSV are not ~10x those for 100 files."""
    paths = []
    for i in range(1000):
        paths.append(tmp_path / "many" / f"{i:04d}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        Image.new("RGB", (16, 12), (i % 256, (7 * i) % 256, (13 * i) % 256)).save(paths[-1])

    def peak(n: int) -> int:
        tracemalloc.start()
        try:
            done = write_predictions(geo, paths[:n], tmp_path / f"p{n}.csv", 1, 32)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            assert done["photos"] == n

    write_predictions(geo, paths[:40], tmp_path / "warm.csv", 1, 32)  # lazy initialisation out of the way
    small, large = peak(100), peak(1000)
    assert large < 2 * small, (small, large)


class Interrupted:
    """A predictor killed (KeyboardInterrupt) at its `fail_at`-th batch."""

    def __init__(self, geo, fail_at: int):
        self.geo, self.fail_at, self.calls = geo, fail_at, 0

    @property
    def root(self):
        return getattr(self.geo, "root", None)

    def info(self) -> dict:
        return self.geo.info()

    def predict(self, images, **options):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.geo.predict(images, **options)


def rows(path) -> list:
    """The rows of a predictions file, without the timings (which differ from run to run)."""
    if path.suffix == ".csv":
        return path.read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if k != "timings_ms"}
        for line in path.read_text().splitlines()
    ]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_killed_write_goes_on_where_it_stopped(geo, tmp_path, suffix):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(10):
        (photos / f"{i:02d}.jpg").write_bytes(jpeg(i, gps=(48.8567, 2.35) if i == 4 else None))
    whole = tmp_path / f"whole{suffix}"
    write_predictions(geo, [photos], whole, 2, 3)
    out = tmp_path / f"p{suffix}"
    with pytest.raises(KeyboardInterrupt):
        write_predictions(Interrupted(geo, 3), [photos], out, 2, 3)  # killed in its third batch: 6 rows kept
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and len(partial.read_text().splitlines()) == 6 + (suffix == ".csv")
    with open(partial, "a") as f:
        f.write("torn half of a r")  # killed in the middle of a row
    done = write_predictions(Interrupted(geo, 0), [photos], out, 2, 3)
    assert done["resumed"] == 6 and done["photos"] == 10 and done["failed"] == 0
    assert rows(out) == rows(whole) and not partial.exists()
    # another job does not resume: other options, or other photos before the rows written
    with pytest.raises(KeyboardInterrupt):
        write_predictions(Interrupted(geo, 2), [photos], out, 2, 3)
    if suffix == ".csv":  # a CSV row is the top candidate whatever top_k: the rows written are kept
        assert write_predictions(geo, [photos], out, 1, 3)["resumed"] == 3 and rows(out) == rows(whole)
    else:
        with pytest.warns(
            UserWarning,
            match=r"p\S*\.partial: starting over, 3 earlier rows given up: .*top_k 2 there, 1 now",
        ):
            assert write_predictions(geo, [photos], out, 1, 3)["resumed"] == 0  # top_k 1 against 2
    with pytest.raises(KeyboardInterrupt):
        write_predictions(Interrupted(geo, 2), [photos], out, 2, 3)
    (photos / "00a.jpg").write_bytes(jpeg(11))  # a new photo among the rows written
    with pytest.warns(
        UserWarning,
        match=r"3 earlier rows given up: its photos differ .* from row 2: \S*01\.jpg there, \S*00a\.jpg now",
    ):
        assert write_predictions(geo, [photos], out, 2, 3)["resumed"] == 0


def test_a_bundle_recalibrated_in_place_starts_its_predictions_over(random_bundle, tmp_path):
    """Resumed after `geotoken calibrate` rewrote the bundle's calibration, the file mixed old and new
    probabilities for the same photos: the bundle's files are part of the job."""
    import shutil

    from geotoken.bundle import set_bundle_part
    from geotoken.predict import Geolocator
    from geotoken.search.calibration import Calibration

    bundle = tmp_path / "bundle"
    shutil.copytree(random_bundle(gallery_rows=32, k=3, image_size=32), bundle)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        (photos / f"{i:02d}.jpg").write_bytes(jpeg(i))
    out = tmp_path / "p.csv"
    with pytest.raises(KeyboardInterrupt):
        write_predictions(Interrupted(Geolocator.from_bundle(bundle), 2), [photos], out, 1, 2)
    assert write_predictions(Geolocator.from_bundle(bundle), [photos], out, 1, 2)["resumed"] == 2  # as it was
    with pytest.raises(KeyboardInterrupt):
        write_predictions(Interrupted(Geolocator.from_bundle(bundle), 2), [photos], out, 1, 2)
    Calibration().save(bundle / "calibration.json")
    set_bundle_part(bundle, "calibration", "calibration.json")
    with pytest.warns(
        UserWarning,
        match=r"given up: .*the bundle's files changed since \(\S*bundle.json, \S*calibration.json\)",
    ):
        assert write_predictions(Geolocator.from_bundle(bundle), [photos], out, 1, 2)["resumed"] == 0


class FellBack(Interrupted):
    """A predictor whose MLLM answers could not be used: every prediction says so in its note."""

    def predict(self, images, **options):
        import dataclasses

        note = "mllm failed (HTTP 500 from http://127.0.0.1:9/v1); fell back to logp"
        return [dataclasses.replace(p, note=note) for p in self.geo.predict(images, **options)]


def test_photos_that_fell_back_are_counted_and_their_note_is_in_the_csv(geo, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.jpg").write_bytes(jpeg(i))
    done = write_predictions(FellBack(geo, 0), [photos], tmp_path / "p.csv", 1, 2)
    assert done["fell_back"] == 3
    with open(tmp_path / "p.csv", newline="") as f:
        assert all("fell back to logp" in r["note"] and not r["error"] for r in csv.DictReader(f))
    assert write_predictions(geo, [photos], tmp_path / "q.csv", 1, 2)["fell_back"] == 0


def test_unreadable_rows_written_before_a_kill_still_count(geo, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "00.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    for i in range(1, 6):
        (photos / f"{i:02d}.jpg").write_bytes(jpeg(i))
    out = tmp_path / "p.csv"
    with pytest.raises(KeyboardInterrupt):
        write_predictions(Interrupted(geo, 2), [photos], out, 1, 2, skip_bad=True)  # rows 00 (bad), 01 kept
    done = write_predictions(geo, [photos], out, 1, 2, skip_bad=True)
    assert (done["resumed"], done["photos"], done["failed"]) == (2, 6, 1)


def test_missing_photos_are_said_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """A typo in the photo path must not cost loading CLIP ViT-L/14 (or downloading it) first."""
    from geotoken.predict import Geolocator

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Geolocator, "from_pretrained", load)
    here = tmp_path / "a.jpg"
    here.write_bytes(jpeg(0))
    gone = str(tmp_path / "typo")
    for argv, more in [([gone], ""), ([gone, str(tmp_path / "typo2")], " (1 more missing)"),
                       ([str(here), gone, "-o", str(tmp_path / "p.csv")], "")]:  # fmt: skip
        assert main(["predict", *argv, "--model", "geoclip"]) == 2
        assert f"{gone}: no such file or folder{more}" in capsys.readouterr().err
    # where the job goes on past a missing file (the terminal, or --skip-bad), it is reported in its turn
    with pytest.raises(AssertionError, match="loaded"):
        main(["predict", str(here), gone, "--model", "geoclip"])
    with pytest.raises(AssertionError, match="loaded"):
        main(["predict", str(here), gone, "--model", "geoclip", "-o", str(tmp_path / "p.csv"), "--skip-bad"])
