"""Stages are peers (CONVENTIONS 11) and dvc.yaml's deps are exactly what each stage imports (3).

Read from the source with `ast`, not by importing it: a stage module that imports another stage
module ties their code together, and DVC then reruns (or, with a dep missing, fails to rerun) the
wrong stages. What two stages share belongs in a library module both import.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from functools import cache

import pytest
import yaml

from stages.config import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "stages"
DVC_YAML = PROJECT_ROOT / "dvc.yaml"
CMD = re.compile(r"python -m stages\.(\w+)\b")


def dvc_stages() -> dict[str, dict]:
    """dvc.yaml's stages by name; a `foreach` stage gives its `do` body."""
    stages = yaml.safe_load(DVC_YAML.read_text())["stages"]
    return {name: body["do"] if "foreach" in body else body for name, body in stages.items()}


def stage_module(body: dict) -> str:
    m = CMD.search(body["cmd"])
    assert m, f"dvc.yaml cmd {body['cmd']!r} does not run `python -m stages.<module>`"
    return m.group(1)


STAGE_MODULES = {name: stage_module(body) for name, body in dvc_stages().items()}
STAGE_NAMES = set(STAGE_MODULES.values())
# Entry points that are not DVC stages (they read MLflow, which DVC does not track) but are peers
# all the same: no stage imports them and they import no stage.
ENTRY_POINTS = {"compare", "stream", "stream_server"}
PEERS = STAGE_NAMES | ENTRY_POINTS


def is_module(name: str) -> bool:
    return (PACKAGE / f"{name}.py").is_file()


@cache
def imports(module: str) -> frozenset[str]:
    """The project modules `stages/<module>.py` imports, anywhere in the file (an import inside a
    function runs when the stage does): `import stages.x`, `from stages import x`,
    `from stages.x import ...`, and their relative forms."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(), filename=f"stages/{module}.py")
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names
                      if a.name.startswith("stages.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:
                continue  # above the package: not a project module
            package = node.module if node.level == 0 else (
                f"stages.{node.module}" if node.module else "stages")
            if package == "stages":
                found |= {a.name for a in node.names if is_module(a.name)}
            elif package and package.startswith("stages."):
                found.add(package.split(".")[1])
    return frozenset(m for m in found if is_module(m))


def closure(module: str) -> set[str]:
    """`module` and every project module it imports, directly or through others."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += imports(m)
    return seen


def declared(body: dict) -> set[str]:
    """The `stages/*.py` files among a dvc.yaml stage's deps, as module names."""
    return {m.group(1) for dep in body.get("deps", [])
            if (m := re.fullmatch(r"stages/(\w+)\.py", str(dep)))}


def test_every_dvc_stage_runs_a_stage_module() -> None:
    assert STAGE_NAMES == {"download", "prepare", "train", "export", "optimize", "benchmark",
                           "profile", "report"}
    assert all(is_module(m) for m in PEERS)
    assert not ENTRY_POINTS & STAGE_NAMES


@pytest.mark.parametrize("module", sorted(PEERS))
def test_no_stage_imports_another_stage(module: str) -> None:
    others = sorted(imports(module) & (PEERS - {module}))
    assert not others, (f"stages/{module}.py imports the stage module(s) {others}: move what they "
                        "share into a library module that takes explicit arguments (CONVENTIONS "
                        "11)")


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_dvc_deps_are_the_modules_the_stage_imports(stage: str) -> None:
    body = dvc_stages()[stage]
    wanted, listed = closure(STAGE_MODULES[stage]), declared(body)
    missing = sorted(f"stages/{m}.py" for m in wanted - listed)
    extra = sorted(f"stages/{m}.py" for m in listed - wanted)
    problems = ([f"missing {missing} (imported: a change to them must rerun it)"] if missing
                else []) + ([f"extra {extra} (not imported: a change to them reruns it for "
                             "nothing)"] if extra else [])
    assert not problems, f"dvc.yaml stage {stage!r} deps: " + "; ".join(problems)


@pytest.mark.parametrize("module", ["report", "compare"])
def test_readers_do_not_import_torch(module: str) -> None:
    """The report reads files and compare reads MLflow; loading torch would cost them seconds
    and gigabytes for nothing."""
    code = (f"import sys, stages.{module}; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    res = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_the_product_never_imports_the_test_mirror() -> None:
    """testing/ (the Open Images mirror) may import stages/ (it reuses the class table and the
    JPEG check), never the reverse: the pipeline must run from a package without its tests."""
    offenders = []
    for file in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            offenders += [f"{file.relative_to(PROJECT_ROOT)}:{node.lineno} imports {n}"
                          for n in names if n == "testing" or n.startswith("testing.")]
    assert not offenders, offenders
