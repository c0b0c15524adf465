"""The layout's rules (issue 13), checked on the source: sizes, and imports that only go down the layers."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "gateway"
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 300

# Lowest first. A module may import from its own layer and the ones below, never from above.
LAYERS: list[tuple[str, ...]] = [
    # gateway.slurm.times is Slurm's time formats only (no client): config checks its time limits with it.
    ("gateway", "gateway.errors", "gateway.config", "gateway.textrules", "gateway.process", "gateway.slurm.times",
     "gateway.jobfiles"),
    (
        "gateway.slurm", "gateway.storage", "gateway.relion", "gateway.sbatch", "gateway.database",
        "gateway.callbacks", "gateway.audit", "gateway.observability", "gateway.auth",
    ),
    ("gateway.jobs",),
    (
        "gateway.api", "gateway.app", "gateway.jobside", "gateway.maintenance", "gateway.dry_run", "gateway.demo",
        "gateway.serve", "gateway.cli", "gateway.client", "gateway.client_cli", "gateway.client_usage", "gateway.stack", "gateway.__main__",
    ),
]


# The package root's create_app is the Flask tutorial's entry point (``flask --app gateway``): it
# imports the app factory inside the function, so importing ``gateway`` for its version stays light.
ALLOWED_UPWARD = {("gateway", "gateway.app")}


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of the longest listed prefix of ``module``."""
    best, found = -1, -1
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, found = len(name), index
    if found < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return found


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("gateway"):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("gateway")]
    return found


def test_every_module_is_placed_in_a_layer() -> None:
    for path in _modules():
        layer_of(_name(path))


def test_imports_only_go_down_the_layers() -> None:
    upward = []
    for path in _modules():
        module = _name(path)
        for line, imported in _imports(path):
            if layer_of(imported) > layer_of(module) and (module, imported) not in ALLOWED_UPWARD:
                upward.append(f"{path.relative_to(ROOT.parent)}:{line} {module} imports {imported}")
    assert upward == []


def test_no_module_is_over_the_size_limit() -> None:
    sizes = {str(p.relative_to(ROOT.parent)): len(p.read_text().splitlines()) for p in _modules()}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_no_class_is_over_the_size_limit() -> None:
    large = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    large[f"{path.relative_to(ROOT.parent)}:{node.name}"] = lines
    assert large == {}


@pytest.mark.parametrize("module, layer", [("gateway.jobs.service", 2), ("gateway.slurm.rest", 1), ("gateway.api.jobs", 3), ("gateway.errors", 0)])
def test_layers_are_read_by_the_longest_prefix(module: str, layer: int) -> None:
    assert layer_of(module) == layer


def test_the_layer_check_catches_an_upward_import(tmp_path: Path) -> None:
    # The rule must bite: a storage module importing the job service is an upward import.
    source = tmp_path / "bad.py"
    source.write_text("from gateway.jobs.service import JobService\n")
    assert [layer_of(m) for _, m in _imports(source)] == [2] and layer_of("gateway.storage.s3") == 1
