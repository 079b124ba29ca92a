"""A fine-tuned teacher is named from the registry (``LASTKD_TEACHER_NAME``) instead of a path."""

from __future__ import annotations

from pathlib import Path

import pytest

from lastkd.errors import NotFoundError
from lastkd.registry import TEACHER_FILE, TEACHERS_FOLDER, RegistryError, find_teacher
from lastkd.services.settings import Settings
from lastkd.teacher.engine_config import EngineConfig, EngineError


def publish_fake(registry: Path, folder: str) -> Path:
    path = registry / TEACHERS_FOLDER / folder / TEACHER_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    return path


def test_a_teacher_is_found_by_folder_or_by_its_only_version(tmp_path: Path) -> None:
    one = publish_fake(tmp_path, "ntu-aaaaaaaaaaaa")
    a = publish_fake(tmp_path, "two-bbbbbbbbbbbb")
    publish_fake(tmp_path, "two-cccccccccccc")
    (tmp_path / TEACHERS_FOLDER / ".publish-x").mkdir()  # a publish in progress is not a teacher
    assert find_teacher(tmp_path, "ntu") == one
    assert find_teacher(tmp_path, "ntu-aaaaaaaaaaaa") == one
    assert find_teacher(tmp_path, "two-bbbbbbbbbbbb") == a
    with pytest.raises(RegistryError, match="has 2 versions; name one: two-bbbbbbbbbbbb, two-cccccccccccc"):
        find_teacher(tmp_path, "two")
    with pytest.raises(NotFoundError, match="published teachers: ntu-aaaaaaaaaaaa, two-"):
        find_teacher(tmp_path, "nope")
    with pytest.raises(NotFoundError, match="published teachers: none"):
        find_teacher(tmp_path / "empty", "ntu")


def test_the_engine_takes_the_named_teachers_weights(tmp_path: Path) -> None:
    weights = publish_fake(tmp_path / "var" / "registry", "ntu-aaaaaaaaaaaa")
    config = EngineConfig.from_settings(Settings(data_dir=tmp_path / "var", teacher_name="ntu"))
    assert config.weights == weights and not config.random_init
    with pytest.raises(EngineError, match="both set"):
        EngineConfig.from_settings(Settings(data_dir=tmp_path / "var", teacher_name="ntu", teacher_weights=weights))
    with pytest.raises(EngineError, match="LASTKD_TEACHER_NAME: no fine-tuned teacher 'other'"):
        EngineConfig.from_settings(Settings(data_dir=tmp_path / "var", teacher_name="other"))
