"""Every hook has a doc and a test (docs/design.md, "Registry and checkpoints"): each hookspec in
``lorakit.core.hookspecs`` has a ``## lorakit_<hook>`` section in docs/plugins.md that
shows its ``register(...)`` call, and is exercised by at least one test."""

import inspect
import re
from pathlib import Path

import pytest

from lorakit.core import hookspecs
from lorakit.core.plugins import HOOKS, Registry

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"


def sections() -> dict[str, str]:
    text = DOC.read_text()
    parts = re.split(r"^## (lorakit_\w+)\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1].split("\n## ")[0] for i in range(1, len(parts), 2)}


def test_hooks_are_the_hookspecs():
    specs = {n for n, f in vars(hookspecs).items() if n.startswith("lorakit_") and inspect.isfunction(f)}
    assert set(HOOKS) == specs and len(specs) >= 6
    assert set(Registry().pm.hook.__dict__) >= specs  # each one is a real pluggy hookspec


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    docs = sections()
    assert hook in docs, f"docs/plugins.md has no '## {hook}' section"
    assert "register(" in docs[hook], f"the '## {hook}' section does not show its register(...) call"
    assert getattr(hookspecs, hook).__doc__, f"hookspec {hook} has no docstring"


def test_no_documented_hook_is_missing_from_the_hookspecs():
    assert set(sections()) <= set(HOOKS), "docs/plugins.md documents a hook that does not exist"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_exercised_by_a_test(hook):
    sources = [p for p in (ROOT / "tests").rglob("*.py") if p.name != Path(__file__).name]
    users = [p.name for p in sources if re.search(rf"def {hook}\(", p.read_text())]
    assert users, f"no test implements {hook}; add one (see tests/test_registry.py)"
