"""What a new user meets first: the entry points' help, and one clear line (exit code 2) for a
malformed params file, a bad override or an unknown key, never a YAML or Hydra traceback."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from oipipe.core.cli import run_stage
from oipipe.core.config import PROJECT_ROOT, compose
from oipipe.core.errors import ConfigError
from oipipe.core.variants import OPTIMIZE_VARIANTS


def cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m <args>` in a fresh process, from the project root of the code under test."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{stderr}"
    return lines[0]


def never_run(cfg) -> None:
    raise AssertionError("the stage ran with a config that should have been refused")


def entry_error(caplog, *argv: str) -> str:
    """Exit code 2 from the shared stage entry point, and its one error line."""
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="oipipe"):
        assert run_stage("check", never_run, list(argv)) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    return errors[0]


@pytest.mark.parametrize(
    ("content", "where", "says"),
    [
        (b"data: [1, 2\n", "line 2, column 1", "flow sequence at line 1, column 7"),
        (b"paths:\n\troot: .\n", "line 2, column 1", "spaces, never tabs"),
        (b"paths:\n  root: .\x00\n", "line 2, column 10", "'\\x00'"),
        (b"paths:\n  root: \xff\xfe\n", "line 2, column 9", "not UTF-8"),
    ],
    ids=["unclosed-list", "tab", "nul-byte", "not-utf8"],
)
def test_malformed_params_file_is_one_line_naming_file_line_and_column(
    tmp_path: Path, caplog, content: bytes, where: str, says: str
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    msg = entry_error(caplog, "--params", str(bad))
    assert f"{bad}, {where}" in msg and says in msg


def test_malformed_override_names_the_override(tmp_path: Path, caplog) -> None:
    params = tmp_path / "params.yaml"
    params.write_text((PROJECT_ROOT / "params.yaml").read_text())
    msg = entry_error(caplog, "--params", str(params), "data.classes=[Cat")
    assert "override 'data.classes=[Cat'" in msg and "column 5" in msg
    assert "not KEY=VALUE" in entry_error(caplog, "--params", str(params), "data.classes")


def test_unknown_key_in_params_or_override_suggests_the_known_one(tmp_path: Path, caplog) -> None:
    good = (PROJECT_ROOT / "params.yaml").read_text()
    params = tmp_path / "params.yaml"
    params.write_text(good)
    msg = entry_error(caplog, "--params", str(params), "train.lrr=0.1")
    assert "unknown key 'train.lrr'; did you mean 'train.lr'?" in msg
    typo = tmp_path / "typo.yaml"
    typo.write_text(good.replace("\n  lr: 0.001\n", "\n  lrr: 0.001\n", 1))
    assert "did you mean 'train.lr'" in entry_error(caplog, "--params", str(typo))
    with pytest.raises(ConfigError, match="did you mean 'runtime.fetch.workers'"):
        compose(["+runtime.fetch.worker=3"])


def test_stage_entry_point_in_a_fresh_process_prints_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("data:\n  classes: [Cat\n")
    res = cli("stages.report", "--params", str(bad))
    assert res.returncode == 2, res.stderr
    line = one_line(res.stderr)
    assert f"{bad}, line 3, column 1: invalid YAML" in line and "Traceback" not in res.stderr


def test_make_params_writes_only_a_valid_file(tmp_path: Path) -> None:
    out = tmp_path / "params.yaml"
    out.write_text("the previous file\n")
    res = cli("oitools.params", "--output", str(out), "train.epochs=abc")
    assert res.returncode == 2
    assert "train.epochs" in one_line(res.stderr) and "not written" in res.stderr
    assert out.read_text() == "the previous file\n"

    res = cli("oitools.params", "--output", str(out), "train.lrr=0.1")
    assert res.returncode == 2
    assert "unknown key 'train.lrr'; did you mean 'train.lr'?" in one_line(res.stderr)

    res = cli("oitools.params", "--output", str(out), "data.classes=[Cat")
    assert res.returncode == 2 and "override 'data.classes=[Cat'" in one_line(res.stderr)
    assert out.read_text() == "the previous file\n"

    res = cli("oitools.params", "--output", str(out))  # what `make params` runs
    assert res.returncode == 0, res.stderr
    assert out.read_text() == (PROJECT_ROOT / "params.yaml").read_text()


def test_config_help_explains_instead_of_composing() -> None:
    res = cli("oitools.params", "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: python -m oitools.params")
    assert "--output" in res.stdout and "Hydra" in res.stdout


def test_broken_conf_file_is_named_with_line_and_column(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    subprocess.run(["cp", "-r", str(PROJECT_ROOT / "conf"), str(conf)], check=True)
    train = conf / "train" / "default.yaml"
    lines = len(train.read_text().splitlines())
    train.write_text(train.read_text() + "epochs: [1\n")
    with pytest.raises(ConfigError, match=rf"train/default.yaml, line {lines + 2}, column 1"):
        compose([], conf)
    with pytest.raises(
        ConfigError,
        match=r"conf/model has no option 'resnet19'; did you mean "
        r"'resnet18'\?",
    ):
        compose(["model=resnet19"])


@pytest.mark.slow
def test_optimize_help_lists_every_variant() -> None:
    res = cli("stages.optimize", "--help")
    assert res.returncode == 0, res.stderr
    assert "--variant" in res.stdout and "--params" in res.stdout
    missing = [v for v in OPTIMIZE_VARIANTS if v not in res.stdout]
    assert not missing, f"--help does not name {missing}:\n{res.stdout}"


# Every stage builds its help with cli.stage_parser: one plain stage and one with options of
# its own stand for them (a stage module that imports torch takes ~5 s to start).
@pytest.mark.parametrize(
    "module, own_option",
    [
        ("stages.download", "--params"),
        ("oitools.compare", "--sweep"),
    ],
)
def test_every_entry_point_helps_with_its_own_options(module: str, own_option: str) -> None:
    res = cli(module, "--help")
    assert res.returncode == 0 and own_option in res.stdout and "Exit codes" in res.stdout, (
        res.stdout + res.stderr
    )


def checkout_copy(dst: Path) -> Path:
    """The repository's files (tracked and not ignored, as they are on disk) copied to `dst`: what a
    fresh clone holds, with the edits under test."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for rel in filter(None, listed.split("\0")):
        src = PROJECT_ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).write_bytes(src.read_bytes())
    return dst


@pytest.mark.slow
def test_every_entry_point_runs_from_a_fresh_checkout(tmp_path: Path) -> None:
    """`python -m` of every stage and tool, and the sender by its path (which puts oitools/ first
    on sys.path, where a module named like the standard library's would shadow it), each from a
    copy of the checkout with nothing on PYTHONPATH: the copy's modules run, not this one's."""
    from concurrent.futures import ThreadPoolExecutor

    import yaml

    clone = checkout_copy(tmp_path / "clone")
    stages = yaml.safe_load((clone / "dvc.yaml").read_text())["stages"]
    modules = sorted({(b.get("do") or b)["cmd"].split()[2] for b in stages.values()})
    assert len(modules) == 8
    tools = ["oitools.sweep", "oitools.compare", "oitools.stream", "oitools.params", "oimirror"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    runs = {m: [sys.executable, "-m", m, "--help"] for m in modules + tools}
    runs["oitools/stream_sender.py"] = [
        sys.executable,
        str(clone / "oitools/stream_sender.py"),
        "--help",
    ]
    runs["where"] = [
        sys.executable,
        "-c",
        "import stages.train, oitools.stream.client as c; print(stages.train.__file__, c.__file__)",
    ]

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(4) as pool:
        done = dict(zip(runs, pool.map(run, runs.values()), strict=True))
    for name, res in done.items():
        assert res.returncode == 0, f"{name}: exit {res.returncode}\n{res.stderr[-2000:]}"
        if name != "where":
            assert "usage" in res.stdout.lower() or "hydra" in res.stdout.lower(), (
                name,
                res.stdout,
            )
    assert done["where"].stdout.split() == [
        str(clone / "stages/train.py"),
        str(clone / "oitools/stream/client.py"),
    ]
