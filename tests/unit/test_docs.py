"""The documentation stays true to the tree: every test docs/invariants.md names exists, every
relative link in the repository's Markdown resolves to a file (and a heading in it), the README's
contents line lists its sections in order, and docs/contract.md names every message, field and
rejection rule the code has."""

from __future__ import annotations

import ast
import json
import os
import re
import unicodedata
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import get_args
from urllib.parse import unquote

import pytest

from services.dispatcher.gateway import SmsRequest
from shared.schemas import (
    INBOUND,
    DeliveryStatus,
    LifecycleEvent,
    Status,
    TimerKind,
    TimerMessage,
)

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
# Trees that hold Markdown the project did not write (or does not keep).
SKIPPED_DIRS = {"node_modules", "results", "__pycache__"}

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")
_TEST_REFERENCE = re.compile(r"\b(tests/[\w/]+\.py)::(\w+)(?:::(\w+))?")
_TEST_FILE = re.compile(r"\b(tests/[\w/]+\.py)\b")
_TREES = "shared|services|tests|testbed|bench|cluster|deploy|k8s|examples|docs|scripts"
_REPO_PATH = re.compile(rf"`((?:{_TREES})/[\w./-]*)`")
# Written by a run, git-ignored: named in the docs, absent from a checkout.
_RUN_OUTPUT = ("bench/results",)
# `a/file.py` `name`, or `a/file.py` (`name`, `other`): names the file must hold
_NAMES_IN_FILE = re.compile(r"`((?:shared|services)/[\w/]+\.py)`\s+(?:\(([^)]*)\)|`([\w.]+)`)")


def markdown_files() -> list[Path]:
    """Every Markdown file of the repository, outside hidden and third-party trees."""
    found = []
    for directory, subdirectories, files in os.walk(ROOT):
        subdirectories[:] = [
            d for d in subdirectories if not d.startswith(".") and d not in SKIPPED_DIRS
        ]
        found += [Path(directory, name) for name in files if name.endswith(".md")]
    return sorted(found)


def prose_lines(text: str) -> Iterator[str]:
    """The lines outside fenced code blocks."""
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield line


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text without markup, lower case, punctuation
    dropped (letters, marks, digits, `_` and `-` stay), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    kept = (c for c in text if c.isalnum() or c in "_- " or unicodedata.category(c).startswith("M"))
    return "".join(kept).replace(" ", "-")


def headings(text: str) -> list[tuple[int, str]]:
    return [
        (len(m.group(1)), m.group(2)) for line in prose_lines(text) if (m := _HEADING.match(line))
    ]


def anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated one gets -1, -2, … as on GitHub."""
    seen: dict[str, int] = {}
    result = set()
    for _, heading in headings(text):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def relative_links(text: str) -> list[str]:
    links = []
    for line in prose_lines(text):
        links += [m.group(1) for m in _LINK.finditer(_INLINE_CODE.sub("", line))]
    return [target for target in links if not _SCHEME.match(target)]


def broken_links(source: Path, text: str) -> list[str]:
    """The relative links of `text` (the content of `source`) that lead nowhere."""
    broken = []
    for target in relative_links(text):
        path_part, _, fragment = target.partition("#")
        path = (source.parent / unquote(path_part)).resolve() if path_part else source
        if not path.exists() or not path.is_relative_to(ROOT):
            broken.append(f"{target}: no such file")
            continue
        in_file = anchors(path.read_text(encoding="utf-8")) if path.suffix == ".md" else None
        if fragment and in_file is not None and unquote(fragment) not in in_file:
            broken.append(f"{target}: no such heading in {path.relative_to(ROOT)}")
    return broken


def defined_tests(path: Path) -> set[str]:
    """`name` for each test function of a module, `Class::name` for each in a class."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {
                f"{node.name}::{item.name}"
                for item in node.body
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
            }
    return names


def test_headings_become_github_anchors():
    text = "\n".join(
        [
            "# followups",
            "## Timer backends (`DELAY_BACKEND`)",
            "```bash",
            "# a comment, not a heading",
            "```",
            "### Signing (Standard Webhooks)",
            "## What limits each figure",
            "## Tests",
            "## Tests",
        ]
    )
    assert anchors(text) == {
        "followups",
        "timer-backends-delay_backend",
        "signing-standard-webhooks",
        "what-limits-each-figure",
        "tests",
        "tests-1",
    }


def test_a_broken_link_is_caught():
    source = ROOT / "README.md"
    text = "\n".join(
        [
            "[ok](docs/contract.md#the-webhook-call) and [gone](docs/nothing.md)",
            "[bad heading](docs/contract.md#no-such-heading) · [web](https://example.com)",
            "`[code](not/a/link.md)`",
            "```",
            "[fenced](not/a/link.md)",
            "```",
        ]
    )
    assert broken_links(source, text) == [
        "docs/nothing.md: no such file",
        "docs/contract.md#no-such-heading: no such heading in docs/contract.md",
    ]


def test_every_relative_link_resolves():
    files = markdown_files()
    assert ROOT / "README.md" in files
    assert DOCS / "invariants.md" in files
    broken = {
        str(path.relative_to(ROOT)): problems
        for path in files
        if (problems := broken_links(path, path.read_text(encoding="utf-8")))
    }
    assert broken == {}


def test_every_test_named_in_the_invariants_exists():
    text = (DOCS / "invariants.md").read_text(encoding="utf-8")
    references = _TEST_REFERENCE.findall(text)
    assert len(references) > 50, "the invariants name their tests as file::test"
    missing = []
    for file, first, second in references:
        path = ROOT / file
        name = f"{first}::{second}" if second else first
        if not path.is_file() or name not in defined_tests(path):
            missing.append(f"{file}::{name}")
    assert missing == []


def test_every_test_file_the_docs_name_exists():
    named = set()
    for path in [ROOT / "README.md", *DOCS.glob("*.md")]:
        named |= set(_TEST_FILE.findall(path.read_text(encoding="utf-8")))
    assert named, "the docs name test files"
    assert sorted(f for f in named if not (ROOT / f).is_file()) == []


def test_every_file_and_name_the_docs_point_at_exists():
    missing = []
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text(encoding="utf-8").replace("\n", " ")
        for named in _REPO_PATH.findall(text):
            if not named.startswith(_RUN_OUTPUT) and not (ROOT / named.rstrip("/")).exists():
                missing.append(f"{path.name}: {named}")
        for file, listed, single in _NAMES_IN_FILE.findall(text):
            source = ROOT / file
            if not source.is_file():
                continue  # reported above
            code = source.read_text(encoding="utf-8")
            for name in re.findall(r"`([\w.]+)`", listed) if listed else [single]:
                if not re.search(rf"\b{re.escape(name.rsplit('.', 1)[-1])}\b", code):
                    missing.append(f"{path.name}: {name} in {file}")
    assert missing == []


def test_the_readme_contents_list_every_section_in_order():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    contents = [line for line in prose_lines(text) if line.startswith("Contents:")]
    assert len(contents) == 1, "one contents line"
    listed = [target.removeprefix("#") for target in relative_links(contents[0])]
    sections = [slug(heading) for level, heading in headings(text) if level == 2]
    assert listed == sections


def _code_rules() -> set[str]:
    """Every rule a message can be rejected with, as the code raises or writes it."""
    raised = re.compile(r"(?:InvalidMessage|Rejected)\(\s*\"([a-z_]+)\"|\brule=\"([a-z_]+)\"")
    rules = set()
    for tree in ("shared", "services"):
        for path in (ROOT / tree).rglob("*.py"):
            for match in raised.finditer(path.read_text(encoding="utf-8")):
                rules.add(match.group(1) or match.group(2))
    return rules


def test_the_contract_names_every_message_and_field():
    text = (DOCS / "contract.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`([^`]+)`", text))
    request = SmsRequest(
        phone="+15555550123",
        message="text",
        contractor_id=1,
        followup_id=1,
        followup_type="t",
        scheduled_time=datetime(2026, 12, 1, tzinfo=UTC),
        idempotency_key="k",
        attempt=1,
        priority=0,
    )
    asyncapi = json.loads((DOCS / "asyncapi.json").read_text(encoding="utf-8"))
    wanted = {
        *INBOUND,
        *(field for model in INBOUND.values() for field in model.model_fields),
        *LifecycleEvent.model_fields,
        *get_args(LifecycleEvent.model_fields["event"].annotation),
        *TimerMessage.model_fields,
        *(kind.value for kind in TimerKind),
        *(status.value for status in Status),
        *(status.value for status in DeliveryStatus),
        *request.payload(),
        *asyncapi["channels"],
        *_code_rules(),
    }
    assert len(_code_rules()) >= 10
    assert sorted(wanted - named) == []


@pytest.mark.parametrize(
    "name", ["architecture.md", "contract.md", "invariants.md", "performance.md"]
)
def test_the_readme_points_at_each_document(name):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"(docs/{name})" in readme
