"""The guide and its reference pages hold together: every relative link resolves.

Walks README.md, docs/*.md and experiments/results/**/README.md for markdown links
(`[text](target)`, `![alt](target)`, `[label]: target`) outside code, and fails on a
target file that does not exist, or a `#anchor` that matches no heading of the target
markdown file under GitHub's slug rules. README stays a guide: at most 320 lines.
"""
import glob
import os
import re
import unicodedata
import urllib.parse

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
MAX_README_LINES = 320

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")


def markdown_files() -> list[str]:
  files = [README] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
  files += sorted(glob.glob(os.path.join(REPO, "experiments", "results", "**", "README.md"),
                            recursive=True))
  return [f for f in files if os.path.isfile(f)]


def prose_lines(path: str):
  """(line number, text) of the lines outside fenced code blocks, inline code removed."""
  in_fence = False
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if _FENCE.match(line):
        in_fence = not in_fence
        continue
      if not in_fence:
        yield number, _INLINE_CODE.sub("", line)


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: its text (markup removed) lower-cased, every character
  but letters, marks, digits, '_', '-' and spaces dropped, spaces turned into '-'."""
  text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
  text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
  text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", text)  # emphasis underscores, not snake_case
  kept = "".join(c for c in text.lower()
                 if c in " -_" or unicodedata.category(c)[0] in "LMN")
  return kept.replace(" ", "-")


def anchors(path: str) -> set[str]:
  """Every anchor a markdown file defines: its headings' slugs (a repeated slug gets -1, -2,
  as on GitHub) and explicit <a name/id> anchors."""
  found, counts = set(), {}
  for _, line in prose_lines(path):
    heading = _HEADING.match(line)
    if heading:
      base = slug(heading.group(2))
      n = counts.get(base, 0)
      counts[base] = n + 1
      found.add(base if n == 0 else f"{base}-{n}")
    found.update(_HTML_ANCHOR.findall(line))
  return found


def links(path: str):
  """(line number, target) of every link in a markdown file's prose."""
  for number, line in prose_lines(path):
    for target in _INLINE_LINK.findall(line):
      yield number, target
    reference = _REFERENCE.match(line)
    if reference:
      yield number, reference.group(1)


def is_external(target: str) -> bool:
  return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def broken_links(path: str) -> list[str]:
  problems = []
  for number, target in links(path):
    if not target or is_external(target):
      continue
    file_part, _, anchor = target.partition("#")
    file_part = urllib.parse.unquote(file_part)
    where = f"{os.path.relpath(path, REPO)}:{number}: ({target})"
    if file_part.startswith("/"):
      problems.append(f"{where} is absolute; links must be relative to the file")
      continue
    resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part \
        else path
    if not os.path.exists(resolved):
      problems.append(f"{where}: no such file {os.path.relpath(resolved, REPO)}")
    elif anchor and resolved.endswith(".md") and urllib.parse.unquote(anchor) not in \
        anchors(resolved):
      problems.append(f"{where}: no heading #{anchor} in {os.path.relpath(resolved, REPO)}")
  return problems


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, REPO))
def test_every_relative_link_resolves(path):
  problems = broken_links(path)
  assert not problems, "\n".join(problems)


def test_readme_is_a_guide_not_a_notebook():
  with open(README, encoding="utf-8") as f:
    lines = f.read().splitlines()
  assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines"


def test_every_docs_page_is_linked_from_readme():
  targets = {os.path.normpath(os.path.join(REPO, t.partition("#")[0]))
             for _, t in links(README) if not is_external(t)}
  pages = sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
  assert pages, "docs/ holds no reference pages"
  assert not [p for p in pages if p not in targets], "docs pages README does not link to"


@pytest.mark.parametrize("heading, expected", [
    ("Cost of the regularizer", "cost-of-the-regularizer"),
    ("Reproducing the paper's table", "reproducing-the-papers-table"),
    ("Why `jax.jit` over a Mesh, not `jax.pmap`", "why-jaxjit-over-a-mesh-not-jaxpmap"),
    ("Cheaper schedules: lazy and sub-batch penalties",
     "cheaper-schedules-lazy-and-sub-batch-penalties"),
    ("ℓ1 on a grid extended downward (3,3)", "ℓ1-on-a-grid-extended-downward-33"),
    ("The `reg.every_k_steps` field", "the-regevery_k_steps-field"),
])
def test_slug_follows_github(heading, expected):
  assert slug(heading) == expected


def test_a_missing_file_and_a_missing_anchor_are_reported(tmp_path):
  (tmp_path / "target.md").write_text("# Title\n\n## A section\n")
  page = tmp_path / "page.md"
  page.write_text("[ok](target.md#a-section) [gone](missing.md) [bad](target.md#nowhere)\n"
                  "```\n[in code](missing.md)\n```\n`[inline](missing.md)` [web](https://x.org)\n"
                  "[self](#title-here)\n\n# Title here\n")
  problems = broken_links(str(page))
  assert len(problems) == 2, problems
  assert "no such file" in problems[0] and "missing.md" in problems[0]
  assert "no heading #nowhere" in problems[1]
