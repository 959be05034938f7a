"""What core may know: no primitive of another package by name, no slot a primitive names, no
pointers to a tracker outside the repository."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

from torch import nn

from lorakit.core import Adapter, adapted_layers, registry

ROOT = Path(__file__).parents[1]
CORE = ROOT / "packages" / "core" / "src" / "lorakit" / "core"


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module's code (docstrings left out: prose may name anything)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_core_names_no_primitive_or_slot_of_another_package():
    reg = registry.load()
    foreign = {name for table in reg.primitives.values() for name, cls in table.items()
               if not cls.__module__.startswith("lorakit.core")}
    foreign |= {name for name, recipe in reg.recipes.items() if recipe.plugin != "core"}
    core_slots = {"A", "B", "d"}  # the factor slots core itself creates (primitives.FACTOR_NAMES)
    slots = set()
    for name in reg.recipes:
        model = Adapter.from_recipe(name, rank=2).apply(nn.Sequential(nn.Linear(6, 6)), targets=["0"])
        layer = adapted_layers(model)["0"]
        own = layer.normalizer.__module__.startswith("lorakit.core")  # core's LoRA baseline names its own
        slots |= {s for s in layer.slots.slot_info if not (own and s == "sigma")}
    assert {"lambda_", "m", "w_norm"} <= slots  # the check sees DeLoRA's and DoRA's slots
    named = {f"{path.relative_to(CORE)}:{line} {value!r}" for path in CORE.rglob("*.py")
             for line, value in _code_strings(path) if value in foreign | (slots - core_slots)}
    assert not named, "core code names another package's primitive or slot: " + ", ".join(sorted(named))


def test_no_tracker_numbers_in_code_or_docs():
    """A tracker number points to a tracker that is not in the repository: say what, and why."""
    files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.toml", "*.yml", "*.txt"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"\b[Ii]ssues? \d+|\bticket \d+")
    found = [f"{f}:{n}" for f in files if (ROOT / f).is_file()
             for n, line in enumerate((ROOT / f).read_text(errors="replace").splitlines(), 1) if pattern.search(line)]
    assert not found, found
