"""Plain tritonclient (no retries of its own) through nginx to N replica containers while
one replica is killed: what a caller that is not the project's client sees.

    python -m bench.proxy_failover [--replicas 2] [--clients 8] [--before 15] [--after 30]

Starts the fleet of `make serve-containers` (deploy.serve_containers) on a free port,
runs `clients` threads that each send one caption request after another, kills replica 0
with `podman kill` (SIGKILL, no drain) after `before` seconds, keeps going for `after`
seconds, and reports requests sent, captioned (and correct), failed (by status), the
failures among the calls in flight during the kill, and each replica's share before it.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np


def run(repo: Path, replicas: int = 2, clients: int = 8, before_s: float = 15.0, after_s: float = 30.0) -> dict:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from captioner.scenes import caption_is_correct, encoded_scenes
    from deploy.serve_containers import Fleet
    from launcher.tritonserver import free_port

    scenes = encoded_scenes(32, 17)
    listen = f"127.0.0.1:{free_port()}"
    outcomes: list[tuple[float, float, str]] = []  # (sent, answered, "ok" | "wrong" | error)
    lock, stop = threading.Lock(), threading.Event()

    def loop(k: int) -> None:
        client = grpcclient.InferenceServerClient(listen)
        i = k
        while not stop.is_set():
            data, scene = scenes[i % len(scenes)]
            i += 1
            image = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
            image.set_data_from_numpy(np.array([[data]], dtype=np.object_))
            sent = time.monotonic()
            try:
                caption = client.infer("captioner", [image], client_timeout=30).as_numpy("CAPTION")[0, 0].decode()
                outcome = "ok" if caption_is_correct(caption, scene) else "wrong"
            except InferenceServerException as e:
                outcome = f"{e.status()}: {e.message()[:120]}"
            with lock:
                outcomes.append((sent, time.monotonic(), outcome))
        client.close()

    with Fleet(repo.resolve(), replicas, listen, prefix="captioner-failover") as fleet:
        threads = [threading.Thread(target=loop, args=(k,), daemon=True) for k in range(clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(before_s)
        share = [r.successes() for r in fleet.members]
        killed_at = time.monotonic()
        fleet.kill(0)
        killed_by = time.monotonic()  # podman kill has returned: the replica is gone
        time.sleep(after_s)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        ended = time.monotonic()
    errors = Counter(o for _, _, o in outcomes if o not in ("ok", "wrong"))
    after = [(s, d, o) for s, d, o in outcomes if s >= killed_at]
    first_ok_after = min((d - killed_at for s, d, o in after if o == "ok"), default=None)
    return {
        "replicas": replicas,
        "clients": clients,
        "before_s": before_s,
        "after_s": after_s,
        "seconds": round(ended - t0, 1),
        "sent": len(outcomes),
        "captioned": sum(o == "ok" for _, _, o in outcomes),
        "wrong": sum(o == "wrong" for _, _, o in outcomes),
        "failed": sum(errors.values()),
        "errors": dict(errors),
        # Sent before the replica was surely gone and answered after the kill was issued:
        # those that reached the killed replica. nginx streams a gRPC request body to the
        # replica without keeping it, so it cannot pass such a call to another replica.
        "in_flight_at_kill": sum(1 for s, d, o in outcomes if s < killed_by and d >= killed_at),
        "failed_in_flight_at_kill": sum(
            1 for s, d, o in outcomes if o not in ("ok", "wrong") and s < killed_by and d >= killed_at
        ),
        "kill_seconds": round(killed_by - killed_at, 2),
        "sent_after_kill": len(after),
        "captioned_after_kill": sum(o == "ok" for _, _, o in after),
        "first_caption_after_kill_s": None if first_ok_after is None else round(first_ok_after, 3),
        "replica_share_before_kill": share,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.proxy_failover", description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--before", type=float, default=15.0, help="seconds of load before the kill")
    p.add_argument("--after", type=float, default=30.0, help="seconds of load after the kill")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON (e.g. reports/proxy_failover.json)")
    a = p.parse_args(argv)
    r = run(a.repo, a.replicas, a.clients, a.before, a.after)
    print(
        f"{r['clients']} plain tritonclient clients through nginx to {r['replicas']} replicas, replica 0 killed "
        f"(podman kill) after {a.before:g} s, {a.after:g} s more: sent {r['sent']}, captioned {r['captioned']}, "
        f"wrong {r['wrong']}, failed {r['failed']} ({r['failed_in_flight_at_kill']} of the {r['in_flight_at_kill']} "
        f"in flight during the {r['kill_seconds']} s kill); after "
        f"the kill {r['captioned_after_kill']}/{r['sent_after_kill']} captioned, the first "
        f"{r['first_caption_after_kill_s']} s after it; replicas' captions before the kill "
        f"{r['replica_share_before_kill']}"
    )
    for err, n in r["errors"].items():
        print(f"  {n} x {err}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(r, indent=2) + "\n")
    # The goal: nothing failed but, at most, calls that were on the killed replica.
    ok = r["wrong"] == 0 and r["failed"] == r["failed_in_flight_at_kill"] and r["captioned_after_kill"] > 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
