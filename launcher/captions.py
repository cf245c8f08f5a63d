"""Real captions from the launcher's own server: the sample scenes it shows once the
server is up, and the supervisor's deep probe (one tiny caption through the ensemble)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from client.wire import image_input

from .tritonserver import TritonServer

if TYPE_CHECKING:
    from captioner.scenes import Scene

PROBE_TIMEOUT_S = 10.0


def sample_images(n: int, seed: int = 2024) -> list[tuple[bytes, Scene]]:
    """Scenes drawn to the spec, as PNG bytes, with their ground truth."""
    from captioner.scenes import encoded_scenes

    return encoded_scenes(n, seed)


def caption_samples(server: TritonServer, n: int, tls: bool = False) -> None:
    """Caption n sample scenes: over gRPC, or over local HTTP when gRPC needs TLS (`tls`;
    the launcher holds the server's certificate, not a CA that clients would trust)."""
    from captioner.scenes import all_captions, caption_is_correct

    if tls:
        import tritonclient.http as client_mod

        client = client_mod.InferenceServerClient(server.http_url)
    else:
        import tritonclient.grpc as client_mod

        client = client_mod.InferenceServerClient(server.grpc_url)
    print(f"Captions of {n} sample scenes, over {'HTTP (gRPC is TLS-only)' if tls else 'gRPC'}:")
    for i, (data, scene) in enumerate(sample_images(n), 1):
        result = client.infer("captioner", [image_input(data, client_mod)])
        caption = result.as_numpy("CAPTION")[0, 0].decode()
        verdict = "correct" if caption_is_correct(caption, scene) else "WRONG"
        print(f"  scene {i}: {caption!r}  ({verdict}; the scene is {all_captions(scene)[0]!r})")
    client.close()


def http_probe(server: TritonServer, timeout_s: float = PROBE_TIMEOUT_S, observe=None):
    """A deep health check for the supervisor: one tiny real caption through the ensemble
    over local HTTP. None when it came back or the server shed it as overloaded (alive),
    else why it failed. `observe(result, seconds)`, result ok/shed/failed: the metrics."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    data = sample_images(1, seed=7)[0][0]

    def probe() -> str | None:
        started = time.monotonic()
        result, failure = _probe()
        if observe is not None:
            observe(result, time.monotonic() - started)
        return failure

    def _probe() -> tuple[str, str | None]:
        client = httpclient.InferenceServerClient(server.http_url, connection_timeout=2.0, network_timeout=timeout_s)
        try:
            client.infer("captioner", [image_input(data, httpclient)])
            return "ok", None
        except InferenceServerException as e:
            text = str(e)
            # A full or timed-out queue is load shedding doing its job, not a fault.
            if "maximum queue size" in text or "Request timeout expired" in text:
                return "shed", None
            return "failed", text
        except Exception as e:  # noqa: BLE001 - refused connection, timeout, ...
            return "failed", f"{type(e).__name__}: {e}"
        finally:
            client.close()

    return probe
