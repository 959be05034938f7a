"""Fill ``plugins/template`` for one plugin: placeholders are ``{{key}}`` in file
contents and ``__module__`` in paths; files end in ``.tmpl`` so the template itself is
never imported or linted. Plain string replacement: no template engine needed."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from lorakit.core import AdapterError, registry

KINDS = ("initializer", "normalizer", "generator", "magnitude")
NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")


def template_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "template", here.parents[2] / "template"):  # wheel, then checkout
        if (candidate / "pyproject.toml.tmpl").is_file():
            return candidate
    raise AdapterError(f"the plugin template is missing (looked in {here / 'template'} and "
                       f"{here.parents[2] / 'template'}); reinstall lorakit-devtools")


def placeholders(name: str, kind: str) -> dict[str, str]:
    if not NAME.fullmatch(name):
        raise AdapterError(f"plugin name {name!r}: use lowercase letters, digits and single dashes, "
                           "starting with a letter (e.g. 'my-init')")
    if kind not in KINDS:
        raise AdapterError(f"kind {kind!r}: choose one of {', '.join(KINDS)}")
    name = name.removeprefix("lorakit-")
    snake = name.replace("-", "_")
    return {"dist": f"lorakit-{name}", "module": f"lorakit_{snake}", "name": name, "name_py": snake,
            "Class": "".join(part.capitalize() for part in name.split("-")), "kind": kind}


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    if leftover := re.findall(r"\{\{\w+\}\}", text):
        raise AdapterError(f"template bug: unknown placeholders {sorted(set(leftover))}")
    return text


def new_plugin(name: str, kind: str = "initializer", directory: str | Path = ".") -> Path:
    """Create ``directory/lorakit-NAME``: a plugin package with a working example
    primitive of ``kind``, its entry point and its conformance tests. Returns the path."""
    values = placeholders(name, kind)
    taken = registry.load().primitives[kind].get(values["name"])
    if taken is not None:
        raise AdapterError(f"{kind} {values['name']!r} is already registered "
                           f"({taken.__module__}); choose another name")
    parent = Path(directory)
    if parent.exists() and not parent.is_dir():
        raise AdapterError(f"--dir {directory}: is not a folder; give the folder to create {values['dist']} in")
    target = parent / values["dist"]
    if target.exists() or target.is_symlink():
        raise AdapterError(f"{target} already exists; remove it or choose another --dir")
    try:  # folders below a file, or unwritable, fail here: before any file is written
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{values['dist']}.partial-", dir=parent))
    except OSError as exc:
        raise AdapterError(f"--dir {directory}: cannot create a folder there ({exc.strerror or exc}); "
                           "give another --dir") from None
    src = template_dir()
    values["kind_tests"] = _fill((src / "kinds" / f"{kind}_test.py.tmpl").read_text(), values)
    files = {src / "kinds" / f"{kind}.py.tmpl": Path("src", values["module"], values["name_py"] + ".py")}
    for path in src.rglob("*.tmpl"):
        rel = path.relative_to(src)
        if rel.parts[0] != "kinds":
            files[path] = Path(str(rel).removesuffix(".tmpl").replace("__module__", values["module"]))
    try:  # built in a hidden folder, then renamed: a failure leaves no half package
        for path, rel in sorted(files.items()):
            out = staging / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(_fill(path.read_text(), values))
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
