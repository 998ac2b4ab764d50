"""ONNX Runtime session options against pruning efficiency: each option set times the unpruned and
the pruned export, every session interleaved in one run (colln.infer.timing.measure), and prints
per option set the pruned speedup (paired, with IQR), its efficiency (speedup / FLOPs bound) and the
unpruned latency relative to ONNX Runtime's defaults.

    python benchmarks/session_options.py UNPRUNED_EXPORT PRUNED_EXPORT [--threads 0] [--batch 1,8] [--rounds 12]
        [--variants default,...] [--artifact onnxruntime|onnx]

Each session opens the file export.json lists for ONNX Runtime (model.ort.onnx) unless
``--artifact onnx``; ``--variants default`` is a plain default ``InferenceSession`` on it.

Caveat found with it: all option sets live in one process, so a spinning option changes what the
*other* sessions see (the default sessions' spinning pools compete with every session timed after
them). Spinning settings are compared one at a time in benchmarks/alternating_sessions.py.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import onnx
import onnxruntime as ort
from polygraphy.backend.onnxrt import OnnxrtRunner

from colln.export.artifact import read_export
from colln.export.spec import ONNX_FILE
from colln.infer.timing import Timing, measure, paired_speedup

VARIANTS: dict[str, dict] = {
    "default": {},
    "nospin": {"entries": {"session.intra_op.allow_spinning": "0"}},
    "spinstop": {"entries": {"session.force_spinning_stop": "1"}},
    "dynblock": {"entries": {"session.intra_op.dynamic_block_base": "4"}},
    "extended": {"level": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED},
}


def artifact(
    export: Path,
    which: str,
) -> Path:
    """``model.onnx`` (``onnx``) or the file the manifest lists for ONNX Runtime (``onnxruntime``:
    model.ort.onnx, what colln ships and times)."""
    if which == "onnx":
        return export / ONNX_FILE
    return export / read_export(export).artifacts.get("onnxruntime", {}).get("file", ONNX_FILE)


def session(
    path: Path,
    threads: int,
    entries: dict[str, str] | None = None,
    level: ort.GraphOptimizationLevel | None = None,
):
    def make() -> ort.InferenceSession:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        for key, value in (entries or {}).items():
            options.add_session_config_entry(key, value)
        if level is not None:
            options.graph_optimization_level = level
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    return make


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("unpruned", type=Path)
    p.add_argument("pruned", type=Path)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads, 0 = ONNX Runtime's default")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument(
        "--artifact", choices=("onnxruntime", "onnx"), default="onnxruntime", help="the manifest's ORT file, or model.onnx"
    )
    args = p.parse_args()
    bound = read_export(args.pruned).keep_plan().flops().bound
    names = args.variants.split(",")
    runners = {}
    for v in names:
        for kind, path in (("unpruned", args.unpruned), ("pruned", args.pruned)):
            runners[f"{v}-{kind}"] = OnnxrtRunner(
                session(artifact(path, args.artifact), args.threads, **VARIANTS[v]), name=f"{v}-{kind}"
            )
    for runner in runners.values():
        runner.activate()
    print("files:", artifact(args.unpruned, args.artifact), artifact(args.pruned, args.artifact))
    print("load before", os.getloadavg())
    graph_input = onnx.load(str(args.pruned / ONNX_FILE), load_external_data=False).graph.input[0]
    shape = [d.dim_value for d in graph_input.type.tensor_type.shape.dim[1:]]
    batches = [int(b) for b in args.batch.split(",")]
    compared = measure(runners, shape, batches, Timing(rounds=args.rounds, warmup=2), baseline=f"{names[0]}-unpruned")
    for b, c in compared.items():
        for v in names:
            s, q25, q75 = paired_speedup(c.times[f"{v}-unpruned"], c.times[f"{v}-pruned"])
            rel = paired_speedup(c.times[f"{names[0]}-unpruned"], c.times[f"{v}-unpruned"])[0]
            print(
                f"b={b} threads={args.threads or 'default'} {v:9s} unpruned {c.stats[v + '-unpruned'].p50_ms:8.1f} ms "
                f"pruned {c.stats[v + '-pruned'].p50_ms:8.1f} ms speedup {s:.3f} ({q25:.2f}-{q75:.2f}) "
                f"efficiency {s / bound:.3f} unpruned vs {names[0]} {rel:.3f}x"
            )
    print("load after", os.getloadavg())
    for runner in runners.values():
        runner.deactivate()


if __name__ == "__main__":
    main()
