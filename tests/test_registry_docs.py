"""The README's tables against the code they describe.

- Supported operations: the "rules" column must name exactly the registered rules
  (``get_rule(key).name`` over :func:`lipbound.rules.registered_keys`): a rule without a row, or
  a row naming a rule that does not exist, fails.
- What is certified: every method that :func:`lipbound.estimate` runs has a row.

That every registered key has a property test is checked by
``tests/test_rule_properties.py::test_every_registered_rule_has_a_generator`` (one place).
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lipbound.report import METHODS
from lipbound.rules import get_rule, registered_keys

README = Path(__file__).resolve().parents[1] / "README.md"
_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def table_after(text: str, heading: str) -> list[list[str]]:
    """The first markdown table after ``heading``: its rows (header and rule line dropped) as
    lists of cells (``\\|`` inside a cell is not a separator)."""
    start = text.index(heading)
    rows: list[list[str]] = []
    started = False
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            started = True
            rows.append([c.strip() for c in _CELL_SPLIT.split(line.strip())[1:-1]])
        elif started:
            break
        elif line.startswith("#"):
            break
    if len(rows) < 2:
        raise AssertionError(f"no table after {heading!r} in README.md")
    return rows[2:]


def rules_in_readme(text: str) -> set[str]:
    header_row = table_after(text, "## Supported operations")
    return {name for row in header_row for name in re.findall(r"`([^`]+)`", row[-1])}


_NAMES = (
    "import json; from lipbound.rules import get_rule, registered_keys; "
    "print(json.dumps(sorted({get_rule(k).name for k in registered_keys()})))"
)


@functools.lru_cache(maxsize=1)
def registered_rule_names() -> frozenset[str]:
    """The rules the package registers itself: read in a fresh interpreter, so that rules other
    tests (or doctests) register in this process do not count."""
    out = subprocess.run([sys.executable, "-c", _NAMES], capture_output=True, text=True,
                         check=True, timeout=120)
    return frozenset(json.loads(out.stdout))


def test_names_come_from_the_registry() -> None:
    assert registered_rule_names() <= {get_rule(k).name for k in registered_keys()}


def test_table_parser_reads_escaped_pipes_and_stops_at_the_table_end() -> None:
    text = ("## Supported operations\n\n| op | rules |\n|---|---|\n"
            "| `\\|x\\|` | `abs/sin/cos` |\n\n| a |")
    assert table_after(text, "## Supported operations") == [["`\\|x\\|`", "`abs/sin/cos`"]]
    assert rules_in_readme(text) == {"abs/sin/cos"}
    with pytest.raises(AssertionError, match="no table"):
        table_after("## Supported operations\n\ntext\n", "## Supported operations")


def test_every_registered_rule_has_a_readme_row() -> None:
    documented = rules_in_readme(README.read_text(encoding="utf-8"))
    registered = registered_rule_names()
    assert len(registered) > 30
    missing = sorted(registered - documented)
    assert missing == [], f"registered rules without a row in README's ops table: {missing}"
    stale = sorted(documented - registered)
    assert stale == [], f"README's ops table names rules that are not registered: {stale}"


def test_a_rule_without_a_row_is_caught() -> None:
    text = README.read_text(encoding="utf-8").replace("`mish`", "")
    assert "mish" in registered_rule_names() - rules_in_readme(text)


def test_every_estimate_method_has_a_certification_row() -> None:
    rows = table_after(README.read_text(encoding="utf-8"), "## What is certified")
    called = {m for row in rows for m in re.findall(r"`(\w+)\(", row[0])}
    missing = sorted(fn.__name__ for fn in METHODS.values() if fn.__name__ not in called)
    assert missing == [], f"estimate() methods without a row in README's certified table: {missing}"
