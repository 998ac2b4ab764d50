"""colln's OpenVINO int8 against the peer a CPU user gets without colln: NNCF's untuned default
post-training quantization (transformer model type, no ignored scope, default ranges), on the
unpruned model and on colln's pruned graph. One interleaved run per batch size:

- ``ort:unpruned-fp32``: the common baseline (colln's ONNX Runtime artifact, model.ort.onnx);
- ``ov:unpruned-int8-nncf``: NNCF's default on the unpruned model (the issue's "OpenVINO unpruned int8");
- ``ov:unpruned-int8-colln``: the same with colln's float scope (the stack's unpruned int8);
- ``ov:pruned-int8-nncf``: NNCF's default on colln's pruned graph (quantizes the token selection);
- ``ov:pruned-int8-colln``: the export's own IR (selection float; what colln ships), at fp32;
- ``ov:pruned-int8-colln-default-hint``: the same IR at OpenVINO's default precision hint.

The NNCF IRs run with OpenVINO's defaults (no precision hint), as a user who sets nothing gets them.

"pruned-int8-colln / pruned-int8-nncf" is what keeping the selection float costs; "pruned-int8-colln
over unpruned-int8-nncf" is the speedup over OpenVINO's own best unpruned path. Every IR is
calibrated on the same images. Run benchmarks/openvino_stack.sh first (it builds the export and
the cached counterparts this reads):

    PYTHONPATH=. python benchmarks/openvino_peer.py EXPORT [--batch 1,8] [--threads 0] [--rounds 10] [--json FILE]
As ``benchmarks/run_all.sh openvino`` runs it, for m in deit_small vit_base and t in 0 1:
    PYTHONPATH=. python benchmarks/openvino_peer.py /tmp/colln-bench/$m-colln-keep0.7-int8-openvino --threads $t \\
        --json benchmarks/results/openvino-peer-$m-t$t.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np

from colln.app.cli import parse_ints
from colln.data import data_config, validation_images
from colln.export.artifact import read_export
from colln.export.openvino import CALIBRATION_BATCH, convert, nncf_module, ov_module, selection_crossings, used_precision
from colln.export.spec import ONNX_FILE
from colln.export.unpruned import cached_export, default_cache, unpruned_export
from colln.infer.runners import open_runner
from colln.infer.timing import Timing, measure, paired_speedup


class CompiledModel:
    """Times an OpenVINO model compiled with ``hint`` as its INFERENCE_PRECISION_HINT (None: OpenVINO's
    default, what a user who sets nothing gets: bf16 for what is not int8 on CPUs with bf16)."""

    def __init__(self, model, threads: int | None, hint: str | None = None) -> None:
        config = {"INFERENCE_PRECISION_HINT": hint} if hint else {}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov_module().Core().compile_model(model, "CPU", config)
        self._request = self.compiled.create_infer_request()
        self.inference_time = None

    def infer(self, feed: dict[str, np.ndarray]) -> OrderedDict:
        x = np.ascontiguousarray(next(iter(feed.values())), dtype=np.float32)
        start = time.perf_counter()
        results = self._request.infer({0: x})
        self.inference_time = time.perf_counter() - start
        return OrderedDict(enumerate(results.values()))


def nncf_default(onnx_path: Path, images: np.ndarray):
    """NNCF's untuned transformer PTQ of an fp32 ONNX graph."""
    nncf = nncf_module()
    samples = [images[i : i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH)]
    return nncf.quantize(
        convert(onnx_path), nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--threads", type=int, default=0, help="0: each runtime's default")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    spec = read_export(args.export)
    if spec.precision != "int8" or "openvino" not in spec.artifacts:
        parser.error("EXPORT must be an int8 export with its OpenVINO IR (colln-export --precision int8 --openvino)")
    cache = default_cache(args.export)
    unpruned = spec.load_unpruned()
    fp32 = replace(spec, precision="fp32", plan_record={})
    dirs = {
        "unpruned-fp32": unpruned_export(fp32, cache, unpruned),
        "pruned-fp32": cached_export(fp32, cache, unpruned),
        "unpruned-int8": unpruned_export(spec, cache, unpruned),
    }
    images = validation_images(spec.model, unpruned).images
    peers = {kind: nncf_default(dirs[f"{kind}-fp32"] / ONNX_FILE, images) for kind in ("unpruned", "pruned")}
    crossings = selection_crossings(peers["pruned"])
    threads = args.threads or None
    with contextlib.ExitStack() as stack:
        runners = {
            "ort:unpruned-fp32": stack.enter_context(open_runner(dirs["unpruned-fp32"], "onnxruntime", threads=threads)),
            "ov:unpruned-int8-nncf": CompiledModel(peers["unpruned"], threads),
            "ov:unpruned-int8-colln": stack.enter_context(open_runner(dirs["unpruned-int8"], "openvino", threads=threads)),
            "ov:pruned-int8-nncf": CompiledModel(peers["pruned"], threads),
            "ov:pruned-int8-colln": stack.enter_context(open_runner(args.export, "openvino", threads=threads)),
            # colln's IR with OpenVINO's default hint: what NNCF left float (the selection) runs at bf16.
            "ov:pruned-int8-colln-default-hint": CompiledModel(str(args.export / spec.artifacts["openvino"]["file"]), threads),
        }
        ran = {name: used_precision(r.compiled) for name, r in runners.items() if hasattr(r, "compiled")}
        batches = parse_ints(args.batch, "--batch")
        compared = measure(
            runners,
            tuple(data_config(unpruned)["input_size"]),
            batches,
            Timing(rounds=args.rounds, warmup=args.warmup),
            baseline="ort:unpruned-fp32",
        )
    print(
        f"{spec.model}, threads {args.threads or 'default'}, {args.rounds} interleaved rounds; "
        f"NNCF's default put FakeQuantize on the selection path at {len(crossings)} node(s); "
        f"what is not int8 ran at {ran}"
    )
    rows = {}
    for b, c in compared.items():
        rows[str(b)] = {
            "p50_ms": {name: c.stats[name].p50_ms for name in runners},
            "speedup_over_ort_fp32": {name: paired_speedup(c.times["ort:unpruned-fp32"], c.times[name])[0] for name in runners},
            "colln_over_nncf_unpruned": paired_speedup(c.times["ov:unpruned-int8-nncf"], c.times["ov:pruned-int8-colln"])[0],
            # > 1: colln's IR is slower than NNCF's default on the same pruned graph by this factor.
            "selection_float_cost": paired_speedup(c.times["ov:pruned-int8-nncf"], c.times["ov:pruned-int8-colln"])[0] ** -1,
        }
        print(f"\nbatch {b}\n| variant | p50 ms | speedup over ort:unpruned-fp32 |\n|---|---|---|")
        for name in runners:
            print(f"| {name} | {c.stats[name].p50_ms:.3g} | {rows[str(b)]['speedup_over_ort_fp32'][name]:.2f}x |")
        print(f"colln pruned int8 over NNCF's default unpruned int8: {rows[str(b)]['colln_over_nncf_unpruned']:.2f}x")
        print(
            f"keeping the selection float: colln's IR takes {rows[str(b)]['selection_float_cost']:.3f}x "
            "the time of NNCF's default on the same pruned graph"
        )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "model": spec.model,
                    "threads": args.threads,
                    "rounds": args.rounds,
                    "selection_crossings": crossings,
                    "float_parts_ran_at": ran,
                    "batches": rows,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
