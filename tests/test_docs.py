"""The docs run: every ```python block in docs/ (docs/dev/ excepted) and README.md is executed.

One test per page. A page's blocks run in order in one shared namespace, so a page can
build on its earlier blocks, with a temporary directory as the working directory. A block
fenced as ```python no-run is skipped (and counted: such blocks must stay rare). Tracebacks
point at the page's own line numbers.

Two more checks keep the site whole: mkdocs.yml's nav lists every page (none is orphaned, none
is missing), and docs/api.md has an entry for every name in ``memkit.__all__``.
"""

import re
import sys
import textwrap
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXCLUDED = (DOCS / "dev",)  # internal notes, not part of the site (mkdocs.yml: exclude_docs)
MAX_NO_RUN = 5  # ```python no-run blocks allowed across all pages
MAX_BLOCK_SECONDS = 60.0  # generous: the machine is shared; a docs block should take a second or two

FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*?)[ \t]*$")


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the first code line in the page
    code: str
    info: str  # the fence's info string, e.g. "python" or "python no-run"

    @property
    def language(self) -> str:
        return self.info.split()[0].lstrip(".").lower() if self.info.split() else ""

    @property
    def runs(self) -> bool:
        return self.language in ("python", "py") and "no-run" not in self.info.split()[1:]

    @property
    def no_run(self) -> bool:
        return self.language in ("python", "py") and "no-run" in self.info.split()[1:]


def fenced_blocks(text: str) -> list[Block]:
    """Every fenced code block of a Markdown page (indented ones too, e.g. inside admonitions)."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE_OPEN.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"]
        close = re.compile(rf"^{re.escape(indent)}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        body = "\n".join(line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : j])
        blocks.append(Block(line=i + 2, code=textwrap.dedent(body), info=info))
        i = j + 1
    return blocks


def pages() -> list[Path]:
    found = [p for p in sorted(DOCS.rglob("*.md")) if not any(p.is_relative_to(e) for e in EXCLUDED)]
    readme = ROOT / "README.md"
    return [readme, *found] if readme.exists() else found


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("page", pages(), ids=page_id)
def test_page_code_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = [b for b in fenced_blocks(page.read_text(encoding="utf-8")) if b.runs]
    if not blocks:
        pytest.skip(f"{page_id(page)} has no python blocks")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    # a real (temporary) module, so classes a page defines can be pickled by torch.save
    module = types.ModuleType("memkit_docs_" + re.sub(r"\W", "_", page_id(page)))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    default_dtype = torch.get_default_dtype()
    try:
        run_blocks(page, blocks, module)
    finally:
        torch.set_default_dtype(default_dtype)  # a page that changes it must not leak into the next


def run_blocks(page: Path, blocks: list[Block], module: types.ModuleType) -> None:
    for block in blocks:
        # pad with newlines so tracebacks and linecache point at the page's own lines
        code = compile("\n" * (block.line - 1) + block.code, str(page), "exec")
        start = time.perf_counter()
        exec(code, module.__dict__)
        took = time.perf_counter() - start
        assert took < MAX_BLOCK_SECONDS, (
            f"{page_id(page)}:{block.line}: block took {took:.1f}s; docs blocks must be quick"
        )


def test_no_run_blocks_are_rare() -> None:
    no_run = [
        f"{page_id(p)}:{b.line}" for p in pages() for b in fenced_blocks(p.read_text(encoding="utf-8")) if b.no_run
    ]
    assert len(no_run) < MAX_NO_RUN, f"too many ```python no-run blocks (make them run): {no_run}"


def test_fence_parser() -> None:
    text = (
        "a\n```python\nx = 1\n```\n\n"
        "!!! note\n    ```python no-run\n    y = 2\n    ```\n"
        "````md\n```python\nz\n```\n````\n"
    )
    blocks = fenced_blocks(text)
    assert [(b.line, b.code, b.runs, b.no_run) for b in blocks] == [
        (3, "x = 1", True, False),
        (8, "y = 2", False, True),
        (11, "```python\nz\n```", False, False),
    ]


def _nav_pages(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [p for item in node for p in _nav_pages(item)]
    if isinstance(node, dict):
        return [p for value in node.values() for p in _nav_pages(value)]
    return []


def _load_mkdocs_yml() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")

    class Loader(yaml.SafeLoader):
        """SafeLoader that reads mkdocs.yml's `!!python/name:` tags as plain strings."""

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: suffix)
    Loader.add_multi_constructor("!", lambda loader, suffix, node: suffix)
    config = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)
    assert isinstance(config, dict)
    return config


def test_nav_lists_every_page() -> None:
    nav = _nav_pages(_load_mkdocs_yml()["nav"])
    local = {p for p in nav if not p.startswith(("http://", "https://"))}
    on_disk = {p.relative_to(DOCS).as_posix() for p in pages() if p.is_relative_to(DOCS)}
    assert not on_disk - local, f"pages missing from mkdocs.yml nav (orphaned): {sorted(on_disk - local)}"
    assert not local - on_disk, f"mkdocs.yml nav lists pages that do not exist: {sorted(local - on_disk)}"


def test_api_reference_lists_every_public_name() -> None:
    import memkit

    api = (DOCS / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: memkit\.(\w+)\s*$", api, flags=re.MULTILINE))
    missing = sorted(set(memkit.__all__) - documented)
    assert not missing, f"docs/api.md has no '::: memkit.NAME' entry for {missing}"


def test_refusals_shown_in_docs_fail_when_nothing_is_refused() -> None:
    """A ``try``/``except`` in a docs block shows a refusal: its ``else`` must fail if none comes."""
    import ast

    missing = []
    for page in pages():
        for block in fenced_blocks(page.read_text(encoding="utf-8")):
            if not block.runs:
                continue
            for node in ast.walk(ast.parse(block.code)):
                if isinstance(node, ast.Try) and node.handlers and not node.orelse:
                    missing.append(f"{page_id(page)}:{block.line + node.lineno - 1}")
    assert not missing, f"try/except without an else that raises (passes whether or not it is refused): {missing}"
