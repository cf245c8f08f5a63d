"""builder.shm: /dev/shm for full batches of the largest images, read from a repository's
configs as the build writes them, and what it rounds to."""

from __future__ import annotations

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from builder.shm import MIB, ROUND_TO, ShmLimits, manifest_entry, quantity, repository_limits, required_bytes


def _model(repo, name, backend, instances, max_batch=32, params=None, platform=""):
    cfg = mc.ModelConfig(name=name, backend=backend, platform=platform, max_batch_size=max_batch)
    cfg.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    for k, v in (params or {}).items():
        cfg.parameters[k].string_value = v
    (repo / name).mkdir()
    (repo / name / "config.pbtxt").write_text(text_format.MessageToString(cfg))


def test_the_front_models_full_batches_size_dev_shm(tmp_path):
    _model(tmp_path, "preprocess", "python", 2, params={"max_image_bytes": str(8 * MIB), "fused_encoder": "1"})
    _model(tmp_path, "caption_generator", "python", 1)
    _model(tmp_path, "decoder_step", "python", 1)
    _model(tmp_path, "captioner", "", 0, platform="ensemble")
    limits = repository_limits(tmp_path)
    assert limits == ShmLimits(max_batch_size=32, max_image_bytes=8 * MIB, front_instances=2, python_instances=4, layout="fused")
    need = required_bytes(limits)
    assert need >= 2 * 32 * 8 * MIB and need % ROUND_TO == 0
    assert need - ROUND_TO < 2 * (32 * (8 * MIB + 4) + 5 * MIB) + 2 * MIB  # rounded up by less than one step
    entry = manifest_entry(tmp_path)
    assert entry["bytes"] == need and entry["quantity"] == quantity(need) and entry["layout"] == "fused"


def test_each_front_instance_holds_its_own_batch_and_images_grow_it():
    one = required_bytes(ShmLimits(32, 20 * MIB, 1, 3))
    assert required_bytes(ShmLimits(32, 20 * MIB, 2, 4)) > one + 32 * 20 * MIB - ROUND_TO
    assert required_bytes(ShmLimits(32, 10 * MIB, 1, 3)) < one


def test_quantities_are_what_a_manifest_writes():
    assert quantity(1408 * MIB) == "1408Mi" and quantity(2 * 1024 * MIB) == "2Gi"
