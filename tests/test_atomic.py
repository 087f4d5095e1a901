"""Atomic writes: all or nothing, durable (fsynced), with the permissions open() would give."""

import os
import stat

import jax
import numpy as np
import pytest
import safetensors.numpy

import jpeft
from jpeft.models import hf
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


def test_a_body_that_replaces_the_temporary_file_still_gets_umask_permissions(tmp_path):
    """What safetensors' save_file does: it writes its own 0600 file and renames it over tmp."""
    target = tmp_path / "adapter_model.safetensors"
    old_mask = os.umask(0o002)
    try:
        with atomic_path(target) as tmp:
            safetensors.numpy.save_file({"a": np.ones(2, np.float32)}, tmp)
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o664


def test_the_adapter_files_get_umask_permissions(tmp_path, cfg, params):
    """Before: adapter_model.safetensors was 0600, unreadable to others sharing the run."""
    method = jpeft.LoRA(r=2, targets=("q_proj",))
    adapted = method.init(jax.random.key(1), params, cfg)
    old_mask = os.umask(0o022)
    try:
        jpeft.save_hf_adapter(tmp_path, method, adapted, cfg)
    finally:
        os.umask(old_mask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    expected = ("adapter_model.safetensors", "adapter_config.json", "jpeft_base.json", "README.md")
    assert modes == dict.fromkeys(expected, 0o644)


@pytest.fixture
def disk_log(monkeypatch):
    """Record ``("fsync", path)`` and ``("replace", src, dst)`` in the order they happen."""
    log = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def record_replace(src, dst):
        log.append(("replace", os.fspath(src), os.fspath(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    return log


def _assert_durable(log, directory, names):
    """Each file: its temp file fsynced, renamed over it, then the directory fsynced."""
    directory = os.path.realpath(directory)
    for name in names:
        final = os.path.join(directory, name)
        (src,) = [e[1] for e in log if e[0] == "replace" and os.path.realpath(e[2]) == final]
        rename = log.index(("replace", src, os.path.join(os.path.dirname(src), name)))
        assert ("fsync", os.path.realpath(src)) in log[:rename], name
        assert ("fsync", directory) in log[rename:], name


def test_writes_are_fsynced_then_renamed_then_the_directory_fsynced(tmp_path, disk_log):
    """Before: nothing was fsynced; a power cut could leave an empty or missing file."""
    with atomic_path(tmp_path / "config.json") as tmp, open(tmp, "w") as f:
        f.write("{}")
    _assert_durable(disk_log, tmp_path, ["config.json"])


def test_model_and_adapter_saves_are_durable(tmp_path, disk_log, cfg, params):
    hf.save_pretrained(tmp_path / "model", cfg, params)
    _assert_durable(disk_log, tmp_path / "model", ["model.safetensors", "config.json"])
    method = jpeft.LoRA(r=2, targets=("q_proj",))
    adapted = method.init(jax.random.key(1), params, cfg)
    jpeft.save_hf_adapter(tmp_path / "adapter", method, adapted, cfg)
    names = ["adapter_model.safetensors", "adapter_config.json"]
    _assert_durable(disk_log, tmp_path / "adapter", names)
