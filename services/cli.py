"""The ``lastkd`` command line: one dispatcher, one module per command.

Each command module exposes ``add_parser(subparsers)`` which registers its sub-parser and sets
``func=run`` where ``run(args, settings) -> int``. Modules are imported lazily so that
``lastkd store stats`` never pays for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from services.settings import SettingsError, load_settings

# command name -> module implementing it (see the module docstrings for what each does)
COMMANDS: dict[str, str] = {
    "store": "services.store_cli",
    "embed": "services.teacher_api.bulk",
    "serve-teacher": "services.teacher_api.app",
    "synth": "services.trainer.synth",
    "train": "services.trainer.train_cli",
    "serve-trainer": "services.trainer.api",
    "worker": "services.trainer.worker",
    "up": "services.stack",
    "demo": "services.demo",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Build the parser, importing only the module of the command being run."""
    parser = argparse.ArgumentParser(prog="lastkd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, module in COMMANDS.items():
        if wanted in (None, name) and wanted is not None:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=f"see 'lastkd {name} --help'", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"lastkd: {exc}", file=sys.stderr)
        return 2
    return int(args.func(args, settings) or 0)


if __name__ == "__main__":
    sys.exit(main())
