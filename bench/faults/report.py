"""The fault report: reports/faults.json (every figure) and reports/faults.md (one section
per recorded result, rendered by the function registered for its scenario)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import psutil


def _supervisor(r: dict) -> str:
    return "- supervisor: " + " / ".join(e.split("launcher.supervisor ", 1)[-1] for e in r["supervisor"])


def _overload(r: dict, results: dict) -> list[str]:
    o, plan, live = r["overload"], results["plan"], r["liveness"]
    on = f"ON (queue budget {plan['queue_budget_ms']} ms)" if plan["queue_budget_ms"] else "ON (the build default)"
    recovered = r["recovered_s"] if r["recovered_s"] is None else round(r["recovered_s"], 2)
    lines = [
        f"## overload: {r['model']}, load shedding {on if r['shedding'] else 'OFF (--max-queue-size 0)'}, "
        f"{o['clients']} clients, {o['deadline_s']:g} s deadlines, {o['elapsed_s']:.0f} s",
        f"- capacity at 8 clients: {r['capacity_8']:.1f} captions/s; goodput under overload {r['goodput']:.1f}/s "
        f"= **{r['goodput_ratio']:.2f}x** capacity",
        f"- good requests {o['good']}, late {o['late']}, refusals (UNAVAILABLE, each attempt) {o['refusals']}, "
        f"other errors {o['other_errors']}",
        f"- latency of good requests p50 {o['good_p50_ms']:.0f} ms, p99 {o['good_p99_ms']:.0f} ms; "
        f"refusals answered in p50 **{o['refusal_p50_ms']:.1f} ms**, p99 {o['refusal_p99_ms']:.1f} ms",
        f"- 1-client latency back to normal (median of 5 <= 1.5 x idle p50 {r['idle_p50_ms']:.1f} ms + 2 ms) "
        f"**{recovered} s** after the load stopped",
        f"- liveness probe (`client.health --overload-ok`) every 2 s during the load: "
        f"{live['probes']} probes, {live['caption']} captioned, "
        f"{live['overloaded']} shed as overloaded (pass), **{live['failed']} failed** {live['failures'] or ''}",
        "- inside Triton during the overload: "
        + "; ".join(
            f"{m} batch {v['batch']:.1f}, queue {v['queue_ms']:.0f} ms/request, compute {v['compute_ms']:.0f} ms/execution"
            for m, v in r["inside_triton"].items()
        ),
        "",
    ]
    if o["error_samples"]:
        lines += [f"- error samples: {o['error_samples'][:2]}", ""]
    return lines


def _stub_fault(r: dict, results: dict) -> list[str]:
    how = f", {r['stopped'] or 'as it was: no such moment in 10 s'})" if r["signal"] == "SIGSTOP" else ")"
    return [
        f"## {r['scenario']}: {r['model']} `{r['target']}` stub ({r['signal']}" + how,
        f"- readiness NOT ready after {r['not_ready_after_s']} s, ready again (repaired) after "
        f"{r.get('repaired_after_s')} s; captions again after "
        f"**{r['captions_again_after_s']} s**; requests {r['requests']}, lost **{r['lost']}** {r['lost_samples'] or ''}",
        _supervisor(r),
        "",
    ]


def _server_kill(r: dict, results: dict) -> list[str]:
    return [
        f"## server-kill: {r['model']} (SIGKILL tritonserver)",
        f"- captions again after **{r['captions_again_after_s']} s**; orphaned stubs left {r['orphaned_stubs_left']}; "
        f"requests {r['requests']}, lost **{r['lost']}** {r['lost_samples'] or ''}",
        _supervisor(r),
        "",
    ]


def _abort_in_repair(r: dict, results: dict) -> list[str]:
    return [
        f"## abort-in-repair: {r['model']} `{r['target']}` stub (SIGKILL), then tritonserver SIGABRT during the repair",
        f"- abort ({r['abort']}) {r['aborted_after_s']} s after the kill; ready again "
        f"**{r['ready_again_after_abort_s']} s** after the abort; "
        f"requests {r['requests']}, lost **{r['lost']}** {r['lost_samples'] or ''}",
        _supervisor(r),
        "",
    ]


def _drain(r: dict, results: dict) -> list[str]:
    return [
        f"## drain: {r['model']} (SIGTERM to the launcher, {results['plan']['fault_clients'] * 2} clients)",
        f"- in flight at SIGTERM {r['in_flight_at_sigterm']}, lost **{r['accepted_lost']}** "
        f"{r['accepted_lost_by_status'] or ''}; "
        f"sent after SIGTERM: {r['after_sigterm']}; launcher exit {r['launcher_exit']}, "
        f"stopped {r['stopped_after_s']} s after SIGTERM",
        "",
    ]


def _soak(r: dict, results: dict) -> list[str]:
    return [
        f"## soak: {r['model']}, {r['seconds']} s",
        f"- {r['requests']} captions asked by {results['plan']['soak_clients']} clients of the client library, "
        f"{r['failed']} lost after retries, {r['throughput']:.1f}/s; server RSS "
        f"{r['rss_start_mb']} -> {r['rss_end_mb']} MB ({r['rss_growth'] * 100:+.1f} %)",
        "",
    ]


def _rollout(r: dict, results: dict) -> list[str]:
    p99, v, rep = r["p99_ms"], r["versions"], r["repair_after"]
    ready = r["readiness"]
    return [
        f"## rollout: {r['model']} -> a checkpoint with other layer sizes ({v['sizes']}) and back, "
        f"{r['clients']} plain clients (no retries)",
        f"- requests {r['requests']}, failed **{r['failed']}** {r['failed_samples'] or ''}; captions not the "
        f"in-process caption of the version they name **{r['wrong_version_caption']}**, matching neither "
        f"version **{r['matching_neither']}**; by version {r['by_version']}",
        f"- p99 steady {p99['steady']} ms; while the new version was built here {p99['rollout_build']} ms; "
        f"rollout switch (load, gate, switch, unload) **{p99['rollout_switch']} ms**; rollback switch "
        f"**{p99['rollback_switch']} ms**",
        f"- first new-version caption **{r['first_new_caption_after_command_s']} s** after the command "
        f"({r['first_new_caption_after_switch_s']} s after the switch); first caption of the old version again "
        f"{r['first_old_caption_after_rollback_command_s']} s after `make rollback`",
        f"- rollout phases (s) {r['rollout_phases_s']}; rollback phases (s) {r['rollback_phases_s']}",
        f"- readiness: `/v2/models/captioner/ready` not ready in {ready['/v2/models/captioner/ready']['not_ready']} "
        f"of {ready['/v2/models/captioner/ready']['polls']} polls "
        f"({ready['/v2/models/captioner/ready'].get('unanswered', 0)} not answered within 2 s); "
        "server `/v2/health/ready` (strict) not ready "
        f"{ready['/v2/health/ready']['not_ready_s']} s in all (while versions loaded or unloaded)",
        f"- then a SIGKILLed {rep.get('model', 'caption_generator')} stub of the version served after it: repaired after "
        f"{rep['repaired_s']} s on version {rep['version']} (caption its own: {rep['caption_ok']})",
        _supervisor(r),
        "",
    ]


RENDERERS: dict[str, Callable[[dict, dict], list[str]]] = {
    "overload": _overload,
    "stub-kill": _stub_fault,
    "hang": _stub_fault,
    "hang-idle": _stub_fault,
    "server-kill": _server_kill,
    "abort-in-repair": _abort_in_repair,
    "drain": _drain,
    "soak": _soak,
    "rollout": _rollout,
}


def report(results: dict) -> str:
    lines = [
        f"# Fault scenarios ({'quick' if results['quick'] else 'full'}), {results['started']}",
        "",
        "Command: `python -m bench.faults" + (" --quick" if results["quick"] else "") + "` (`make faults`). "
        "Machine: "
        + f"{psutil.cpu_count()} cores; load average at the end "
        + ", ".join(f"{x:.2f}" for x in os.getloadavg())
        + ".",
        "",
    ]
    for r in results["scenarios"]:
        lines += RENDERERS[r["scenario"]](r, results)
    return "\n".join(lines)


def write(results: dict, out: Path) -> str:
    (out / "faults.json").write_text(json.dumps(results, indent=1, default=str))
    text = report(results)
    (out / "faults.md").write_text(text + "\n")
    return text
