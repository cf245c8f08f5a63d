"""Locust users that caption shapes-v1 scenes through the `captioner` Triton ensemble over gRPC.

    locust -f loadtest/locustfile.py --headless -u 8 -r 4 -t 60s --host localhost:8001[,host2:8001...]

With several endpoints, users spread requests over them and fail over as the client
library does (client.endpoints: least outstanding, retry a broken replica's requests on
another, set it aside and probe it with a tiny real inference before it gets traffic
again). Each image request is reported once with Locust's request event (name, response
time including retries, response length, exception when every attempt failed); retries
and per-endpoint counts go to --endpoints-out. Captions are also checked against each
scene's ground truth; that share is reported at the end, but a wrong caption is a quality
figure, not a failed request. Each answer's MODEL_VERSION (the model version that made it) is
counted too: the quality report says how many captions each version returned.
"""

# grpc must run on gevent's loop, not its own threads, or one user blocks all the others;
# this has to happen before any channel exists.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import grpc  # noqa: E402
import numpy as np  # noqa: E402
from locust import User, events, task  # noqa: E402
from locust.exception import LocustError  # noqa: E402
from locust.stats import CSV_STATS_INTERVAL_SEC  # noqa: E402
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import serialize_byte_tensor  # noqa: E402

# Locust puts the locustfile's own folder on sys.path; the pool needs the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.scenes import caption_is_correct  # noqa: E402
from client.endpoints import EndpointPool, parse_endpoints, status_text  # noqa: E402
from client.images import probe_image  # noqa: E402
from client.retry import Retry, RetryPolicy, drive, run_probe  # noqa: E402
from client.wire import attempt_failed, call_without_cancel  # noqa: E402
from loadtest.pool import DEFAULT_JPEG_SHARE, DEFAULT_SIZES, build_pool, parse_sizes  # noqa: E402

log = logging.getLogger("loadtest")
MAX_MESSAGE = 64 * 1024 * 1024


@events.init_command_line_parser.add_listener
def _add_arguments(parser):
    g = parser.add_argument_group("captioner")
    g.add_argument("--model-name", default="captioner", env_var="CAPTIONER_MODEL_NAME", help="served model")
    g.add_argument(
        "--beam-size", type=int, default=None, env_var="LOADTEST_BEAM", help="beam_size request parameter (default: the server's)"
    )
    g.add_argument(
        "--max-length",
        type=int,
        default=None,
        env_var="LOADTEST_MAX_LENGTH",
        help="max_length request parameter (default: the server's)",
    )
    g.add_argument(
        "--request-timeout",
        type=float,
        default=30.0,
        env_var="LOADTEST_REQUEST_TIMEOUT",
        help="deadline per image request, retries included, seconds (the server gets the time left)",
    )
    g.add_argument(
        "--attempt-timeout",
        type=float,
        default=None,
        env_var="LOADTEST_ATTEMPT_TIMEOUT",
        help="seconds one attempt may take before the request is tried on another endpoint",
    )
    g.add_argument(
        "--attempts",
        type=int,
        default=RetryPolicy.max_attempts,
        env_var="LOADTEST_ATTEMPTS",
        help="attempts per image request while endpoints are unavailable, broken or reloading",
    )
    g.add_argument(
        "--think-time",
        type=float,
        default=0.0,
        env_var="LOADTEST_THINK_TIME",
        help="seconds each user waits between requests (0: closed loop)",
    )
    g.add_argument("--pool-size", type=int, default=48, env_var="LOADTEST_POOL_SIZE", help="scenes in the pool")
    g.add_argument("--pool-seed", type=int, default=1234, env_var="LOADTEST_POOL_SEED")
    g.add_argument(
        "--pool-sizes",
        default=",".join(map(str, DEFAULT_SIZES)),
        env_var="LOADTEST_POOL_SIZES",
        help="image sides drawn from, comma separated (default: photo-sized, loadtest/pool.py)",
    )
    g.add_argument(
        "--jpeg-share",
        type=float,
        default=DEFAULT_JPEG_SHARE,
        env_var="LOADTEST_JPEG_SHARE",
        help="share of the pool encoded as JPEG (the rest PNG)",
    )
    g.add_argument(
        "--quality-out", default="", env_var="LOADTEST_QUALITY_OUT", help="write the caption-correctness summary here (JSON)"
    )
    g.add_argument(
        "--endpoints-out", default="", env_var="LOADTEST_ENDPOINTS_OUT", help="write retries and per-endpoint counts here (JSON)"
    )


class Pool:
    """Built once per process in the init event; users share it read-only."""

    images: list = []
    requests: list = []
    correct = 0
    checked = 0
    versions: dict = {}  # MODEL_VERSION -> captions it returned


class Fleet:
    """The endpoints of --host, shared by every user of this process, so that what one user
    learns about a broken replica spares the others; plus the run's failover figures."""

    pool: EndpointPool | None = None
    requests = 0
    retried = 0  # image requests that needed more than one attempt
    lost = 0  # image requests that failed after every attempt
    attempt_errors: dict = {}  # "STATUS: message" -> count, of failed attempts

    @classmethod
    def get(cls, host: str) -> EndpointPool:
        if cls.pool is None:
            cls.pool = EndpointPool(parse_endpoints(host))
        return cls.pool

    @classmethod
    def summary(cls) -> dict:
        return {
            "requests": cls.requests,
            "retried": cls.retried,
            "failed": cls.lost,
            "attempt_errors": cls.attempt_errors,
            "endpoints": cls.pool.stats() if cls.pool else [],
        }


def infer_request(model: str, image, params: dict) -> service_pb2.ModelInferRequest:
    """One ModelInfer request for one image, as tritonclient builds it. The image's label
    rides in the request id, which names the call in Locust's statistics."""
    req = service_pb2.ModelInferRequest(model_name=model, id=image.label)
    req.inputs.add(name="IMAGE", datatype="BYTES", shape=[1, 1])
    req.raw_input_contents.append(serialize_byte_tensor(np.array([[image.data]], dtype=np.object_)).item())
    req.outputs.add(name="CAPTION")
    req.outputs.add(name="SCORE")
    req.outputs.add(name="MODEL_VERSION")
    for key, value in params.items():
        if value is not None:
            req.parameters[key].int64_param = int(value)
    return req


@events.init.add_listener
def _build_pool(environment, **_kwargs):
    opts = environment.parsed_options
    if opts is None:  # library use without a command line
        return
    t0 = time.perf_counter()
    Pool.images = build_pool(opts.pool_size, opts.pool_seed, parse_sizes(opts.pool_sizes), opts.jpeg_share)
    params = {"beam_size": opts.beam_size, "max_length": opts.max_length}
    Pool.requests = [infer_request(opts.model_name, im, params) for im in Pool.images]
    mb = sum(len(im.data) for im in Pool.images) / 1e6
    log.info("pool: %d scenes, %.1f MB, built in %.1f s", len(Pool.images), mb, time.perf_counter() - t0)
    # The event loop's clock stood still while the pool was built; without this, --run-time
    # would count the build and the test would end early.
    gevent.get_hub().loop.update_now()


@events.quitting.add_listener
def _report_quality(environment, **_kwargs):
    if environment.parsed_options and environment.parsed_options.csv_prefix:
        # Locust writes its CSVs once a second and not again at exit: give its writer one more
        # turn now that users have stopped, so the CSVs hold the final figures.
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)
    if Fleet.pool is not None:
        fleet = Fleet.summary()
        log.info(
            "failover: %d requests, %d retried, %d failed after every attempt; %s",
            fleet["requests"],
            fleet["retried"],
            fleet["failed"],
            "; ".join(f"{e['url']} {e['ok']} ok {e['failed']} failed" for e in fleet["endpoints"]),
        )
        out = environment.parsed_options.endpoints_out if environment.parsed_options else ""
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(fleet, indent=2) + "\n")
    if not Pool.checked:
        return
    summary = {
        "checked": Pool.checked,
        "correct": Pool.correct,
        "share_correct": Pool.correct / Pool.checked,
        "model_versions": dict(sorted(Pool.versions.items())),
    }
    log.info(
        "captions correct: %d/%d (%.1f%%); by model version: %s",
        Pool.correct,
        Pool.checked,
        100 * summary["share_correct"],
        ", ".join(f"{k} {v}" for k, v in summary["model_versions"].items()),
    )
    out = environment.parsed_options.quality_out if environment.parsed_options else ""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(summary, indent=2) + "\n")


class BadResponse(Exception):
    """The call succeeded at the gRPC level but its answer is unusable."""


class DeadlineReached(Exception):
    """The request's deadline passed between attempts."""


class TritonGrpcUser(User):
    """A User with a gRPC channel to each Triton endpoint of --host (comma separated). `infer()`
    spreads, fails over and reports each logical request once through Locust's request event."""

    abstract = True
    host = os.environ.get("CAPTIONER_URL", "localhost:8001")

    def __init__(self, environment):
        super().__init__(environment)
        if not self.host:
            raise LocustError("set --host to Triton's gRPC address(es), e.g. localhost:8001,otherhost:8001")
        try:
            self.fleet = Fleet.get(self.host)
        except ValueError as e:
            raise LocustError(str(e)) from None
        options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
        self._channels = {ep.url: grpc.insecure_channel(ep.url, options=options) for ep in self.fleet}
        self.stubs = {url: service_pb2_grpc.GRPCInferenceServiceStub(ch) for url, ch in self._channels.items()}
        opts = environment.parsed_options
        self.retry = RetryPolicy(max_attempts=max(1, opts.attempts if opts else RetryPolicy.max_attempts))
        self.attempt_timeout = opts.attempt_timeout if opts else None
        self._retry_rng = random.Random()

    def check_response(self, request, response):
        """Override to validate answers; raise BadResponse for an unusable one."""

    def infer(self, request: service_pb2.ModelInferRequest, timeout: float):
        """ModelInfer with failover within `timeout` seconds (client.retry, as the client
        library does); returns the response or None."""
        start = time.perf_counter()
        retry = Retry(
            self.fleet,
            self.retry,
            timeout=timeout,
            attempt_timeout=self.attempt_timeout,
            rng=self._retry_rng,
            probe=lambda ep: gevent.spawn(self._probe, ep, request.model_name),
        )
        outcome = drive(retry, lambda a: self._attempt(request, a), sleep=gevent.sleep)
        Fleet.requests += 1
        Fleet.retried += outcome.attempts > 1
        response, length = outcome.value, 0
        exception = outcome.failure.error if outcome.failure else None
        if outcome.ok:
            exception = None
            length = response.ByteSize()
            try:
                self.check_response(request, response)
            except BadResponse as e:
                exception = e
        elif exception is None:
            exception = DeadlineReached(f"deadline of {timeout:g} s reached after {outcome.attempts} attempts")
        Fleet.lost += response is None
        self.environment.events.request.fire(
            request_type="grpc",
            name=f"{request.model_name} {request.id}" if request.id else "ModelInfer",
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length,
            response=response,
            context={"attempts": outcome.attempts, "endpoint": outcome.endpoint.url if outcome.endpoint else None},
            exception=exception,
        )
        return response

    def _attempt(self, request: service_pb2.ModelInferRequest, a):
        """One attempt of `infer`: the request with Triton's own timeout (microseconds) set to
        this attempt's wait, so that the server drops what nobody waits for."""
        sent = service_pb2.ModelInferRequest()
        sent.CopyFrom(request)
        sent.parameters["timeout"].int64_param = a.server_timeout_us
        try:
            # Not cancelled at the deadline: Triton 2.51 can crash on a cancellation
            # racing a response (client.wire.infer_without_cancel), and a load test is
            # where deadlines run out.
            return call_without_cancel(self.stubs[a.endpoint.url].ModelInfer, sent, a.wait_s)
        except (grpc.RpcError, TimeoutError) as e:
            failed = attempt_failed(e)
            key = f"{status_text(failed.status)}: {failed.message}"
            Fleet.attempt_errors[key] = Fleet.attempt_errors.get(key, 0) + 1
            raise failed from None

    def _probe(self, ep, model: str) -> None:
        """One tiny real inference: readiness alone passes a replica whose stub is dead."""
        req = infer_request(model, _ProbeImage, {})

        def check() -> None:
            try:
                call_without_cancel(self.stubs[ep.url].ModelInfer, req, 5.0)
            except (grpc.RpcError, TimeoutError) as e:
                raise attempt_failed(e) from None

        run_probe(self.fleet, ep, check)

    def on_stop(self):
        for ch in self._channels.values():
            ch.close()


class _ProbeImage:
    data = probe_image()
    label = "probe"


class CaptionUser(TritonGrpcUser):
    def wait_time(self):
        return self.environment.parsed_options.think_time if self.environment.parsed_options else 0.0

    def on_start(self):
        if not Pool.requests:
            raise LocustError("the image pool is empty: was the locustfile's init event skipped?")
        self._rng = random.Random()
        self._timeout = self.environment.parsed_options.request_timeout
        self._current = None  # the pool image of the call in flight, for check_response

    def check_response(self, request, response):
        try:
            result = InferResult(response)
            caption = result.as_numpy("CAPTION").reshape(-1)[0]
            score = float(result.as_numpy("SCORE").reshape(-1)[0])
            version = result.as_numpy("MODEL_VERSION").reshape(-1)[0]
        except Exception as e:  # any shape or type surprise is the server's fault here
            raise BadResponse(f"response lacks CAPTION/SCORE/MODEL_VERSION: {e}") from None
        caption = caption.decode() if isinstance(caption, bytes) else str(caption)
        version = version.decode() if isinstance(version, bytes) else str(version)
        Pool.versions[version] = Pool.versions.get(version, 0) + 1
        if not np.isfinite(score) or score > 0:
            raise BadResponse(f"score {score} is not a log-probability (caption {caption!r})")
        Pool.checked += 1
        Pool.correct += caption_is_correct(caption, self._current.scene)

    @task
    def caption(self):
        i = self._rng.randrange(len(Pool.requests))
        self._current = Pool.images[i]
        self.infer(Pool.requests[i], self._timeout)
