"""Photo-sized images do not page-fault the decode's buffers in afresh on every request:
the launcher runs tritonserver and its stubs with malloc settings that keep freed memory
in the process (launcher.tritonserver.MALLOC_TUNABLES). Without them a 1024 px PNG costs
the stub thousands of minor page faults per request (its pixels, several times over)."""

from __future__ import annotations

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient

from captioner.photos import photos

pytestmark = pytest.mark.integration
PAGE = 4096


def _minor_faults(processes: list[psutil.Process]) -> int:
    total = 0
    for p in processes:
        with open(f"/proc/{p.pid}/stat") as f:
            total += int(f.read().rsplit(")", 1)[1].split()[7])  # minflt
    return total


def test_a_photo_sized_png_reuses_the_stubs_memory(triton_server):
    server = psutil.Process(triton_server.server.process.pid)
    stubs = [p for p in server.children(recursive=True) if "triton_python_backend_stub" in " ".join(p.cmdline())]
    assert stubs, "no Python-backend stub under tritonserver"
    pngs = [p.data for p in photos(4, 11, "png")]
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)

    def caption(data: bytes) -> str:
        image = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[data]], dtype=np.object_))
        return client.infer("captioner", [image], client_timeout=60).as_numpy("CAPTION")[0, 0].decode()

    for data in pngs:  # warm: the first requests grow the heap to the working set
        caption(data)
    before = _minor_faults(stubs)
    rounds = 3
    for _ in range(rounds):
        for data in pngs:
            assert caption(data)
    per_request = (_minor_faults(stubs) - before) / (rounds * len(pngs))
    one_image = 1024 * 1024 * 3 / PAGE  # the decoded pixels alone, in pages
    assert per_request < one_image / 4, f"{per_request:.0f} minor page faults per 1024 px PNG request"
    client.close()
