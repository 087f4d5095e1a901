"""Atomic writes: all or nothing, with the permissions a plain open() would give."""

import os
import stat

import pytest

from jpeft.models.atomic import atomic_path


def test_replaces_the_file_with_umask_permissions(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("old")
    old_mask = os.umask(0o022)
    try:
        with atomic_path(target) as tmp, open(tmp, "w") as f:
            f.write("new")
    finally:
        os.umask(old_mask)
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["config.json"]


def test_a_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            f.write("partial")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["model.safetensors"]
