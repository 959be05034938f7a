"""Entry point ``devtools``: the ``lorakit new-plugin`` command."""

from lorakit.core import hookimpl

from .scaffold import KINDS, new_plugin


def configure(parser):
    parser.add_argument("name", help="plugin name, e.g. 'my-init' → package lorakit-my-init, primitive 'my-init'")
    parser.add_argument("--kind", choices=KINDS, default="initializer", help="kind of primitive (default: initializer)")
    parser.add_argument("--dir", default=".", help="folder to create lorakit-NAME in (default: .)")


def run(args) -> int:
    path = new_plugin(args.name, kind=args.kind, directory=args.dir)
    print(f"created {path}\nnext:\n  pip install -e {path}\n  python -m pytest {path}")
    return 0


@hookimpl
def lorakit_commands(register):
    register("new-plugin", "create a plugin package (primitive, entry point, conformance tests)", configure, run)
