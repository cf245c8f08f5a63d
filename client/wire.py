"""The wire contract as tritonclient spells it, and calls that are given up without being
cancelled.

Contract: input `IMAGE` (BYTES, [1] per item: encoded image file bytes), outputs `CAPTION`
(BYTES), `SCORE` (FP32, total log-probability) and `MODEL_VERSION` (BYTES, "<repository
version>:<checkpoint sha256[:8]>", the model that answered); decoding options travel as
request parameters `beam_size`, `max_length`, `temperature`.

Light on purpose (numpy and tritonclient only, imported when used): the launcher and the
benchmarks build their requests with `image_input` too.
"""

from __future__ import annotations

import asyncio

import numpy as np

from client.retry import DEADLINE_EXCEEDED, AttemptFailed

# How much longer than the caller waits an abandoned call may run before gRPC cancels it.
CANCEL_GRACE_S = 5.0


def image_input(data: bytes, module=None, *, name: str = "IMAGE"):
    """The request's image input: `name` (the contract's IMAGE), BYTES, shape [1, 1],
    holding the encoded image file. `module`: the tritonclient flavour whose InferInput to
    build, tritonclient.grpc (the default; grpc.aio shares its class) or tritonclient.http."""
    inp = (module or _grpc()).InferInput(name, [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[data]], dtype=np.object_))
    return inp


OUTPUTS = ("CAPTION", "SCORE", "MODEL_VERSION")


def requested_outputs(module=None) -> list:
    """CAPTION, SCORE and MODEL_VERSION, for tritonclient `module` (tritonclient.grpc by default)."""
    mod = module or _grpc()
    return [mod.InferRequestedOutput(name) for name in OUTPUTS]


def _grpc():
    import tritonclient.grpc

    return tritonclient.grpc


def attempt_failed(e: BaseException) -> AttemptFailed:
    """What a failed call said, for the retry driver: a tritonclient
    InferenceServerException, a grpc.RpcError, or the TimeoutError of call_without_cancel."""
    from tritonclient.utils import InferenceServerException

    if isinstance(e, InferenceServerException):
        return AttemptFailed(e.status(), e.message(), e)
    if isinstance(e, TimeoutError):
        return AttemptFailed(DEADLINE_EXCEEDED, "Deadline Exceeded", e)
    import grpc

    if isinstance(e, grpc.RpcError):  # a grpc.Call too: code() and details()
        return AttemptFailed(str(e.code()), e.details(), e)
    raise TypeError(f"not the failure of a call: {e!r}") from e


async def infer_without_cancel(client, wait_s: float | None, model: str, inputs, **kwargs):
    """`client.infer(model, inputs, **kwargs)`, given up after `wait_s` (DEADLINE_EXCEEDED to the caller)
    without cancelling the call: it runs on in the background, its gRPC deadline
    `CANCEL_GRACE_S` later, while Triton's own `timeout` (the caller's time left, in
    kwargs) drops it if it is still queued. Why: Triton 2.51 can crash (SIGSEGV in its
    gRPC handler) when a cancellation races a response being completed (upstream issues
    7368 and 8034, fixed in 24.12), and under overload every late caller cancels. A server
    that answers late is then only answered into the void; a hung one is still cancelled
    once the grace is over."""
    if wait_s is None:
        return await client.infer(model, inputs, client_timeout=None, **kwargs)
    call = asyncio.ensure_future(client.infer(model, inputs, client_timeout=wait_s + CANCEL_GRACE_S, **kwargs))
    try:
        return await asyncio.wait_for(asyncio.shield(call), wait_s)
    except TimeoutError:
        _abandon(call)  # the event loop holds tasks only weakly
        from tritonclient.utils import InferenceServerException

        raise InferenceServerException("Deadline Exceeded", status=DEADLINE_EXCEEDED) from None


def call_without_cancel(method, request, wait_s: float):
    """The synchronous counterpart of `infer_without_cancel` for a raw gRPC stub method
    (`GRPCInferenceServiceStub(...).ModelInfer`, the Locust users): its answer if it comes
    within `wait_s` seconds, else TimeoutError while the call runs on, its gRPC deadline
    CANCEL_GRACE_S later. RpcError as gRPC raises it."""
    import grpc

    call = method.future(request, timeout=wait_s + CANCEL_GRACE_S)
    try:
        return call.result(timeout=wait_s)
    except grpc.FutureTimeoutError:
        _abandon(call)  # a gRPC future that is garbage collected cancels its call
        raise TimeoutError("Deadline Exceeded (the call was left to run out, not cancelled)") from None


_abandoned: set = set()  # calls given up on but left to run: referenced until they end


def _abandon(call) -> None:
    """Keep a call given up on (an asyncio task or a gRPC future) referenced until it ends."""
    _abandoned.add(call)
    call.add_done_callback(_forget)


def _forget(call) -> None:
    _abandoned.discard(call)
    if not call.cancelled():
        call.exception()  # retrieved: no "exception was never retrieved" warning
