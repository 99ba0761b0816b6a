"""Configuration: structured schemas for `conf/`, loading, validation and path resolution.

`conf/` (Hydra) is the one source of truth and `params.yaml` is it composed. DVC composes `conf/`
in its own process without importing this package, so the schemas are not named in any defaults
list: `validate()` merges a loaded config into them instead, which works the same for
`params.yaml` and for in-process `hydra.compose` (tests, sweeps).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stages.errors import ConfigError, InputError, StageError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"

log = logging.getLogger("stages")


# --- schemas -----------------------------------------------------------------------------------


@dataclass
class PathsConf:
    root: str = "."
    cache: str = "data/cache"
    raw: str = "data/raw"
    prepared: str = "data/prepared"
    models: str = "models"
    checkpoint: str = "model.pt"
    plots: str = "plots"
    artifacts: str = "artifacts"
    exported: str = "artifacts/exported"
    optimized: str = "artifacts/optimized"
    metrics: str = "metrics"
    reports: str = "reports"
    compare: str = "compare"


@dataclass
class SplitConf:
    mode: str = "resplit"
    ratios: dict[str, float] = field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1}
    )


@dataclass
class FetchConf:
    workers: int = 16
    retries: int = 5
    backoff: float = 0.5
    timeout: float = 30.0
    max_image_mb: float = 50.0


@dataclass
class DataConf:
    source: str = "openimages"
    folder: str = "photos"  # source=folder: DIR/<class>/<image>, relative to paths.root
    classes: list[str] = field(default_factory=list)  # source=folder: empty = every sub-folder
    max_images_per_class: int = 150
    seed: int = 0
    metadata_url: str = "https://storage.googleapis.com/openimages/"
    images_url: str = "https://open-images-dataset.s3.amazonaws.com/"
    splits: list[str] = field(default_factory=lambda: ["train", "validation", "test"])
    multiclass_policy: str = "drop"
    on_empty_class: str = "error"
    image_size: int = 256
    split: SplitConf = field(default_factory=SplitConf)
    fetch: FetchConf = field(default_factory=FetchConf)
    prepare_workers: int = 2


@dataclass
class ModelConf:
    name: str = MISSING
    weights: str = "DEFAULT"
    input_size: int = 224
    crop_pct: float = 0.875
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class TrainConf:
    mode: str = "lp_ft"
    unfreeze_blocks: int = 2
    probe_epochs: int = 5
    probe_lr: float = 0.01
    epochs: int = 15
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 1e-3
    backbone_lr_scale: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    device: str = "auto"
    num_workers: int = 2
    seed: int = 0
    deterministic: bool = False
    patience: int = 5
    system_metrics: bool = True
    log_model: bool = True


@dataclass
class ExportConf:
    formats: list[str] = field(default_factory=lambda: ["torchscript", "exported_program", "onnx"])
    onnx_opset: int = 18
    verify_batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    rtol: float = 1e-4
    max_batch: int = 256


@dataclass
class TrtConf:
    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 128
    min_block_size: int = 1
    fp32_accumulation: bool = False
    also_torchscript: bool = False


@dataclass
class OptimizeConf:
    variants: list[str] = field(default_factory=list)
    calibration_images: int = 128
    calibration_batch: int = 16
    eval_batch: int = 32
    eval_splits: list[str] = field(default_factory=lambda: ["val", "test"])
    accuracy_bars: dict[str, float] = field(
        default_factory=lambda: {"fp32": 0.5, "fp16": 0.5, "bf16": 0.5, "int8": 1.5})
    trt: TrtConf = field(default_factory=TrtConf)


@dataclass
class ProtocolConf:
    """How one variant is timed at one batch size."""
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    warmup_iters: int = 3
    warmup_seconds: float = 2.0
    min_iters: int = 10
    min_seconds: float = 3.0
    trials: int = 3
    variants: list[str] | None = None  # None: every variant of optimize.variants


@dataclass
class ThroughputModeConf:
    batch_sizes: list[int] = field(default_factory=lambda: [32])
    streams: int = 0


@dataclass
class BenchmarkConf:
    protocol: str = "default"
    protocols: dict[str, ProtocolConf] = field(default_factory=lambda: {"default": ProtocolConf()})
    threads: int = 0
    device: str = "auto"
    input_batches: int = 4
    min_agreement: float = 0.9
    reference_batch: int = 32
    worker_timeout: float = 3600.0
    throughput_mode: ThroughputModeConf = field(default_factory=ThroughputModeConf)


@dataclass
class ProfileConf:
    modes: list[str] = field(default_factory=lambda: ["eager", "inductor"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    warmup: int = 5
    iterations: int = 20
    threads: int = 0


@dataclass
class TrackingConf:
    enabled: bool = True
    uri: str | None = None
    experiment: str = "oi-pipeline"
    run_name: str | None = None
    # Set on the pipeline's parent run when a stage starts or resumes it (e.g. a sweep's
    # `++tracking.tags.sweep_name=...`, `sweep_job`, `sweep_overrides`; `+`/`++` as keys are new).
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class PipelineConf:
    paths: PathsConf = field(default_factory=PathsConf)
    data: DataConf = field(default_factory=DataConf)
    model: ModelConf = field(default_factory=ModelConf)
    train: TrainConf = field(default_factory=TrainConf)
    export: ExportConf = field(default_factory=ExportConf)
    optimize: OptimizeConf = field(default_factory=OptimizeConf)
    benchmark: BenchmarkConf = field(default_factory=BenchmarkConf)
    profile: ProfileConf = field(default_factory=ProfileConf)
    tracking: TrackingConf = field(default_factory=TrackingConf)


# Choices checked after the type check: one registry each, so the error can list them.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("openimages", "folder"),  # stages.download.SOURCES (tests keep them equal)
    "data.multiclass_policy": ("drop", "first"),
    "data.on_empty_class": ("error", "skip"),
    "data.split.mode": ("resplit", "official"),
    "train.mode": ("linear_probe", "full", "partial", "lp_ft"),
    "train.optimizer": ("adamw", "sgd"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "benchmark.device": ("auto", "cpu", "cuda"),
}
OFFICIAL_SPLITS = ("train", "validation", "test")


# --- loading and validation --------------------------------------------------------------------


def validate(cfg: DictConfig | dict) -> DictConfig:
    """Merge `cfg` into the schema: unknown keys, wrong types and missing values fail here.

    Returns a new, resolved, read-only config; the input is not modified.
    """
    schema = OmegaConf.structured(PipelineConf)
    try:
        merged = OmegaConf.merge(schema, cfg)
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = (getattr(e, "msg", None) or str(e)).splitlines()[0]
        raise ConfigError(f"invalid config at key {key!r}: {msg}") from e
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"config is missing required value(s): {', '.join(missing)}")
    for key, valid in CHOICES.items():
        value = OmegaConf.select(merged, key)
        if value not in valid:
            raise ConfigError(
                f"invalid value {value!r} for {key!r}; expected one of {sorted(valid)}")
    _check_paths(merged.paths)
    _check_data(merged.data)
    _check_train(merged.train, merged.model)
    _check_export(merged.export)
    _check_optimize(merged.optimize, merged.export)
    _check_benchmark(merged.benchmark)
    _check_profile(merged.profile)
    OmegaConf.set_readonly(merged, True)
    return merged


def _check_paths(paths: DictConfig) -> None:
    # dvc.yaml declares `paths.models` as train's output: the checkpoint is a file inside it.
    if not paths.checkpoint or Path(paths.checkpoint).name != paths.checkpoint:
        raise ConfigError(f"paths.checkpoint {paths.checkpoint!r} must be a file name (it lies "
                          "inside paths.models, train's DVC output)")


def _check_data(data: DictConfig) -> None:
    if data.source == "openimages" and not data.classes:
        raise ConfigError("data.classes is empty: name at least one Open Images class (or set "
                          "data.source=folder to read class-per-folder photos)")
    if data.source == "folder":
        if not data.folder:
            raise ConfigError("data.folder is empty: name the photo folder (DIR/<class>/<image>)")
        if data.split.mode != "resplit":
            raise ConfigError(f"data.split.mode={data.split.mode} needs official splits, which a "
                              "photo folder has not: use data.split.mode=resplit")
    if data.max_images_per_class < 1:
        raise ConfigError("data.max_images_per_class must be >= 1")
    if data.image_size < 8:
        raise ConfigError("data.image_size must be >= 8 pixels")
    unknown = sorted(set(data.splits) - set(OFFICIAL_SPLITS))
    if unknown or not data.splits:
        raise ConfigError(f"data.splits {list(data.splits)}: expected a non-empty subset of "
                          f"{list(OFFICIAL_SPLITS)}")
    ratios = dict(data.split.ratios)
    if set(ratios) != {"train", "val", "test"} or any(r < 0 for r in ratios.values()):
        raise ConfigError(f"data.split.ratios {ratios}: expected non-negative train, val and test")
    if abs(sum(ratios.values()) - 1.0) > 1e-6 or ratios["train"] <= 0:
        raise ConfigError(f"data.split.ratios {ratios} must sum to 1 with train > 0")
    if data.fetch.workers < 1 or data.fetch.retries < 0 or data.fetch.timeout <= 0:
        raise ConfigError("data.fetch: workers >= 1, retries >= 0 and timeout > 0 are required")


def _check_train(train: DictConfig, model: DictConfig) -> None:
    if train.epochs < 1 or train.batch_size < 1:
        raise ConfigError("train.epochs and train.batch_size must be >= 1")
    if train.lr <= 0 or train.backbone_lr_scale < 0 or train.weight_decay < 0:
        raise ConfigError("train.lr must be > 0; train.backbone_lr_scale, weight_decay >= 0")
    if not 0 <= train.label_smoothing < 1 or not 0 <= train.min_lr_ratio <= 1:
        raise ConfigError("train.label_smoothing must be in [0, 1), train.min_lr_ratio in [0, 1]")
    if train.unfreeze_blocks < 1 or train.num_workers < 0 or train.patience < 0:
        raise ConfigError("train.unfreeze_blocks >= 1, num_workers >= 0 and patience >= 0")
    if train.probe_epochs < 0 or train.probe_lr <= 0:
        raise ConfigError("train.probe_epochs must be >= 0 and train.probe_lr > 0")
    if len(model.mean) != 3 or len(model.std) != 3 or any(s <= 0 for s in model.std):
        raise ConfigError("model.mean and model.std need 3 values each, std > 0")
    if model.input_size < 16 or not 0 < model.crop_pct <= 1:
        raise ConfigError("model.input_size must be >= 16 and model.crop_pct in (0, 1]")


EXPORT_FORMATS = ("torchscript", "exported_program", "onnx")


def _check_export(export: DictConfig) -> None:
    unknown = sorted(set(export.formats) - set(EXPORT_FORMATS))
    if unknown:
        raise ConfigError(f"unknown export format(s) {unknown}; expected any of "
                          f"{list(EXPORT_FORMATS)}")
    if export.onnx_opset < 17:
        raise ConfigError("export.onnx_opset must be >= 17")
    if not export.verify_batch_sizes or min(export.verify_batch_sizes) < 1:
        raise ConfigError("export.verify_batch_sizes needs batch sizes >= 1")
    if max(export.verify_batch_sizes) > export.max_batch:
        raise ConfigError("export.verify_batch_sizes must not exceed export.max_batch")


# The registry itself is stages.optimize.VARIANTS (tests keep the two equal); named here so that
# validating a config does not import the compilers.
OPTIMIZE_VARIANTS = ("cpu_bf16", "inductor_fp32", "inductor_bf16", "int8", "onnxruntime_fp32",
                     "onnxruntime_int8", "openvino_fp32", "openvino_bf16", "openvino_int8",
                     "cuda_fp16", "inductor_fp16_cuda", "trt_fp32", "trt_fp16")


def _check_optimize(opt: DictConfig, export: DictConfig) -> None:
    unknown = [v for v in opt.variants if v not in OPTIMIZE_VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown} in optimize.variants; expected any of "
                          f"{sorted(OPTIMIZE_VARIANTS)}")
    if opt.calibration_images < 1 or opt.calibration_batch < 1 or opt.eval_batch < 1:
        raise ConfigError("optimize.calibration_images, calibration_batch and eval_batch "
                          "must be >= 1")
    if max(opt.calibration_batch, opt.eval_batch) > export.max_batch:
        raise ConfigError("optimize.calibration_batch and optimize.eval_batch must not exceed "
                          f"export.max_batch ({export.max_batch}): the artifacts refuse larger "
                          "batches")
    if not opt.eval_splits or not set(opt.eval_splits) <= {"train", "val", "test"} \
            or len(set(opt.eval_splits)) != len(opt.eval_splits):
        raise ConfigError(f"optimize.eval_splits {list(opt.eval_splits)}: expected distinct "
                          "names among val, test (and train, which the model has seen)")
    bars = dict(opt.accuracy_bars)
    if set(bars) != {"fp32", "fp16", "bf16", "int8"} or min(bars.values()) < 0:
        raise ConfigError(f"optimize.accuracy_bars {bars}: expected fp32, fp16, bf16 and int8, "
                          "each >= 0 (top-1 points)")


def _check_benchmark(bench: DictConfig) -> None:
    if bench.protocol not in bench.protocols:
        raise ConfigError(f"unknown benchmark.protocol {bench.protocol!r}; expected one of "
                          f"{sorted(bench.protocols)}")
    p = bench.protocols[bench.protocol]
    if not p.batch_sizes or min(p.batch_sizes) < 1:
        raise ConfigError(f"benchmark.protocols.{bench.protocol}.batch_sizes needs sizes >= 1")
    if p.min_iters < 1 or p.trials < 1 or p.warmup_iters < 0:
        raise ConfigError(f"benchmark.protocols.{bench.protocol}: min_iters and trials >= 1, "
                          "warmup_iters >= 0")
    unknown = [v for v in (p.variants or []) if v not in OPTIMIZE_VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown} in benchmark.protocols."
                          f"{bench.protocol}.variants; expected any of {sorted(OPTIMIZE_VARIANTS)}")
    if bench.threads < 0 or bench.input_batches < 2 or not 0 <= bench.min_agreement <= 1:
        raise ConfigError("benchmark.threads >= 0, input_batches >= 2 (rotated, never one "
                          "batch) and min_agreement in [0, 1] are required")
    tm = bench.throughput_mode
    if tm.streams < 0 or any(b < 1 for b in tm.batch_sizes):
        raise ConfigError("benchmark.throughput_mode: streams >= 0 (0: one per thread) and batch "
                          "sizes >= 1 are required")


PROFILE_MODES = ("eager", "inductor")  # stages.profile.MODES (its tests keep them equal)


def _check_profile(prof: DictConfig) -> None:
    unknown = [m for m in prof.modes if m not in PROFILE_MODES]
    if unknown or not prof.modes:
        raise ConfigError(f"unknown profile.modes {unknown or '[]'}; expected some of "
                          f"{sorted(PROFILE_MODES)}")
    if not prof.batch_sizes or min(prof.batch_sizes) < 1 or prof.iterations < 1 \
            or prof.warmup < 0 or prof.threads < 0:
        raise ConfigError("profile.batch_sizes need sizes >= 1, profile.iterations >= 1, "
                          "profile.warmup >= 0 and profile.threads >= 0")


def compose(overrides: Sequence[str] = (), config_dir: Path = CONF_DIR) -> DictConfig:
    """Compose `conf/` in-process (tests, sweeps) and validate it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    return validate(cfg)


def load_params(path: Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a composed `params.yaml` (what DVC runs with) plus dotlist overrides, validated."""
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such params file; run from the project root or pass --params")
    try:
        cfg = OmegaConf.load(path)
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {e}") from e
    return validate(cfg)


def path(cfg: DictConfig, key: str) -> Path:
    """The absolute-or-root-relative location of `paths.<key>` (conf/paths is the only source).

    `paths.cache` alone is resolved against the project DVC runs from: a queued `dvc exp run`
    runs each experiment in a copy of the repository under `.dvc/tmp/exps/`, where a relative
    cache would be empty and the 1.1 GB of Open Images metadata fetched again per experiment.
    DVC sets `DVC_ROOT` to the original project's root for every stage it runs (in a temporary
    workspace as in the project), so queued experiments share its download and training caches.
    An absolute `paths.root` or `paths.cache` is kept as it is; `paths.checkpoint` is a file name
    inside `paths.models`.
    """
    root = Path(cfg.paths.root)
    if key == "root":
        return root
    if key == "cache":
        root = Path(os.environ.get("DVC_ROOT", "")) / root
    if key == "checkpoint":  # a file name inside `models`
        return path(cfg, "models") / cfg.paths.checkpoint
    return root / cfg.paths[key]


# --- entry points ------------------------------------------------------------------------------


def stage_main(name: str, run: Callable[[DictConfig], Any],
               argv: Sequence[str] | None = None) -> int:
    """The thin entry point every stage shares: parse, load `params.yaml`, run, map errors to exits.

    Exit codes: 0 ok, 2 bad config or input (the message says which and how to fix it), 1 other
    failures, 130 interrupted.
    """
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=run.__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="composed config (default: ./params.yaml, what DVC runs with)")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. data.seed=1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_params(args.params, args.overrides)
        run(cfg)
    except (ConfigError, InputError) as e:
        log.error("%s: %s", name, e)
        return 2
    except StageError as e:
        log.error("%s failed: %s", name, e)
        return 1
    except KeyboardInterrupt:
        log.error("%s: interrupted; completed work is kept, rerun to resume", name)
        return 130
    return 0



def main_for(name: str, run: Callable[[DictConfig], Any]) -> None:
    sys.exit(stage_main(name, run))


def write_params(output: Path = PROJECT_ROOT / "params.yaml", overrides: Sequence[str] = (),
                 config_dir: Path = CONF_DIR) -> None:
    """Compose `conf/` into `output` exactly as `dvc exp run` does (DVC's own function)."""
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(output, str(config_dir), None, "config", str(PROJECT_ROOT), list(overrides))
    validate(OmegaConf.load(output))


if __name__ == "__main__":
    # `python -m stages.config [overrides...]`: regenerate params.yaml after editing conf/.
    write_params(overrides=sys.argv[1:])
