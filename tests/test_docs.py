"""The repository stands alone: its docs and --help cite its own docs/method.md, never a file outside it."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = (".py", ".md", ".cpp", ".h", ".cu", ".cuh", ".sh", ".toml", ".txt")
# a reference to a specification that is not in the repository
OUTSIDE = re.compile(r"shared/SPEC|\bSPEC\.md|\bSPEC §")


def _tracked_text_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (an sdist): walk the tree
        for d, _, files in os.walk(ROOT):
            for f in files:
                yield os.path.relpath(os.path.join(d, f), ROOT)
        return
    yield from out.stdout.split()


def test_no_file_cites_a_spec_outside_the_repository():
    bad = []
    for rel in _tracked_text_files():
        if not rel.endswith(TEXT) or rel == os.path.join("tests", "test_docs.py"):
            continue
        with open(os.path.join(ROOT, rel), encoding="utf-8", errors="replace") as fh:
            for i, line in enumerate(fh, 1):
                if OUTSIDE.search(line):
                    bad.append(f"{rel}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_method_doc_exists_and_readme_links_it():
    path = os.path.join(ROOT, "docs", "method.md")
    with open(path, encoding="utf-8") as fh:
        doc = fh.read()
    for section in ("## 2. Per tensor", "## 3. Time axis", "## 4. Which tensors", "## 5. File formats"):
        assert section in doc
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        assert "docs/method.md" in fh.read()


def test_extrapolate_help_points_at_the_method_doc():
    out = subprocess.run([sys.executable, "-m", "relex_kernels", "extrapolate", "--help"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0
    assert "docs/method.md" in out.stdout
    assert not OUTSIDE.search(out.stdout)
