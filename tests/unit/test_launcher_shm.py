"""launcher.shm: the launcher warns at start when /dev/shm is smaller than the build sized
it (build_manifest.json "shm"), naming the size to give the container."""

from __future__ import annotations

import json
import shutil

from launcher.shm import shortfall


def _repo(tmp_path, need: int | None):
    manifest = {"target": "cpu"} | ({"shm": {"bytes": need}} if need is not None else {})
    (tmp_path / "build_manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_a_small_dev_shm_is_named_with_the_size_to_give(tmp_path):
    have = shutil.disk_usage(tmp_path).total
    warning = shortfall(_repo(tmp_path, have + 1), shm_dir=tmp_path)
    assert warning and f"--shm-size={have + 1}" in warning and "refused" in warning
    assert shortfall(_repo(tmp_path, have), shm_dir=tmp_path) is None


def test_replicas_on_one_machine_share_dev_shm(tmp_path):
    have = shutil.disk_usage(tmp_path).total
    repo = _repo(tmp_path, have // 2 + 1)
    assert shortfall(repo, servers=1, shm_dir=tmp_path) is None
    assert f"--shm-size={2 * (have // 2 + 1)}" in shortfall(repo, servers=2, shm_dir=tmp_path)


def test_a_repository_built_before_the_figure_was_recorded_gets_no_warning(tmp_path):
    assert shortfall(_repo(tmp_path, None), shm_dir=tmp_path) is None
    assert shortfall(tmp_path / "nowhere", shm_dir=tmp_path) is None
