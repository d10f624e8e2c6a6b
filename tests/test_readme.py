"""README's library snippet runs as written: the first ``python`` block under "## The library".

It is executed in a fresh Python process, in an empty folder (it writes a checkpoint there), with
the project on ``PYTHONPATH`` and nothing else prepared, so it can only use what ``import slimcore``
offers. The README's relative links are checked too: each names a file of the project.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HEADING = "The library"


def readme_section(title: str) -> str:
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def library_snippet() -> str:
    match = re.search(r"```python\n(.*?)```", readme_section(HEADING), re.DOTALL)
    assert match, f"README's '## {HEADING}' section has no ```python block"
    return match.group(1)


def test_snippet_uses_only_the_public_api() -> None:
    code = library_snippet()
    assert re.search(r"^import slimcore$", code, re.MULTILINE), "the snippet imports slimcore itself"
    assert not re.search(r"\bfrom slimcore\b|\bimport slimcore\.", code), "the snippet reaches past slimcore's API"
    lines = [line for line in code.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) <= 16, f"README's library snippet should stay about ten lines, has {len(lines)}"


def test_snippet_runs_as_written(tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(library_snippet())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"README's library snippet failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    assert done.stdout.strip(), "the snippet prints the report's ratio, FLOPs and parameters"


def test_readme_links_resolve() -> None:
    text = README.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert targets, "README links to its docs"
    missing = [t for t in targets if "://" not in t and not (ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
