"""The plugin registry (docs/design.md, "Registry and checkpoints"), each behaviour on a fresh ``Registry()``:
lazy idempotent loading, the environment switches, failures reported not fatal,
name clashes, unknown hooks rejected; and the ``plugins``/``recipes`` commands."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from importlib.metadata import EntryPoint

import pytest
import torch
from torch import nn

from lorakit.core import AdapterError, Initializer, hookimpl
from lorakit.core import plugins as plugins_mod
from lorakit.core.cli import main
from lorakit.core.layer_kinds import LinearKind
from lorakit.core.plugins import HOOKS, Registry


@dataclass
class Zeros(Initializer):
    name = "zeros-test"

    def factors(self, weight, rank, scale, rng):
        out_f, in_f = weight.shape
        return weight.new_zeros(out_f, rank), weight.new_ones(rank), weight.new_zeros(rank, in_f)


class MyLinear(nn.Linear):
    pass


def export_nothing(model, path, **options):
    return path


class Everything:
    """A plugin implementing every hook of lorakit.core.hookspecs."""

    @hookimpl
    def lorakit_primitives(register):
        register(Zeros)

    @hookimpl
    def lorakit_recipes(register):
        register("zeros-recipe", generator="direct", normalizer="scale", init="zeros-test",
                 description="test recipe")

    @hookimpl
    def lorakit_layers(register):
        register(MyLinear, LinearKind())

    @hookimpl
    def lorakit_targets(register):
        register("my-model", ["q", "v"])

    @hookimpl
    def lorakit_exporters(register):
        register("nothing", export_nothing)

    @hookimpl
    def lorakit_commands(register):
        register("hello", "say hello", lambda parser: None, lambda args: 0)


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("LORAKIT_DISABLE_AUTOLOAD", raising=False)
    monkeypatch.delenv("LORAKIT_LOAD_PLUGINS", raising=False)


def test_every_hook_registers_through_its_callback(monkeypatch):
    monkeypatch.setenv("LORAKIT_DISABLE_AUTOLOAD", "1")  # only this plugin
    reg = Registry()
    reg.register_plugin(Everything, "everything")
    assert reg.failures == {}
    info = reg.plugins["everything"]
    assert sorted(info.hooks) == sorted(HOOKS)  # lorakit_primitives ... lorakit_commands
    assert reg.primitives["initializer"]["zeros-test"] is Zeros
    assert reg.recipes["zeros-recipe"].init == {"name": "zeros-test", "args": {}}
    assert reg.recipes["zeros-recipe"].plugin == "everything"
    assert isinstance(reg.layer_kind(MyLinear(2, 2)), LinearKind)  # found through the MRO
    assert reg.targets["my-model"] == ["q", "v"]
    assert reg.exporters["nothing"] is export_nothing
    assert reg.commands["hello"][0] == "say hello"
    assert "initializer 'zeros-test'" in info.registered and "command 'hello'" in info.registered


def test_loading_is_lazy_and_idempotent(no_env):
    reg = Registry()
    assert not reg.loaded and reg.plugins == {} and reg.primitives["generator"] == {}
    reg.load()
    assert reg.loaded and {"core", "generators", "normalizers", "initializers"} <= set(reg.plugins)
    snapshot = ({k: dict(v) for k, v in reg.primitives.items()}, dict(reg.recipes), dict(reg.failures))
    assert reg.load() is reg
    assert ({k: dict(v) for k, v in reg.primitives.items()}, dict(reg.recipes), dict(reg.failures)) == snapshot
    # a lookup loads on first use
    fresh = Registry()
    assert fresh.primitive_class("generator", "direct").__name__ == "Direct" and fresh.loaded


def test_autoload_can_be_disabled(monkeypatch):
    monkeypatch.setenv("LORAKIT_DISABLE_AUTOLOAD", "1")
    reg = Registry().load()
    assert reg.plugins == {} and reg.recipes == {}
    with pytest.raises(AdapterError, match="unknown generator 'direct'.*Install the plugin"):
        reg.primitive_class("generator", "direct")
    reg.register_plugin(Everything, "everything")  # plugins can still be registered by hand
    assert "zeros-test" in reg.primitives["initializer"]


def test_allow_list(monkeypatch):
    monkeypatch.delenv("LORAKIT_DISABLE_AUTOLOAD", raising=False)
    monkeypatch.setenv("LORAKIT_LOAD_PLUGINS", "core, normalizers")
    reg = Registry().load()
    assert set(reg.plugins) == {"core", "normalizers"}
    # core ships the LoRA baseline (lorakit.core.lora); the normalizers add DeLoRA
    assert set(reg.primitives["normalizer"]) == {"scale", "delora"} and set(reg.primitives["generator"]) == {"direct"}


@pytest.mark.parametrize("plugins", ["core", "core,transformers", "core,generators"])
def test_core_plus_any_one_plugin_works(monkeypatch, plugins, tmp_path):
    """lorakit-core alone is LoRA; any one plugin composes with it (issue: core self-sufficient)."""
    import subprocess
    import sys

    code = (
        "import torch; from torch import nn; from lorakit.core import Adapter, save, load\n"
        "m = nn.Sequential(nn.Linear(4, 3)); Adapter(rank=2).apply(m, targets=['0'])\n"
        f"save(m, {str(tmp_path)!r}); load(nn.Sequential(nn.Linear(4, 3)), {str(tmp_path)!r})\n"
        "import importlib.util\n"
        "if importlib.util.find_spec('lorakit.transformers'):\n"
        "    from lorakit.transformers import export_peft, import_peft\n"
        f"    export_peft(m, {str(tmp_path / 'peft')!r})\n"
        f"    import_peft(nn.Sequential(nn.Linear(4, 3)), {str(tmp_path / 'peft')!r})\n"
    )
    env = {**__import__("os").environ, "LORAKIT_LOAD_PLUGINS": plugins}
    env.pop("LORAKIT_DISABLE_AUTOLOAD", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_plugin_that_fails_to_import_is_reported_not_fatal(monkeypatch, no_env):
    real = plugins_mod.entry_points
    broken = EntryPoint(name="broken", value="lorakit_no_such_module_xyz.plugin", group="lorakit")
    monkeypatch.setattr(plugins_mod, "entry_points", lambda group: [broken, *real(group=group)])
    with pytest.warns(UserWarning, match="'broken': import failed: ModuleNotFoundError"):
        reg = Registry().load()
    assert reg.failures["broken"].startswith("import failed: ModuleNotFoundError")
    assert "broken" not in reg.plugins and "direct" in reg.primitives["generator"]  # the others loaded


def test_a_hook_that_raises_is_reported_not_fatal():
    class Raising:
        @hookimpl
        def lorakit_recipes(register):
            raise RuntimeError("boom")

    reg = Registry()
    with pytest.warns(UserWarning, match="lorakit_recipes raised RuntimeError: boom"):
        reg.register_plugin(Raising, "raising")
    reg.register_plugin(Everything, "everything")
    assert "raising" in reg.failures and reg.recipes["zeros-recipe"].plugin == "everything"


def test_name_clashes_are_clear_errors():
    class Again:
        @hookimpl
        def lorakit_primitives(register):
            register(Zeros)

    class SameRecipe:
        @hookimpl
        def lorakit_recipes(register):
            register("zeros-recipe", generator="direct", normalizer="scale", init="kaiming")

    reg = Registry()
    reg.register_plugin(Everything, "everything")
    with pytest.warns(UserWarning):
        reg.register_plugin(Again, "again")
        reg.register_plugin(SameRecipe, "same-recipe")
    assert reg.failures["again"] == ("lorakit_primitives raised AdapterError: initializer 'zeros-test' is "
                                      "already registered; rename it in plugin 'again'")
    assert "recipe 'zeros-recipe' is already registered; rename it in plugin 'same-recipe'" in reg.failures[
        "same-recipe"]
    assert reg.primitives["initializer"]["zeros-test"] is Zeros and reg.recipes["zeros-recipe"].plugin == "everything"


def test_unknown_hookimpls_are_rejected():
    class Typo:
        @hookimpl
        def lorakit_primitivs(register):  # misspelt: check_pending rejects it
            register(Zeros)

    reg = Registry()
    with pytest.warns(UserWarning, match="rejected"):
        reg.register_plugin(Typo, "typo")
    assert "lorakit_primitivs" in reg.failures["typo"] and "typo" not in reg.plugins
    assert not reg.pm.is_registered(Typo) and reg.primitives["initializer"] == {}


def test_only_primitive_classes_register():
    class NotAPrimitive:
        @hookimpl
        def lorakit_primitives(register):
            register(torch.nn.Linear)

    reg = Registry()
    with pytest.warns(UserWarning, match="is not a primitive class with a kind and a name"):
        reg.register_plugin(NotAPrimitive, "bad")
    assert reg.primitives["initializer"] == {}


def test_a_registered_primitive_is_usable_by_name(no_env):
    reg = Registry().load()
    reg.register_plugin(Everything, "everything")
    init = reg.create("initializer", {"name": "zeros-test", "args": {}})
    assert isinstance(init, Zeros)
    with pytest.raises(AdapterError, match=r"initializer 'zeros-test': bad arguments \{'x': 1\}"):
        reg.create("initializer", {"name": "zeros-test", "args": {"x": 1}})
    with pytest.raises(AdapterError, match="unknown recipe 'nope'; registered recipes: .*lora"):
        reg.recipe("nope")


def test_cli_plugins_json(capsys):
    assert main(["plugins", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row for row in report["plugins"]}
    assert {"core", "generators", "normalizers", "initializers", "olora", "vera", "devtools"} <= set(rows)
    assert rows["olora"]["distribution"] == "lorakit-olora" and rows["olora"]["version"] == "0.1.0"
    assert "initializer 'olora'" in rows["olora"]["registered"]
    assert rows["devtools"]["hooks"] == ["lorakit_commands"]
    assert report["failures"] == []


def test_cli_recipes_json(capsys):
    assert main(["recipes", "--json"]) == 0
    recipes = json.loads(capsys.readouterr().out)
    assert recipes["lora"]["init"] == {"name": "kaiming", "args": {}} and recipes["lora"]["magnitude"] is None
    assert recipes["rslora"]["normalizer"] == {"name": "scale", "args": {"rs": True}}
    assert recipes["vera"]["plugin"] == "vera" and recipes["vera"]["generator"]["name"] == "vera"
    assert recipes["olora"]["init"]["name"] == "olora"


# -- a plugin must not break lorakit ----------------------------------------------------
BAD_PLUGINS = '''
import sys
from lorakit.core import hookimpl
from lorakit.core.primitives import Initializer


class Half(Initializer):
    name = "half-registered"


class DemoClash:
    @hookimpl
    def lorakit_commands(register):
        register("demo", "takes a core command", lambda parser: None, lambda args: 0)


class BadConfigure:
    @hookimpl
    def lorakit_commands(register):
        register("bad-configure", "configure raises", lambda parser: 1 / 0, lambda args: 0)


class ExitInHook:
    @hookimpl
    def lorakit_primitives(register):
        register(Half)

    @hookimpl
    def lorakit_recipes(register):
        sys.exit("no")


class BadRecipe:
    @hookimpl
    def lorakit_recipes(register):
        register("ghost", generator="no-such-generator", normalizer="scale", init="kaiming")
'''


@pytest.fixture
def bad_plugins(tmp_path, monkeypatch, no_env):
    (tmp_path / "lorakit_test_exit.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "lorakit_test_bad.py").write_text(BAD_PLUGINS)
    monkeypatch.syspath_prepend(str(tmp_path))
    real = plugins_mod.entry_points
    bad = [EntryPoint(name=n, value=v, group="lorakit") for n, v in [
        ("exits", "lorakit_test_exit"), ("demo-clash", "lorakit_test_bad:DemoClash"),
        ("bad-configure", "lorakit_test_bad:BadConfigure"), ("exit-in-hook", "lorakit_test_bad:ExitInHook"),
        ("bad-recipe", "lorakit_test_bad:BadRecipe")]]
    monkeypatch.setattr(plugins_mod, "entry_points", lambda group: [*bad, *real(group=group)])
    with pytest.warns(UserWarning):
        reg = Registry().load()
    monkeypatch.setattr("lorakit.core.cli.registry", reg)
    return reg


def test_broken_plugins_are_listed_and_register_nothing(bad_plugins):
    reg = bad_plugins
    assert reg.failures["exits"] == "import failed: SystemExit: 3"
    assert "command 'demo' is one of lorakit's own" in reg.failures["demo-clash"]
    assert "lorakit_commands raised ZeroDivisionError" in reg.failures["bad-configure"]
    assert reg.failures["exit-in-hook"] == "lorakit_recipes raised SystemExit: no"
    assert "names generator 'no-such-generator', which no loaded plugin registers" in reg.failures["recipe 'ghost'"]
    # all-or-nothing: the primitive registered before the failing hook is gone too
    assert "half-registered" not in reg.primitives["initializer"] and "bad-configure" not in reg.commands
    assert not {"exits", "demo-clash", "bad-configure", "exit-in-hook"} & set(reg.plugins)
    assert "ghost" not in reg.recipes and reg.plugins["bad-recipe"].registered == []
    for name in ("demo-clash", "bad-configure", "exit-in-hook"):  # pluggy forgot them too
        assert reg.pm.get_plugin(name) is None
    assert {"lora", "dora", "vera"} <= set(reg.recipes)  # every other plugin loaded


def test_every_other_command_works_beside_broken_plugins(bad_plugins, capsys):
    assert main(["recipes", "--json"]) == 0
    assert "ghost" not in json.loads(capsys.readouterr().out)
    assert main(["plugins", "--json"]) == 0
    failed = {f["name"] for f in json.loads(capsys.readouterr().out)["failures"]}
    assert failed == {"exits", "demo-clash", "bad-configure", "exit-in-hook", "recipe 'ghost'"}
    assert main(["demo"]) == 0
    assert "ghost" not in capsys.readouterr().out


def test_core_commands_are_the_clis_own():
    import argparse

    from lorakit.core.cli import build_parser
    from lorakit.core.plugins import CORE_COMMANDS, registry

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) - set(registry.load().commands) == CORE_COMMANDS


def test_unregister_removes_everything_a_plugin_registered(monkeypatch):
    monkeypatch.setenv("LORAKIT_DISABLE_AUTOLOAD", "1")
    reg = Registry()
    reg.register_plugin(Everything, "everything")
    info = reg.unregister("everything")
    assert "command 'hello'" in info.registered and "everything" not in reg.plugins
    assert reg.primitives["initializer"] == {} and reg.recipes == {} and reg.commands == {} and reg.layers == {}
    reg.register_plugin(Everything, "everything")  # and it can come back
    assert reg.failures == {} and reg.primitives["initializer"]["zeros-test"] is Zeros
    with pytest.raises(AdapterError, match="no plugin 'nope' is registered"):
        reg.unregister("nope")


def test_recipes_lists_withdrawn_recipes():
    """A recipe whose primitive no loaded plugin registers is withdrawn, and ``lorakit recipes`` says so."""
    import os
    import subprocess

    env = {**os.environ, "LORAKIT_LOAD_PLUGINS": "core,generators,normalizers,initializers"}
    result = subprocess.run([sys.executable, "-m", "lorakit.core.cli", "recipes"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "withdrawn recipe 'op-dora'" in result.stdout and "magnitude 'dora'" in result.stdout


def test_hooks_are_called_through_pluggy():
    """Registration calls each hook through pluggy's own dispatch (restricted to the plugin being
    registered), so pluggy's tracing and hook wrappers see it."""
    reg = Registry()
    seen = []
    undo = reg.pm.add_hookcall_monitoring(lambda name, impls, kwargs: seen.append(name), lambda *a: None)
    try:
        reg.register_plugin(Everything, "everything")
    finally:
        undo()
    assert sorted(seen) == sorted(HOOKS)
