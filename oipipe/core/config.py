"""Configuration: loading, validation with one-line messages, and path resolution.

`conf/` (Hydra) holds every value and `params.yaml` is it composed (`make params`); the schema
(`oipipe.core.schema`) holds none. DVC composes `conf/` in its own process without importing this
package, so the schema is named in no defaults list: `validate()` checks whatever was composed or
loaded against it, the same for `params.yaml` and for in-process `hydra.compose` (tests, sweeps),
and returns the read-only OmegaConf config every stage reads (`cfg.train.epochs`, `cfg.paths[key]`).
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast, get_args

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from oipipe.core.errors import ConfigError
from oipipe.core.files import write_text
from oipipe.core.schema import ALL_KEYS, CHOICES, PipelineConf, is_model, schema_at

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_ROOT / "conf"
__all__ = [
    "ALL_KEYS",
    "CHOICES",
    "CONF_DIR",
    "PROJECT_ROOT",
    "compose",
    "load_params",
    "path",
    "validate",
    "write_params",
]


# --- validation and its one-line errors --------------------------------------------------------


def _dotted(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def did_you_mean(loc: Sequence[Any]) -> str:
    """'; did you mean 'train.lr'?' for an unknown key (a sibling first, then any key)."""
    parent = schema_at(loc[:-1])
    siblings = list(parent.model_fields) if is_model(parent) else []
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


def _error_line(err: ErrorDetails) -> str:
    loc, kind = err["loc"], err["type"]
    key = _dotted(loc)
    if kind == "extra_forbidden":
        return f"unknown key {key!r}{did_you_mean(loc)}"
    if kind == "literal_error":
        valid = get_args(schema_at(loc))
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
    others = sorted(
        (x for x in errors if x["type"] != "missing"), key=lambda x: x["type"] != "extra_forbidden"
    )  # a typo explains a missing key
    if others:
        first = _error_line(others[0])
        more = len(others) - 1 + len(missing)
        return first + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")
    return (
        f"config is missing required value(s): {', '.join(missing)}; conf/ sets every value "
        "(after editing conf/, run `make params`)"
    )


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
        raise ConfigError(
            f"expected a mapping of config groups "
            f"({', '.join(PipelineConf.model_fields)}), got a {type(raw).__name__}"
        )
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
            what += (
                f" ({e.context} at line {e.context_mark.line + 1}, "
                f"column {e.context_mark.column + 1})"
            )
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
        raise ConfigError(
            f"{path}, line {line}, column {column}: not UTF-8 text (byte "
            f"{data[e.start]:#04x}): is it the params file?"
        ) from None
    try:
        cfg = OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as e:
        line, column, what = _yaml_problem(e, text)
        raise ConfigError(f"{path}, line {line}, column {column}: invalid YAML: {what}") from None
    if isinstance(cfg, ListConfig):
        raise ConfigError(
            f"{path}: expected a mapping of config groups (paths:, data:, ...), found a list"
        )
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
            raise ConfigError(
                f"override {item!r}: invalid YAML value at column {column} of {value!r}: {what}"
            ) from None
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item!r}: {str(e).splitlines()[0]}") from None
        try:
            cfg = cast(DictConfig, OmegaConf.merge(cfg, update))  # merging dicts gives a dict
        except OmegaConfBaseException as e:
            raise ConfigError(
                f"override {item!r} does not fit the config: {str(e).splitlines()[0]}"
            ) from None
    return cfg


def load_params(path: Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a composed `params.yaml` (what DVC runs with) plus dotlist overrides, validated."""
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such params file; run from the project root or pass --params"
        )
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
            raise ConfigError(
                f"override {item!r} cannot be parsed: {str(e).splitlines()[0]} "
                "(Hydra's grammar: key=value, lists as [a,b], quote special "
                "characters)"
            ) from None
    try:
        yield
    except MissingConfigException as e:  # `model=resnet19`: no such file in a group
        group, _, option = (e.missing_cfg_file or "").rpartition("/")
        options = list(e.options or [])
        near = difflib.get_close_matches(option, options, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ConfigError(
            f"conf/{group} has no option {option!r}; {hint}expected one of {options}"
        ) from None
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

    with (
        _hydra_errors(overrides),
        initialize_config_dir(config_dir=str(config_dir), version_base=None),
    ):
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


def write_params(
    output: Path = PROJECT_ROOT / "params.yaml",
    overrides: Sequence[str] = (),
    config_dir: Path = CONF_DIR,
) -> None:
    """Compose `conf/` into `output` exactly as `dvc exp run` does (DVC's own function), and
    write it only when it validates: a bad override leaves the previous file as it was."""
    from dvc.utils.hydra import compose_and_dump

    with tempfile.TemporaryDirectory(prefix="params-") as tmp:
        composed = Path(tmp) / "params.yaml"
        with _hydra_errors(overrides):
            compose_and_dump(
                composed, str(config_dir), None, "config", str(PROJECT_ROOT), list(overrides)
            )
        text = composed.read_text(encoding="utf-8")
    validate(cast(DictConfig, OmegaConf.create(text)))  # a YAML mapping
    write_text(output, text)
