"""nginx in front of two replica containers (make serve-containers), with plain
tritonclient callers that do not retry: each call is balanced on its own, and when one
replica is killed (podman kill, no drain) captioning goes on through the other; the only
failures allowed are calls that were on the killed replica (nginx streams a gRPC body
and cannot resend it)."""

from __future__ import annotations

import subprocess

from bench.proxy_failover import run
from deploy.containers import podman
from launcher.tritonserver import PROJECT_ROOT


def test_plain_clients_through_nginx_keep_captioning_when_a_replica_is_killed(images):
    r = run(PROJECT_ROOT / "model_repository", replicas=2, clients=8, before_s=6.0, after_s=10.0)
    print(
        f"\nsent {r['sent']}, captioned {r['captioned']}, failed {r['failed']} "
        f"({r['failed_in_flight_at_kill']} of {r['in_flight_at_kill']} in flight at the kill), "
        f"share before {r['replica_share_before_kill']}, errors {r['errors']}"
    )
    assert r["wrong"] == 0
    assert min(r["replica_share_before_kill"]) > 0.3 * max(r["replica_share_before_kill"])  # per call, not per client
    assert r["failed"] == r["failed_in_flight_at_kill"] <= r["in_flight_at_kill"]
    assert r["captioned_after_kill"] > 0.9 * r["sent_after_kill"] and r["first_caption_after_kill_s"] < 2
    left = subprocess.run(podman() + ["ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True).stdout
    assert "captioner-failover" not in left  # the fleet stopped and removed its containers
