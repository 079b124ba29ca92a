"""`lastkd store`: inspect, export and verify the LMDB feature store.

    lastkd store stats [--path DIR] [--json]          sizes, totals, readers
    lastkd store ls [--path DIR] [--json]             one line per feature set
    lastkd store export DEST [--set ID]... [--path DIR] [--json]
                                                      compacted, checksummed snapshot
    lastkd store verify SNAPSHOT [--json]             checksums + re-read every vector
    lastkd store export-npy --set ID --data CONFIG.yaml --split train [--out DIR] [--path DIR] [--json]
                                                      teacher_features_<split>.npy for the original
                                                      LAST code (rows in the dataset's sample order)

The store is opened read-only at ``settings.resolved_store_path`` (``--path`` overrides), so
these commands are safe while the teacher is writing. Exit status: 0 on success, 1 on any store
or snapshot error (message on stderr), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lastkd.featurestore import FeatureStore, FeatureStoreError, NotAStoreError, verify_snapshot
from lastkd.services.settings import Settings


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``lastkd store`` and its sub-commands."""
    parser = subparsers.add_parser(
        "store",
        help="inspect, export and verify the feature store",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    location = argparse.ArgumentParser(add_help=False)
    location.add_argument(
        "--path", type=Path, default=None, help="store directory (default: settings.resolved_store_path)"
    )
    sub = parser.add_subparsers(dest="store_command", metavar="SUBCOMMAND")
    sub.add_parser("stats", parents=[output, location], help="sizes, totals and readers of the store")
    sub.add_parser("ls", parents=[output, location], help="list feature sets with their metadata and counts")
    export = sub.add_parser("export", parents=[output, location], help="write a compacted, checksummed snapshot")
    export.add_argument("dest", type=Path, help="new or empty directory for the snapshot")
    export.add_argument(
        "--set",
        dest="set_ids",
        action="append",
        default=None,
        metavar="SET_ID",
        help="export only this feature set (repeatable); default: the whole store",
    )
    npy = sub.add_parser(
        "export-npy",
        parents=[output, location],
        help="write teacher_features_<split>.npy aligned with a training config's dataset (the seed's format)",
    )
    npy.add_argument("--set", dest="set_id", required=True, metavar="SET_ID", help="the feature set to export")
    npy.add_argument("--data", required=True, type=Path, metavar="CONFIG.yaml", help="a training config (its data)")
    npy.add_argument("--split", required=True, choices=("train", "val"), help="which side of the config's split")
    npy.add_argument("--out", type=Path, default=Path("."), help="output folder (default: the current one)")
    verify = sub.add_parser("verify", parents=[output], help="verify a snapshot against its manifest")
    verify.add_argument("snapshot", type=Path, help="snapshot directory (holds manifest.json)")
    parser.set_defaults(func=run, store_parser=parser)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one ``lastkd store`` sub-command; returns the exit status."""
    command = getattr(args, "store_command", None)
    if command is None:
        args.store_parser.print_help(sys.stderr)
        return 2
    from_settings = command != "verify" and args.path is None
    if command == "export-npy":
        return _export_npy(args, settings, settings.resolved_store_path if from_settings else args.path)
    try:
        if command == "verify":
            result = verify_snapshot(args.snapshot).to_dict()
        else:
            path = settings.resolved_store_path if from_settings else args.path
            store = FeatureStore(path, map_size=settings.store_map_size, readonly=True)
            try:
                result = _run_on_store(command, store, args)
            finally:
                store.close()
    except NotAStoreError as exc:
        hint = (
            " (the path comes from LASTKD_STORE_PATH / LASTKD_DATA_DIR; --path overrides it)" if from_settings else ""
        )
        return _error(command, f"{exc}{hint}")
    except FeatureStoreError as exc:
        return _error(command, str(exc))
    except OSError as exc:  # e.g. a permission problem the store did not anticipate
        return _error(command, str(exc))
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(_human(command, result))
    return 0


def _export_npy(args: argparse.Namespace, settings: Settings, store_path: Path) -> int:
    """``lastkd store export-npy``: 0 written, 1 store or data errors, 2 a bad config file."""
    from lastkd.datapaths import DataPathError
    from lastkd.student.config import ConfigError, TrainConfig
    from lastkd.student.data.dataset import DatasetError
    from lastkd.student.data.export import export_teacher_npy
    from lastkd.student.data.readers import DataSourceError
    from lastkd.student.paths import confine_config_paths

    try:
        config = confine_config_paths(TrainConfig.from_yaml(args.data), settings.resolved_data_roots)
    except (ConfigError, DataPathError) as exc:
        print(f"lastkd store export-npy: {exc}", file=sys.stderr)
        return 2
    try:
        done = export_teacher_npy(
            config.data, store_path, args.set_id, args.split, args.out, settings.resolved_data_roots
        )
    except (DatasetError, DataSourceError, DataPathError, OSError) as exc:
        return _error("export-npy", str(exc))
    if args.json:
        result = {"array": str(done.array), "ids": str(done.ids), "missing": str(done.missing)}
        print(json.dumps({**result, "rows": done.rows, "dim": done.dim, "covered": done.covered}, sort_keys=True))
    else:
        print(f"wrote {done.array} ({done.rows} x {done.dim} float32) and {done.ids}")
        print(done.coverage_line())
    return 0


def _error(command: str, message: str) -> int:
    print(f"lastkd store {command}: error: {message}", file=sys.stderr)
    return 1


def _run_on_store(command: str, store: FeatureStore, args: argparse.Namespace) -> dict[str, Any]:
    if command == "stats":
        return store.stats()
    if command == "ls":
        return {"path": str(store.path), "sets": [meta.to_dict() for meta in store.list_sets()]}
    if command == "export":
        manifest_path = store.export(args.dest, args.set_ids)
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        return {
            "snapshot": str(args.dest),
            "manifest": str(manifest_path),
            "sets": {set_id: meta["count"] for set_id, meta in manifest["sets"].items()},
            "vectors": manifest["vectors"],
            "bytes": sum(entry["bytes"] for entry in manifest["files"].values()),
        }
    raise AssertionError(f"unhandled store command {command!r}")  # argparse restricts choices


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def _human(command: str, result: dict[str, Any]) -> str:
    if command == "stats":
        return "\n".join(
            [
                f"store        {result['path']}",
                f"feature sets {result['sets']}",
                f"vectors      {result['vectors']:,}",
                f"used         {_size(result['used_bytes'])} of a {_size(result['map_size'])} map "
                f"({100 * result['used_bytes'] / result['map_size']:.1f}%)",
                f"file         {_size(result['file_bytes'])}",
                f"reader slots {result['readers']} used of {result['max_readers']}",
                f"last txn     {result['last_txnid']}",
            ]
        )
    if command == "ls":
        sets = result["sets"]
        if not sets:
            return f"no feature sets in {result['path']}"
        header = f"{'SET ID':<48} {'DIM':>5} {'DTYPE':<8} {'COUNT':>10}  {'WEIGHTS':<14} CREATED"
        rows = [
            f"{m['set_id']:<48} {m['dim']:>5} {m['dtype']:<8} {m['count']:>10,}  "
            f"{m['weights_sha256'][:12]:<14} {m['created_at']}"
            for m in sets
        ]
        return "\n".join([header, *rows])
    if command == "export":
        lines = [f"snapshot {result['snapshot']}: {result['vectors']:,} vectors, {_size(result['bytes'])}"]
        lines += [f"  {set_id}: {count:,}" for set_id, count in result["sets"].items()]
        lines.append(f"manifest {result['manifest']}")
        return "\n".join(lines)
    lines = [f"snapshot {result['path']}: OK, {result['vectors']:,} vectors re-read, checksums match"]
    lines += [f"  {set_id}: {count:,}" for set_id, count in result["sets"].items()]
    return "\n".join(lines)
