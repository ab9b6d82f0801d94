"""The `geotoken` command: a thin layer over library functions.

Every module in this package (and every module of a group package such as `bench/` or `data/`)
defines `register(subparsers)`, which adds its sub-command and sets `func` on the parser to a
function taking the parsed args and returning an exit status. Modules are discovered, so adding a
command is adding a file.

A command module parses arguments and calls library functions; it checks nothing the library checks
and computes nothing a stage needs. It imports the library (and torch, numpy) at module top, so
`geotoken --help` imports torch once, like every command; only optional or heavy third-party packages
(uvicorn, ...) are imported inside a `func`.

One vocabulary across commands (tests/test_cli_vocabulary.py walks every parser): `-o/--out` for every
output path, `-k/--k`, `--batch-size`, `--group-size`, `--skip-bad`, `--beam-width`, `--num-samples`,
`--threads` with default 0 (the library's own choice); choices come from the library's registries
(`geotoken.search.STRATEGIES` / `SELECTORS`, `geotoken.DTYPES`, presets, ...) and defaults from its
config dataclasses.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import pkgutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from geotoken import __version__
from geotoken.search.mllm import MODES as MLLM_MODES
from geotoken.search.mllm import TEMPLATES as MLLM_TEMPLATES

DEVICE_HELP = (
    "torch device: auto (default: this rank's CUDA GPU, then Apple MPS, then the CPU), cpu, cuda, cuda:1, mps"
)
THREADS_HELP = "torch CPU threads (default 0: torch's choice, one per core)"


def add_mllm_arguments(p: argparse.ArgumentParser) -> None:
    """The MLLM selector's options, as predict, evaluate and serve take them (its endpoint: GEOTOKEN_MLLM_*)."""
    p.add_argument("--mllm-mode", choices=MLLM_MODES,
                   help="MLLM selection: pool (choose among the candidates) or free (answer any place); endpoint "
                   "from GEOTOKEN_MLLM_BASE_URL / _MODEL / _API_KEY")  # fmt: skip
    p.add_argument("--mllm-template", choices=MLLM_TEMPLATES,
                   help="MLLM prompt: paper (the authors': best guess + other guesses) or geotoken")  # fmt: skip
    p.add_argument(
        "--mllm-temperature", type=float, help="the MLLM's sampling temperature (paper template: 0.7)"
    )
    p.add_argument("--mllm-strict", action=argparse.BooleanOptionalAction, default=None,
                   help="pool mode: refuse an answer that is none of the candidates (fall back to logp)")  # fmt: skip
    p.add_argument("--mllm-match-km", type=positive,
                   help="pool mode: how close an answer must be to a candidate to select it (default 1)")  # fmt: skip
    p.add_argument("--mllm-timeout-s", type=positive, help="seconds to wait for one MLLM answer (default 60)")
    p.add_argument(
        "--mllm-retries", type=count, help="extra attempts after a failed MLLM request (default 3)"
    )
    p.add_argument(
        "--mllm-concurrency", type=at_least_one, help="MLLM requests in flight at once (default 4)"
    )


def mllm_changes(args: argparse.Namespace) -> dict:
    """The MLLM options given on the command line, as MLLMConfig fields (the others: the bundle's)."""
    given = {"mode": args.mllm_mode, "template": args.mllm_template, "temperature": args.mllm_temperature,
             "strict": args.mllm_strict, "match_km": args.mllm_match_km, "timeout_s": args.mllm_timeout_s,
             "retries": args.mllm_retries, "concurrency": args.mllm_concurrency}  # fmt: skip
    return {k: v for k, v in given.items() if v is not None}


def first_process() -> bool:
    """Whether this is the process that speaks for the job: rank 0 under torchrun, or the only one."""
    return int(os.environ.get("RANK", "0")) == 0


def use_threads(threads: int) -> None:
    """Apply a command's `--threads` (0 leaves torch's own setting)."""
    if threads:
        torch.set_num_threads(threads)


def count(text: str) -> int:
    """argparse type of a number of things (threads, workers, a port): a whole number >= 0."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def positive(text: str) -> float:
    """argparse type of a finite number > 0 (seconds, km): not inf, which the clients below would take."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < x < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return x


def at_least_one(text: str) -> int:
    """argparse type of a whole number >= 1."""
    n = count(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def register_modules(subparsers: argparse._SubParsersAction, package: ModuleType) -> None:
    """Call `register(subparsers)` of every public module in `package`, in name order."""
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}").register(subparsers)


def register_group(subparsers: argparse._SubParsersAction, name: str, help: str, package: ModuleType) -> None:
    """A command such as `geotoken bench` whose sub-commands are the modules of `package`."""
    parser = subparsers.add_parser(name, help=help, description=help)
    register_modules(parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND"), package)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geotoken", description="Worldwide image geolocalization by next-token prediction over S2 cells."
    )
    parser.add_argument("--version", action="version", version=f"geotoken {__version__}")
    register_modules(
        parser.add_subparsers(dest="command", required=True, metavar="COMMAND"), sys.modules[__name__]
    )
    return parser


@contextlib.contextmanager
def said_as_lines(command: str):
    """geotoken's own warnings (a job starting over, photos left out) as one line each, like its errors,
    not Python's file:line and source echo; other packages' warnings, and GEOTOKEN_DEBUG=1, keep theirs."""
    own = str(Path(__file__).resolve().parents[1])
    python_format = warnings.formatwarning

    def line(message, category, filename, lineno, line=None):
        if os.environ.get("GEOTOKEN_DEBUG") or not str(filename).startswith(own):
            return python_format(message, category, filename, lineno, line)
        return f"geotoken {command}: warning: {message}\n"

    warnings.formatwarning = line
    try:
        yield
    finally:
        warnings.formatwarning = python_format


def os_error_text(exc: OSError) -> str:
    """An OSError as a line that names the path first and says what is in the way ("[Errno 17] File
    exists: 'out'" is what Python says when a file stands where a folder of the output path must go)."""
    path = exc.filename
    if path is None:
        return str(exc)
    if isinstance(exc, FileExistsError) and not os.path.isdir(path):
        return f"{path}: is a file, where the output path needs a folder"
    if isinstance(exc, NotADirectoryError):
        return f"{path}: a part of this path is a file, not a folder"
    target = f" -> {exc.filename2}" if exc.filename2 else ""
    return f"{path}{target}: {exc.strerror or exc}"


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub-)command `args` ran, e.g. that of `geotoken bench decode`."""
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, sub.dest, None) if sub is not None else None
        if name is None:
            return parser
        parser = sub.choices[name]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. User errors print one line and return 2; GEOTOKEN_DEBUG=1 shows tracebacks."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's own parser: its usage, not the top level's list of commands
        command_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        with said_as_lines(args.command):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("geotoken: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:  # GeoTokenError is a ValueError
        if os.environ.get("GEOTOKEN_DEBUG"):
            raise
        text = os_error_text(exc) if isinstance(exc, OSError) else str(exc)
        print(f"geotoken {args.command}: error: {text}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as exc:  # torch's OutOfMemoryError is a RuntimeError
        text = str(exc)
        if os.environ.get("GEOTOKEN_DEBUG") or not (
            isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text
        ):
            raise
        print(
            f"geotoken {args.command}: error: out of memory ({text.splitlines()[0][-200:] if text else 'MemoryError'}); "
            "lower --batch-size, or --beam-width / --num-samples",
            file=sys.stderr,
        )
        return 2
