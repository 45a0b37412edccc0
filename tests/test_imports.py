"""The package's imports run one way (docs/architecture.md): a module imports only from its own
part of the package or from parts below it, never from above, so that e.g. the model can be
used without Ray Train and training never needs the evaluation code. Imports inside functions
count too: a lazy import is still a dependency."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "detr_ray"

# Lowest first. A part may import from its own layer's other parts only where listed together
# in a tuple below and never in a circle (checked separately).
LAYERS = [
    ("config",),
    ("ownership", "testing_hooks", "local_ray", "pareto"),
    ("data",),
    ("checkpoint", "coco_eval"),
    ("model",),
    ("train",),
    ("relaunch",),
    ("tune", "evaluation"),
    ("serve",),
    ("cli",),
]
LEVEL = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _part(module: str) -> str | None:
    """`detr_ray.data.shards` -> `data`; `detr_ray.checkpoint` -> `checkpoint`; `detr_ray` -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("detr_ray"):
            if node.module == "detr_ray":
                out += [(node.lineno, f"detr_ray.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            out.append((node.lineno, "<relative>"))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("detr_ray")]
    return out


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        yield path, ".".join(p for p in rel.parts if p != "__init__")


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(m) for _, m in _modules()} - {None}
    assert parts <= set(LEVEL), f"give these a layer in tests/test_imports.py: {sorted(parts - set(LEVEL))}"


def test_imports_run_one_way():
    wrong = []
    for path, module in _modules():
        src = _part(module)
        for line, target in _imports(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if target == "<relative>":
                wrong.append(f"{where}: relative import (the package uses absolute imports)")
                continue
            dst = _part(target)
            if src is None or dst is None or dst == src:
                continue
            if LEVEL[dst] > LEVEL[src]:
                wrong.append(f"{where}: {module} ({src}) imports {target} ({dst}), a layer above it")
    assert not wrong, "\n".join(wrong)


def test_no_circle_between_parts_of_one_layer():
    edges = set()
    for path, module in _modules():
        src = _part(module)
        for _, target in _imports(path):
            dst = _part(target) if target != "<relative>" else None
            if src and dst and src != dst and LEVEL[src] == LEVEL[dst]:
                edges.add((src, dst))
    circles = sorted((a, b) for a, b in edges if (b, a) in edges and a < b)
    assert not circles, f"parts that import each other: {circles}"


def test_the_check_sees_an_upward_import(tmp_path):
    """The walker finds imports inside functions (the kind that hid a cycle before)."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from detr_ray.tune.space import parse_space\n")
    assert _imports(path) == [(2, "detr_ray.tune.space")]
