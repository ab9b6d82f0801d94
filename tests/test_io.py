import os

import pytest

from geotoken.errors import GeoTokenError
from geotoken.io import atomic_open, read_json, sha256_json, write_json


def test_atomic_open_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temp file left behind
    with atomic_open(target) as f:
        f.write("new")
    assert target.read_text() == "new"


def test_atomic_files_get_normal_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert read_json(tmp_path / "a.json") == {"x": 1}


def test_sha256_json_ignores_key_order():
    assert sha256_json({"a": 1, "b": [1, 2]}) == sha256_json({"b": [1, 2], "a": 1})
    assert sha256_json({"a": 1}) != sha256_json({"a": 2})


def test_atomic_dir_swaps_a_whole_folder_in_and_keeps_the_old_one_on_failure(tmp_path):
    from geotoken.io import atomic_dir

    target = tmp_path / "model"
    with atomic_dir(target) as out:
        (out / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError), atomic_dir(target) as out:
        (out / "b.txt").write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    with atomic_dir(target) as out:
        (out / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced whole, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no .tmp / .old sibling left
    elsewhere = tmp_path / "disk2" / "model"
    elsewhere.mkdir(parents=True)
    link = tmp_path / "linked"
    link.symlink_to(elsewhere)
    with atomic_dir(link) as out:
        (out / "c.txt").write_text("third")
    assert link.is_symlink() and (link / "c.txt").read_text() == "third"
    assert sorted(p.name for p in elsewhere.parent.iterdir()) == ["model"]


def test_a_full_disk_or_a_folder_as_target_is_one_error_naming_the_file(tmp_path):
    import errno

    from geotoken.errors import GeoTokenError
    from geotoken.io import atomic_path

    target = tmp_path / "weights.safetensors"
    target.write_text("old")
    for exc in (
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("write error: No space left on device"),
    ):
        with pytest.raises(GeoTokenError, match="weights.safetensors: no space left on the device"):
            with atomic_path(target):
                raise exc
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]
    with pytest.raises(GeoTokenError, match="is a folder; name a file"):
        with atomic_open(tmp_path):
            pass
    with pytest.raises(RuntimeError, match="other"):  # other faults pass through unchanged
        with atomic_path(target):
            raise RuntimeError("other")


def test_an_output_naming_an_input_is_refused(tmp_path, capsys):
    from geotoken.cli import main
    from geotoken.errors import GeoTokenError
    from geotoken.io import check_outputs_spare_inputs

    csv = tmp_path / "points.csv"
    csv.write_text("id,lat,lon\na,1,2\n")
    check_outputs_spare_inputs([csv], tmp_path / "tokens.npy", None)
    with pytest.raises(GeoTokenError, match="named as an output and as an input"):
        check_outputs_spare_inputs([str(tmp_path / "." / "points.csv")], csv)
    with pytest.raises(GeoTokenError, match="named as an output and as an output"):
        check_outputs_spare_inputs([], tmp_path / "m.csv", tmp_path / "m.csv")
    for argv in (
        ["tokenize", str(csv), "-o", str(csv)],
        ["manifest", str(csv), "-o", str(csv)],
        [
            "manifest",
            str(tmp_path / "a.report.csv"),
            "-o",
            str(tmp_path / "a.csv"),
            "--skip-bad",
        ],  # its report
        ["predict", str(csv), "--model", "nowhere", "-o", str(csv)],
    ):
        assert main(argv) == 2, argv
        assert "named as an output" in capsys.readouterr().err
    assert csv.read_text() == "id,lat,lon\na,1,2\n"
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "metrics.json")]) == 2
    assert "NAME.html" in capsys.readouterr().err


def test_a_lock_that_cannot_be_made_names_the_output_not_the_lock(tmp_path):
    from geotoken.io import exclusive

    (tmp_path / "afile").write_text("")
    with pytest.raises(GeoTokenError, match=r"afile/p.csv: cannot be written there") as e:
        with exclusive(tmp_path / "afile" / "p.csv.lock", str(tmp_path / "afile" / "p.csv")):
            pass
    assert ".lock" not in str(e.value)
