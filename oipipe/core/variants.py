"""The names of the optimized variants: the one list that config validation, the runtime (how
each loads, `runtime.VARIANTS`) and the optimize stage (how each is built, `optimize.BUILDERS`)
read. Torch-free, so that validating a config does not import the compilers.

Adding a variant: its name here, its loader in `runtime.VARIANTS` and its build function in
`optimize.BUILDERS` (both refuse to import when they do not cover exactly these names). The
variants a pipeline builds are a setting, `optimize.variants` in conf/optimize: DVC makes one
`optimize@<name>` stage per name listed there (dvc.yaml's `foreach`), and validation checks that
each is a name of this list.
"""

from __future__ import annotations

from typing import Literal, get_args

VariantName = Literal[
    "cpu_bf16", "inductor_fp32", "inductor_bf16", "int8",
    "onnxruntime_fp32", "onnxruntime_int8",
    "openvino_fp32", "openvino_bf16", "openvino_int8",
    "cuda_fp16", "inductor_fp16_cuda", "trt_fp32", "trt_fp16",
]
OPTIMIZE_VARIANTS: tuple[str, ...] = get_args(VariantName)
