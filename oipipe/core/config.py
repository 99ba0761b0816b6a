"""Configuration: the schema of `conf/`, loading, validation and path resolution.

`conf/` (Hydra) holds every value and `params.yaml` is it composed (`make params`). The schema
below holds none: it gives each key its type, range and allowed values, and the rules that tie
keys together. DVC composes `conf/` in its own process without importing this package, so the
schema is named in no defaults list: `validate()` checks whatever was composed or loaded against
it, the same for `params.yaml` and for in-process `hydra.compose` (tests, sweeps), and returns
the read-only OmegaConf config every stage reads (`cfg.train.epochs`, `cfg.paths[key]`).

Pydantic rather than OmegaConf's structured configs: a structured config needs a default (or
MISSING) per field and has no ranges, so ranges lived in hand-written checks; pydantic states
`ge=1`, `Literal[...]` and cross-key rules beside the field they concern, and its errors carry
the key and the offending value, which `_error_line` turns into one line.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import logging
import os
import sys
import tempfile
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from oipipe.core.errors import ConfigError, InputError, StageError
from oipipe.core.files import write_text
from oipipe.core.variants import OPTIMIZE_VARIANTS, VariantName  # noqa: F401 (importers' name)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_ROOT / "conf"

log = logging.getLogger("stages")


# --- schema: types, ranges and allowed values; every value lives in conf/ ----------------------


class Schema(BaseModel):
    # A number where a string is expected (`tracking.run_name=2024`) is taken as its text.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


def names(kind: Any, what: str) -> Any:
    """A list of names from a registry (a `Literal`); the error lists the unknown and the valid."""
    valid = get_args(kind)

    def known(values: Any) -> Any:
        if isinstance(values, list):
            unknown = [v for v in values if v not in valid]
            if unknown:
                raise ValueError(f"unknown {what}(s) {unknown}; expected any of {sorted(valid)}")
        return values

    return Annotated[list[kind], BeforeValidator(known)]


DataSource = Literal["openimages", "folder"]  # stages.download.SOURCES (a test keeps them equal)
OfficialSplit = Literal["train", "validation", "test"]
Split = Literal["train", "val", "test"]
Device = Literal["auto", "cpu", "cuda"]
ExportFormat = Literal["torchscript", "exported_program", "onnx"]
ProfileMode = Literal["eager", "inductor"]  # stages.profile.MODES (a test keeps them equal)
ZeroToOne = Annotated[float, Field(ge=0, le=1)]
BatchSizes = Annotated[list[PositiveInt], Field(min_length=1)]
ExportFormats = names(ExportFormat, "export format")
VariantNames = names(VariantName, "variant")
ProfileModes = names(ProfileMode, "profile mode")

OFFICIAL_SPLITS: tuple[str, ...] = get_args(OfficialSplit)
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
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
            raise ValueError(f"{name!r} must be a file name (it lies inside paths.models, "
                             "train's DVC output)")
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
    splits: Annotated[list[OfficialSplit], Field(min_length=1)]
    multiclass_policy: Literal["drop", "first"]
    on_empty_class: Literal["error", "skip"]
    image_size: Annotated[int, Field(ge=8)]
    split: SplitConf
    fetch: FetchConf
    prepare_workers: PositiveInt

    @model_validator(mode="after")
    def _source_needs(self) -> DataConf:
        if self.source == "openimages" and not self.classes:
            raise ValueError("data.classes is empty: name at least one Open Images class (or set "
                             "data.source=folder to read class-per-folder photos)")
        if self.source == "folder":
            if not self.folder:
                raise ValueError("data.folder is empty: name the photo folder "
                                 "(DIR/<class>/<image>)")
            if self.split.mode != "resplit":
                raise ValueError(f"data.split.mode={self.split.mode} needs official splits, which "
                                 "a photo folder has not: use data.split.mode=resplit")
        return self


class ModelConf(Schema):
    name: str
    weights: str
    input_size: Annotated[int, Field(ge=16)]
    crop_pct: Annotated[float, Field(gt=0, le=1)]
    mean: Annotated[list[float], Field(min_length=3, max_length=3)]
    std: Annotated[list[PositiveFloat], Field(min_length=3, max_length=3)]


class TrainConf(Schema):
    mode: Literal["linear_probe", "full", "partial", "lp_ft"]  # stages.train.RECIPES
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
    num_workers: NonNegativeInt
    seed: int
    deterministic: bool
    patience: NonNegativeInt
    system_metrics: bool
    log_model: bool


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
    """How much worse than fp32 (top-1 points) a variant of each precision may be."""
    fp32: NonNegativeFloat
    fp16: NonNegativeFloat
    bf16: NonNegativeFloat
    int8: NonNegativeFloat


class OptimizeConf(Schema):
    variants: VariantNames
    calibration_images: PositiveInt
    calibration_batch: PositiveInt
    eval_batch: PositiveInt
    eval_splits: Annotated[list[Split], Field(min_length=1)]
    accuracy_bars: AccuracyBars
    trt: TrtConf

    @field_validator("eval_splits")
    @classmethod
    def _distinct(cls, splits: list[str]) -> list[str]:
        if len(set(splits)) != len(splits):
            raise ValueError(f"{splits}: expected distinct names among val, test (and train, "
                             "which the model has seen)")
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
    streams: NonNegativeInt  # 0: one per thread


class BenchmarkConf(Schema):
    protocol: str
    protocols: dict[str, ProtocolConf]
    threads: NonNegativeInt
    device: Device
    input_batches: Annotated[int, Field(ge=2)]  # rotated through the timed calls, never one
    min_agreement: ZeroToOne
    reference_batch: PositiveInt
    worker_timeout: PositiveFloat
    throughput_mode: ThroughputModeConf

    @model_validator(mode="after")
    def _protocol_is_defined(self) -> BenchmarkConf:
        if self.protocol not in self.protocols:
            raise ValueError(f"unknown benchmark.protocol {self.protocol!r}; expected one of "
                             f"{sorted(self.protocols)}")
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

    @model_validator(mode="after")
    def _batches_fit_the_artifacts(self) -> PipelineConf:
        opt, max_batch = self.optimize, self.export.max_batch
        if max(opt.calibration_batch, opt.eval_batch) > max_batch:
            raise ValueError("optimize.calibration_batch and optimize.eval_batch must not exceed "
                             f"export.max_batch ({max_batch}): the artifacts refuse larger batches")
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


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _schema_at(loc: Sequence[Any]) -> Any:
    """The type at `loc` in the schema (dict keys and list indices pass through), or None."""
    t: Any = PipelineConf
    for part in loc:
        t = _unwrap(t)
        if _is_model(t):
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
        elif _is_model(inner):
            out.update(_choices(inner, f"{prefix}{name}."))
    return out


def _keys(t: Any = PipelineConf, prefix: str = "") -> list[str]:
    out = []
    for name, f in t.model_fields.items():
        out.append(prefix + name)
        if _is_model(_unwrap(f.annotation)):
            out += _keys(_unwrap(f.annotation), f"{prefix}{name}.")
    return out


CHOICES: dict[str, tuple[str, ...]] = _choices()  # e.g. CHOICES["train.mode"]
ALL_KEYS: list[str] = _keys()


# --- validation and its one-line errors --------------------------------------------------------


def _dotted(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def did_you_mean(loc: Sequence[Any]) -> str:
    """'; did you mean 'train.lr'?' for an unknown key (a sibling first, then any key)."""
    parent = _schema_at(loc[:-1])
    siblings = list(parent.model_fields) if _is_model(parent) else []
    match = difflib.get_close_matches(str(loc[-1]), siblings, n=1)
    if match:
        return f"; did you mean {_dotted([*loc[:-1], match[0]])!r}?"
    match = difflib.get_close_matches(_dotted(loc), ALL_KEYS, n=1)
    if match:
        return f"; did you mean {match[0]!r}?"
    return f"; valid keys here: {siblings}" if siblings else ""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _error_line(err: dict) -> str:
    loc, kind = err["loc"], err["type"]
    key = _dotted(loc)
    if kind == "extra_forbidden":
        return f"unknown key {key!r}{did_you_mean(loc)}"
    if kind == "literal_error":
        valid = get_args(_schema_at(loc))
        return f"invalid value {err['input']!r} for {key!r}; expected one of {sorted(valid)}"
    if kind in ("model_type", "dict_type"):
        return f"{key}: expected a mapping (key: value), got {_short(err['input'])}"
    if kind == "value_error":
        msg = str(err["ctx"]["error"])
        return msg if key in msg else f"{key}: {msg}"
    return f"{key}: {err['msg']} (got {_short(err['input'])})"


def _one_line(e: ValidationError) -> str:
    errors = e.errors(include_url=False)
    missing = [_dotted(x["loc"]) for x in errors if x["type"] == "missing"]
    others = sorted((x for x in errors if x["type"] != "missing"),
                    key=lambda x: x["type"] != "extra_forbidden")  # a typo explains a missing key
    if others:
        first = _error_line(others[0])
        more = len(others) - 1 + len(missing)
        return first + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")
    return (f"config is missing required value(s): {', '.join(missing)}; conf/ sets every value "
            "(after editing conf/, run `make params`)")


def validate(cfg: DictConfig | dict) -> DictConfig:
    """Check `cfg` against the schema: unknown keys, wrong types, values out of range or not
    allowed, and missing values fail here, as one line naming the key.

    Returns a new, resolved, read-only config; the input is not modified.
    """
    try:
        raw = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = (getattr(e, "msg", None) or str(e) or type(e).__name__).splitlines()[0]
        raise ConfigError(f"invalid config at key {key!r}: {msg}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping of config groups "
                          f"({', '.join(PipelineConf.model_fields)}), got a {type(raw).__name__}")
    try:
        checked = PipelineConf.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from e
    out = OmegaConf.create(checked.model_dump())
    OmegaConf.set_struct(out, True)
    OmegaConf.set_readonly(out, True)
    return out


# --- loading -----------------------------------------------------------------------------------


def _yaml_problem(e: yaml.YAMLError, text: str) -> tuple[int, int, str]:
    """(line, column, what is wrong) of a YAML error, 1-based."""
    if isinstance(e, yaml.MarkedYAMLError) and (e.problem_mark or e.context_mark):
        mark = e.problem_mark or e.context_mark
        line, column, what = mark.line + 1, mark.column + 1, e.problem or e.context
        if e.problem and e.context and e.context_mark:
            what += (f" ({e.context} at line {e.context_mark.line + 1}, "
                     f"column {e.context_mark.column + 1})")
    elif isinstance(e, yaml.reader.ReaderError):
        pos, char = e.position, e.character
        line, column = text.count("\n", 0, pos) + 1, pos - (text.rfind("\n", 0, pos) + 1) + 1
        char = chr(char) if isinstance(char, int) else char
        what = f"unacceptable character {char!r}: {e.reason} (is it a text file?)"
    else:
        line, column, what = 1, 1, str(e).splitlines()[0]
    if "'\\t'" in what:  # yaml quotes the tab it found as '\t'
        what += "; YAML indents with spaces, never tabs"
    return line, column, what


def _load_yaml(path: Path) -> DictConfig:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{path}, line {line}, column {column}: not UTF-8 text (byte "
                          f"{data[e.start]:#04x}): is it the params file?") from None
    try:
        cfg = OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as e:
        line, column, what = _yaml_problem(e, text)
        raise ConfigError(f"{path}, line {line}, column {column}: invalid YAML: {what}") from None
    if isinstance(cfg, ListConfig):
        raise ConfigError(f"{path}: expected a mapping of config groups (paths:, data:, ...), "
                          "found a list")
    return cfg


def _apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Dotlist overrides (`data.seed=1`, `data.classes=[Cat,Dog]`), each checked on its own so
    the error names it."""
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or key != key.strip():
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. data.seed=1)")
        try:
            update = OmegaConf.from_dotlist([item])
        except yaml.YAMLError as e:
            _, column, what = _yaml_problem(e, value)
            raise ConfigError(f"override {item!r}: invalid YAML value at column {column} of "
                              f"{value!r}: {what}") from None
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item!r}: {str(e).splitlines()[0]}") from None
        try:
            cfg = OmegaConf.merge(cfg, update)
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item!r} does not fit the config: "
                              f"{str(e).splitlines()[0]}") from None
    return cfg


def load_params(path: Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a composed `params.yaml` (what DVC runs with) plus dotlist overrides, validated."""
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such params file; run from the project root or pass --params")
    cfg = _apply_overrides(_load_yaml(path), overrides)
    try:
        return validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}{' with overrides' if overrides else ''}: {e}") from e


@contextlib.contextmanager
def _hydra_errors(overrides: Sequence[str]) -> Iterator[None]:
    """Hydra's multi-line composition errors as one line naming the override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, MissingConfigException

    parser = OverridesParser.create()
    for item in overrides:
        try:
            parser.parse_override(item)
        except HydraException as e:
            raise ConfigError(f"override {item!r} cannot be parsed: {str(e).splitlines()[0]} "
                              "(Hydra's grammar: key=value, lists as [a,b], quote special "
                              "characters)") from None
    try:
        yield
    except MissingConfigException as e:  # `model=resnet19`: no such file in a group
        group, _, option = (e.missing_cfg_file or "").rpartition("/")
        options = list(e.options or [])
        near = difflib.get_close_matches(option, options, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ConfigError(f"conf/{group} has no option {option!r}; {hint}expected one of "
                          f"{options}") from None
    except HydraException as e:
        key = getattr(e.__cause__, "full_key", None)
        if key:  # `train.lrr=0.1`: a key conf/ does not have
            raise ConfigError(f"unknown key {key!r}{did_you_mean(key.split('.'))}") from None
        raise ConfigError(str(e).splitlines()[0]) from None
    except yaml.YAMLError as e:  # a file in conf/ that is not valid YAML
        line, column, what = _yaml_problem(e, "")
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        source = getattr(mark, "name", None) or "conf/"
        raise ConfigError(f"{source}, line {line}, column {column}: invalid YAML: {what}") from None


def compose(overrides: Sequence[str] = (), config_dir: Path = CONF_DIR) -> DictConfig:
    """Compose `conf/` in-process (tests, sweeps) and validate it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with _hydra_errors(overrides), initialize_config_dir(config_dir=str(config_dir),
                                                         version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
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


def stage_parser(name: str, description: str | None = None) -> argparse.ArgumentParser:
    """The options every stage takes; a stage with its own adds them to this parser."""
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{name}", description=description,
        epilog="Exit codes: 0 ok, 2 bad config or input, 1 the stage failed, 130 interrupted.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="composed config (default: ./params.yaml, what DVC runs with)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides of params.yaml, e.g. data.seed=1 'data.classes=[Cat,Dog]'")
    return parser


def stage_main(name: str, run: Callable[[DictConfig], Any],
               argv: Sequence[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """The thin entry point every stage shares: parse, load `params.yaml`, run, map errors to exits.

    `args`: already parsed by a stage with options of its own (`stage_parser` plus them).
    Exit codes: 0 ok, 2 bad config or input (the message says which and how to fix it), 1 other
    failures, 130 interrupted.
    """
    if args is None:
        doc = (run.__doc__ or "").strip().split("\n\n")[0] or None
        args = stage_parser(name, doc).parse_intermixed_args(argv)
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
    """Compose `conf/` into `output` exactly as `dvc exp run` does (DVC's own function), and
    write it only when it validates: a bad override leaves the previous file as it was."""
    from dvc.utils.hydra import compose_and_dump

    with tempfile.TemporaryDirectory(prefix="params-") as tmp:
        composed = Path(tmp) / "params.yaml"
        with _hydra_errors(overrides):
            compose_and_dump(composed, str(config_dir), None, "config", str(PROJECT_ROOT),
                             list(overrides))
        text = composed.read_text(encoding="utf-8")
    validate(OmegaConf.create(text))
    write_text(output, text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m oipipe.core.config",
        description="Compose conf/ into params.yaml (what DVC runs the stages with) and validate "
                    "it. The file is written only when the composition is valid. `make params` "
                    "runs this after conf/ was edited; tests fail while the two differ.",
        epilog="Overrides use Hydra's grammar, as `dvc exp run -S` does: train.epochs=5, "
               "model=resnet18, data=animals7, 'data.classes=[Cat,Dog]', "
               "'++tracking.tags.note=x' (a new key). Exit codes: 0 written, 2 invalid.")
    parser.add_argument("-o", "--output", type=Path, default=PROJECT_ROOT / "params.yaml",
                        help="where to write (default: the project's params.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                        help="Hydra overrides applied to conf/ before writing")
    args = parser.parse_args(argv)
    try:
        write_params(args.output, args.overrides)
    except ConfigError as e:
        print(f"oipipe.core.config: {args.output} not written: {e}", file=sys.stderr)
        return 2
    print(f"oipipe.core.config: wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
