"""``lastkd transcode SRC DST``: a one-off, resumable, parallel transcode of a dataset's videos to a
short side of 256 (1080p H.264 decoding is what slows RGB training down); see
:mod:`lastkd.teacher.transcode`. Exit 0 when every file is done, 1 when some could not be read
(named), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lastkd.services.settings import Settings


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``lastkd transcode``."""
    parser = sub.add_parser(
        "transcode",
        help="re-encode a dataset's videos to a small short side (resumable, parallel)",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("src", type=Path, help="folder of videos (searched recursively)")
    parser.add_argument("dst", type=Path, help="output folder (same relative paths, .avi)")
    parser.add_argument("--short-side", type=int, default=256, help="pixels of the short side (default 256)")
    parser.add_argument(
        "--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="processes (default: cores - 1)"
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``lastkd transcode``."""
    from lastkd.teacher.transcode import transcode_tree

    done = {"n": 0}

    def on_done(src: Path, error: str | None) -> None:
        done["n"] += 1
        if error is not None:
            print(f"failed: {src}: {error}", file=sys.stderr)

    try:
        report = transcode_tree(args.src, args.dst, args.short_side, args.workers, on_done)
    except ValueError as exc:
        print(f"lastkd transcode: {exc}", file=sys.stderr)
        return 2
    print(
        f"transcoded {len(report.written)}, already done {len(report.skipped)}, failed {len(report.failed)} "
        f"-> {args.dst}"
    )
    return 1 if report.failed else 0
