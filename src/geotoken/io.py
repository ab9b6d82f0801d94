"""Small file helpers shared by every stage: atomic writes and content hashes.

Outputs are written to a temporary file beside the target and renamed into place, so a killed job
never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

try:  # POSIX file locks (`exclusive`)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

import numpy as np
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from geotoken.errors import GeoTokenError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def split_ref(ref: str) -> tuple[str, str | None]:
    """An image reference's file and member: 'a/b.tar#KEY.jpg' -> ('a/b.tar', 'KEY.jpg'), 'a/b.zip#x/1.jpg'
    -> ('a/b.zip', 'x/1.jpg'); a plain path -> (path, None), '#' and all ('photos/#1.jpg' is a file)."""
    for ext in (".tar#", ".zip#"):
        i = ref.find(ext)
        if i >= 0:
            return ref[: i + 4], ref[i + 5 :]
    return ref, None


def check_outputs_spare_inputs(inputs, *outputs) -> None:
    """Refuse an output path that names one of the inputs (or another output): writing it would destroy
    what the command reads, or one output would overwrite the other."""
    seen: dict[Path, str] = {}
    for kind, paths in (("input", inputs), ("output", outputs)):
        for p in paths:
            if p is None:
                continue
            key = Path(os.path.realpath(split_ref(os.fspath(p))[0]))  # a shard member: its shard
            if key in seen and kind == "output":
                raise GeoTokenError(
                    f"{p}: named as an output and as an {seen[key]}; write the output elsewhere"
                )
            seen.setdefault(key, kind)


def disk_full(exc: BaseException) -> bool:
    """Whether a write failed for want of space (or quota), whichever library raised it."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc)


@contextlib.contextmanager
def exclusive(lock: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold `lock` (a file, created and removed here) for one process at a time: a second job writing the
    same resumable output would interleave its rows with the first's. Another holder -> GeoTokenError
    naming `what`. Without POSIX locks (Windows) nothing is checked."""
    if fcntl is None:  # pragma: no cover - not POSIX
        yield
        return
    lock = Path(lock)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a")  # noqa: SIM115 - closed by the with below
    except OSError as exc:  # the folder cannot hold `what` either: say it of `what`, not of its lock
        raise GeoTokenError(f"{what}: cannot be written there ({exc.strerror or exc})") from None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GeoTokenError(
                f"{what}: another process is writing it (it holds {lock}); wait for it to end or stop it"
            ) from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # still held: a waiting process gets the error, not this file


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    if path.is_dir():
        raise GeoTokenError(f"{path}: is a folder; name a file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except Exception as exc:
        if disk_full(exc):  # from any writer (numpy, safetensors, FAISS): said once, naming the file
            raise GeoTokenError(
                f"{path}: no space left on the device while writing it; nothing was replaced"
            ) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty sibling folder `.NAME.tmp`; when the block succeeds it takes `path`'s place (an old
    folder there is first renamed `.NAME.old`, then removed). A failure removes the sibling and leaves
    the old folder as it was; a crash between the two renames leaves the old one as `.NAME.old`."""
    path = Path(path)
    if path.is_symlink():  # a link to a folder elsewhere (another disk): replace the folder, keep the link
        path = path.resolve()
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def read_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """The tensors of a safetensors file (torch), or an error naming it if it is missing or damaged
    (a truncated download, another format); safetensors never unpickles, so an untrusted file is safe."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise GeoTokenError(
            f"{path}: not a readable safetensors file ({exc}); download or save it again"
        ) from None


def optimizer_tensors(opt: Any) -> dict[str, Any]:
    """A torch optimizer's per-parameter state as flat safetensors entries `opt.{i}.{name}` (CPU copies);
    its `param_groups` (numbers) go to JSON beside them. `load_optimizer` reads both back."""
    return {
        f"opt.{i}.{name}": t.detach().cpu().contiguous()
        for i, state in opt.state_dict()["state"].items()
        for name, t in state.items()
    }


def load_optimizer(opt: Any, tensors: dict[str, Any], param_groups: list) -> None:
    """Restore `opt` from `optimizer_tensors` entries (other keys are ignored) and its `param_groups`."""
    state: dict = {}
    for key, t in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = t
    opt.load_state_dict({"state": state, "param_groups": param_groups})


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """`open()` that writes to a temporary file and renames it onto `path` when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file; invalid JSON or text that is not UTF-8 is an error naming the file (and line)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise GeoTokenError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except UnicodeDecodeError as exc:
        raise GeoTokenError(f"{path}: not UTF-8 text ({exc})") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex SHA-256 of a JSON-serialisable object in canonical form (sorted keys): a config's identity."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def is_whole(value: Any, low: int = 1, high: int | None = None) -> bool:
    """Whether `value` is an int in low..high (not a bool, a float or a string): the check behind every
    count a user gives (batch sizes, k, top-k, epochs)."""
    return (
        isinstance(value, (int, np.integer))  # (NumPy's too: a count read from an array's shape or a table)
        and not isinstance(value, (bool, np.bool_))
        and value >= low
        and (high is None or value <= high)
    )


def value_fits(hint: Any, value: Any) -> bool:
    """A plain (JSON / YAML) value against a config field's type: an int is a float too, a bool is not a
    number, a list is a tuple; unions by their members; what it cannot check (Any, item types) passes."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(value_fits(h, value) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is type(None):
        return value is None
    kind = origin or hint
    if kind is tuple:
        return isinstance(value, list | tuple)
    return isinstance(value, kind) if isinstance(kind, type) else True


def plain(value: Any) -> Any:
    """A NumPy scalar as the Python number it holds (what JSON, FAISS and `is_whole` take); else `value`."""
    return value.item() if isinstance(value, np.generic) else value


def check_types(config: Any, what: str) -> None:
    """Each field of the dataclass `config` against its type hint, NumPy scalars made Python ones (so they
    reach JSON): a value of another type is an error naming the field, not a TypeError deep inside."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = plain(getattr(config, f.name))  # e.g. a learning rate read from an array
        object.__setattr__(config, f.name, value)
        if not value_fits(hints[f.name], value):
            raise GeoTokenError(f"{what} {f.name} must be {type_name(hints[f.name])}, got {value!r}")


def type_name(hint: Any) -> str:
    """A field's type as a config file's reader would say it: "int or null", "tuple of str"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(h) for h in args)
    if hint is type(None):
        return "null"
    if origin in (tuple, list) and args:
        return f"{'list' if origin is list else 'tuple'} of {type_name(args[0])}"
    return getattr(origin or hint, "__name__", str(hint))


# ---------------------------------------------------------------------------------------------- YAML
class _YAMLLoader(yaml.SafeLoader):
    """safe_load, with YAML 1.2's numbers (1e-3 is a float, not the string '1e-3' of YAML 1.1) and a
    repeated key an error (YAML takes the last silently: `size: 300` then `size: 500` is 500)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice "
                    + (
                        f"(lines {seen[key] + 1} and {key_node.start_mark.line + 1})"
                        if seen[key] != key_node.start_mark.line
                        else f"on line {seen[key] + 1}"
                    ),  # fmt: skip
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str, where: str = "") -> Any:
    """Parse YAML text (`where`: the file, named in errors with the line)."""
    try:
        return yaml.load(text, Loader=_YAMLLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise GeoTokenError(f"{where or 'YAML'}: not valid YAML: {exc}") from None
