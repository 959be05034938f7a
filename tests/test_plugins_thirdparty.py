"""The third-party plugins in plugins/ and the plugin template.

- each plugin is found through its entry point and runs its own test suite (its
  math + the conformance kit crossed with every registered primitive), in-process;
- ``lorakit new-plugin`` produces a package that registers on a fresh ``Registry``
  and whose generated tests pass.
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
from pathlib import Path

import pytest

from lorakit.core import AdapterError, registry
from lorakit.core.cli import main
from lorakit.core.plugins import Registry

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("initializer", "normalizer", "generator", "magnitude")


def run_pytest(path: Path, *args: str) -> int:
    """pytest on ``path`` in this process (no interpreter start, no torch re-import)."""
    before = set(sys.modules)
    try:
        return int(pytest.main([str(path), "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *args]))
    finally:  # forget the test modules of that run (their names could clash with ours)
        for name in set(sys.modules) - before:
            if name.startswith(("test_", "conftest")):
                del sys.modules[name]


@pytest.fixture
def restore_registry():
    """The global registry as it was before the test (a generated plugin registers itself)."""
    reg = registry.load()
    tables = {k: copy.copy(v) for k, v in vars(reg).items() if isinstance(v, dict)}
    tables["primitives"] = {k: dict(v) for k, v in reg.primitives.items()}
    plugins = {name for name, _ in reg.pm.list_name_plugin()}
    path = list(sys.path)
    yield reg
    for name, plugin in reg.pm.list_name_plugin():
        if name not in plugins:
            reg.pm.unregister(plugin)
    for key, value in tables.items():
        setattr(reg, key, value)
    sys.path[:] = path


@pytest.mark.parametrize("plugin,dist,registered", [
    ("olora", "lorakit-olora", {"initializer 'olora'", "recipe 'olora'"}),
    ("vera", "lorakit-vera", {"generator 'vera'", "initializer 'shared-random'", "recipe 'vera'"}),
    ("devtools", "lorakit-devtools", {"command 'new-plugin'"}),
    ("lorafa", "lorakit-lorafa", {"generator 'lora-fa'", "recipe 'lora-fa'"}),
    ("ia3", "lorakit-ia3", {"magnitude 'ia3'"}),
])
def test_found_through_the_entry_point(plugin, dist, registered):
    info = registry.load().plugins[plugin]
    assert info.distribution == dist and set(info.registered) == registered
    assert plugin not in registry.failures


def test_plugins_depend_only_on_core():
    import tomllib

    for name in ("lorakit-olora", "lorakit-vera", "lorakit-devtools", "lorakit-lorafa", "lorakit-ia3"):
        project = tomllib.loads((ROOT / "plugins" / name / "pyproject.toml").read_text())["project"]
        assert project["dependencies"] == ["lorakit-core"], name
        assert list(project["entry-points"]) == ["lorakit"], name


@pytest.mark.parametrize("plugin", ["lorakit-olora", "lorakit-vera", "lorakit-lorafa", "lorakit-ia3"])
def test_plugin_suite_passes(plugin, monkeypatch):
    monkeypatch.setenv("LORAKIT_CONFORMANCE_EXAMPLES", "1")  # CI budget; the plugin's default is 3
    assert run_pytest(ROOT / "plugins" / plugin) == 0, f"{plugin}'s own tests failed (output above)"


def generate(tmp_path, name: str, kind: str) -> Path:
    assert main(["new-plugin", name, "--kind", kind, "--dir", str(tmp_path)]) == 0
    return tmp_path / f"lorakit-{name}"


@pytest.mark.parametrize("kind", KINDS)
def test_new_plugin_registers_and_its_tests_pass(kind, tmp_path, restore_registry, monkeypatch, capsys):
    name = f"gen-{kind[:4]}"
    module_name = f"lorakit_gen_{kind[:4]}"
    pkg = generate(tmp_path, name, kind)
    assert f"created {pkg}" in capsys.readouterr().out
    files = {str(p.relative_to(pkg)) for p in pkg.rglob("*") if p.is_file()}
    assert files == {"pyproject.toml", "README.md", f"src/{module_name}/__init__.py",
                     f"src/{module_name}/plugin.py", f"src/{module_name}/gen_{kind[:4]}.py",
                     "tests/conftest.py", f"tests/test_{module_name}.py"}
    assert f'{name} = "{module_name}.plugin"' in (pkg / "pyproject.toml").read_text()

    sys.path.insert(0, str(pkg / "src"))
    try:
        plugin = importlib.import_module(f"{module_name}.plugin")
        fresh = Registry()
        fresh.register_plugin(plugin, name)
        assert fresh.failures == {} and fresh.plugins[name].registered == [f"{kind} '{name}'"]
        cls = fresh.primitives[kind][name]
        assert cls.__module__ == f"{module_name}.gen_{kind[:4]}" and cls().spec() == cls().spec()

        # the generated suite: formula + registration always; the conformance kit for
        # one kind in CI (every kind under LORAKIT_SLOW=1, see test below)
        monkeypatch.setenv("LORAKIT_CONFORMANCE_EXAMPLES", "1")
        select = [] if kind == "initializer" else ["-k", "not conformance"]
        assert run_pytest(pkg, *select) == 0, f"generated {kind} plugin: its tests failed (output above)"
    finally:
        for mod in [m for m in sys.modules if m.startswith(module_name)]:
            del sys.modules[mod]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS[1:])
def test_new_plugin_conformance_every_kind(kind, tmp_path, restore_registry, monkeypatch):
    pkg = generate(tmp_path, f"slow-{kind[:4]}", kind)
    monkeypatch.setenv("LORAKIT_CONFORMANCE_EXAMPLES", "3")
    try:
        assert run_pytest(pkg) == 0
    finally:
        for mod in [m for m in sys.modules if m.startswith(f"lorakit_slow_{kind[:4]}")]:
            del sys.modules[mod]


def test_new_plugin_bad_input(tmp_path, capsys):
    assert main(["new-plugin", "Bad_Name", "--dir", str(tmp_path)]) == 2
    assert "plugin name 'Bad_Name': use lowercase letters" in capsys.readouterr().err
    assert main(["new-plugin", "olora", "--kind", "initializer", "--dir", str(tmp_path)]) == 2
    assert "initializer 'olora' is already registered (lorakit_olora.olora)" in capsys.readouterr().err
    generate(tmp_path, "twice", "normalizer")
    with pytest.raises(AdapterError, match="already exists; remove it or choose another --dir"):
        from lorakit_devtools import new_plugin
        new_plugin("twice", "normalizer", tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["lorakit-twice"]  # nothing written for the refused ones


def test_checkpoints_record_every_primitives_distribution(tmp_path):
    """A checkpoint names the distribution and version of each primitive it uses (a
    third-party plugin's too), and a load without that plugin says what to install."""
    import json
    import subprocess

    from torch import nn

    from lorakit.core import Adapter, save

    model = nn.Sequential(nn.Linear(6, 4))
    Adapter(generator="lora-fa", normalizer="delora", init="pissa", magnitude="ia3", rank=2).apply(model, targets=["0"])
    save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["primitives"] == {"generator lora-fa": "lorakit-lorafa", "normalizer delora": "lorakit-normalizers",
                                    "initializer pissa": "lorakit-initializers", "magnitude ia3": "lorakit-ia3"}
    assert {"lorakit-core", "lorakit-lorafa", "lorakit-ia3", "lorakit-normalizers", "lorakit-initializers"} <= set(
        config["versions"])
    code = ("from torch import nn; from lorakit.core import load\n"
            f"load(nn.Sequential(nn.Linear(6, 4)), {str(tmp_path)!r})")
    env = {**os.environ, "LORAKIT_LOAD_PLUGINS": "core,normalizers,initializers,ia3"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "it was saved with lorakit-lorafa: pip install it" in result.stderr
