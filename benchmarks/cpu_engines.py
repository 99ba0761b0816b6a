"""The pipeline's CPU variants beside what a CPU user would run instead, on the same files.

    python benchmarks/cpu_engines.py --params <job>/job_config.yaml
                                     [--batches 1 32] [--seconds 3] [--trials 3]
                                     [--out benchmarks/results/cpu_engines.json]

`--params` is a pipeline run's config (a sweep job's `job_config.yaml`, or `params.yaml` of a
reproduced project) whose `paths` hold the trained model, its exported ONNX file and prepared
images. Every CPU variant is built there first when missing (`optimize.run`), then every
row is timed in this one process, one after another, on the same real held-out images:

- the pipeline's variants as the benchmark loads them (`runtime.load_variant`): one call at a time;
- plain ONNX Runtime on the exported fp32 ONNX and on the pipeline's int8 QDQ ONNX, default
  session options (what `ort.InferenceSession(file)` gives);
- plain OpenVINO on the same two ONNX files, `core.compile_model(file, "CPU")` with no property
  (its defaults: LATENCY, and bf16 inference wherever the CPU has AVX512-BF16 or AMX);
- throughput modes, several requests in flight, which a one-call loop cannot show: OpenVINO's
  THROUGHPUT hint with an `AsyncInferQueue` of its optimal size (on the fp32 ONNX, the int8 QDQ
  ONNX and the pipeline's `openvino_int8` IR), and ONNX Runtime as one single-threaded session
  per core, each fed by its own thread.

Throughput is images per second over at least `--seconds` of calls after warm-up, the median of
`--trials`. Writes every row with its engine, file, mode and what OpenVINO compiled (precision,
streams, requests), the fastest row per batch size, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from oipipe.core.config import load_params, path  # noqa: E402
from oipipe.core.files import write_json  # noqa: E402
from oipipe.core.variants import FORMATS, VARIANTS  # noqa: E402
from oipipe.deploy.runtime import load_variant  # noqa: E402
from oipipe.measure import evaluation, machine  # noqa: E402
from stages import optimize  # noqa: E402

# Every variant that runs on a CPU, built where missing.
CPU_VARIANTS = (
    "eager_bf16",
    "inductor_fp32",
    "inductor_bf16",
    "inductor_int8",
    "onnxruntime_fp32",
    "onnxruntime_int8",
    "openvino_fp32",
    "openvino_bf16",
    "openvino_int8",
)


def timed(run_batch: Callable[[], int], seconds: float, trials: int) -> float:
    """Images/s: the median of `trials` runs of at least `seconds` each, after warm-up."""
    for _ in range(3):
        run_batch()
    results = []
    for _ in range(trials):
        images, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            images += run_batch()
        results.append(images / elapsed)
    return statistics.median(results)


def ov_props(compiled) -> dict:
    import openvino.properties as props
    import openvino.properties.hint as hints

    return {
        "precision": compiled.get_property(hints.inference_precision).to_string(),
        "hint": str(compiled.get_property(hints.performance_mode)),
        "streams": int(compiled.get_property(props.num_streams)),
        "requests": int(compiled.get_property(props.optimal_number_of_infer_requests)),
    }


def ov_sync(file: Path, x: np.ndarray) -> tuple[Callable[[], int], dict]:
    import openvino as ov

    compiled = ov.Core().compile_model(str(file), "CPU")
    request = compiled.create_infer_request()
    return lambda: (request.infer({0: x}), len(x))[1], ov_props(compiled)


def ov_async(file: Path, x: np.ndarray) -> tuple[Callable[[], int], dict]:
    """THROUGHPUT hint, all optimal requests in flight; one 'batch' = one round of them."""
    import openvino as ov
    import openvino.properties.hint as hints

    compiled = ov.Core().compile_model(
        str(file), "CPU", {hints.performance_mode: hints.PerformanceMode.THROUGHPUT}
    )
    info = ov_props(compiled)
    queue = ov.AsyncInferQueue(compiled, info["requests"])

    def run() -> int:
        for _ in range(info["requests"]):
            queue.start_async({0: x})
        queue.wait_all()
        return len(x) * info["requests"]

    return run, info


def ort_sync(file: Path, x: np.ndarray) -> tuple[Callable[[], int], dict]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda: (session.run(None, {name: x}), len(x))[1], {}


def ort_per_core(file: Path, x: np.ndarray) -> tuple[Callable[[], int], dict]:
    """One single-threaded session per core, each run from its own thread (ORT releases the GIL)."""
    import onnxruntime as ort

    cores = os.cpu_count() or 1
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sessions = [
        ort.InferenceSession(str(file), so, providers=["CPUExecutionProvider"])
        for _ in range(cores)
    ]
    name = sessions[0].get_inputs()[0].name

    def run() -> int:
        threads = [threading.Thread(target=s.run, args=(None, {name: x})) for s in sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return len(x) * cores

    return run, {"sessions": cores}


def pipeline_case(folder: Path, x: torch.Tensor) -> tuple[Callable[[], int], dict]:
    """The variant as the benchmark runs it: inputs prepared once, `call` timed (with `sync`)."""
    rt, _, rec = load_variant(folder)
    prepared = rt.prepare(x)

    def run() -> int:
        rt.call(prepared)
        rt.sync()
        return len(x)

    return run, {k: rec[k] for k in ("inference_precision", "streams") if k in rec}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=Path, required=True)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cpu_engines.json")
    args = ap.parse_args()
    load = os.getloadavg()
    cfg = load_params(args.params)
    if not Path(cfg.paths.root).is_absolute():  # a reproduced project's params.yaml: root "."
        os.chdir(args.params.resolve().parent)
    optimized = path(cfg, "optimized")
    for name in (v for v in CPU_VARIANTS if v in VARIANTS):
        if not (optimized / name / "record.json").is_file():
            print(f"building {name}", flush=True)
            optimize.run(cfg, name)
    onnx_fp32 = path(cfg, "exported") / FORMATS["onnx"].file
    onnx_int8 = optimized / "onnxruntime_int8" / "model.onnx"
    variants = sorted(
        p.name
        for p in optimized.iterdir()
        if (p / "record.json").is_file()
        if json.loads((p / "record.json").read_text())["status"] == "ok"
    )
    meta = json.loads((optimized / variants[0] / "meta.json").read_text())
    images, _ = evaluation.images(path(cfg, "prepared"), list(cfg.optimize.eval_splits), meta)
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for batch in args.batches:
        x = evaluation.fill(images, batch).contiguous()
        xn = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        cases: list[tuple[str, str, str, Callable[..., tuple[Callable[[], int], dict]], tuple]] = [
            (f"pipeline:{v}", "latency", v, pipeline_case, (optimized / v, x)) for v in variants
        ]
        for label, file in (("fp32 ONNX", onnx_fp32), ("int8 QDQ ONNX", onnx_int8)):
            if file.is_file():
                cases += [
                    (f"onnxruntime plain, {label}", "latency", str(file), ort_sync, (file, xn)),
                    (f"openvino plain, {label}", "latency", str(file), ov_sync, (file, xn)),
                    (
                        f"onnxruntime one session per core, {label}",
                        "throughput",
                        str(file),
                        ort_per_core,
                        (file, xn),
                    ),
                    (
                        f"openvino THROUGHPUT + AsyncInferQueue, {label}",
                        "throughput",
                        str(file),
                        ov_async,
                        (file, xn),
                    ),
                ]
        ir = optimized / "openvino_int8" / "model.xml"
        if ir.is_file():
            cases.append(
                (
                    "openvino THROUGHPUT + AsyncInferQueue, pipeline openvino_int8 IR",
                    "throughput",
                    str(ir),
                    ov_async,
                    (ir, xn),
                )
            )
        for engine, mode, file, make, make_args in cases:
            run, info = make(*make_args)
            ips = timed(run, args.seconds, args.trials)
            rows.append(
                {
                    "batch": batch,
                    "engine": engine,
                    "mode": mode,
                    "file": file,
                    "images_per_s": round(ips, 1),
                    **info,
                }
            )
            print(f"b{batch:<3} {ips:8.1f} img/s  {mode:10s} {engine} {info or ''}", flush=True)
    best = {
        str(b): max((r for r in rows if r["batch"] == b), key=lambda r: r["images_per_s"])
        for b in args.batches
    }
    out = {
        "what": __doc__.split("\n\n")[0],
        "params": str(args.params),
        "model": cfg.model.name,
        "images": int(len(images)),
        "seconds": args.seconds,
        "trials": args.trials,
        "load_average_before": load,
        "machine": machine.machine_info(),
        "rows": rows,
        "fastest": best,
    }
    write_json(args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
