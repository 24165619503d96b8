"""The documentation site: it builds without a warning, covers the public API, and
every Python example in it runs.

- `mkdocs build --strict` (skipped when mkdocs, mkdocs-material or mkdocstrings are
  not installed: `pip install -e ".[docs]"`; the `test` extra includes them).
- Every public name of `ssm`, `layers` and `train` has a `::: package.Name` entry in
  `docs/api/`.
- Every fenced ```` ```python ```` block of the guides (`docs/**/*.md` outside
  `docs/api/`, and `README.md`) is executed, the blocks of one page in order in one
  namespace, in a temporary working directory that holds a link to `configs/`. The
  examples run as a user's would: JAX's default dtype rules, not the test suite's
  float64 and strict promotion. A block that must not run (it needs a GPU, the
  network, or minutes) is marked by the HTML comment `<!-- docs-test: skip -->` on
  the line before its opening fence; the comment does not show on the site.
"""

import ast
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIP_MARK = "<!-- docs-test: skip -->"
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\n]*)$")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """The ```python blocks of a Markdown page as (line number, code), skipped ones out.

    Fences may be indented (inside an admonition or a list item); the code is
    dedented by the fence's indentation.
    """
    lines = text.split("\n")
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], m["indent"]
        info = m["info"].strip()
        lang = info.split()[0].lstrip("{.").rstrip("}") if info else ""
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence[0] * len(fence))
            and lines[i].strip().strip(fence[0]) == ""
        ):
            body.append(
                lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i]
            )
            i += 1
        i += 1
        prev = next((lines[j] for j in range(start - 2, -1, -1) if lines[j].strip()), "")
        if lang in ("python", "py") and prev.strip() != SKIP_MARK:
            blocks.append((start + 1, textwrap.dedent("\n".join(body))))
    return blocks


def guide_pages() -> list[Path]:
    pages = [
        p for p in sorted(DOCS.rglob("*.md")) if "api" not in p.relative_to(DOCS).parts
    ]
    return [ROOT / "README.md", *pages]


PAGES_WITH_CODE = [p for p in guide_pages() if python_blocks(p.read_text())]


def test_block_extraction():
    text = textwrap.dedent(
        """\
        ```python
        x = 1
        ```

        <!-- docs-test: skip -->
        ```python
        raise SystemExit
        ```

        !!! example

            ```python
            y = x + 1
            ```

        ```bash
        rm -rf /
        ```
        """
    )
    assert python_blocks(text) == [(2, "x = 1"), (13, "y = x + 1")]


def test_examples_run(tmp_path, monkeypatch):
    """Every page's examples, in one process: pages that build the same layers at the
    same sizes share JAX's compiled operations, which is most of the cost."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    failures = []
    for page in PAGES_WITH_CODE:
        namespace = {"__name__": f"docs_example_{page.stem}"}
        with (
            jax.enable_x64(False),
            jax.numpy_dtype_promotion("standard"),
            jax.numpy_rank_promotion("allow"),
        ):
            for line, code in python_blocks(page.read_text()):
                try:
                    exec(compile(code, f"{page}:{line}", "exec"), namespace)
                except Exception as e:
                    failures.append(
                        f"{page.relative_to(ROOT)}:{line}: {type(e).__name__}: {e}"
                    )
                    break  # the page's later blocks build on this one
    assert PAGES_WITH_CODE, "found no Python examples in the docs"
    assert not failures, "examples that failed:\n" + "\n".join(failures)


def _public_names(package: str) -> list[str]:
    """`__all__` of a package, or else the names its `__init__.py` re-exports
    (`from .x import Name as Name`)."""
    tree = ast.parse((ROOT / package / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    names = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            names += [a.asname for a in node.names if a.asname and a.asname == a.name]
    return names


@pytest.mark.parametrize("package", ["ssm", "layers", "train"])
def test_api_reference_covers_public_names(package):
    page = (DOCS / "api" / f"{package}.md").read_text()
    documented = set(re.findall(rf"^::: {package}\.([A-Za-z_][\w.]*)\s*$", page, re.M))
    names = _public_names(package)
    assert names, f"found no public names in {package}/__init__.py"
    missing = [n for n in names if n not in documented]
    assert not missing, (
        f"docs/api/{package}.md has no `::: {package}.NAME` entry for {missing}; "
        "add one (and a nav entry if it is a new page)"
    )


@pytest.mark.skipif(
    not all(
        importlib.util.find_spec(m) for m in ("mkdocs", "material", "mkdocstrings_handlers")
    ),
    reason='needs the docs extra: pip install -e ".[docs]"',
)
def test_mkdocs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert not warnings, "\n".join(warnings)
    for package in ("ssm", "layers", "train"):  # every entry rendered, none left empty
        html = (tmp_path / "api" / package / "index.html").read_text()
        entries = re.findall(
            r"^::: ([\w.]+)\s*$", (DOCS / "api" / f"{package}.md").read_text(), re.M
        )
        missing = [e for e in entries if e != package and f'id="{e}"' not in html]
        assert not missing, f"docs/api/{package}.md: rendered nothing for {missing}"
    config_page = (tmp_path / "config" / "index.html").read_text()
    assert "optim.lr" in config_page and "task.vocab_size" in config_page
