"""Shared fixtures: the real conf/ composed and shrunk, a real Open Images mirror on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from oimirror import MirrorServer, generate
from oipipe.core.config import PROJECT_ROOT, compose, path
from stages import download, export, prepare, train

# Small, fast settings: tiny images, quick retries (the backoff sleeps add up across faults).
FAST = [
    "data.image_size=48",
    "runtime.fetch.backoff=0.01",
    "runtime.fetch.retries=3",
    "runtime.fetch.timeout=5",
    "runtime.fetch.workers=4",
    "tracking.enabled=false",
]


@pytest.fixture(scope="session")
def mirror_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated mirror (3 classes, 10 downloadable images each), shared read-only."""
    out = tmp_path_factory.mktemp("mirror")
    generate(out, images_per_class=10, seed=0)
    return out


@pytest.fixture
def manifest(mirror_dir: Path) -> dict:
    return json.loads((mirror_dir / "manifest.json").read_text())


@pytest.fixture
def mirror(mirror_dir: Path) -> Iterator[MirrorServer]:
    with MirrorServer(mirror_dir) as srv:
        yield srv


@pytest.fixture
def private_mirror(mirror_dir: Path, tmp_path: Path) -> Path:
    """A copy of the mirror that a test may edit."""
    dst = tmp_path / "mirror-copy"
    shutil.copytree(mirror_dir, dst)
    return dst


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_mlflow(db: Path, log: Path, *args: str) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 over the SQLite file `db` (plus `args`), its output in
    `log`; yields its URL once /health answers, stops it (and its workers) afterwards."""
    port = free_port()
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            *args,
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start:\n{log.read_text()}")
                time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def mirror_overrides(srv: MirrorServer) -> list[str]:
    return [
        "data=mirror",
        f"data.metadata_url={srv.metadata_url}",
        f"data.images_url={srv.images_url}",
    ]


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose the real conf/ with FAST settings and every output under tmp_path/out."""

    def make(*overrides: str, srv: MirrorServer | None = None) -> DictConfig:
        base = [f"paths.root={tmp_path / 'out'}", *FAST]
        if srv is not None:
            base += mirror_overrides(srv)
        return compose([*base, *overrides])

    return make


def on_trained(root: Path, prepared: Path, trained: Path, *overrides: str) -> list[str]:
    """Overrides for a run rooted at `root` on the session's prepared mirror and trained
    checkpoint, tracking off."""
    return [
        "data=mirror",
        f"paths.root={root}",
        f"paths.prepared={prepared}",
        f"paths.models={trained.parent}",
        "tracking.enabled=false",
        *overrides,
    ]


def write_params(cfg: DictConfig, path: Path) -> Path:
    path.write_text(OmegaConf.to_yaml(cfg))
    return path


def stage_cmd(stage: str, params: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", f"stages.{stage}", "--params", str(params), *overrides]


def git_dvc_init(dst: Path) -> None:
    """Make `dst` (a copy of the project) a git repository with DVC (Hydra composition on) and
    commit it: what `dvc repro` and `dvc exp run` need."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "test@localhost"],
        ["git", "config", "user.name", "test"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "hydra.enabled", "true"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "init"],
    ):
        subprocess.run(
            cmd, cwd=dst, capture_output=True, text=True, timeout=120, env=env, check=True
        )


def run_stage(
    stage: str, params: Path, *overrides: str, env: dict | None = None, cwd: Path = PROJECT_ROOT
) -> subprocess.CompletedProcess:
    """Run a stage's real entry point in a fresh process."""
    return subprocess.run(
        stage_cmd(stage, params, *overrides),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def logits_in_fresh_process(
    x: torch.Tensor, folder: Path, tmp: Path, body: str
) -> dict[str, np.ndarray]:
    """Run `body` in a new Python process, with `x` (this batch), `d` (`folder`) and an empty dict
    `out` in scope; returns what it put in `out` (name -> logits). Proves an artifact loads alone,
    with nothing of this process (imports, registrations, caches) behind it."""
    np.save(tmp / "x.npy", x.numpy())
    code = (
        "import sys, json, numpy as np, torch\nfrom pathlib import Path\n"
        "x = torch.from_numpy(np.load(sys.argv[1]))\nd = Path(sys.argv[2])\nout = {}\n"
        f"{body}\n"
        "print(json.dumps({k: np.asarray(v).tolist() for k, v in out.items()}))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp / "x.npy"), str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return {k: np.array(v) for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """30 downloadable images per class, split 50/25/25 so val and test have ~7 per class."""
    tmp = tmp_path_factory.mktemp("train-data")
    generate(tmp / "mirror", images_per_class=30, seed=1)
    with MirrorServer(tmp / "mirror") as srv:
        cfg = compose(
            [
                f"paths.root={tmp}",
                "data=mirror",
                f"data.metadata_url={srv.metadata_url}",
                f"data.images_url={srv.images_url}",
                "data.image_size=72",
                "tracking.enabled=false",
                "runtime.fetch.backoff=0.01",
                "data.split.ratios={train: 0.5, val: 0.25, test: 0.25}",
            ]
        )
        download.run(cfg)
        prepare.run(cfg)
    return path(cfg, "prepared")


@pytest.fixture(scope="session")
def trained(prepared, tmp_path_factory) -> Path:
    """A quickly trained checkpoint (linear probe, one epoch, 64 px) on `prepared`."""
    root = tmp_path_factory.mktemp("trained")
    cfg = compose(
        [
            "data=mirror",
            f"paths.root={root}",
            f"paths.prepared={prepared}",
            "model.input_size=64",
            "train.epochs=1",
            "train.recipe=linear_probe",
            "train.lr=0.01",
            "runtime.train_workers=0",
            "runtime.log_model=false",
            "runtime.system_metrics=false",
            "tracking.enabled=false",
        ]
    )
    train.run(cfg)
    return path(cfg, "checkpoint")


@pytest.fixture(scope="session")
def exported_onnx(prepared, trained, tmp_path_factory) -> Path:
    """`trained` exported to ONNX by the export stage (checked at batches 1 and 2) once for the
    session: a root holding `artifacts/exported/` and `metrics/export.json`. Read-only: a module
    that builds on it copies it into its own root (`copy_export`)."""
    root = tmp_path_factory.mktemp("exported-onnx")
    cfg = compose(
        [
            "data=mirror",
            f"paths.root={root}",
            f"paths.prepared={prepared}",
            f"paths.models={trained.parent}",
            "tracking.enabled=false",
            "export.formats=[onnx]",
            "export.verify_batch_sizes=[1,2]",
        ]
    )
    export.run(cfg)
    return root


def copy_export(exported_root: Path, cfg: DictConfig) -> None:
    """The session's ONNX export, where `cfg` reads the export stage's outputs."""
    shutil.copytree(exported_root / "artifacts" / "exported", path(cfg, "exported"))
    metrics = path(cfg, "metrics")
    metrics.mkdir(parents=True, exist_ok=True)
    shutil.copy(exported_root / "metrics" / "export.json", metrics / "export.json")
