"""Named training recipes: YAML files of `TrainConfig` fields, shipped in `geotoken/configs/recipes/`.

A recipe is a starting point, not a run: `resolve_train_config` applies the library defaults, then the
recipe, then explicit overrides (command-line flags, a stage's fields), so a flag always wins.
"""

from __future__ import annotations

import dataclasses
import typing
from importlib import resources
from pathlib import Path
from typing import Any

from geotoken.errors import GeoTokenError
from geotoken.io import load_yaml, type_name, value_fits
from geotoken.train.loop import TrainConfig

RECIPE_DIR = resources.files("geotoken") / "configs" / "recipes"
RECIPES: tuple[str, ...] = tuple(
    sorted(p.name[: -len(".yaml")] for p in RECIPE_DIR.iterdir() if p.name.endswith(".yaml"))
)


def load_recipe(name_or_path: str | Path) -> dict[str, Any]:
    """The `TrainConfig` fields of a recipe: a name of `RECIPES` or a YAML file's path. Lists become tuples
    (`betas`); unknown fields and bad values are refused, naming the file."""
    name = str(name_or_path)
    if name in RECIPES:
        where, text = f"recipe {name!r}", (RECIPE_DIR / f"{name}.yaml").read_text(encoding="utf-8")
    elif Path(name).is_file():
        where, text = str(name), Path(name).read_text(encoding="utf-8")
    else:
        raise GeoTokenError(f"recipe {name!r}: neither a YAML file nor one of {', '.join(RECIPES)}")
    values = load_yaml(text, where)
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise GeoTokenError(f"{where}: expected a mapping of TrainConfig fields, got {type(values).__name__}")
    hints = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise GeoTokenError(f"{where}: unknown TrainConfig field(s) {unknown}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    for key, v in values.items():
        if not value_fits(hints[key], v):
            raise GeoTokenError(f"{where}: field {key!r} = {v!r} is not a {type_name(hints[key])}")
    try:
        TrainConfig(**values)
    except (TypeError, GeoTokenError) as exc:
        raise GeoTokenError(f"{where}: {exc}") from None
    return values


def resolve_train_config(recipe: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the recipe (if any), then `overrides` (None values are left out: not given).

    `grad_accum` and `effective_batch_size` are two ways to say one thing: the one given in `overrides`
    replaces the recipe's other (a recipe's 2048 and `--grad-accum 4` mean micro-batches x 4)."""
    values = load_recipe(recipe) if recipe else {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise GeoTokenError(f"unknown TrainConfig field(s) {unknown}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if "grad_accum" in given and "effective_batch_size" not in given:
        values.pop("effective_batch_size", None)
    if "effective_batch_size" in given and "grad_accum" not in given:
        values.pop("grad_accum", None)
    return TrainConfig(**{**values, **given})
