"""The graphs the bench serves, made by the build's own entry point (the command `make
build-engines` runs, with its parity checks and caption-agreement gates, spelled by
builder.command) and described by the build manifest it writes: which runtime it chose
per graph, the encoder's rates, the caption agreement of a reduced-precision variant.

One build with PRECISION=int8 (it leaves the checked fp32 graphs too) and one with
PRECISION=bf16 when those variants are asked for; reused while the checkpoint and the
requested precisions are unchanged (bench_build.json next to them)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from builder.build_engines import EXIT_REFUSED, MANIFEST
from builder.command import build_command

from .variants import ROOT, ModelSpec

STAMP = "bench_build.json"
PATH_KEYS = ("encoder", "decoder")  # the entries of a variant's paths that are files


@dataclass(frozen=True)
class BuildOptions:
    """The bench's flags for build_engines."""

    parity_scenes: int
    agreement_images: int
    speed_only_agreement_images: int
    max_batch_size: int
    rebuild: bool = False


def build(spec: ModelSpec, work: Path, logs: Path, opts: BuildOptions) -> tuple[dict[str, dict], list[str]]:
    """Precision -> the checked graphs to serve (paths, runtimes, encoder rates), and the
    notes for the report. `work`/<model> holds the builds, `logs` their logs."""
    from captioner import checkpoint as ckpt_mod

    d = work / spec.name
    sha = ckpt_mod.file_sha256(ckpt_mod.resolve(spec.checkpoint))
    wanted = sorted({p for _, p in spec.variants if p != "fp32"}) or ["fp32"]
    stamp = d / STAMP
    if stamp.is_file() and not opts.rebuild:
        cached = json.loads(stamp.read_text())
        if cached["checkpoint_sha256"] == sha and set(wanted) <= set(cached.get("builds", [])):
            return (
                {k: {n: (Path(p) if n in PATH_KEYS else p) for n, p in v.items()} for k, v in cached["precisions"].items()},
                cached["notes"],
            )
    speed_only = bool(ckpt_mod.load(spec.checkpoint).meta.get("speed_only"))
    d.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    precisions: dict[str, dict] = {}
    for precision in wanted:
        # The first build checks the export against torch on --parity-scenes scenes; the
        # second exports the same graphs again and checks them on a few (InceptionV3 in
        # eager torch is most of a seed-inception build).
        scenes = opts.parity_scenes if not precisions else min(8, opts.parity_scenes)
        manifest = run_build(spec, precision, d, scenes, speed_only, logs / f"build-{spec.name}-{precision}.log", opts)
        if manifest is None:
            notes.append(
                f"{spec.name}: the build refused {precision} (build_engines exit status "
                f"{EXIT_REFUSED}: it failed its caption-agreement gate or does not run here; "
                f"its log: {logs / f'build-{spec.name}-{precision}.log'})"
            )
            continue
        suffix = " (speed-only model: built with --min-agreement 0 --decode-min-agreement 0)" if speed_only else ""
        notes += [f"{spec.name}: {line}{suffix}" for line in manifest_notes(manifest)]
        add_precision(precisions, precision, manifest, d / "out")
    if "fp32" in precisions and precisions["fp32"]["auto_encoder_runtime"] is None:
        runtime, note = fp32_choice(spec, precisions["fp32"], opts.max_batch_size)
        precisions["fp32"]["auto_encoder_runtime"] = runtime
        notes.append(note)
    stamp.write_text(
        json.dumps(
            {
                "checkpoint_sha256": sha,
                "builds": wanted,
                "notes": notes,
                "precisions": {k: {n: str(p) for n, p in v.items()} for k, v in precisions.items()},
            },
            indent=1,
        )
    )
    return precisions, notes


def run_build(
    spec: ModelSpec, precision: str, d: Path, scenes: int, speed_only: bool, log: Path, opts: BuildOptions
) -> dict | None:
    """One build_engines run into d/built-<precision> (graphs in d/out); its manifest, or
    None when the build refused the precision (its documented exit status)."""
    repo = d / f"built-{precision}"
    if speed_only:
        # Random weights: captions are noise, so agreement with fp32 says nothing about
        # quality; the variant is measured for speed and its agreement only reported.
        gate = ["--min-agreement", "0", "--agreement-images", str(opts.speed_only_agreement_images)]
        gate += ["--decode-min-agreement", "0"]  # the decode gate likewise: its agreement only reported
    else:
        # The 98% gate needs a sample whose error bar is well under 2 points.
        gate = ["--agreement-images", str(opts.agreement_images)]
    cmd = build_command(
        spec.checkpoint,
        repo,
        target="cpu",
        precision=precision,
        runtime="auto",
        extra=["--out", str(d / "out"), "--parity-scenes", str(scenes), "--encoder-input", "float32", *gate],
    )
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc == EXIT_REFUSED:
        return None
    if rc != 0:
        raise RuntimeError(f"build_engines exited {rc}; its log: {log}")
    return json.loads((repo / MANIFEST).read_text())


def manifest_notes(manifest: dict) -> list[str]:
    """The report's lines about one build: the runtime chosen per graph and the caption
    agreement of a reduced-precision encoder with fp32."""
    runtime = manifest.get("runtime") or {}
    notes = []
    for key in ("encoder", "decoder_step"):
        if key in runtime:
            c = runtime[key]
            figures = ", ".join(f"{k} {v:.1f}/s" for k, v in c["rows_per_s"].items()) or "not measured"
            notes.append(f"chosen {key.replace('_', ' ')}: {c['runtime']} ({c['reason']}; {figures})")
    notes += [f"chosen {n}" for n in runtime.get("notes", [])]
    variant = manifest.get("cpu_reduced_precision") or {}
    if variant.get("agreement"):
        a = variant["agreement"]
        verdict = "accepted" if variant["accepted"] else f"REFUSED (below {variant['min_agreement']:.0%})"
        notes.append(
            f"greedy captions {variant['chosen']} == fp32 on {variant['evaluated_on']}: "
            f"{a['agree']}/{a['total']} = {a['share']:.2%}  {verdict}"
        )
    if runtime.get("agreement"):
        a = runtime["agreement"]
        notes.append(
            f"greedy captions {a['variant']} == fp32 on {a['evaluated_on']}: {a['agree']}/{a['total']} = "
            f"{a['share']:.2%}" + ("" if a["accepted"] else "  (below the gate: onnxruntime serves it)")
        )
    return notes


def add_precision(precisions: dict[str, dict], precision: str, manifest: dict, out: Path) -> None:
    """The variants one build made possible, from its manifest: the reduced-precision
    graph it asked for, and the fp32 graphs every build leaves."""
    runtime = manifest["runtime"]
    top = str(max(int(b) for r in runtime["encoder_rows_per_s"].values() for b in r))
    base = {
        "decoder": out / "decoder_step.onnx",
        "step_runtime": runtime["decoder_step"]["runtime"],
        "auto_encoder_runtime": runtime["encoder"]["runtime"],
        # the decode path the build's gate chose (builder/decode_gate.py); None: built before the gate
        "decode": (manifest.get("decode") or {}).get("served"),
        # images/s of this precision's graph per runtime: LAYOUT=auto's rule, per variant
        "rates": json.dumps({k: v[top] for k, v in runtime["encoder_rows_per_s"].items()}),
    }
    if precision == "int8" and manifest["precision"] != "fp32":
        # the build's reduced-precision graph (int8 unless onnxruntime ran a bf16 graph faster)
        precisions["int8"] = {**base, "encoder": out / f"encoder.{manifest['precision']}.onnx"}
    if precision == "bf16":
        precisions["bf16"] = {**base, "encoder": out / "encoder.onnx"}
    precisions.setdefault("fp32", {**base, "encoder": out / "encoder.onnx", "auto_encoder_runtime": None, "rates": None})


def fp32_choice(spec: ModelSpec, paths: dict, max_batch_size: int) -> tuple[str, str]:
    """What RUNTIME=auto picks for the fp32 encoder (the reduced-precision builds time
    their own graph); fills paths["rates"]. Returns (runtime, a note for the report)."""
    from builder.repository import DEFAULT_ORT_THREADS, ENCODER
    from builder.runtime_choice import choose_runtimes
    from captioner import checkpoint as ckpt_mod

    r = choose_runtimes(
        ckpt_mod.load(spec.checkpoint),
        paths["encoder"],
        paths["decoder"],
        "auto",
        "fp32",
        DEFAULT_ORT_THREADS[ENCODER],
        (1, max_batch_size),
        log=lambda m: None,
    )
    paths["rates"] = json.dumps({k: v[max_batch_size] for k, v in r.encoder_rates.items()})
    return r.encoder.runtime, (
        f"{spec.name}: fp32 RUNTIME=auto would serve the encoder with {r.encoder.runtime} ({r.encoder.reason})"
    )


def served_paths(spec: ModelSpec, runtime: str, precision: str, built: dict, encoder_input: str, layout: str) -> dict:
    """The graphs, runtimes, precision hint and layout of one variant, the encoder graph
    with uint8 input when the bench serves that (builder/uint8_input.py; cached)."""
    from captioner import checkpoint as ckpt_mod

    paths = dict(built[precision])
    if encoder_input == "uint8":
        from builder.uint8_input import with_uint8_input

        src = Path(paths["encoder"])
        dst = src.with_name(f"{src.stem}.uint8.onnx")
        if not dst.is_file() or dst.stat().st_mtime < src.stat().st_mtime:
            with_uint8_input(src, dst, ckpt_mod.load(spec.checkpoint).preprocess)
        paths["encoder"] = dst
    paths.update(runtime=runtime, inference_precision="bf16" if precision == "bf16" else "fp32")
    if layout == "auto":
        from builder.runtime_choice import layout_for_rate

        rates = paths.get("rates")
        paths["layout"] = layout_for_rate(json.loads(rates).get(runtime) if rates not in (None, "None") else None)
    else:
        paths["layout"] = layout
    return paths
