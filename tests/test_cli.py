"""Every command and sub-command of `geotoken` builds and prints its help; user errors are one line."""

import argparse

import pytest

from geotoken.cli import build_parser, main


def _all_parsers(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, (*path, name))


def test_every_command_has_help():
    parsers = list(_all_parsers(build_parser()))
    names = {" ".join(p) for p, _ in parsers}
    for expected in (
        "tokenize",
        "demo",
        "bench tokens",
        "data earthviews",
        "embed",
        "train",
        "evaluate",
        "predict",
    ):
        assert expected in names
    for path, parser in parsers:
        text = parser.format_help()  # raises on a bad %-format in any help string
        assert parser.description or path == (), f"`geotoken {' '.join(path)}` has no description"
        assert "usage:" in text


def test_user_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("IMG_ID,LAT,LON\na,91.5,3\n")
    assert main(["tokenize", str(bad), "-o", str(tmp_path / "t.npy")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("geotoken tokenize: error:") and "\n" not in err
    assert "91.5" in err
    assert not (tmp_path / "t.npy").exists()


def test_a_file_in_the_way_of_an_output_folder_is_said_in_words(tmp_path, capsys):
    """Python says "[Errno 17] File exists: 'afile'" when a file stands where an output folder must go."""
    (tmp_path / "m.csv").write_text("id,lat,lon,image\na,1,2,a.jpg\n")
    (tmp_path / "afile").write_text("")
    for out, said in (("afile/x.csv", "afile: is a file, where the output path needs a folder"),
                      ("afile/y/x.csv", "a part of this path is a file, not a folder")):  # fmt: skip
        assert main(["manifest", str(tmp_path / "m.csv"), "-o", str(tmp_path / out)]) == 2
        err = capsys.readouterr().err
        assert said in err and "Errno" not in err and len(err.splitlines()) == 1


def test_own_warnings_are_one_line_like_errors():
    """A geotoken warning (a job starting over, photos left out) reads as one line, not Python's file:line
    and source echo; other packages' warnings keep theirs (their source is what to look at)."""
    import subprocess
    import sys

    code = (
        "import warnings, geotoken.photos as p\n"
        "from geotoken.cli import said_as_lines\n"
        "with said_as_lines('predict'):\n"
        "    warnings.warn_explicit('o.csv.partial: starting over', UserWarning, p.__file__, 146)\n"
        "    warnings.warn_explicit('deprecated', UserWarning, '/elsewhere/lib.py', 3)\n"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert err.splitlines()[0] == "geotoken predict: warning: o.csv.partial: starting over"
    assert err.splitlines()[1] == "/elsewhere/lib.py:3: UserWarning: deprecated"


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert "geotoken" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "tokens", "--points", "0"], "points must be >= 1, got 0"),
        (["bench", "tokens", "--s2sphere-points", "-1"], "s2sphere_points must be >= 0, got -1"),
        (["bench", "decode", "--iters", "0"], "iters must be >= 1, got 0"),
        (["bench", "train", "--gallery-rows", "0"], "rows must be >= 1, got 0"),
    ],
)
def test_bench_counts_are_checked_by_the_library(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"geotoken {argv[0]}: error:") and message in err and "\n" not in err
