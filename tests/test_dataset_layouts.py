"""Real dataset layouts as users actually have them on disk: symlinked folders, macOS zips, ids without an
extension, byte-split archives, truncated or duplicated annotation rows, and colliding file names."""

from __future__ import annotations

import csv
import os
import shutil
import tarfile
import zipfile

import pytest
from PIL import Image

import realdata
from geotoken.data.datasets import DatasetSource, ImageIndex, read_source
from geotoken.data.table import Manifest
from geotoken.errors import GeoTokenError
from geotoken.features import embed
from geotoken.stages import DatasetStageConfig, HoldoutConfig, read_datasets
from helpers import TinyBackbone


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_images_in_symlinked_folders_are_found_and_a_symlink_loop_ends(tmp_path):
    """MP16 on several disks: images/8a -> /disk2/8a. os.walk did not follow the links, so every row under
    one was reported as having no image."""
    path, images, ids = realdata.mp16(tmp_path / "mp16", 6)
    disk = tmp_path / "disk2"
    disk.mkdir()
    for top in sorted({i.split("/")[0] for i in ids[:3]}):
        shutil.move(images / top, disk / top)
        os.symlink(disk / top, images / top)
    os.symlink(images, images / "loop")  # a link back up: scanned once, not forever
    r = read_source(DatasetSource("gallery", "mp16", str(path), str(images)), tmp_path / "work")
    assert r.manifest.ids.tolist() == ids and r.counts["rows_without_image"] == 0
    assert r.counts["images_without_label"] == 0


def test_macos_junk_in_zips_and_folders_is_not_an_image(tmp_path):
    """A zip made on macOS holds __MACOSX/im2gps3ktest/._NAME.jpg for every photo: they were counted as
    images without a label."""
    path, images, ids = realdata.places365_test_set(tmp_path / "im2gps3k", "im2gps3k", 4, 4, zipped=True)
    with zipfile.ZipFile(images, "a") as z:
        for name in ids:
            z.writestr(f"__MACOSX/im2gps3ktest/._{name}", b"\x00\x05\x16\x07" + b"\x00" * 60)
    r = read_source(DatasetSource("im2gps3k", "im2gps3k", str(path), str(images)), tmp_path / "work")
    assert len(r.manifest) == 4 and r.counts["images_without_label"] == 0 and r.report == []
    folder = tmp_path / "folder"
    (folder / "__MACOSX").mkdir(parents=True)
    (folder / "__MACOSX" / "a.jpg").write_bytes(b"x")
    (folder / "._b.jpg").write_bytes(b"x")
    (folder / "c.jpg").write_bytes(b"x")
    assert list(ImageIndex.scan(folder).refs) == ["c.jpg"]


def test_ids_without_an_extension_match_their_jpg(tmp_path):
    """A YFCC4k csv whose IMG_ID is `6000000000` next to the file `6000000000.jpg`: nothing matched."""
    path, images, ids = realdata.places365_test_set(tmp_path / "yfcc", "yfcc25600", 6, 4)
    text = path.read_text()
    for i in ids:
        text = text.replace(i, i[: -len(".jpg")])
    path.write_text(text)
    r = read_source(DatasetSource("yfcc4k", "yfcc4k", str(path), str(images)), tmp_path / "work")
    assert r.manifest.ids.tolist() == [i[:-4] for i in ids[:4]]
    assert r.manifest.images.tolist() == [str(images / i) for i in ids[:4]]
    assert r.counts["rows_without_image"] == 2 and r.counts["images_without_label"] == 0


def test_file_name_fallback_needs_a_unique_name_and_is_counted(tmp_path):
    """Rows naming test/1.jpg matched train/1.jpg by file name. A name several images share matches none of
    them; a unique name still matches (G3's flattened tar, OSV-5M's sub-folders), and the rows matched in
    another folder than they name are counted and logged."""
    root = tmp_path / "imgs"
    for rel in ("train/1.jpg", "train/2.jpg", "val/2.jpg", "a_b_3.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(realdata.jpeg(0, 0, 0))
    index = ImageIndex.scan(root)
    assert index.match("test/1.jpg") == (str(root / "train/1.jpg"), True)
    assert index.match("test/2.jpg") == (None, False)  # train/2.jpg or val/2.jpg: not a guess
    assert index.match("a/b/3.jpg") == (str(root / "a_b_3.jpg"), False)  # the flattened form
    assert index.match("1.jpg") == (str(root / "train/1.jpg"), False)  # the row names no folder
    annotations = tmp_path / "test.csv"
    annotations.write_text("IMG_ID,LAT,LON\ntest/1.jpg,10,10\ntest/2.jpg,20,20\n")
    r = read_source(DatasetSource("test", "im2gps3k", str(annotations), str(root)), tmp_path / "work")
    assert r.manifest.ids.tolist() == ["test/1.jpg"] and r.counts["rows_without_image"] == 1
    assert r.counts["matched_by_file_name"] == 1 and r.matched_by_name == [
        ("test/1.jpg", str(root / "train/1.jpg"))
    ]
    logged = []
    read_datasets(DatasetStageConfig((DatasetSource("test", "im2gps3k", str(annotations), str(root)),)),
                  tmp_path / "out", log=logged.append)  # fmt: skip
    assert any("1 rows matched an image by file name in another folder" in line for line in logged)


def test_a_split_archive_left_in_chunks_is_reported_with_the_cat_to_join_it(tmp_path):
    """MP16-Pro from the Hub: mp-16-images00 .. 18, byte-split pieces of one tar. The stage raised "no row
    with an image (see its report)" and wrote no report."""
    path, tar, ids = realdata.mp16(tmp_path / "pro", 4, pro=True, layout="flat-tar")
    root = tmp_path / "hub"
    (root / "metadata").mkdir(parents=True)
    shutil.copy(path, root / "metadata" / path.name)
    blob = tar.read_bytes()
    (root / "mp-16-images00").write_bytes(blob[: len(blob) // 2])
    (root / "mp-16-images01").write_bytes(blob[len(blob) // 2 :])
    source = DatasetSource("gallery", "mp16-pro", str(root / "metadata" / path.name), str(root))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(GeoTokenError) as e:
        read_datasets(DatasetStageConfig((source,)), out, log=lambda s: None)
    message = str(e.value)
    assert f"see {out / 'gallery.report.csv'}" in message and "mp-16-images00, mp-16-images01" in message
    assert f"cat {root}/mp-16-images* > {root}/mp-16-images.tar" in message
    # the paper's config always holds out a validation split: its size check must not hide the hint
    with pytest.raises(GeoTokenError, match="look like the pieces of one split archive"):
        read_datasets(DatasetStageConfig((source,), HoldoutConfig("val", "gallery", 2)), out, log=print)
    report = read_csv(out / "gallery.report.csv")
    assert sum("no image" in r["reason"] for r in report) == 4
    assert {r["id"] for r in report if "neither an image" in r["reason"]} >= {
        "mp-16-images00",
        "mp-16-images01",
    }
    # joined as the message says, the same split reads
    (root / "mp-16-images.tar").write_bytes(
        (root / "mp-16-images00").read_bytes() + (root / "mp-16-images01").read_bytes()
    )
    assert tarfile.is_tarfile(root / "mp-16-images.tar")
    source = DatasetSource("gallery", "mp16-pro", source.annotations, str(root / "mp-16-images.tar"))
    assert read_datasets(DatasetStageConfig((source,)), out, log=lambda s: None)["sizes"] == {"gallery": 4}


def test_an_empty_images_folder_is_said_to_hold_no_images(tmp_path):
    path, _, _ = realdata.mp16(tmp_path / "mp16", 3)
    (tmp_path / "empty").mkdir()
    source = DatasetSource("gallery", "mp16", str(path), str(tmp_path / "empty"))
    out = tmp_path / "out"
    with pytest.raises(GeoTokenError, match="empty holds no image files .* nor .tar / .zip archives at all"):
        read_datasets(DatasetStageConfig((source,)), out, log=lambda s: None)
    # a folder of the wrong images (none the rows name) is another case: not "no images at all"
    Image.new("RGB", (8, 8)).save(tmp_path / "empty" / "other.jpg")
    with pytest.raises(GeoTokenError) as e:
        read_datasets(DatasetStageConfig((source,)), out, log=lambda s: None)
    assert "at all" not in str(e.value)


def test_mp16_pro_duplicate_id_takes_the_text_of_the_row_it_keeps(tmp_path):
    """A duplicated IMG_ID: the manifest keeps the first row (its coordinates); its text came from the last."""
    path, images, ids = realdata.mp16(tmp_path / "pro", 3, pro=True)
    lines = path.read_text().splitlines()
    dup = lines[1].replace("Paris", "Lyon")
    path.write_text("\n".join([*lines, dup]) + "\n")
    r = read_source(DatasetSource("gallery", "mp16-pro", str(path), str(images)), tmp_path / "work")
    assert r.manifest.ids.tolist() == ids and r.counts["bad_rows"] == 1
    assert r.texts[0] == "a photo taken in Paris, Ile-de-France, France"


def test_mp16_pro_short_row_is_a_bad_row_not_the_end_of_the_run(tmp_path):
    """An interrupted download cuts the last row: "line N: has 3 fields, needs 16" stopped the whole read,
    where --format mp16 reports the row and goes on. A row cut after its coordinates but before its place
    columns is a bad row too."""
    path, images, ids = realdata.mp16(tmp_path / "pro", 5, pro=True)
    lines = path.read_text().splitlines()
    lines[2] = ",".join(lines[2].split(",")[:12])  # row 2: coordinates, but not state / country
    lines[5] = lines[5][:30]  # the last row, cut mid-row
    path.write_text("\n".join(lines))
    r = read_source(DatasetSource("gallery", "mp16-pro", str(path), str(images)), tmp_path / "work")
    assert r.manifest.ids.tolist() == [ids[0], ids[2], ids[3]] and len(r.texts) == 3
    assert r.texts[1] == "a photo taken in Kyoto, Japan"
    assert r.counts["bad_rows"] == 2 and r.counts["kept"] == 3 and r.counts["rows"] == 5
    bad = {row[1]: row for row in r.report}
    assert (
        bad[ids[1]][0].endswith("line 3") and "has 12 fields, the header has 18 (cut short" in bad[ids[1]][2]
    )
    assert any(where.endswith("line 6") for where, _, _ in r.report)


def test_embed_skip_bad_that_skips_every_row_is_an_error(tmp_path):
    """--skip-bad with every image unreadable (a wrong image root) exited 0 with a store of NaNs."""
    manifest = Manifest(
        ["a", "b", "c"], [1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [str(tmp_path / f"{s}.jpg") for s in "abc"]
    )
    with pytest.raises(
        GeoTokenError, match=r"every image was unreadable \(3 of 3 skipped.*row 1 \(id 'a'\).*a\.jpg"
    ):
        embed(
            manifest,
            TinyBackbone(),
            tmp_path / "store",
            batch_size=2,
            num_workers=0,
            skip_bad=True,
            progress=False,
        )
    assert len(read_csv(tmp_path / "store" / "skipped.csv")) == 3
    (tmp_path / "a.jpg").write_bytes(realdata.jpeg(1, 4, 0))  # one readable image is a store
    store = embed(
        manifest, TinyBackbone(), tmp_path / "ok", batch_size=2, num_workers=0, skip_bad=True, progress=False
    )
    assert store.valid.tolist() == [True, False, False]
