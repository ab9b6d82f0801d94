"""Real dataset layouts (MP16, MP16-Pro, Im2GPS3k, YFCC4k, OSV-5M, img2dataset shards) -> manifests,
place texts and reports of what was left out; the `dataset` stage that writes them for the features stage."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest

import helpers
import realdata
from geotoken.cli import main
from geotoken.data.datasets import DatasetSource, ImageIndex, fill_template, read_source, read_texts
from geotoken.data.images import check_images, open_image
from geotoken.data.manifest import read_manifest
from geotoken.errors import GeoTokenError
from geotoken.features import embed
from geotoken.stages import DatasetStageConfig, HoldoutConfig, read_datasets
from geotoken.stages.method import texts_path


def report_reasons(result) -> list[str]:
    return [r[2] for r in result.report]


def test_mp16_nested_folders_keep_rows_with_an_image_and_report_the_rest(tmp_path):
    path, images, ids = realdata.mp16(tmp_path / "mp16", 8, missing=2)
    r = read_source(DatasetSource("gallery", "mp16", str(path), str(images)), tmp_path / "work")
    assert r.manifest.ids.tolist() == ids[:6]
    assert r.manifest.images.tolist() == [str(images / i) for i in ids[:6]]
    assert r.counts["rows_without_image"] == 2 and r.counts["kept"] == 6 and r.texts is None
    assert [row[1] for row in r.report] == ids[6:] and all("no image" in x for x in report_reasons(r))
    assert open_image(r.manifest.images[0]).size == (32, 32)


@pytest.mark.parametrize("layout", ["shards", "flat-tar"])
def test_mp16_images_in_tar_archives_are_found_by_img_id(tmp_path, layout):
    """img2dataset shards (KEY.jpg + KEY.json with the IMG_ID) and one tar of flattened names (G3's)."""
    path, images, ids = realdata.mp16(tmp_path / "mp16", 6, layout=layout, missing=1)
    r = read_source(DatasetSource("gallery", "mp16", str(path), str(images)), tmp_path / "work")
    assert r.manifest.ids.tolist() == ids[:5] and r.counts["rows_without_image"] == 1
    assert all(".tar#" in ref for ref in r.manifest.images.tolist())
    assert list(check_images(r.manifest)) == []
    # every row reads the image of its own id (the colour encodes the coordinates)
    for ref, lat in zip(r.manifest.images.tolist(), r.manifest.lat.tolist()):
        red = np.asarray(open_image(ref))[..., 0].mean()
        assert abs(red - (lat + 90) / 180 * 255) < 25


def test_mp16_pro_place_columns_become_texts_as_g3_builds_them(tmp_path):
    path, images, ids = realdata.mp16(tmp_path / "pro", 6, pro=True)
    r = read_source(DatasetSource("gallery", "mp16-pro", str(path), str(images)), tmp_path / "work")
    assert r.texts[:3] == ["a photo taken in Paris, Ile-de-France, France", "a photo taken in Texas, United States",
                           "a photo taken in Kyoto, Japan"]  # fmt: skip
    # the same texts from the annotation file itself (what `geotoken align train --texts` reads)
    assert read_texts(path, r.manifest.ids[::-1]) == r.texts[::-1]
    assert fill_template("x {a}, {b}", {"a": "nan", "b": ""}) == "x"
    with pytest.raises(GeoTokenError, match="no row with IMG_ID 'nope'"):
        read_texts(path, ["nope"])


@pytest.mark.parametrize("zipped", [False, True])
def test_im2gps3k_reports_images_without_a_label(tmp_path, zipped):
    """Real Im2GPS3k: 3,000 images, 2,997 labels. Here 5 labelled rows, 2 images without a row; the images
    in a folder or in the zip as downloaded (read in place)."""
    path, images, ids = realdata.places365_test_set(
        tmp_path / "im2gps3k", "im2gps3k", 5, 5, extra_images=2, zipped=zipped
    )
    r = read_source(DatasetSource("im2gps3k", "im2gps3k", str(path), str(images)), tmp_path / "work")
    assert len(r.manifest) == 5 and r.counts["images_without_label"] == 2
    assert all((".zip#im2gps3ktest/" in x) == zipped for x in r.manifest.images.tolist())
    assert list(check_images(r.manifest, decode=True)) == []
    assert sorted(row[1].split("/")[-1] for row in r.report) == sorted(ids[5:])
    assert report_reasons(r)[0].startswith("image without")


def test_yfcc_rows_whose_image_is_absent_are_left_out_and_counted(tmp_path):
    """yfcc25600_places365.csv lists 25,600 rows for YFCC4k's 4,536 images: keep the rows with an image."""
    path, images, ids = realdata.places365_test_set(tmp_path / "yfcc", "yfcc25600", 12, 4)
    r = read_source(DatasetSource("yfcc4k", "yfcc4k", str(path), str(images)), tmp_path / "work")
    assert r.manifest.ids.tolist() == ids[:4]
    assert r.counts == {
        "rows": 12,
        "bad_rows": 0,
        "rows_without_image": 8,
        "images_without_label": 0,
        "matched_by_file_name": 0,
        "kept": 4,
    }


@pytest.mark.parametrize("fmt", ["mp16", "osv5m"])
def test_a_bad_row_is_counted_once_not_again_as_an_image_without_a_label(tmp_path, fmt):
    make = realdata.mp16 if fmt == "mp16" else lambda root, n: realdata.osv5m(root, "test", n)
    path, images, ids = make(tmp_path / fmt, 6)
    lines = path.read_text().splitlines()
    cells = lines[3].split(",")
    lat = next(i for i, h in enumerate(lines[0].split(",")) if h.strip().upper() in ("LAT", "LATITUDE"))
    cells[lat] = "123.0"  # row 3's latitude out of range: a bad row, its image still on disk
    path.write_text("\n".join([*lines[:3], ",".join(cells), *lines[4:]]) + "\n")
    r = read_source(DatasetSource(fmt, fmt, str(path), str(images)), tmp_path / "work")
    assert r.counts["bad_rows"] == 1 and r.counts["images_without_label"] == 0 and r.counts["kept"] == 5
    assert len(r.report) == 1 and "123.0 is outside" in r.report[0][2]


@pytest.mark.parametrize("zipped", [False, True])
def test_osv5m_nested_folders_and_zip_archives(tmp_path, zipped):
    path, images, ids = realdata.osv5m(tmp_path / "osv5m", "test", 6, zipped=zipped)
    r = read_source(DatasetSource("osv5m", "osv5m", str(path), str(images)), tmp_path / "work")
    assert r.manifest.ids.tolist() == ids and r.counts["rows_without_image"] == 0
    refs = r.manifest.images.tolist()
    assert all((".zip#" in x) == zipped for x in refs) and refs[4].endswith(f"01/{ids[4]}.jpg")
    assert list(check_images(r.manifest, decode=True)) == []
    assert open_image(refs[0]).size == (32, 32)


def test_a_bad_row_is_reported_with_its_line(tmp_path):
    path, images, ids = realdata.mp16(tmp_path / "mp16", 4)
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace(lines[2].split(",")[2], "123.0", 1)  # latitude out of range
    path.write_text("\n".join(lines) + "\n")
    r = read_source(DatasetSource("gallery", "mp16", str(path), str(images)), tmp_path / "work")
    assert len(r.manifest) == 3 and r.counts["bad_rows"] == 1
    assert r.report[0][0].endswith("line 3") and "outside [-90, 90]" in r.report[0][2]


def test_manifest_format_counts_bad_rows_apart_from_missing_images(tmp_path, capsys):
    """`manifest --format` leaves bad rows out (a real dataset has some) but says so, by kind, not as
    rows whose image is missing."""
    path, images, ids = realdata.mp16(tmp_path / "mp16", 6, missing=1)
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace(lines[2].split(",")[2], "95", 1)  # latitude out of range
    path.write_text("\n".join([*lines, lines[3]]) + "\n")  # and a duplicate id
    out = tmp_path / "out" / "gallery.csv"
    assert main(["manifest", str(path), "--format", "mp16", "--image-root", str(images), "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert (
        "4 rows with an image; left out: bad rows (" in said
        and "short rows): 2, rows without an image: 1" in said
    )
    assert "every row or image left out is in gallery.report.csv" in said
    report = list(csv.reader(open(out.with_suffix(".report.csv"), encoding="utf-8")))
    assert report[0] == ["where", "id", "reason"] and len(report) == 4


def test_image_index_refuses_what_is_not_images(tmp_path):
    (tmp_path / "x.txt").write_text("no")
    with pytest.raises(GeoTokenError, match="must be a folder, a .tar or a .zip"):
        ImageIndex.scan(tmp_path / "x.txt")
    with pytest.raises(GeoTokenError, match="not found"):
        ImageIndex.scan(tmp_path / "nowhere")
    with pytest.raises(GeoTokenError, match="unknown format"):
        DatasetSource("a", "mp17", "x.csv")


def test_the_dataset_stage_writes_manifests_texts_and_reports(tmp_path):
    pro, pro_images, _ = realdata.mp16(tmp_path / "pro", 10, pro=True, missing=1)
    yf, yf_images, _ = realdata.places365_test_set(tmp_path / "yfcc", "yfcc25600", 6, 3)
    config = DatasetStageConfig(
        sources=(DatasetSource("gallery", "mp16-pro", str(pro), str(pro_images)),
                 DatasetSource("yfcc4k", "yfcc4k", str(yf), str(yf_images))),
        holdout=HoldoutConfig("val", "gallery", size=2, seed=0),
    )  # fmt: skip
    out = tmp_path / "data"
    out.mkdir()
    info = read_datasets(config, out, log=lambda s: None)
    assert info["sizes"] == {"gallery": 7, "yfcc4k": 3, "val": 2}
    gallery, val = read_manifest(out / "gallery.csv"), read_manifest(out / "val.csv")
    assert not set(gallery.ids) & set(val.ids) and all(os.path.isfile(x) for x in gallery.images)
    with open(texts_path(out, "gallery"), newline="") as f:
        texts = list(csv.DictReader(f))
    assert [t["id"] for t in texts] == gallery.ids.tolist() and texts[0]["text"].startswith(
        "a photo taken in"
    )
    assert read_texts(texts_path(out, "val"), val.ids) == read_texts(pro, val.ids)
    with open(out / "yfcc4k.report.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert info["sources"]["yfcc4k"]["rows_without_image"] == 3 and not (out / "yfcc4k.texts.csv").exists()
    with pytest.raises(GeoTokenError, match="holdout size"):
        read_datasets(DatasetStageConfig(config.sources, HoldoutConfig(size=100)), tmp_path, log=print)


@pytest.mark.slow
def test_zip_members_embed_the_same_in_forked_workers(tmp_path):
    """Zip members read by forked DataLoader workers (after the main process opened the archive, as the
    dataset stage does) embed exactly as in the main process. Each process opens its own handle."""
    path, images, ids = realdata.osv5m(tmp_path / "osv5m", "test", 24, zipped=True)
    r = read_source(DatasetSource("test", "osv5m", str(path), str(images)), tmp_path / "work")
    assert list(check_images(r.manifest, decode=True)) == []  # opens the zips here, before the fork
    backbone = helpers.TinyBackbone().eval()
    one = embed(r.manifest, backbone, tmp_path / "w0", batch_size=4, num_workers=0)
    two = embed(r.manifest, backbone, tmp_path / "w2", batch_size=4, num_workers=2)
    assert np.array_equal(np.asarray(one["features"]), np.asarray(two["features"]))


def test_a_reused_dataset_stage_whose_annotations_changed_is_refused_naming_the_file(tmp_path):
    """The annotation files are outside the run, so not in the stage's identity: a csv edited after the
    stage ran would have been reused (the dry run said "done (reused)" with the new row count)."""
    from geotoken.stages.config import RunConfig, plan_run, plan_text
    from geotoken.stages.runner import Pipeline, Run, StageSpec, run_pipeline

    path, images, _ = realdata.mp16(tmp_path / "mp16", 6)
    source = DatasetSource("gallery", "mp16", str(path), str(images))
    pipeline = Pipeline((StageSpec("data", "dataset", DatasetStageConfig((source,))),))
    run = Run(tmp_path / "run", log=lambda s: None)
    assert run_pipeline(pipeline, run)["data"].info["sizes"] == {"gallery": 6}
    assert run_pipeline(pipeline, run)["data"].info["sizes"] == {"gallery": 6}  # unchanged: reused
    plan = RunConfig(pipeline, str(tmp_path / "run"), tmp_path / "x.yaml")
    assert "PROBLEM" not in plan_text(plan, plan_run(plan))
    data = path.read_bytes()
    path.write_bytes(data)  # rewritten with the same bytes (a copy to another disk): still reusable
    assert run_pipeline(pipeline, run)["data"].info["sizes"] == {"gallery": 6}
    row = data.splitlines()[1]
    digit = next(i for i in range(row.index(b",") + 1, len(row)) if chr(row[i]).isdigit())
    edited = row[:digit] + str((int(chr(row[digit])) + 1) % 10).encode() + row[digit + 1 :]  # the same size
    path.write_bytes(data.replace(row, edited, 1))
    with pytest.raises(GeoTokenError, match=f"changed since: {path} was edited \\(same size, other bytes\\)"):
        run_pipeline(pipeline, run)
    path.write_bytes(data)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:4]) + "\n")  # the user cuts the csv
    with pytest.raises(GeoTokenError, match=f"changed since: {path} had .* bytes, now"):
        run_pipeline(pipeline, run)
    assert f"PROBLEM: changed since this stage ran: {path}" in plan_text(plan, plan_run(plan))
