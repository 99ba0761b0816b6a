"""The docs name only what exists: config keys and options, repository files, make targets and
`python -m` modules quoted in README.md, CONTRIBUTING.md and docs/ are checked against the tree;
the README's example is the committed example report's; the docs site builds with
`mkdocs build --strict`."""

from __future__ import annotations

import functools
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from oipipe.core.config import PROJECT_ROOT

DOCS = PROJECT_ROOT / "docs"
README = PROJECT_ROOT / "README.md"
EXAMPLE = DOCS / "example"
# Pages a person wrote. docs/example/report.md is the report stage's output (its names are the
# pipeline's outputs, checked by the report's own tests); the optimize research notes quote
# other projects' APIs.
PAGES = sorted(
    p
    for p in [README, PROJECT_ROOT / "CONTRIBUTING.md", *DOCS.rglob("*.md")]
    if p.name != "optimize-research.md" and EXAMPLE not in p.parents
)
# Where files live: a quoted path under one of these, or one of the root files, must exist.
TREE_ROOTS = ("conf", "stages", "oipipe", "oitools", "oimirror", "benchmarks", "tests", "docs")
ROOT_FILES = {p.name for p in PROJECT_ROOT.iterdir() if p.is_file()}
PLACEHOLDER = re.compile(r"[<>*{}\[\]$]|\.\.\.")
# A word ending in one of these is a file name (`model.onnx`, `train.json`), not a config key.
FILE_SUFFIX = re.compile(
    r"\.(json|jsonl|csv|md|html|png|txt|yaml|yml|toml|lock|py|db|ts|pt|pt2|ep|onnx|xml|bin|so|"
    r"jpg|jpeg|avi|mp4|mkv|log|patch)$"
)
CODE = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


@functools.cache
def params() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


@functools.cache
def outputs() -> tuple[frozenset[str], frozenset[str]]:
    """(declared, folders): the paths dvc.yaml declares as stages' outputs, metrics and plots (a
    foreach stage's up to its `${item}`), and the folders of `conf/paths` and the Makefile's
    mirror, relative to the root."""
    paths = params()["paths"]
    resolved = OmegaConf.create({"paths": paths})
    folders = {v for k, v in paths.items() if k not in ("root", "checkpoint")}
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    folders |= set(re.findall(r"^MIRROR\s*\?=\s*(\S+)", makefile, re.M))
    declared: set[str] = set()
    for stage in yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"].values():
        body = stage.get("do", stage)  # a foreach stage keeps its fields under `do`
        for kind in ("outs", "metrics", "plots"):
            for out in body.get(kind) or []:
                name = next(iter(out)) if isinstance(out, dict) else out
                for key in re.findall(r"\$\{(paths\.[a-z_]+)\}", name):
                    name = name.replace("${" + key + "}", str(OmegaConf.select(resolved, key)))
                name = name.split("${item}")[0].rstrip("/")
                if "${" not in name:
                    declared.add(Path(name).as_posix().removeprefix("./"))
    return frozenset(declared), frozenset(folders)


def written(path: str, declared: frozenset[str], folders: frozenset[str], source: str) -> bool:
    """Whether the pipeline writes `path`: a declared output, a folder holding one or inside
    one, a file the code names (`metrics/sweep.json`: the sweep writes it, not a stage), or a
    file in a conf/paths folder that dvc.yaml does not list file by file."""
    if path in folders or any(
        o == path or o.startswith(path + "/") or path.startswith(o + "/") for o in declared
    ):
        return True
    name = path.rsplit("/", 1)[-1]
    if re.search(r"[\"'/]" + re.escape(name) + r"[\"']", source):
        return True
    return any(
        path.startswith(f + "/") and not any(o.startswith(f + "/") for o in declared)
        for f in folders
    )


@functools.cache
def code_names() -> str:
    """The library's, the stages' and the tools' source: MLflow metric and tag names
    (`<stage>.<key>`) are the keys the code writes."""
    return "\n".join(
        f.read_text(encoding="utf-8")
        for folder in ("stages", "oipipe", "oitools")
        for f in (PROJECT_ROOT / folder).rglob("*.py")
    )


@functools.cache
def make_targets() -> frozenset[str]:
    text = (PROJECT_ROOT / "Makefile").read_text()
    return frozenset(re.findall(r"^([a-z][a-z0-9-]*):", text, re.M))


def snippets(text: str) -> list[tuple[int, str]]:
    """(line, text) of every inline code span and every line of a fenced block."""
    found: list[tuple[int, str]] = []
    for block in FENCE.finditer(text):
        first = text.count("\n", 0, block.start()) + 1
        for k, line in enumerate(block.group().splitlines()[1:-1], start=first + 1):
            found.append((k, line.split("#")[0].strip()))
    inline = FENCE.sub(lambda m: "\n" * m.group().count("\n"), text)
    for m in CODE.finditer(inline):
        found.append((inline.count("\n", 0, m.start()) + 1, m.group(1)))
    return found


def key_exists(tree: dict, dotted: str) -> bool:
    node = tree
    for part in dotted.split("."):
        if node == {}:  # a free-form mapping (`tracking.tags`): any key may go in it
            return True
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def logged_name(dotted: str, source: str) -> bool:
    """`<stage>.<key>` as MLflow names a stage's metric or tag: the stage exists and the code
    writes the key (as a string literal or an f-string's text)."""
    stage, _, rest = dotted.partition(".")
    last = rest.split(".")[-1]
    return (PROJECT_ROOT / "stages" / f"{stage}.py").is_file() and bool(
        re.search(r"[\"'.{]" + re.escape(last) + r"[\"'}.\[]", source)
    )


def problems_in(text: str, name: str) -> list[str]:
    """One line per name in `text` (the page `name`) that does not exist, with its line."""
    cfg, (declared, folders), targets, source = params(), outputs(), make_targets(), code_names()
    groups = set(cfg)
    bad: list[str] = []
    for line, snippet in snippets(text):
        words = snippet.split()
        for i, word in enumerate(words):
            word = word.strip(",;:()'\"")
            if not word or PLACEHOLDER.search(word):
                continue
            if i and words[i - 1] == "make":
                if word not in targets and not word.startswith("-") and "=" not in word:
                    bad.append(f"{name}:{line}: `make {word}`: no such Makefile target")
            if i > 1 and words[i - 1] == "-m" and "python" in words[i - 2]:
                if importlib.util.find_spec(word) is None:
                    bad.append(f"{name}:{line}: `python -m {word}`: no such module")
            key, _, value = word.partition("=")
            key = key.removeprefix("++").removeprefix("+")
            head = key.split(".")[0]
            if head in groups and "/" not in key and not FILE_SUFFIX.search(key):
                if "." in key and not key_exists(cfg, key) and not logged_name(key, source):
                    bad.append(f"{name}:{line}: `{key}`: no such config key (params.yaml)")
                elif "." not in key and value and not value.startswith("["):
                    for option in value.split(","):  # a sweep lists several
                        if not (PROJECT_ROOT / "conf" / key / f"{option}.yaml").is_file():
                            bad.append(f"{name}:{line}: `{word}`: no conf/{key}/{option}.yaml")
            path = word.split(":")[0].rstrip("/")
            first = path.split("/")[0]
            if "/" in path and first in TREE_ROOTS or path in ROOT_FILES:
                if not (PROJECT_ROOT / path).exists():
                    bad.append(f"{name}:{line}: `{path}`: no such file in the repository")
            elif "/" in path and any(o.split("/")[0] == first for o in declared | folders):
                if not written(path, declared, folders, source):
                    bad.append(f"{name}:{line}: `{path}`: no dvc.yaml stage writes it")
    return bad


def page_id(page: Path) -> str:
    return page.relative_to(PROJECT_ROOT).as_posix()


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_name_a_page_quotes_exists(page: Path) -> None:
    bad = problems_in(page.read_text(encoding="utf-8"), page_id(page))
    assert not bad, "\n".join(bad)


def test_the_check_catches_a_renamed_key_option_file_output_target_and_module() -> None:
    page = (
        "`optimize.accuracy_bars` and `data=nowhere`\n\n"
        "```bash\nmake no-such-target\npython -m oitools.no_such_tool\n```\n\n"
        "`oipipe/core/no_such_module.py`, `metrics/nothing_writes_this.json`\n"
    )
    bad = "\n".join(problems_in(page, "broken.md"))
    for line, name in (
        (1, "`optimize.accuracy_bars`: no such config key"),
        (1, "`data=nowhere`: no conf/data/nowhere.yaml"),
        (4, "`make no-such-target`: no such Makefile target"),
        (5, "`python -m oitools.no_such_tool`: no such module"),
        (8, "`oipipe/core/no_such_module.py`: no such file"),
        (8, "`metrics/nothing_writes_this.json`: no dvc.yaml stage writes it"),
    ):
        assert f"broken.md:{line}: {name}" in bad, bad


def squeeze(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def test_the_readme_quotes_the_example_report_and_shows_its_chart() -> None:
    """The README's quote is the first lines of docs/example/report.md, word for word, and its
    chart is that report's Pareto chart: replacing the example updates the README or fails."""
    report = (EXAMPLE / "report.md").read_text(encoding="utf-8")
    start = report.find("**Ship")
    assert start >= 0, "docs/example/report.md has no '**Ship ...' line (a report with a benchmark)"
    end = report.find("\n## ", start)
    headline = squeeze(report[start : end if end >= 0 else None])
    readme = README.read_text(encoding="utf-8")
    quoted = squeeze(" ".join(re.findall(r"^> ?(.*)$", readme, re.M)))
    assert quoted == headline, (
        f"README.md quotes\n  {quoted}\nbut docs/example/report.md says\n  {headline}"
    )
    assert "](docs/example/pareto_b32.png)" in readme
    chart = EXAMPLE / "pareto.png"  # the chart the report itself shows, beside it
    if chart.is_file():
        assert (EXAMPLE / "pareto_b32.png").read_bytes() == chart.read_bytes(), (
            "docs/example/pareto_b32.png is not the example report's pareto.png: copy it over"
        )


def test_the_docs_home_page_is_the_readme() -> None:
    """docs/index.md is README.md up to its "## More" links (which point at repository files
    on GitHub and at pages on the site), with the links into docs/ made relative to it."""
    readme = README.read_text(encoding="utf-8")
    home = (DOCS / "index.md").read_text(encoding="utf-8")
    cut = readme.index("\n## More")
    assert home[: home.index("\n## More")] == readme[:cut].replace("](docs/", "]("), (
        "docs/index.md differs from README.md before '## More': copy the README's text over"
    )


def test_the_docs_site_builds_strictly(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    if not mkdocs.exists() and shutil.which("mkdocs") is None:
        pytest.skip("mkdocs is not installed (the dev extra installs it)")
    out = subprocess.run(
        [str(mkdocs if mkdocs.exists() else "mkdocs"), "build", "--strict", "-d", str(tmp_path)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent)},
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / "stages" / "train" / "index.html").is_file()
