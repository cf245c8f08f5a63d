"""Each bench peer (Ray Serve, LitServe, MLServer) started as `make bench` starts it, from
its own venv, serving the default model's graphs: its captions are the in-process
pipeline's, and a bad image is refused without failing its neighbours. Skipped, with the
reason, where the peer's venv has not been made (`python -m bench.peers.venv`): `make
test` installs no peer framework."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

from bench.peers import clients, venv
from bench.peers.launch import PeerServer
from bench.peers.pipeline import PeerSpec, Pipeline
from bench.peers.run import peer_spec
from bench.variants import ModelSpec, default_checkpoint
from captioner.scenes import encoded_scenes

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory):
    from builder.export import export_decoder_step, export_encoder
    from captioner import checkpoint as ckpt_mod

    d = tmp_path_factory.mktemp("peer_graphs")
    ckdir = default_checkpoint()
    ck = ckpt_mod.load(ckdir)
    paths = {
        "encoder": export_encoder(ck, d / "encoder.onnx"),
        "decoder": export_decoder_step(ck, d / "decoder.onnx"),
        "runtime": "onnxruntime",
        "step_runtime": "onnxruntime",
        "inference_precision": "fp32",
    }
    return peer_spec(ModelSpec("default", ckdir, None), paths, 32, d / "cache").write(d / "peer.json")


@pytest.mark.parametrize("name", venv.PEERS)
def test_a_peer_captions_like_the_pipeline_and_refuses_a_bad_image_alone(name, spec_path, tmp_path):
    if not venv.ready(name):
        pytest.skip(f"no venv for {name}: python -m bench.peers.venv {name} makes it (the bench does on first use)")
    images = [data for data, _ in encoded_scenes(6, 3)]
    expected = Pipeline(PeerSpec.read(spec_path))(images)
    batches = tmp_path / "batches"
    with PeerServer(name, venv.python(name), spec_path, log_path=tmp_path / "peer.log", batch_log_dir=batches) as srv:

        async def go():
            async with clients.client(name, srv, images, None, batches) as c:
                got = await asyncio.gather(*(c(i) for i in range(len(images))))
                return got, await c.model_stats()

        got, stats = asyncio.run(go())
        assert got == expected
        assert stats["peer"]["inferences"] == len(images)
        if name == "ray":
            req = urllib.request.Request(srv.url + "/caption", data=b"not an image")
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=30)
            assert e.value.code == 400 and json.loads(e.value.read())["error"] == "not_an_image"
        elif name == "litserve":
            body = json.dumps({"image": "bm90IGFuIGltYWdl", "parameters": {}}).encode()
            with urllib.request.urlopen(
                urllib.request.Request(srv.url + "/predict", data=body, headers={"Content-Type": "application/json"}), timeout=30
            ) as r:
                assert json.loads(r.read())["error"] == "not_an_image"
        else:
            import numpy as np
            import tritonclient.grpc as grpcclient

            inp = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
            inp.set_data_from_numpy(np.array([[b"not an image"]], dtype=np.object_))
            with grpcclient.InferenceServerClient(srv.grpc_url) as c:
                res = c.infer("captioner", [inp])
            assert res.as_numpy("CAPTION").reshape(-1)[0] == b""
            assert res.as_numpy("ERROR").reshape(-1)[0].startswith(b"not_an_image")
