"""Where each decision lives, checked on the sources: the schedule's kind is known only inside the schedule
package, adapters are found through the registry, the core imports no demo model, and the keep/stop
collector and the mid-depth rule are written once."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fastperc"
SCHEDULE = PACKAGE / "schedule"


def sources(exclude: tuple[Path, ...] = ()) -> dict[str, ast.AST]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if any(path == e or e in path.parents for e in exclude):
            continue
        found[str(path.relative_to(PACKAGE.parent))] = ast.parse(path.read_text(), filename=str(path))
    return found


def private_schedule_names() -> set[str]:
    """Private (single underscore) methods and attributes the schedule classes define or assign."""
    names = set()
    for tree in (ast.parse(p.read_text()) for p in SCHEDULE.glob("*.py")):
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("_") and not node.name.startswith("__"):
                names.add(node.name)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                names.add(node.attr)
    return names


def test_no_module_outside_the_schedule_package_branches_on_its_class_or_calls_its_private_members():
    private = private_schedule_names()
    assert {"_table", "_sigma"} <= private  # the scan sees the package's private members
    offences = []
    for name, tree in sources(exclude=(SCHEDULE, PACKAGE / "__init__.py")).items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in ("VPSchedule", "FlowMatchingSchedule"):
                offences.append(f"{name}:{node.lineno} names {node.id}")
            if isinstance(node, ast.alias) and node.name in ("VPSchedule", "FlowMatchingSchedule"):
                offences.append(f"{name}: imports {node.name}")
            if isinstance(node, ast.Attribute) and node.attr in private:
                offences.append(f"{name}:{node.lineno} uses .{node.attr}")
    assert not offences, offences


def test_the_library_core_imports_no_demo_model():
    offences = []
    for name, tree in sources(exclude=(PACKAGE / "models", PACKAGE / "recipes")).items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                if module.lstrip(".").split(".")[0] == "models" or module.startswith("fastperc.models") or \
                        (module == "." and any(a.name == "models" for a in node.names)):
                    offences.append(f"{name}:{node.lineno} from {module} import ...")
            if isinstance(node, ast.Import) and any(a.name.startswith("fastperc.models") for a in node.names):
                offences.append(f"{name}:{node.lineno} import fastperc.models")
    assert not offences, offences


def test_models_are_matched_through_the_registry_never_by_exact_class():
    offences = []
    for name, tree in sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Is, ast.Eq)) for op in node.ops):
                sides = [node.left, *node.comparators]
                if any(isinstance(s, ast.Call) and getattr(s.func, "id", None) == "type" and s.args
                       and getattr(s.args[0], "id", None) in ("model", "m", "module") for s in sides):
                    offences.append(f"{name}:{node.lineno}")
    assert not offences, offences


def _floor_half_minus_one(node: ast.AST) -> bool:
    return (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub) and isinstance(node.left, ast.BinOp)
            and isinstance(node.left.op, ast.FloorDiv) and getattr(node.left.right, "value", None) == 2
            and getattr(node.right, "value", None) == 1)


def test_the_mid_depth_rule_is_written_once():
    places = [f"{name}:{node.lineno}" for name, tree in sources().items() for node in ast.walk(tree)
              if _floor_half_minus_one(node)]
    assert places == [places[0]] and places[0].startswith("fastperc/adapters/base.py"), places


def test_the_keep_stop_collector_is_written_once():
    """Only FeatureCollector tests membership in a `keep` set: every truncated forward records through it."""
    places = []
    for name, tree in sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(isinstance(op, ast.In) for op in node.ops):
                target = node.comparators[0]
                if getattr(target, "id", None) == "keep" or getattr(target, "attr", None) == "keep":
                    places.append(f"{name}:{node.lineno}")
    assert len(places) == 1 and places[0].startswith("fastperc/adapters/base.py"), places
