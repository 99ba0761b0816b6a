"""The layout is the architecture (CONVENTIONS, "The shape"; 3 and 11), held from the source.

- `stages/` holds the DVC stage entry points and nothing else, and no stage imports another;
- `oipipe/` (the library) imports no stage, no tool and not the mirror; `oitools/` (entry points
  that are not stages) may run stages, never the mirror; `oimirror/` (the test mirror) may use the
  library, never a stage;
- dvc.yaml's deps of each stage are exactly the files its import closure reads: a folder listed
  there stands for every module in it, and is listed only when the stage imports all of them;
- no library, tool or mirror module is named like a standard-library module (`io`, `http`, ...),
  which would shadow it for any script run from that folder.

Imports are read with `ast`, not by importing, including those inside functions (they run when
the stage does), and the import strings of the variant and format tables (`oipipe.core.variants`)
count as imports of the module that imports them: builders of `oipipe.deploy.build`, loaders of
the runtime, export writers of the export stage. Package `__init__.py` files hold a docstring
and nothing else, so a stage that imports `oipipe.core.config` reads no code from
`oipipe/__init__.py` (a test holds that too).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from oipipe.core.config import PROJECT_ROOT
from oipipe.core.variants import FORMATS, VARIANTS

DVC_YAML = PROJECT_ROOT / "dvc.yaml"
CMD = re.compile(r"python -m stages\.(\w+)\b")
STAGES, LIBRARY, TOOLS, MIRROR = "stages", "oipipe", "oitools", "oimirror"
PACKAGES = (STAGES, LIBRARY, TOOLS, MIRROR)
# What each top-level package may import of the others (itself always).
MAY_IMPORT = {STAGES: {LIBRARY}, LIBRARY: set(), TOOLS: {LIBRARY, STAGES}, MIRROR: {LIBRARY}}


def dvc_stages() -> dict[str, dict]:
    """dvc.yaml's stages by name; a `foreach` stage gives its `do` body."""
    stages = yaml.safe_load(DVC_YAML.read_text())["stages"]
    return {name: body["do"] if "foreach" in body else body for name, body in stages.items()}


def stage_module(body: dict) -> str:
    m = CMD.search(body["cmd"])
    assert m, f"dvc.yaml cmd {body['cmd']!r} does not run `python -m stages.<module>`"
    return f"stages.{m.group(1)}"


def source_files() -> list[Path]:
    return sorted(f for p in PACKAGES for f in (PROJECT_ROOT / p).rglob("*.py"))


def module_name(file: Path) -> str:
    rel = file.relative_to(PROJECT_ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(f): f for f in source_files()}


def is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def imports_in(source: str, package: str) -> set[str]:
    """The project modules a file in `package` imports, anywhere in it: `import a.b`,
    `from a import b` (b a module or a name in a), `from a.b import c`, and their relative forms."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                up = parts[: len(parts) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in MODULES}


# The tables' import strings, by the module whose code imports them (`imported(...)`).
LAZY: dict[str, set[str]] = {
    "oipipe.deploy.build": {v.builder for v in VARIANTS.values()},
    "oipipe.deploy.runtime": (
        {v.loader for v in VARIANTS.values()} | {f.loader for f in FORMATS.values()}
    ),
    "stages.export": {f.writer for f in FORMATS.values()},
}


@cache
def imports(module: str) -> frozenset[str]:
    package = module if is_package(module) else module.rpartition(".")[0]
    lazy = {spec.partition(":")[0] for spec in LAZY.get(module, ())}
    return frozenset(imports_in(MODULES[module].read_text(), package) | lazy)


def closure(module: str) -> set[str]:
    """`module` and every project module it imports, directly or through others; the packages on
    the way are imported too, but hold no code (test_package_inits_hold_no_code)."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += imports(m)
    return {m for m in seen if not is_package(m)}


def declared_files(body: dict) -> set[str]:
    """The project's .py files among a stage's deps, a folder standing for every module in it."""
    out: set[str] = set()
    for dep in body.get("deps", []):
        dep = str(dep).rstrip("/")
        if dep.split("/")[0] not in PACKAGES:
            continue
        p = PROJECT_ROOT / dep
        if p.is_dir():
            out |= {
                str(f.relative_to(PROJECT_ROOT)) for f in p.rglob("*.py") if f.name != "__init__.py"
            }
        elif p.suffix == ".py":
            out.add(dep)  # data files (the class table, templates) are deps, not imports
    return out


def wanted_files(stage: str) -> set[str]:
    return {str(MODULES[m].relative_to(PROJECT_ROOT)) for m in closure(stage)}


STAGE_MODULES = {name: stage_module(body) for name, body in dvc_stages().items()}


def test_stages_holds_the_dvc_stages_and_nothing_else() -> None:
    assert set(STAGE_MODULES) == {
        "download",
        "prepare",
        "train",
        "export",
        "optimize",
        "benchmark",
        "profile",
        "report",
    }
    in_folder = {m for m in MODULES if m.startswith("stages.")}
    assert in_folder == set(STAGE_MODULES.values()), (
        f"stages/ holds modules DVC does not run: {sorted(in_folder - set(STAGE_MODULES.values()))}"
        "; library code goes to oipipe/, entry points that are not stages to oitools/"
    )


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layers(module: str) -> None:
    top = module.split(".")[0]
    allowed = MAY_IMPORT[top] | {top}
    bad = sorted(m for m in imports(module) if m.split(".")[0] not in allowed)
    if top == STAGES:  # stages are peers: what two share belongs in the library
        bad += sorted(m for m in imports(module) if m.startswith("stages.") and m != module)
    assert not bad, (
        f"{MODULES[module].relative_to(PROJECT_ROOT)} imports {bad}; {top}/ may "
        f"import only {sorted(allowed)} (and no stage another stage)"
    )


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_dvc_deps_are_the_files_the_stage_imports(stage: str) -> None:
    wanted, listed = wanted_files(STAGE_MODULES[stage]), declared_files(dvc_stages()[stage])
    missing, extra = sorted(wanted - listed), sorted(listed - wanted)
    problems = (
        [f"missing {missing} (imported: a change to them must rerun it)"] if missing else []
    ) + ([f"extra {extra} (not imported: a change to them reruns it for nothing)"] if extra else [])
    assert not problems, f"dvc.yaml stage {stage!r} deps: " + "; ".join(problems)


def test_every_table_row_names_functions_that_exist() -> None:
    """A builder, loader or writer string names a module of the project and a function defined
    at its top level (read with ast: no import)."""
    specs = {s for group in LAZY.values() for s in group}
    assert len(specs) >= 10
    for spec in sorted(specs):
        module, _, name = spec.partition(":")
        assert module in MODULES, f"{spec}: no module {module}"
        defined = {
            n.name
            for n in ast.parse(MODULES[module].read_text()).body
            if isinstance(n, ast.FunctionDef)
        }
        assert name in defined, f"{spec}: {MODULES[module].name} defines no function {name!r}"


def test_package_inits_hold_no_code() -> None:
    """A package's __init__.py runs whenever one of its modules is imported: code there would be
    a dependency of every stage that dvc.yaml's deps do not show. (The mirror is no stage's
    dependency; its __init__ gathers its API.)"""
    for file in source_files():
        if file.name == "__init__.py" and not file.is_relative_to(PROJECT_ROOT / MIRROR):
            body = ast.parse(file.read_text()).body
            code = [
                n
                for n in body
                if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
            ]
            assert not code, f"{file.relative_to(PROJECT_ROOT)} holds code; put it in a module"


def test_no_module_is_named_like_the_standard_library() -> None:
    """`python oitools/stream_sender.py` puts oitools/ first on sys.path: a module there named
    `http` or `io` would replace the standard library's for everything that process imports.
    Stage modules run only as `python -m stages.<name>`, and `profile` is the DVC stage's name."""
    clash = sorted(
        f"{f.relative_to(PROJECT_ROOT)}"
        for f in source_files()
        if f.stem in sys.stdlib_module_names and not f.is_relative_to(PROJECT_ROOT / STAGES)
    )
    assert not clash, f"named like a standard-library module: {clash}"


def test_dvc_deps_name_existing_paths() -> None:
    missing = [
        f"{name}: {dep}"
        for name, body in dvc_stages().items()
        for dep in body.get("deps", [])
        if str(dep).split("/")[0] in PACKAGES and not (PROJECT_ROOT / str(dep)).exists()
    ]
    assert not missing, missing


@pytest.mark.parametrize("module", ["stages.report", "oitools.compare"])
def test_readers_do_not_import_torch(module: str) -> None:
    """The report reads files and compare reads MLflow; loading torch would cost them seconds
    and gigabytes for nothing."""
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch was imported'"
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr


def test_the_import_reader_sees_every_form() -> None:
    """The import reader is what every test above rests on: a stage importing another is seen
    through each import form, inside a function too."""
    forms = [
        "import stages.train",
        "from stages import train",
        "from stages.train import run",
        "from . import train",
        "from .train import run",
        "def f():\n    from stages import train",
    ]
    for code in forms:
        assert "stages.train" in imports_in(code, "stages"), code
    assert imports_in("from ..core import config", "oipipe.data") == {
        "oipipe.core",
        "oipipe.core.config",
    }
    assert imports_in("import os, json", "stages") == set()
