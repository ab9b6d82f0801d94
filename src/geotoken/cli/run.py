"""`geotoken run CONFIG`: a stage graph from a YAML config file, every stage content-hashed and resumable."""

from __future__ import annotations

import argparse
from pathlib import Path

from geotoken.cli import THREADS_HELP, count, use_threads
from geotoken.devices import retain_freed_memory
from geotoken.stages.config import (
    load_run_config,
    packaged_configs,
    parse_assignments,
    plan_run,
    plan_text,
    run_stages,
)

HELP = "run a stage graph from a YAML config (datasets on disk ... evaluation, the paper's Table I)"

EPILOG = f"""\
CONFIG is a YAML file or a packaged config by name ({", ".join(packaged_configs())}). Its `${{NAME}}`
placeholders (data paths, sizes) are filled by `--set NAME=VALUE`, else the environment variable NAME, else
the config's `variables:` defaults. Stages are content-hashed folders under the run folder: a second run
reuses every finished stage, a changed option redoes only what depends on it.

examples:
  geotoken run paper --dry-run --set MP16_ROOT=/data/mp16 --set IM2GPS3K_ROOT=/data/im2gps3k \\
      --set YFCC4K_ROOT=/data/yfcc4k
  geotoken run configs/paper.yaml --set MP16_ROOT=/data/mp16 ... --run-dir runs/paper
  geotoken run demo                     # the same graph as `geotoken demo`
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help=HELP,
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "config", help=f"run config: a YAML file, or a packaged name ({', '.join(packaged_configs())})"
    )
    p.add_argument(
        "--set", action="append", metavar="NAME=VALUE", default=[],
        help="fill the config's ${NAME} placeholders (repeatable)",
    )  # fmt: skip
    p.add_argument("--run-dir", help="run folder (default: the config's run_dir, else runs/CONFIG)")
    p.add_argument(
        "--dry-run", action="store_true",
        help="print the plan (stages, inputs, folders, estimated rows, disk and work) and stop",
    )  # fmt: skip
    p.add_argument("--threads", type=count, default=0, help=THREADS_HELP)
    p.set_defaults(func=run)


def run(args) -> int:
    retain_freed_memory()  # a training job: keep freed activations' memory (see there)
    cfg = load_run_config(args.config, parse_assignments(args.set), run_dir=args.run_dir)
    if args.dry_run:
        plans = plan_run(cfg)
        print(plan_text(cfg, plans))
        return 2 if any(p.problems for p in plans) else 0
    use_threads(args.threads)
    results = run_stages(cfg)  # (refuses a plan with problems first)
    for name, result in results.items():
        print(f"{name}: {result.folder}")
    print(f"run.json: {Path(cfg.run_dir).resolve() / 'run.json'} (geotoken report {cfg.run_dir})")
    for spec in cfg.pipeline.stages:
        table = results[spec.name].folder / "table.md"
        if spec.kind == "table" and table.is_file():
            print()
            print(table.read_text(encoding="utf-8"))
    return 0
