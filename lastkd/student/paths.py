"""Confine the filesystem paths of a training config to the operator's data roots.

One rule (:func:`lastkd.datapaths.confine`) for every entry point: ``lastkd train`` applies it when
it reads the config, the API when a job is submitted, the worker again just before training (the
filesystem may have changed in between), and the readers to every file they open. So a path
gets the same answer everywhere:

* ``~`` is expanded and then confined like any other path (it grants nothing);
* relative paths are taken from the first data root, ``..`` is collapsed, symlinks are followed;
* the data folder, label files, missing-skeleton list and label map must exist (``missing``);
  the parse cache folder need not (it is created on demand) but must lie inside the roots;
* what is read counts, not only what is named: the data files inside the data folder (and the
  LAST split sub-folder, the label folder) that are symlinks must resolve inside the roots too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lastkd.datapaths import DataPathError, confine, confine_entries
from lastkd.student.config import TrainConfig
from lastkd.student.data.cache import CACHE_FOLDER

__all__ = ["MUST_EXIST", "DataPathError", "confine_config_paths"]

# Fields that must exist when given; the parse cache is created on demand.
MUST_EXIST = ("data.path", "data.label_path", "data.missing_skeletons", "eval.label_map")


def _data_folders(config: TrainConfig, real: dict[str, Path]) -> list[tuple[str, Path]]:
    """The folders whose data files the job will read, with the field that names each."""
    folders = []
    data_path = real["data.path"]
    if data_path.is_dir():
        folders.append(("data.path", data_path))
        if config.data.format == "last_npy" and (data_path / config.data.split).is_dir():
            folders.append(("data.path", data_path / config.data.split))
    label = real.get("data.label_path")
    if label is not None and label.is_dir():
        folders.append(("data.label_path", label))
    return folders


def confine_config_paths(config: TrainConfig, roots: Sequence[Path]) -> TrainConfig:
    """A copy of ``config`` whose paths are absolute, real and inside ``roots``.

    Raises :class:`~lastkd.datapaths.DataPathError` naming the first offending field (and file):
    ``forbidden`` (403) outside every root, ``missing`` (422) for a required file or folder that
    does not exist, ``invalid`` (422) for a path no filesystem accepts (NUL byte, too long).
    """
    real = {
        field: confine(path, roots, field=field, must_exist=field in MUST_EXIST)
        for field, path in config.path_fields().items()
    }
    for field, folder in _data_folders(config, real):
        confine_entries(folder, roots, field=field)
    if "data.cache_dir" not in real and real["data.path"].is_dir():
        # the default cache lives inside the data folder; a link there must not lead out either
        confine(real["data.path"] / CACHE_FOLDER, roots, field="data.cache_dir")
    data = config.data.model_copy(
        update={key.split(".", 1)[1]: path for key, path in real.items() if key.startswith("data.")}
    )
    ev = config.eval.model_copy(update={"label_map": real["eval.label_map"]} if "eval.label_map" in real else {})
    return config.model_copy(update={"data": data, "eval": ev})
