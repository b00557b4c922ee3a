"""No typed measurements in the docs (issue #15).

``docs/*.md`` and ``README.md`` are reference (what, why, how to call it). A number measured by
a run (a duration, a speed-up, a looser-by factor) belongs to a generated table in
``benchmarks/results/`` (the docs name the file and the section), to a tested example
(``tests/test_docs_examples.py``), or, for past runs, to ``CHANGELOG.md``. This test flags the
common forms of a typed measurement in prose: a number followed by a unit of time, and
``Nx faster`` / ``Nx looser`` / ... Code blocks, inline code and lines that name a results file
are not read.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]

_NUM = r"~?\d+(?:\.\d+)?"
_RANGE = rf"{_NUM}(?:\s*(?:-|to)\s*{_NUM})?"
# "45-50 s", "12.9 s", "15 ms", "10 minutes", "2 h" (a duration)
DURATION = re.compile(rf"(?<![\w.^-]){_RANGE}\s*(?:s|ms|sec|seconds?|min|minutes?|h|hours?)\b")
# "4.95x less time", "1.3x-3.8x looser", "2-4x faster", "6.7 times fewer"
RATIO = re.compile(
    rf"(?<![\w.^-]){_NUM}(?:x?\s*(?:-|to)\s*{_NUM})?\s*(?:x|×|times)\s+"
    r"(?:faster|slower|looser|tighter|fewer|less|more|smaller|larger|below|above|cheaper)\b"
)

# Exact phrases that match the patterns but are not measurements. Keep it short.
ALLOWED = (
    "10 s per pair",  # docs/seqlip.md: the default of seqlip's time_limit, an option's value
)


def _prose_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, text)`` outside fenced code blocks and off lines that name a results
    file, inline code removed."""
    out, fenced = [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and "benchmarks/results/" not in line:
            out.append((n, re.sub(r"`[^`]*`", "``", line)))
    return out


def typed_measurements(path: Path) -> list[str]:
    """The typed measurements of one markdown file, as ``file:line: match`` strings."""
    found = []
    for n, line in _prose_lines(path):
        text = line
        for phrase in ALLOWED:
            text = text.replace(phrase, "")
        for pattern in (DURATION, RATIO):
            found += [f"{path.name}:{n}: {m.group(0)!r}" for m in pattern.finditer(text)]
    return found


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_no_typed_measurements_in_docs(path: Path) -> None:
    found = typed_measurements(path)
    assert not found, (
        "typed measurements in the docs; point to the benchmarks/results/ file (and section) "
        "that holds them, or move run history to CHANGELOG.md:\n" + "\n".join(found)
    )


@pytest.mark.parametrize(
    "line",
    [
        "it costs 45-50 s (SCS) on the deep nets",
        "(about 15 s of CPU time; ...)",
        "12.9 s in Lanczos against 13.3 s",
        "the full run takes about 10 minutes",
        "a cached call takes 3 ms",
        "with 6.7x fewer operator applications and 4.95x less time",
        "where SeqLip is 1.3x-3.8x looser",
        "float32, 2-4x faster on CPU",
        "true norm up to ~3x larger",
        "it is 2 times slower",
    ],
)
def test_the_patterns_catch_typed_measurements(line: str, tmp_path: Path) -> None:
    p = tmp_path / "doc.md"
    p.write_text(line + "\n")
    assert typed_measurements(p), line


@pytest.mark.parametrize(
    "line",
    [
        "`lipbound.exact(model, input_shape, *, norm=2, time_limit=60.0)`",
        "`time_limit` (10 s per pair, auto mode)",
        "activations with slope in `[0, 1]`, sigmoid `[0, 1/4]`, LeakyReLU(s) `[s, 1]`",
        "inflated by a relative `1e-9`; 192 channels; 24 batched Lanczos steps",
        "3x224x224 and 64x56x56 inputs; a 3x3 stride-1 conv; 2 samples; the 10x target",
        "the 29 layers: 4.95x faster (see `benchmarks/results/spectral.md`, Summary)",
        "2^-22 margins, 2-D inputs, a 2-core machine",
    ],
)
def test_the_patterns_pass_definitions(line: str, tmp_path: Path) -> None:
    p = tmp_path / "doc.md"
    p.write_text(line + "\n")
    assert not typed_measurements(p), line


def test_code_blocks_are_not_read(tmp_path: Path) -> None:
    p = tmp_path / "doc.md"
    p.write_text("```\nlower 5.5014 certified 12.9 s, 4x faster\n```\n")
    assert not typed_measurements(p)
