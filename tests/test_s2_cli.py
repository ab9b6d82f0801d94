"""`geotoken tokenize` and `geotoken bench tokens`."""

import json

import numpy as np
import pytest

from geotoken import s2
from geotoken.assets import mp16_coordinates_csv
from geotoken.cli import main
from geotoken.geo import haversine_km


def write_csv(path, rows, header="IMG_ID,LAT,LON"):
    path.write_text(header + "\n" + "".join(",".join(str(v) for v in row) + "\n" for row in rows))
    return path


def test_tokenize_writes_int64_tokens_in_input_row_order(tmp_path, capsys):
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-90, 90, 50), rng.uniform(-180, 180, 50)
    csv = write_csv(
        tmp_path / "mp16.csv", [(f"img_{k:02d}.jpg", a, b) for k, (a, b) in enumerate(zip(lat, lon))]
    )
    out = tmp_path / "tokens.npy"
    assert main(["tokenize", str(csv), "-o", str(out), "--level", "20", "--group-size", "2"]) == 0
    tokens = np.load(out)
    assert tokens.dtype == np.int64 and tokens.shape == (50, 11)
    assert np.array_equal(tokens, s2.latlon_to_tokens(lat, lon, 20, 2))
    assert "50 x 11 int64 tokens" in capsys.readouterr().out
    assert main(["tokenize", str(csv), "-o", str(out), "--level", "21", "--group-size", "2"]) == 0
    assert np.load(out).shape == (50, 12) and np.load(out)[:, -1].max() <= 3


def test_tokenize_the_real_mp16_coordinates_within_ten_metres(tmp_path, capsys):
    out = tmp_path / "mp16.npy"
    assert main(["tokenize", str(mp16_coordinates_csv()), "-o", str(out)]) == 0
    tokens = np.load(out)
    coords = np.loadtxt(mp16_coordinates_csv(), delimiter=",", skiprows=1)
    assert tokens.shape == (len(coords), 11) and len(coords) > 90_000
    c_lat, c_lon = s2.tokens_to_latlon(tokens)
    assert 1000 * haversine_km(coords[:, 0], coords[:, 1], c_lat, c_lon).max() < 10
    assert "cell centre vs point: max" in capsys.readouterr().out


def test_tokenize_bad_input_is_one_line_and_leaves_no_file(tmp_path, capsys):
    csv = write_csv(tmp_path / "bad.csv", [("a", 10, 20), ("b", 95.5, 20)])
    out = tmp_path / "tokens.npy"
    assert main(["tokenize", str(csv), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.csv" in err and "95.5" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [csv]
    assert main(["tokenize", str(csv), "-o", str(out), "--level", "31"]) == 2
    assert "level = 31" in capsys.readouterr().err
    assert main(["tokenize", str(tmp_path / "missing.csv"), "-o", str(out)]) == 2


def test_tokenize_skip_bad_leaves_bad_rows_out_and_lists_them(tmp_path, capsys):
    """An MP16 file with a duplicate id and an out-of-range row: --skip-bad tokenizes the rest (images do not
    matter here, so no --format is needed) and lists the two rows left out."""
    rows = [("1/a.jpg", 10, 20), ("1/b.jpg", 95.5, 20), ("1/a.jpg", 1, 2), ("2/c.jpg", -30, 150)]
    csv = write_csv(tmp_path / "mp16_places365.csv", rows, header="IMG_ID,LAT,LON")
    out = tmp_path / "tokens.npy"
    assert main(["tokenize", str(csv), "-o", str(out)]) == 2
    assert "1 more bad rows" in capsys.readouterr().err
    assert main(["tokenize", str(csv), "-o", str(out), "--skip-bad"]) == 0
    assert "2 bad rows left out" in capsys.readouterr().out
    assert np.array_equal(np.load(out), s2.latlon_to_tokens(np.array([10.0, -30]), np.array([20.0, 150])))
    report = (tmp_path / "tokens.report.csv").read_text().splitlines()
    assert report[0] == "where,id,reason" and len(report) == 3
    assert "line 3" in report[1] and "95.5" in report[1] and "duplicate" in report[2]


def test_every_command_has_help(capsys):
    for argv in (["tokenize", "--help"], ["bench", "tokens", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    assert "s2geometry" in capsys.readouterr().out


def test_bench_tokens_prints_one_json_object_with_the_ratios(capsys):
    argv = ["bench", "tokens", "--points", "3000", "--s2geometry-points", "500", "--s2sphere-points", "200"]
    assert main([*argv, "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (
        result["points"] == 3000 and result["s2geometry_points"] == 500 and result["s2sphere_points"] == 200
    )
    for key in ("points_per_s", "s2geometry_points_per_s", "s2sphere_points_per_s"):
        assert result[key] > 0
    assert result["speedup_vs_s2geometry"] == pytest.approx(
        result["points_per_s"] / result["s2geometry_points_per_s"]
    )
    assert result["baseline_tokens_identical"] is True
    assert main(["bench", "tokens", "--points", "0"]) == 2
