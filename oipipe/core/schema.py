"""The schema of `conf/`: each key's type, range and allowed values, and the rules that tie keys
together. It holds no value: every value lives in `conf/` (`oipipe.core.config` validates a
composed config against this).

Pydantic rather than OmegaConf's structured configs: a structured config needs a default (or
MISSING) per field and has no ranges, so ranges lived in hand-written checks; pydantic states
`ge=1`, `Literal[...]` and cross-key rules beside the field they concern, and its errors carry
the key and the offending value, which `config` turns into one line.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from oipipe.core.variants import ExportFormatName, VariantName

# --- schema: types, ranges and allowed values; every value lives in conf/ ----------------------


class Schema(BaseModel):
    # A number where a string is expected (`tracking.run_name=2024`) is taken as its text.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


def known(kind: Any, what: str) -> BeforeValidator:
    """Checks a list of names against a registry (a `Literal`); the error lists the unknown and
    the valid names."""
    valid = get_args(kind)

    def check(values: Any) -> Any:
        if isinstance(values, list):
            unknown = [v for v in values if v not in valid]
            if unknown:
                raise ValueError(f"unknown {what}(s) {unknown}; expected any of {sorted(valid)}")
        return values

    return BeforeValidator(check)


DataSource = Literal["openimages", "folder"]  # stages.download.SOURCES (a test keeps them equal)
OfficialSplit = Literal["train", "validation", "test"]
Split = Literal["train", "val", "test"]
Device = Literal["auto", "cpu", "cuda"]
ProfileMode = Literal["eager", "inductor"]  # stages.profile.MODES (a test keeps them equal)
ZeroToOne = Annotated[float, Field(ge=0, le=1)]
BatchSizes = Annotated[list[PositiveInt], Field(min_length=1)]
ExportFormats = Annotated[list[ExportFormatName], known(ExportFormatName, "export format")]
VariantNames = Annotated[list[VariantName], known(VariantName, "variant")]
ProfileModes = Annotated[list[ProfileMode], known(ProfileMode, "profile mode")]

OFFICIAL_SPLITS: tuple[str, ...] = get_args(OfficialSplit)
PROFILE_MODES: tuple[str, ...] = get_args(ProfileMode)


class PathsConf(Schema):
    root: str
    cache: str
    raw: str
    prepared: str
    models: str
    checkpoint: str
    plots: str
    artifacts: str
    exported: str
    optimized: str
    metrics: str
    reports: str
    compare: str

    @field_validator("checkpoint")
    @classmethod
    def _a_file_name(cls, name: str) -> str:
        # dvc.yaml declares `paths.models` as train's output: the checkpoint is a file inside it.
        if not name or Path(name).name != name:
            raise ValueError(
                f"{name!r} must be a file name (it lies inside paths.models, train's DVC output)"
            )
        return name


class SplitRatios(Schema):
    train: NonNegativeFloat
    val: NonNegativeFloat
    test: NonNegativeFloat

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitRatios:
        if abs(self.train + self.val + self.test - 1.0) > 1e-6 or self.train <= 0:
            raise ValueError(f"{self.model_dump()} must sum to 1 with train > 0")
        return self


class SplitConf(Schema):
    mode: Literal["resplit", "official"]
    ratios: SplitRatios


class FetchConf(Schema):
    workers: PositiveInt
    retries: NonNegativeInt
    backoff: NonNegativeFloat
    timeout: PositiveFloat
    max_image_mb: PositiveFloat


class DataConf(Schema):
    source: DataSource
    folder: str
    classes: list[str]
    max_images_per_class: PositiveInt
    seed: int
    metadata_url: str
    images_url: str
    official_splits: Annotated[list[OfficialSplit], Field(min_length=1)]
    multiclass_policy: Literal["drop", "first"]
    on_empty_class: Literal["error", "skip"]
    image_size: Annotated[int, Field(ge=8)]
    split: SplitConf

    @model_validator(mode="after")
    def _source_needs(self) -> DataConf:
        if self.source == "openimages" and not self.classes:
            raise ValueError(
                "data.classes is empty: name at least one Open Images class (or set "
                "data.source=folder to read class-per-folder photos)"
            )
        if self.source == "folder":
            if not self.folder:
                raise ValueError(
                    "data.folder is empty: name the photo folder (DIR/<class>/<image>)"
                )
            if self.split.mode != "resplit":
                raise ValueError(
                    f"data.split.mode={self.split.mode} needs official splits, which "
                    "a photo folder has not: use data.split.mode=resplit"
                )
        return self


class ModelConf(Schema):
    name: str
    weights: str
    input_size: Annotated[int, Field(ge=16)]
    crop_pct: Annotated[float, Field(gt=0, le=1)]
    mean: Annotated[list[float], Field(min_length=3, max_length=3)]
    std: Annotated[list[PositiveFloat], Field(min_length=3, max_length=3)]


class TrainConf(Schema):
    recipe: Literal["linear_probe", "full", "partial", "lp_ft"]  # stages.train.RECIPES
    unfreeze_blocks: PositiveInt
    probe_epochs: NonNegativeInt
    probe_lr: PositiveFloat
    epochs: PositiveInt
    batch_size: PositiveInt
    optimizer: Literal["adamw", "sgd"]
    lr: PositiveFloat
    backbone_lr_scale: NonNegativeFloat
    momentum: NonNegativeFloat
    weight_decay: NonNegativeFloat
    warmup_epochs: NonNegativeInt
    min_lr_ratio: ZeroToOne
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]
    grad_clip: NonNegativeFloat
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    channels_last: bool
    compile: bool
    device: Device
    seed: int
    deterministic: bool
    patience: NonNegativeInt


class ExportConf(Schema):
    formats: ExportFormats
    onnx_opset: Annotated[int, Field(ge=17)]
    verify_batch_sizes: BatchSizes
    rtol: NonNegativeFloat
    max_batch: PositiveInt

    @model_validator(mode="after")
    def _within_max_batch(self) -> ExportConf:
        if max(self.verify_batch_sizes) > self.max_batch:
            raise ValueError("export.verify_batch_sizes must not exceed export.max_batch")
        return self


class TrtConf(Schema):
    min_batch: PositiveInt
    opt_batch: PositiveInt
    max_batch: PositiveInt
    min_block_size: PositiveInt
    fp32_accumulation: bool
    also_torchscript: bool


class AccuracyBars(Schema):
    """How much worse than fp32 a variant of each precision may be, in top-1 percentage points."""

    fp32: NonNegativeFloat
    fp16: NonNegativeFloat
    bf16: NonNegativeFloat
    int8: NonNegativeFloat


class InductorInt8Settings(Schema):
    """torchao's get_default_x86_inductor_quantization_config arguments (static, not QAT)."""

    reduce_range: bool


class OrtInt8Settings(Schema):
    """onnxruntime.quantization.quantize_static's quantization arguments."""

    quant_format: Literal["QDQ", "QOperator"]
    per_channel: bool
    activation_type: Literal["QUInt8", "QInt8"]
    weight_type: Literal["QInt8", "QUInt8"]


class OpenVinoInt8Settings(Schema):
    """nncf.quantize's arguments."""

    preset: Literal["performance", "mixed"]
    fast_bias_correction: bool


class AccuracyControlSettings(Schema):
    """NNCF's int8 with an accuracy budget (oipipe/deploy/build_openvino.py)."""

    max_drop_pct: NonNegativeFloat  # top-1 points below fp32 on the validation split
    max_iterations: PositiveInt  # operations put back to floating point, at most


class QatSettings(Schema):
    """The quantization-aware fine-tune (oipipe/deploy/build_qat.py)."""

    epochs: NonNegativeInt  # 0: the post-training model itself
    lr: PositiveFloat
    batch: PositiveInt
    seed: NonNegativeInt


class PrunedSettings(Schema):
    """Channel pruning and its fine-tune (oipipe/deploy/build_pruned.py)."""

    ratio: Annotated[float, Field(gt=0, lt=1)]  # of every prunable group's channels
    importance: Literal["l2", "l1"]
    round_to: PositiveInt
    epochs: NonNegativeInt  # 0: the pruned model without fine-tune
    lr: PositiveFloat
    batch: PositiveInt
    seed: NonNegativeInt


class VariantSettings(Schema):
    """A block per variant with quantizer or compiler settings (the TensorRT pair: `trt`)."""

    inductor_int8: InductorInt8Settings
    onnxruntime_int8: OrtInt8Settings
    openvino_int8: OpenVinoInt8Settings
    openvino_ac_int8: AccuracyControlSettings
    openvino_qat_int8: QatSettings
    pruned: PrunedSettings


class OptimizeConf(Schema):
    variants: VariantNames
    calibration_images: PositiveInt
    calibration_batch: PositiveInt
    eval_batch: PositiveInt
    eval_splits: Annotated[list[Split], Field(min_length=1)]
    accuracy_bars_pct: AccuracyBars
    allow_emulated: bool
    settings: VariantSettings
    trt: TrtConf

    @field_validator("eval_splits")
    @classmethod
    def _distinct(cls, splits: list[str]) -> list[str]:
        if len(set(splits)) != len(splits):
            raise ValueError(
                f"{splits}: expected distinct names among val, test (and train, "
                "which the model has seen)"
            )
        return splits


class ProtocolConf(Schema):
    """How one variant is timed at one batch size."""

    batch_sizes: BatchSizes
    warmup_iters: NonNegativeInt
    warmup_seconds: NonNegativeFloat
    min_iters: PositiveInt
    min_seconds: NonNegativeFloat
    trials: PositiveInt
    variants: VariantNames | None  # None: every variant of optimize.variants


class ThroughputModeConf(Schema):
    batch_sizes: list[PositiveInt]  # [] turns it off
    concurrency: NonNegativeInt  # requests in flight; 0: one per thread


class BenchmarkConf(Schema):
    protocol: str
    presets: dict[str, ProtocolConf]
    threads: NonNegativeInt
    device: Device
    input_batches: Annotated[int, Field(ge=2)]  # rotated through the timed calls, never one
    min_agreement_pct: Annotated[float, Field(ge=0, le=100)]
    reference_batch: PositiveInt
    worker_timeout: PositiveFloat
    tie_margin_pct: Annotated[float, Field(ge=0, le=100)]
    roofline: bool
    throughput_mode: ThroughputModeConf

    @model_validator(mode="after")
    def _protocol_is_defined(self) -> BenchmarkConf:
        if self.protocol not in self.presets:
            raise ValueError(
                f"unknown benchmark.protocol {self.protocol!r}; expected one of "
                f"{sorted(self.presets)}"
            )
        return self


class ProfileConf(Schema):
    modes: Annotated[ProfileModes, Field(min_length=1)]
    batch_sizes: BatchSizes
    warmup: NonNegativeInt
    iterations: PositiveInt
    threads: NonNegativeInt


class TrackingConf(Schema):
    enabled: bool
    uri: str | None
    experiment: str
    run_name: str | None
    tags: dict[str, str]


class RuntimeConf(Schema):
    """How the stages run, not what they produce: no DVC param, no part of a resume key."""

    fetch: FetchConf
    prepare_workers: PositiveInt
    train_workers: NonNegativeInt
    system_metrics: bool
    log_model: bool


class SweepConf(Schema):
    objective: Annotated[str, Field(pattern=r"^[a-z_]+\.[\w.]+$")]  # <stage>.<metrics key>


class PipelineConf(Schema):
    paths: PathsConf
    data: DataConf
    model: ModelConf
    train: TrainConf
    export: ExportConf
    optimize: OptimizeConf
    benchmark: BenchmarkConf
    profile: ProfileConf
    tracking: TrackingConf
    runtime: RuntimeConf
    sweep: SweepConf

    @model_validator(mode="after")
    def _batches_fit_the_artifacts(self) -> PipelineConf:
        opt, max_batch = self.optimize, self.export.max_batch
        if max(opt.calibration_batch, opt.eval_batch) > max_batch:
            raise ValueError(
                "optimize.calibration_batch and optimize.eval_batch must not exceed "
                f"export.max_batch ({max_batch}): the artifacts refuse larger batches"
            )
        return self


def _unwrap(t: Any) -> Any:
    """`Annotated[X, ...]` and `X | None` -> X."""
    while True:
        if get_origin(t) is Annotated:
            t = get_args(t)[0]
        elif get_origin(t) in (Union, types.UnionType):
            inner = [a for a in get_args(t) if a is not type(None)]
            if len(inner) != 1:
                return t
            t = inner[0]
        else:
            return t


def is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def schema_at(loc: Sequence[Any]) -> Any:
    """The type at `loc` in the schema (dict keys and list indices pass through), or None."""
    t: Any = PipelineConf
    for part in loc:
        t = _unwrap(t)
        if is_model(t):
            if part not in t.model_fields:
                return None
            t = t.model_fields[part].annotation
        elif get_origin(t) in (dict, list):
            t = get_args(t)[-1]
        else:
            return None
    return _unwrap(t)


def _choices(t: Any = PipelineConf, prefix: str = "") -> dict[str, tuple[str, ...]]:
    """Every single-choice key and its allowed values, read off the schema's `Literal`s."""
    out = {}
    for name, f in t.model_fields.items():
        inner = _unwrap(f.annotation)
        if get_origin(inner) is Literal:
            out[prefix + name] = get_args(inner)
        elif is_model(inner):
            out.update(_choices(inner, f"{prefix}{name}."))
    return out


def _keys(t: Any = PipelineConf, prefix: str = "") -> list[str]:
    out = []
    for name, f in t.model_fields.items():
        out.append(prefix + name)
        if is_model(_unwrap(f.annotation)):
            out += _keys(_unwrap(f.annotation), f"{prefix}{name}.")
    return out


CHOICES: dict[str, tuple[str, ...]] = _choices()  # e.g. CHOICES["train.recipe"]
ALL_KEYS: list[str] = _keys()
