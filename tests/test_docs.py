"""The documentation's pointers resolve. Code, params and docs point into a document in one form,
``README.md#anchor`` or ``bench/README.md#anchor`` (in a Markdown file also ``](#anchor)`` for its own sections), and
each anchor must be a heading of that file as GitHub names it; and nothing points outside the repository, where
users have nothing."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "bench/README.md")
# Where pointers live: the library, the stage scripts, the benchmarks, the tests, the configuration and the docs.
SOURCES = ("README.md", "bench/README.md", "params.yaml", "dvc.yaml", "pyproject.toml", "requirements*.txt",
           "pipeline/**/*.py", "src/*.py", "bench/*.py", "tests/**/*.py", ".ci/*")
POINTER = re.compile(r"(?<![\w/.-])((?:bench/)?README\.md)#([\w-]+)")
OWN_LINK = re.compile(r"\]\(#([\w-]+)\)")
# The older forms, a quoted heading or a bare "section": they cannot be checked, so they are not used.
OLD_FORM = re.compile(r"README\.md(?:, | \()(?:\"|“|the \w+ section)")
# Built from parts, so that this file does not match itself.
OUTSIDE = ("../" + "shared", "shared/" + "MEASURED", "MEASURED" + ".md")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (backticks, dots, colons, apostrophes...),
    spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading's anchor, outside fenced code blocks; a repeated heading gets -1, -2... as on GitHub."""
    found, counts = set(), {}
    fenced = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            base = slug(m.group(1))
            n = counts[base] = counts.get(base, -1) + 1
            found.add(f"{base}-{n}" if n else base)
    return found


def sources() -> list[Path]:
    here = Path(__file__).resolve()  # it names the forms, not a section
    return sorted({p for pattern in SOURCES for p in ROOT.glob(pattern) if p.is_file() and p.resolve() != here})


def pointers(path: Path) -> list[tuple[int, str, str]]:
    """(line, document, anchor) for every pointer in ``path``."""
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        found += [(number, doc, anchor) for doc, anchor in POINTER.findall(line)]
        if path.suffix == ".md":
            own = str(path.relative_to(ROOT))
            found += [(number, own, anchor) for anchor in OWN_LINK.findall(line)]
    return found


def test_slug_is_githubs() -> None:
    assert slug("The head's training loop") == "the-heads-training-loop"
    assert slug("`fullscale.py`: CIFAKE size") == "fullscalepy-cifake-size"
    assert anchors("# A\n```bash\n# not a heading\n```\n## A\n## B c\n") == {"a", "a-1", "b-c"}


@pytest.mark.parametrize("doc", DOCS)
def test_the_documents_have_headings_to_point_at(doc: str) -> None:
    assert len(anchors((ROOT / doc).read_text(encoding="utf-8"))) >= 8


def test_every_pointer_into_a_document_names_one_of_its_headings() -> None:
    known = {doc: anchors((ROOT / doc).read_text(encoding="utf-8")) for doc in DOCS}
    checked, broken = 0, []
    for path in sources():
        for number, doc, anchor in pointers(path):
            checked += 1
            if anchor not in known[doc]:
                broken.append(f"{path.relative_to(ROOT)}:{number}: {doc}#{anchor}")
    assert checked > 20, "the pointers were not found: has their form changed?"
    assert not broken, "pointers to no heading:\n" + "\n".join(broken)


def test_pointers_use_the_anchor_form() -> None:
    old = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in sources()
           for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if OLD_FORM.search(line)]
    assert not old, "use README.md#anchor or bench/README.md#anchor:\n" + "\n".join(old)


def test_nothing_points_outside_the_repository() -> None:
    outside = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in sources()
               for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
               if any(s in line for s in OUTSIDE)]
    assert not outside, "a file no user has:\n" + "\n".join(outside)
