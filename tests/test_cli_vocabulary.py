"""One vocabulary across the `geotoken` CLI: every option of every (sub-)command, walked from
`geotoken.cli.build_parser()`, uses the canonical spelling, the canonical default and the library's registry.

`vocabulary_problems(parser)` lists every violation; the walker itself is checked on deliberately wrong
parsers, so that a rule which can no longer fail is noticed.
"""

from __future__ import annotations

import argparse

import pytest

from geotoken import DTYPES
from geotoken.align import GPS_HEADS
from geotoken.bench.decode import REFERENCE
from geotoken.cli import DEVICE_HELP, THREADS_HELP, build_parser, count, main
from geotoken.data.earthviews import PRESETS as EARTHVIEWS_PRESETS
from geotoken.encoders import BACKBONES
from geotoken.encoders.clip import PRECISIONS
from geotoken.encoders.ort import RUNTIMES
from geotoken.encoders.text import TEXT_ENCODERS
from geotoken.evaluate.baselines import GPS_GALLERIES
from geotoken.fit import CALIBRATION_SELECTORS
from geotoken.model import ARCHS
from geotoken.model import PRESETS as MODEL_PRESETS
from geotoken.pipeline import PRESETS as DEMO_PRESETS
from geotoken.retrieval import KINDS
from geotoken.search import SELECTORS, STRATEGIES
from geotoken.search.mllm import MODES as MLLM_MODES
from geotoken.train import SCHEDULES, WEIGHT_DECAY_ON

# canonical spelling -> second spellings that must not exist anywhere in the CLI
FORBIDDEN = {
    "-o/--out": ("--output", "--output-dir", "--out-dir", "--outdir", "--dest"),
    "-k/--k": ("--top-k-neighbours", "--num-neighbours", "--neighbours-k"),
    "--batch-size": ("--batch", "--bs", "--batchsize"),
    "--group-size": ("--group", "--groups"),
    "--skip-bad": ("--skip-bad-rows", "--skip-errors", "--skip-invalid"),
    "--beam-width": ("--width", "--beams", "--num-beams", "--beam", "--beam-size", "--n-beams"),
    "--num-samples": ("--samples", "--n-samples", "--nsamples", "-n"),
    "--threads": ("--num-threads", "--n-threads", "--nthreads", "-j"),
}
SECOND_SPELLINGS = {bad: good for good, bads in FORBIDDEN.items() for bad in bads}

# dest -> the registry its choices must equal, in every command
REGISTRIES = {
    "strategy": STRATEGIES,
    "select": SELECTORS,
    "dtype": DTYPES,
    "kind": KINDS,
    "kinds": KINDS,
    "mllm_mode": MLLM_MODES,
    "schedule": SCHEDULES,
    "arch": ARCHS,
    "weight_decay_on": WEIGHT_DECAY_ON,
    "model_preset": tuple(MODEL_PRESETS),
    "backbone": tuple(BACKBONES),
    "text_encoder": tuple(TEXT_ENCODERS),
    "gps_gallery": GPS_GALLERIES,
    "gps_head": GPS_HEADS,
    "backbone_precision": PRECISIONS,
    "backbone_runtime": RUNTIMES,
    "backbone_runtimes": RUNTIMES,
}
# (command path, dest) -> the registry it must equal instead: a documented part of a registry, or the
# registry of that command's own presets
PER_COMMAND = {
    (("calibrate",), "select"): CALIBRATION_SELECTORS,
    (("train",), "preset"): tuple(MODEL_PRESETS),
    (("bench", "train"), "preset"): tuple(MODEL_PRESETS),
    (("bench", "decode"), "preset"): tuple(REFERENCE),
    (("data", "earthviews"), "preset"): tuple(EARTHVIEWS_PRESETS),
    (("demo",), "preset"): tuple(DEMO_PRESETS),
}
NOT_OPTIONS = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) of `parser` and of every sub-parser below it, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, (*path, name))


def option_problems(path: tuple[str, ...], action: argparse.Action) -> list[str]:
    """What is wrong with one option of the command at `path` (empty: nothing)."""
    where = f"geotoken {' '.join(path)} {'/'.join(action.option_strings)}"
    names, dest, out = set(action.option_strings), action.dest, []
    for name in sorted(names & set(SECOND_SPELLINGS)):
        out.append(f"{where}: {name} is a second spelling of {SECOND_SPELLINGS[name]}")
    longs = [s for s in action.option_strings if s.startswith("--")]
    spelled = ["--" + dest.replace("_", "-")]
    if isinstance(action, argparse.BooleanOptionalAction):  # the pair --NAME / --no-NAME, nothing else
        spelled.append("--no-" + spelled[0][2:])
    if longs != spelled:
        out.append(f"{where}: dest {dest!r} is not spelled {' / '.join(spelled)} (and only that)")
    for short, canonical in (("-o", "out"), ("-k", "k")):
        if (dest == canonical) != (short in names):
            out.append(f"{where}: {short} and --{canonical} go together (-{short[1:]}/--{canonical})")
    if dest == "threads" and action.default != 0:
        out.append(f"{where}: --threads defaults to {action.default!r}, not 0 (the library's own choice)")
    if dest == "threads" and action.type is not count:
        out.append(f"{where}: --threads takes geotoken.cli.count (a whole number >= 0), not {action.type}")
    if dest == "threads" and action.help != THREADS_HELP and not str(action.help).startswith("FAISS threads"):
        out.append(f"{where}: --threads help is not geotoken.cli.THREADS_HELP (or 'FAISS threads ...')")
    if dest == "device" and path[:1] != ("bench",) and (action.default, action.help) != ("auto", DEVICE_HELP):
        out.append(f"{where}: --device defaults to {action.default!r}; 'auto' with geotoken.cli.DEVICE_HELP")
    registry = PER_COMMAND.get((path, dest), REGISTRIES.get(dest))
    if action.choices is not None and registry is not None:
        if tuple(action.choices) not in (tuple(registry), tuple(sorted(registry))):
            out.append(f"{where}: choices {list(action.choices)} are not the registry {list(registry)}")
    return out


def vocabulary_problems(parser: argparse.ArgumentParser, at: tuple[str, ...] = ()) -> list[str]:
    """Every violation of the vocabulary in `parser` (the command at `at`) and all its sub-parsers."""
    out = []
    for path, p in walk(parser, at):
        for action in p._actions:
            if action.option_strings and not isinstance(action, NOT_OPTIONS):
                out += option_problems(path, action)
        dests = {a.dest for a in p._actions}
        if "device" in dests and "threads" not in dests:  # a torch command: its CPU knob too
            out.append(f"{' '.join(('geotoken', *path))}: --device without --threads")
    return out


PARSER = build_parser()
COMMANDS = [name for action in PARSER._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_command_speaks_the_vocabulary(command):
    sub = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    assert vocabulary_problems(sub, (command,)) == []


def test_every_command_is_walked():
    paths = {" ".join(path) for path, _ in walk(PARSER)}
    for expected in ("align train", "bench decode", "data download", "demo", "index neighbours", "serve"):
        assert expected in paths
    assert {"serve", "demo"} <= set(COMMANDS)


def test_the_narrowed_registries_are_parts_of_the_registries():
    assert set(CALIBRATION_SELECTORS) < set(SELECTORS)
    assert set(REFERENCE) <= set(MODEL_PRESETS)


def _wrong_parser() -> argparse.ArgumentParser:
    """A parser breaking each rule once, two sub-command levels deep."""
    root = argparse.ArgumentParser(prog="geotoken")
    group = root.add_subparsers(dest="command").add_parser("group")
    commands = group.add_subparsers(dest="group_command")
    cmd = commands.add_parser("cmd")
    cmd.add_argument("--output")
    cmd.add_argument("-o", "--path")
    cmd.add_argument("--out")
    cmd.add_argument("--k", type=int)
    cmd.add_argument("--threads", type=int)
    cmd.add_argument("--strategy", choices=["greedy", "beam"])
    cmd.add_argument("--select", choices=list(SELECTORS))  # right
    cmd.add_argument("--batch", type=int)
    cmd.add_argument("--width", dest="beam_width", type=int)
    cmd.add_argument("-n", "--num-samples", type=int)
    cmd.add_argument("--skip-bad-rows", action="store_true")
    cmd.add_argument("--gallery-only", dest="constrain", action=argparse.BooleanOptionalAction)
    cmd.add_argument("--device", default="cpu")
    cmd2 = commands.add_parser("cmd2")
    cmd2.add_argument("--device", default="auto", help=DEVICE_HELP)
    return root


def test_the_walker_finds_every_kind_of_wrong_option():
    problems = vocabulary_problems(_wrong_parser())
    expected = [
        "geotoken group cmd --output: --output is a second spelling of -o/--out",
        "geotoken group cmd -o/--path: -o and --out go together",
        "geotoken group cmd --out: -o and --out go together",
        "geotoken group cmd --k: -k and --k go together",
        "geotoken group cmd --threads: --threads defaults to None, not 0",
        "geotoken group cmd --threads: --threads takes geotoken.cli.count",
        "geotoken group cmd --strategy: choices ['greedy', 'beam'] are not the registry",
        "geotoken group cmd --batch: --batch is a second spelling of --batch-size",
        "geotoken group cmd --width: --width is a second spelling of --beam-width",
        "geotoken group cmd --width: dest 'beam_width' is not spelled --beam-width",
        "geotoken group cmd -n/--num-samples: -n is a second spelling of --num-samples",
        "geotoken group cmd --skip-bad-rows: --skip-bad-rows is a second spelling of --skip-bad",
        "geotoken group cmd --gallery-only/--no-gallery-only: dest 'constrain' is not spelled --constrain / --no-constrain",
        "geotoken group cmd --threads: --threads help is not geotoken.cli.THREADS_HELP",
        "geotoken group cmd --device: --device defaults to 'cpu'; 'auto' with geotoken.cli.DEVICE_HELP",
        "geotoken group cmd2: --device without --threads",
    ]
    for message in expected:
        assert sum(p.startswith(message) for p in problems) == 1, (message, problems)
    assert len(problems) == len(expected), problems
    assert not any("--select" in p for p in problems)


def test_the_walker_accepts_the_canonical_spellings():
    p = argparse.ArgumentParser(prog="geotoken")
    cmd = p.add_subparsers(dest="command").add_parser("cmd")
    cmd.add_argument("-o", "--out")
    cmd.add_argument("-k", "--k", type=int)
    cmd.add_argument("--threads", type=count, default=0, help=THREADS_HELP)
    cmd.add_argument("--device", default="auto", help=DEVICE_HELP)
    cmd.add_argument("--strategy", choices=STRATEGIES)
    cmd.add_argument("--dtype", choices=sorted(DTYPES))
    cmd.add_argument("--batch-size", type=int)
    cmd.add_argument("--beam-width", type=int)
    cmd.add_argument("--constrain", action=argparse.BooleanOptionalAction)
    assert vocabulary_problems(p) == []


def test_an_unknown_option_is_said_by_its_command(capsys):
    for argv, usage in ((["demo", "--fast", "-o", "x"], "geotoken demo"),
                        (["bench", "decode", "--foo"], "geotoken bench decode")):  # fmt: skip
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err
        assert (
            f"{usage}: error: unrecognized arguments: {' '.join(argv[-2:] if argv[0] == 'demo' else argv[-1:])}"
            in err
        )
        assert err.startswith(f"usage: {usage} ")


def test_demo_fast_and_another_preset_contradict(capsys):
    assert main(["demo", "--fast", "--preset", "full", "--run-dir", "/nonexistent/x"]) == 2
    assert "--fast is --preset fast; it contradicts --preset full" in capsys.readouterr().err
