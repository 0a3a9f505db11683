"""The documentation: README.md and docs/ run, link to files that exist, and build as a site.

Every ```python block of README.md and docs/*.md runs on the CPU, each in a fresh interpreter (a
block may set global state such as torch's thread count). A block that cannot (it needs a GPU,
several processes, or names code of your own) is preceded by `<!-- skip: why -->`; SKIPPED counts
them per file, so the skipped blocks cannot grow unnoticed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted(["README.md"] + [f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")])
SKIPPED = {"README.md": 1, "docs/guide.md": 2, "docs/sharded.md": 1, "docs/fused.md": 1, "docs/jax.md": 1}
README_MAX_LINES = 250

_FENCE = re.compile(r"^```(\S*)\s*$")
_SKIP = re.compile(r"^<!--\s*skip:\s*(\S.*?)\s*-->$")


def _blocks(doc: str) -> list[tuple[int, str, str | None]]:
    """(first line number, code, skip reason or None) of each ```python block of `doc`."""
    lines = (ROOT / doc).read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        i += 1
        while i < len(lines) and not _FENCE.match(lines[i]):
            i += 1
        if lang == "python":
            prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            skip = _SKIP.match(prev)
            out.append((start + 1, "\n".join(lines[start + 1 : i]), skip.group(1) if skip else None))
        i += 1
    return out


_RUN = [(doc, line, code) for doc in DOCS for line, code, skip in _blocks(doc) if skip is None]


def test_skipped_blocks_are_counted():
    have = {doc: n for doc in DOCS if (n := sum(s is not None for _, _, s in _blocks(doc)))}
    assert have == SKIPPED, "a code block was marked `<!-- skip: ... -->` (or unmarked): update SKIPPED"


def test_every_doc_has_runnable_code_where_the_readme_promises_it():
    assert sum(doc == "README.md" for doc, _, _ in _RUN) >= 2  # the NumPy and PyTorch quickstarts


@pytest.mark.long
@pytest.mark.parametrize("doc,line,code", _RUN, ids=[f"{d}:{ln}" for d, ln, _ in _RUN])
def test_code_block_runs(doc, line, code, tmp_path):
    if "torch" in code:
        pytest.importorskip("torch")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_ORTHOL1_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, f"{doc}:{line} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"


_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_name_existing_files(doc):
    text = (ROOT / doc).read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code are code
    bad = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#")[0]
        if not (ROOT / doc).parent.joinpath(path).resolve().exists():
            bad.append(target)
    assert not bad, f"{doc} links to missing files: {bad}"


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; the reference material belongs in docs/"


@pytest.mark.long
def test_mkdocs_build_strict(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(tmp_path / "site"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("loss_and_grad", "OrthoL1", "ortho_l1"):  # the reference really was generated
        assert name in api, name
