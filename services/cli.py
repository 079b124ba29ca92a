"""The ``lastkd`` command line: one dispatcher, one module per command.

Each command module exposes ``add_parser(subparsers)`` which registers its sub-parser and sets
``func=run`` where ``run(args, settings) -> int``. Modules are imported lazily so that
``lastkd store stats`` never pays for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

from lastkd.lifeline import follow_owner_from_env
from lastkd.services.settings import SettingsError, load_settings

# command name -> module implementing it (see the module docstrings for what each does)
COMMANDS: dict[str, str] = {
    "store": "lastkd.services.store_cli",
    "embed": "lastkd.services.teacher_api.bulk",
    "serve-teacher": "lastkd.services.teacher_api.app",
    "synth": "lastkd.student.synth",
    "train": "lastkd.services.trainer.train_cli",
    "compare": "lastkd.services.trainer.compare_cli",
    "finetune-teacher": "lastkd.services.finetune_cli",
    "transcode": "lastkd.services.transcode_cli",
    "serve-trainer": "lastkd.services.trainer.api",
    "worker": "lastkd.services.trainer.worker",
    "up": "lastkd.services.stack",
    "demo": "lastkd.services.demo",
}

# One line per command for ``lastkd --help``, which must list them without importing any module.
SUMMARIES: dict[str, str] = {
    "store": "inspect, export and verify the feature store",
    "embed": "embed video clips into the feature store (resumable)",
    "serve-teacher": "run the teacher HTTP service (POST /embed)",
    "synth": "generate a small synthetic NTU-format dataset",
    "train": "train a LAST v2 student from a YAML config and publish it",
    "compare": "distillation against its baseline: arms x seeds, paired differences",
    "finetune-teacher": "fine-tune the VideoMAE V2 teacher on RGB clips and publish it",
    "transcode": "re-encode a dataset's videos to a small short side (resumable, parallel)",
    "serve-trainer": "run the trainer job API (POST /train)",
    "worker": "run a Celery worker for training jobs",
    "up": "teacher API + trainer API + one worker on the embedded defaults",
    "demo": "from nothing to a published student (synthetic data, random-init teacher)",
}

DESCRIPTION = "lastkd: distil a frozen video teacher into the LAST v2 skeleton student."
EPILOG = "Run 'lastkd COMMAND --help' for the options of one command. Settings: LASTKD_* variables or .env."


def _version() -> str:
    try:
        return version("lastkd")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Build the parser, importing only the module of the command being run (so that
    ``lastkd store stats`` never pays for importing torch)."""
    parser = argparse.ArgumentParser(prog="lastkd", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"lastkd {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, module in COMMANDS.items():
        if name == wanted:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=SUMMARIES[name], add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script: parse, load and validate the settings once, run the
    command. Returns the exit status (2 for usage errors and invalid settings)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Started by `lastkd up`: shut down in order when it dies, even by kill -9.
    follow_owner_from_env()
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"lastkd: {exc}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args, settings) or 0)
    except KeyboardInterrupt:
        print(f"lastkd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
