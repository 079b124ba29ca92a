"""The four skeleton file formats -> :class:`SkeletonCollection` (``specs/ntu_data.md``).

* raw NTU ``.skeleton`` folders (:func:`read_ntu_folder`; normally reached through the parse cache),
* CTR-GCN ``.npz`` (:func:`read_ctrgcn_npz`; the file defines the split),
* PYSKL pickle (:func:`read_pyskl`; only from an operator-configured data root),
* LAST stream ``.npy`` + label pickle (:func:`read_last_npy`; ready-made streams).

Every reader validates what it opens and raises :class:`DataSourceError` with a message that names
the file and the problem. Pickles are loaded through a restricted unpickler that only rebuilds
plain containers and numpy arrays, on top of the data-root rule the caller must supply.

Data roots: readers take ``roots`` (the operator's data roots, or None when the caller trusts
the path, e.g. a test or a benchmark on its own files) and confine every file they open with
:func:`lastkd.datapaths.confine`, so a symlink inside a root that points out of it is refused with
the file named, whichever entry point started the read. Pickles are refused without roots.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from numpy._core import multiarray as np_multiarray  # numpy's stubs lack the attribute np._core

from lastkd.datapaths import confine, confine_entries
from lastkd.lifeline import die_with_parent
from lastkd.ntu.skeleton import (
    MAX_FRAMES,
    NUM_JOINTS,
    NUM_SLOTS,
    BodyAssignment,
    SampleNameError,
    SkeletonParseError,
    parse_sample_name,
    parse_skeleton_file,
)
from lastkd.ntu.splits import is_train
from lastkd.student.data.collection import SkeletonCollection

STREAM_NAMES = ("joint", "velocity", "bone")
NUM_CLASSES = {"ntu60": 60, "ntu120": 120}
POOL_MIN_FILES = 64  # below this a process pool costs more than it saves
SCAN_CHUNK = 256  # samples per chunk when scanning big arrays for empty samples

DataRoots = Sequence[Path] | None
Allocate = Callable[[int, int], np.ndarray]


class DataSourceError(ValueError):
    """A data source that cannot be used as configured; the message says which file and why."""


# --------------------------------------------------------------------------------------------
# shared validation helpers


def _num_classes(dataset: str) -> int:
    if dataset not in NUM_CLASSES:
        raise DataSourceError(f"unknown dataset {dataset!r}; expected ntu60 or ntu120")
    return NUM_CLASSES[dataset]


def _check_labels(labels: np.ndarray, dataset: str, where: str) -> np.ndarray:
    classes = _num_classes(dataset)
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = int(np.flatnonzero((labels < 0) | (labels >= classes))[0])
        raise DataSourceError(
            f"{where}: label {int(labels[bad])} of sample {bad} is outside 0..{classes - 1} for {dataset}"
        )
    return labels.astype(np.int64, copy=False)


def _valid_lengths(data: np.ndarray) -> np.ndarray:
    """Per sample, 1 + index of the last frame with any non-zero value (0 for an all-zero sample).

    Scans in chunks so a memory-mapped array is read once without being loaded whole.
    """
    n, _, t = data.shape[:3]
    out = np.zeros(n, dtype=np.int64)
    for start in range(0, n, SCAN_CHUNK):
        block = np.asarray(data[start : start + SCAN_CHUNK])
        nonzero = (block != 0).any(axis=(1, 3, 4))  # (chunk, T)
        has_any = nonzero.any(axis=1)
        last = t - np.argmax(nonzero[:, ::-1], axis=1)
        out[start : start + len(block)] = np.where(has_any, last, 0)
    return out


def _as_row_array(rows: list[np.ndarray], frames: Sequence[int] | np.ndarray) -> np.ndarray:
    t = max(frames, default=1) or 1
    data = np.zeros((len(rows), 3, t, NUM_JOINTS, NUM_SLOTS), dtype=np.float32)
    for i, row in enumerate(rows):
        data[i, :, : row.shape[1]] = row
    return data


# --------------------------------------------------------------------------------------------
# raw NTU folder


def list_skeleton_files(folder: Path, roots: DataRoots = None) -> list[Path]:
    """The ``*.skeleton`` files of a folder (not recursive), sorted by name.

    With ``roots``, a ``.skeleton`` entry that is a symlink resolving outside them is refused
    (:class:`~lastkd.datapaths.DataPathError` naming the file), whether or not it is parsed later.
    """
    if not folder.is_dir():
        raise DataSourceError(f"{folder}: not a folder of .skeleton files")
    if roots is not None:
        entries = confine_entries(folder, roots, field="data.path", suffixes=(".skeleton",))
    else:
        entries = sorted((p for p in folder.iterdir() if p.name.endswith(".skeleton")), key=lambda p: p.name)
    return [p for p in entries if p.is_file()]


def _declared_frames(path: Path) -> int:
    """The frame count on a file's first line (0 when unreadable: the parser will say why)."""
    try:
        with open(path, "rb") as fh:
            first = fh.readline(64).strip()
        value = int(first)
    except (OSError, ValueError):
        return 0
    return value if 0 <= value <= MAX_FRAMES else 0


def _parse_job(job: tuple[str, BodyAssignment]) -> tuple[np.ndarray | None, int, str | None]:
    """Parse one file; errors come back as text because they cross process boundaries."""
    path, mode = job
    try:
        parsed = parse_skeleton_file(path, mode)
    except SkeletonParseError as exc:
        return None, 0, f"{exc.line}: {exc.reason}"  # the caller prefixes the name in the folder
    return parsed.coords, parsed.frames, None


def _parse_all(
    paths: list[Path], mode: BodyAssignment, workers: int
) -> Iterator[tuple[np.ndarray | None, int, str | None]]:
    jobs = [(str(p), mode) for p in paths]
    if workers > 1 and len(jobs) >= POOL_MIN_FILES:
        # initializer: the parse workers die with their parent (kill -9 of a training run)
        with ProcessPoolExecutor(max_workers=workers, initializer=die_with_parent) as pool:
            yield from pool.map(_parse_job, jobs, chunksize=16)
    else:
        yield from map(_parse_job, jobs)


def read_ntu_folder(
    folder: Path,
    *,
    body_assignment: BodyAssignment = "tracked",
    dataset: str = "ntu60",
    missing: frozenset[str] = frozenset(),
    workers: int = 1,
    allocate: Allocate | None = None,
    source_hash: str = "",
    split: str | None = None,
    roots: DataRoots = None,
) -> SkeletonCollection:
    """Parse every ``.skeleton`` file of ``folder`` (sorted by name) into one collection.

    With ``split``, the rows are ordered training samples first, then validation samples (each
    sorted by name), so both sides are contiguous row ranges of one (memory-mapped) array.

    Samples named in ``missing`` are not parsed and are counted in ``excluded_missing``. Files that
    do not parse, have no frames or no bodies, or whose name is not an NTU sample name are skipped
    and listed in ``malformed`` as ``"file:line: reason"``. A sample name outside the dataset's
    ranges (e.g. action 61 in NTU60) is a configuration error and raises.
    ``allocate(n, frames)`` provides the (n, 3, frames, 25, 2) output array (e.g. a memmap of the
    parse cache); the returned ``data`` is its first ``len(names)`` rows. With ``roots`` every
    file is confined to them (see :func:`list_skeleton_files`) and read through its real path.
    """
    _num_classes(dataset)
    malformed: list[str] = []
    excluded = 0
    todo: list[tuple[Path, str, int]] = []
    out_of_range: list[str] = []
    for path in list_skeleton_files(folder, roots):
        name = path.name[: -len(".skeleton")]
        if name in missing:
            excluded += 1
            continue
        try:
            sample = parse_sample_name(name)
        except SampleNameError as exc:  # a foreign file in the folder: skip it, say so
            malformed.append(f"{path.name}:0: {exc}")
            continue
        try:
            parse_sample_name(name, dataset)  # type: ignore[arg-type]  # a str, checked by _num_classes above
        except SampleNameError:
            out_of_range.append(name)
            continue
        if roots is not None:  # open the checked real file, not the link (which could be swapped)
            path = confine(path, roots, field="data.path")
        todo.append((path, name, sample.label))
    if out_of_range:
        raise DataSourceError(
            f"{folder}: {len(out_of_range)} sample names are outside {dataset} (e.g. {out_of_range[0]}); "
            "is the dataset setting right?"
        )
    if not todo:
        raise DataSourceError(
            f"{folder}: no usable .skeleton files ({excluded} on the missing list, {len(malformed)} malformed)"
            + (f"; first problem: {malformed[0]}" if malformed else "")
        )
    if split is not None:
        todo.sort(key=lambda item: not is_train(parse_sample_name(item[1]), split))  # stable: names stay sorted
    frames_cap = max(_declared_frames(p) for p, _, _ in todo) or 1
    data = (allocate or _zeros)(len(todo), frames_cap)
    names: list[str] = []
    labels: list[int] = []
    lengths: list[int] = []
    results = _parse_all([p for p, _, _ in todo], body_assignment, workers)
    for (path, name, label), (coords, frames, error) in zip(todo, results):
        if error is not None:
            malformed.append(f"{name}.skeleton:{error}")
            continue
        assert coords is not None
        if frames == 0:
            malformed.append(f"{name}.skeleton:1: no frames")
            continue
        if not coords.any():
            malformed.append(f"{name}.skeleton:0: no bodies in any frame")
            continue
        if frames > frames_cap:  # the file changed between the two passes
            raise DataSourceError(f"{path}: changed while being read (now {frames} frames); retry")
        row = len(names)
        data[row, :, :frames] = coords
        names.append(name)
        labels.append(label)
        lengths.append(frames)
    if not names:
        raise DataSourceError(
            f"{folder}: none of the {len(todo)} .skeleton files is usable; first problem: {malformed[0]}"
        )
    return SkeletonCollection(
        names=names,
        labels=np.asarray(labels, dtype=np.int64),
        data=data[: len(names)],
        lengths=np.asarray(lengths, dtype=np.int64),
        source_hash=source_hash,
        excluded_missing=excluded,
        malformed=malformed,
    )


def _zeros(n: int, frames: int) -> np.ndarray:
    return np.zeros((n, 3, frames, NUM_JOINTS, NUM_SLOTS), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# .npy / .npz opened without loading them whole


def open_npy(path: Path, what: str = "array") -> np.ndarray:
    """Memory-map a ``.npy`` file read-only after checking its header and its size."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataSourceError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if size == 0:
        raise DataSourceError(f"{path}: empty file, expected a .npy {what}")
    try:
        with open(path, "rb") as fh:
            shape, fortran, dtype, offset = _npy_header(fh)
    except DataSourceError as exc:
        raise DataSourceError(f"{path}: {exc}") from None
    needed = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < needed:
        raise DataSourceError(f"{path}: truncated .npy: header promises {needed} bytes, file has {size}")
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _npy_header(fh: io.BufferedIOBase) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise DataSourceError(f"unsupported .npy version {version}")
    except (ValueError, EOFError, struct.error) as exc:
        raise DataSourceError(f"not a valid .npy array ({exc})") from None
    if dtype.hasobject:
        raise DataSourceError(f"holds Python objects (dtype {dtype}); only numeric arrays are accepted")
    return tuple(int(s) for s in shape), bool(fortran), dtype, fh.tell()


def _npz_arrays(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The named members of an ``.npz``; stored (uncompressed) members are memory-mapped."""
    if not path.is_file():
        raise DataSourceError(f"{path}: no such .npz file")
    if path.stat().st_size == 0:
        raise DataSourceError(f"{path}: empty file, expected a .npz archive")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataSourceError(f"{path}: not a valid .npz archive (truncated or corrupt: {exc})") from None
    out: dict[str, np.ndarray] = {}
    with zf, open(path, "rb") as raw:
        members = {n[: -len(".npy")]: n for n in zf.namelist() if n.endswith(".npy")}
        absent = [k for k in keys if k not in members]
        if absent:
            raise DataSourceError(f"{path}: missing arrays {absent}; the archive holds {sorted(members)}")
        for key in keys:
            info = zf.getinfo(members[key])
            where = f"{path}[{key}]"
            try:
                if info.compress_type == zipfile.ZIP_STORED:
                    out[key] = _stored_member(raw, path, info, where)
                else:
                    with zf.open(info) as fh:
                        out[key] = np.lib.format.read_array(fh, allow_pickle=False)
            except DataSourceError:
                raise
            except (ValueError, EOFError, zipfile.BadZipFile, zlib.error, struct.error, OSError) as exc:
                raise DataSourceError(f"{where}: corrupt or truncated array ({exc})") from None
    return out


def _stored_member(raw: io.BufferedReader, path: Path, info: zipfile.ZipInfo, where: str) -> np.ndarray:
    raw.seek(info.header_offset)
    local = raw.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise DataSourceError(f"{where}: corrupt zip member header")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    raw.seek(start)
    try:
        shape, fortran, dtype, offset = _npy_header(raw)
    except DataSourceError as exc:
        raise DataSourceError(f"{where}: {exc}") from None
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    end = offset + nbytes
    if end > start + info.file_size or end > path.stat().st_size:
        raise DataSourceError(f"{where}: truncated array ({nbytes} bytes promised)")
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


# --------------------------------------------------------------------------------------------
# CTR-GCN .npz


def _npz_coords(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype.kind != "f":
        raise DataSourceError(f"{where}: dtype {x.dtype}, expected float coordinates")
    if x.ndim == 3 and x.shape[2] == NUM_SLOTS * NUM_JOINTS * 3:
        x = x.reshape(x.shape[0], x.shape[1], NUM_SLOTS, NUM_JOINTS, 3)
    elif not (x.ndim == 5 and x.shape[2:] == (NUM_SLOTS, NUM_JOINTS, 3)):
        raise DataSourceError(f"{where}: shape {x.shape}, expected (N, T, 150) or (N, T, 2, 25, 3)")
    if x.shape[1] < 1:
        raise DataSourceError(f"{where}: has no frames (shape {x.shape})")
    x = x.transpose(0, 4, 1, 3, 2)  # (N, T, M, V, C) -> (N, C, T, V, M), a view of the memmap
    return x if x.dtype == np.float32 else x.astype(np.float32)


def _npz_labels(y: np.ndarray, n: int, dataset: str, where: str) -> np.ndarray:
    classes = _num_classes(dataset)
    if y.shape[:1] != (n,):
        raise DataSourceError(f"{where}: {y.shape[0] if y.ndim else 0} labels for {n} samples")
    if y.ndim == 2:
        if y.shape[1] != classes:
            raise DataSourceError(f"{where}: one-hot width {y.shape[1]}, but {dataset} has {classes} classes")
        y = np.asarray(y)
        ones = (y == 1).sum(axis=1)
        nonzero = (y != 0).sum(axis=1)
        bad = np.flatnonzero((ones != 1) | (nonzero != 1))
        if bad.size:
            raise DataSourceError(f"{where}: row {int(bad[0])} is not one-hot")
        return np.argmax(y, axis=1).astype(np.int64)
    if y.ndim == 1 and y.dtype.kind in "iu":
        return _check_labels(np.asarray(y, dtype=np.int64), dataset, where)
    raise DataSourceError(f"{where}: shape {y.shape} dtype {y.dtype}, expected one-hot (N, {classes}) or integer (N,)")


def read_ctrgcn_npz(
    path: Path, *, dataset: str = "ntu60", source_hash: str = ""
) -> tuple[SkeletonCollection, SkeletonCollection]:
    """(train, val) from a CTR-GCN ``.npz`` (``x_train``/``y_train``/``x_test``/``y_test``).

    Names are synthesised (``npz_train_000000``, ``npz_test_000000``) because the file stores none;
    lengths are 1 + the last non-zero frame. All-zero samples are dropped and reported.
    """
    arrays = _npz_arrays(path, ("x_train", "y_train", "x_test", "y_test"))
    sides = []
    for side in ("train", "test"):
        data = _npz_coords(arrays[f"x_{side}"], f"{path.name}[x_{side}]")
        labels = _npz_labels(arrays[f"y_{side}"], data.shape[0], dataset, f"{path.name}[y_{side}]")
        lengths = _valid_lengths(data)
        names = [f"npz_{side}_{i:06d}" for i in range(data.shape[0])]
        empty = np.flatnonzero(lengths == 0)
        malformed = [f"{path.name}:x_{side}[{i}]: all-zero sample" for i in empty]
        coll = SkeletonCollection(names, labels, data, lengths, source_hash, malformed=malformed)
        if empty.size:
            coll = coll.subset(np.flatnonzero(lengths > 0))
        if len(coll) == 0:
            raise DataSourceError(f"{path}: x_{side} holds no non-empty samples")
        sides.append(coll)
    return sides[0], sides[1]


# --------------------------------------------------------------------------------------------
# pickles (PYSKL annotations, LAST labels)


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds only builtin containers/scalars, OrderedDict and numpy arrays/dtypes/scalars."""

    _ALLOWED = {
        ("collections", "OrderedDict"): OrderedDict,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy._core.multiarray", "_reconstruct"): np_multiarray._reconstruct,
        ("numpy.core.multiarray", "_reconstruct"): np_multiarray._reconstruct,
        ("numpy._core.multiarray", "scalar"): np_multiarray.scalar,
        ("numpy.core.multiarray", "scalar"): np_multiarray.scalar,
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "numpy.dtypes" and name.endswith("DType"):
            import numpy.dtypes

            return getattr(numpy.dtypes, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data and numpy arrays are allowed")


def load_pickle(path: Path, roots: DataRoots, what: str, field: str = "data.path") -> object:
    """Load a data pickle: the path must lie inside ``roots`` (operator-configured data roots)."""
    if roots is None:
        raise DataSourceError(
            f"{path}: refusing to load a pickle ({what}) without configured data roots; pickles run code "
            "when loaded, so they are read only from folders the operator configured (LASTKD_DATA_ROOTS)"
        )
    resolved = confine(path, roots, field=field)
    if not resolved.is_file():
        raise DataSourceError(f"{path}: no such {what} file")
    if resolved.stat().st_size == 0:
        raise DataSourceError(f"{path}: empty file, expected a pickled {what}")
    try:
        with open(resolved, "rb") as fh:
            return _RestrictedUnpickler(fh).load()
    except pickle.UnpicklingError as exc:
        raise DataSourceError(f"{path}: not a usable {what} pickle ({exc})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, struct.error, MemoryError) as exc:
        raise DataSourceError(f"{path}: corrupt or truncated {what} pickle ({type(exc).__name__}: {exc})") from None


def _pyskl_keypoint(ann: dict, where: str) -> np.ndarray:
    kp = ann.get("keypoint")
    if not isinstance(kp, np.ndarray):
        raise DataSourceError(f"{where}: 'keypoint' is {type(kp).__name__}, expected a numpy array")
    if kp.ndim != 4 or kp.shape[2:] != (NUM_JOINTS, 3) or kp.shape[0] < 1 or kp.shape[1] < 1:
        raise DataSourceError(f"{where}: keypoint shape {kp.shape}, expected (M, T, 25, 3) with M, T >= 1")
    if kp.dtype.kind != "f":
        raise DataSourceError(f"{where}: keypoint dtype {kp.dtype}, expected float")
    if not np.isfinite(kp).all():
        raise DataSourceError(f"{where}: keypoint holds NaN or infinite values")
    total = ann.get("total_frames", kp.shape[1])
    if not isinstance(total, (int, np.integer)) or isinstance(total, bool) or int(total) != kp.shape[1]:
        raise DataSourceError(f"{where}: total_frames {total!r} does not match keypoint length {kp.shape[1]}")
    # (M, T, V, C) -> (C, T, V, M) with exactly two body slots
    kp = kp[:NUM_SLOTS].astype(np.float32)
    out = np.zeros((3, kp.shape[1], NUM_JOINTS, NUM_SLOTS), dtype=np.float32)
    out[..., : kp.shape[0]] = kp.transpose(3, 1, 2, 0)
    return out


_PYSKL_SPLIT_KEY = {"xsub": "xsub", "xview": "xview", "xsub120": "xsub", "xset120": "xset"}


def read_pyskl(
    path: Path,
    *,
    split: str,
    dataset: str = "ntu60",
    missing: frozenset[str] = frozenset(),
    roots: DataRoots,
    source_hash: str = "",
) -> tuple[SkeletonCollection, SkeletonCollection]:
    """(train, val) from a PYSKL annotation pickle (``split`` + ``annotations``).

    Refused unless the path lies inside ``roots``. Names on the ``missing`` list are excluded and
    counted; a split that names a sample without annotation is an error.
    """
    obj = load_pickle(path, roots, "PYSKL annotation")
    if not isinstance(obj, dict) or "split" not in obj or "annotations" not in obj:
        keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DataSourceError(f"{path}: expected a dict with 'split' and 'annotations', got {keys}")
    splits, anns = obj["split"], obj["annotations"]
    if not isinstance(splits, dict) or not isinstance(anns, list):
        raise DataSourceError(f"{path}: 'split' must be a dict and 'annotations' a list")
    key = _PYSKL_SPLIT_KEY.get(split)
    if key is None:
        raise DataSourceError(f"unknown split {split!r}")
    by_name: dict[str, dict] = {}
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict) or not isinstance(ann.get("frame_dir"), str):
            raise DataSourceError(f"{path}: annotations[{i}] is not a dict with a string 'frame_dir'")
        by_name[ann["frame_dir"]] = ann
    sides = []
    for side in ("train", "val"):
        names_in = splits.get(f"{key}_{side}")
        if not isinstance(names_in, (list, tuple)) or not all(isinstance(n, str) for n in names_in):
            raise DataSourceError(
                f"{path}: split '{key}_{side}' missing or not a list of names; splits: {sorted(map(str, splits))}"
            )
        excluded = sum(1 for n in names_in if n in missing)
        chosen = [n for n in names_in if n not in missing]
        unknown = [n for n in chosen if n not in by_name]
        if unknown:
            raise DataSourceError(
                f"{path}: split '{key}_{side}' names {len(unknown)} samples without annotation, e.g. {unknown[0]!r}"
            )
        if len(set(chosen)) != len(chosen):
            raise DataSourceError(f"{path}: split '{key}_{side}' lists a sample twice")
        rows, labels = [], []
        for name in chosen:
            ann = by_name[name]
            where = f"{path.name}: annotation {name!r}"
            label = ann.get("label")
            if not isinstance(label, (int, np.integer)) or isinstance(label, bool):
                raise DataSourceError(f"{where}: label {label!r} is not an integer")
            rows.append(_pyskl_keypoint(ann, where))
            labels.append(int(label))
        if not rows:
            raise DataSourceError(f"{path}: split '{key}_{side}' has no usable samples")
        label_arr = _check_labels(np.asarray(labels, dtype=np.int64), dataset, f"{path.name} '{key}_{side}'")
        lengths = np.asarray([r.shape[1] for r in rows], dtype=np.int64)
        data = _as_row_array(rows, lengths)
        sides.append(SkeletonCollection(chosen, label_arr, data, lengths, source_hash, excluded_missing=excluded))
    return sides[0], sides[1]


# --------------------------------------------------------------------------------------------
# LAST stream .npy + label pickle


def _last_file(root: Path, split_type: str, filename: str) -> Path:
    # spec 7.4: <root>/<split_type>/<file>, falling back to <root>/<file>
    inner = root / split_type / filename
    return inner if inner.is_file() else root / filename


def _last_labels(obj: object, where: str) -> tuple[list[str] | None, np.ndarray]:
    names = None
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(o, (list, tuple, np.ndarray)) for o in obj):
        names_obj, obj = obj
        if not all(isinstance(n, str) for n in names_obj):
            raise DataSourceError(f"{where}: the names of a (names, labels) tuple must be strings")
        names = list(names_obj)
    if isinstance(obj, np.ndarray):
        if obj.ndim != 1 or obj.dtype.kind not in "iu":
            raise DataSourceError(f"{where}: label array shape {obj.shape} dtype {obj.dtype}, expected 1-D integers")
        labels = obj.astype(np.int64)
    elif isinstance(obj, (list, tuple)):
        bad = next((i for i, v in enumerate(obj) if not isinstance(v, (int, np.integer)) or isinstance(v, bool)), None)
        if bad is not None:
            raise DataSourceError(f"{where}: label {bad} is {obj[bad]!r}, expected an integer")
        labels = np.asarray([int(v) for v in obj], dtype=np.int64)
    else:
        raise DataSourceError(
            f"{where}: expected a list of labels or a (names, labels) tuple, got {type(obj).__name__}"
        )
    if names is not None and len(names) != len(labels):
        raise DataSourceError(f"{where}: {len(names)} names but {len(labels)} labels")
    return names, labels


def read_last_npy(
    root: Path,
    *,
    split_type: str,
    dataset: str = "ntu60",
    label_dir: Path | None = None,
    missing: frozenset[str] = frozenset(),
    roots: DataRoots,
    source_hash: str = "",
) -> tuple[SkeletonCollection, SkeletonCollection]:
    """(train, val) from LAST stream files (spec 7.4), memory-mapped; sets ``streams``, not ``data``.

    Samples whose joint array is all zero are dropped (reported); names on the ``missing`` list are
    dropped only when the label pickle carries names, as the reference does. Without stored names,
    names are synthesised as ``last_train_000000``. ``lengths`` is the stored length of every sample.
    """
    if not root.is_dir():
        raise DataSourceError(f"{root}: not a folder of LAST stream files")
    if label_dir is not None and not label_dir.is_dir():
        raise DataSourceError(f"{label_dir}: label_path must be a folder holding train_label.pkl and val_label.pkl")
    sides = []
    for side in ("train", "val"):
        streams: dict[str, np.ndarray] = {}
        for stream in STREAM_NAMES:
            path = _last_file(root, split_type, f"{side}_{stream}.npy")
            if roots is not None:
                path = confine(path, roots, field="data.path")
            if not path.is_file():
                raise DataSourceError(f"{root}: missing {side}_{stream}.npy (looked in {root / split_type} and {root})")
            arr = open_npy(path, f"{stream} stream")
            if arr.ndim != 5 or arr.shape[1] != 3 or arr.shape[3] != NUM_JOINTS or arr.shape[2] < 1 or arr.shape[4] < 1:
                raise DataSourceError(f"{path}: shape {arr.shape}, expected (N, 3, T, 25, M)")
            if arr.dtype not in (np.float32, np.float64):
                raise DataSourceError(f"{path}: dtype {arr.dtype}, expected float32")
            streams[stream] = arr
        shapes = {s: a.shape for s, a in streams.items()}
        if len(set(shapes.values())) != 1:
            raise DataSourceError(f"{root}: {side} streams differ in shape: {shapes}")
        label_name = f"{side}_label.pkl"
        label_path = label_dir / label_name if label_dir else _last_file(root, split_type, label_name)
        where = str(label_path)
        label_field = "data.label_path" if label_dir else "data.path"
        names, labels = _last_labels(load_pickle(label_path, roots, "label", label_field), where)
        n = streams["joint"].shape[0]
        if len(labels) != n:
            raise DataSourceError(f"{where}: {len(labels)} labels for {n} samples in {side}_joint.npy")
        labels = _check_labels(labels, dataset, where)
        t = streams["joint"].shape[2]
        coll = SkeletonCollection(
            names or [f"last_{side}_{i:06d}" for i in range(n)],
            labels,
            None,
            np.full(n, t, dtype=np.int64),
            source_hash,
            streams=streams,
        )
        keep = _valid_lengths(streams["joint"]) > 0
        malformed = [f"{side}_joint.npy:{i}: all-zero sample" for i in np.flatnonzero(~keep)]
        excluded = 0
        if names is not None and missing:
            on_list = np.asarray([nm in missing for nm in names], dtype=bool)
            excluded = int((on_list & keep).sum())
            keep &= ~on_list
        if not keep.all():
            coll = coll.subset(np.flatnonzero(keep))  # copies; stored data rarely holds empty samples
        coll.malformed = malformed
        coll.excluded_missing = excluded
        if len(coll) == 0:
            raise DataSourceError(f"{root}: {side} split has no non-empty samples")
        sides.append(coll)
    return sides[0], sides[1]
