"""The README and the docs pages say only what holds: the code tour's line ranges, every flag,
every file, the defaults and metrics the README lists, and every README command — run by a named
test (CPU) or at least parsed by the loaders train.py and accelerate use (GPU recipes).

Cheap by design: nothing here trains; the commands are run by the tests `RUN_BY` names.
"""
import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml

from dpo.config.cli import _build_parser, load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
TOUR = ROOT / "docs" / "code-tour.md"


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def flat(s: str) -> str:
    """Whitespace-normalised: a reference that wraps a line reads as one that does not."""
    return " ".join(s.split())


# --- The code tour's line ranges ------------------------------------------------------------

def definitions() -> dict[str, list[tuple[int, int]]]:
    """Line ranges (decorators included) of every function, class and module-level name."""
    found: dict[str, list[tuple[int, int]]] = {}
    for path in [*sorted((ROOT / "dpo").rglob("*.py")), ROOT / "train.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                found.setdefault(node.name, []).append((start, node.end_lineno))
            elif isinstance(node, ast.Assign) and node.col_offset == 0:
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        found.setdefault(target.id, []).append((node.lineno, node.end_lineno))
    return found


# "`name` (lines a–b)", "`name` (`file.py` lines a–b)", "`name` (a–b)", "(`name`, a–b)"
LINE_REF = re.compile(r"`(\w+)`(?:,| \((?:`[^`]+` )?)\s?(?:lines )?(\d+)–(\d+)")
LINE_RANGE = re.compile(r"\b\d+–\d+\b|\blines? \d+")


def line_ref_problems(tour: str, defs: dict) -> list[str]:
    """Each range of `tour` that does not span exactly the definition of the name it follows,
    and each line number that follows no name (it could not be checked)."""
    tour = flat(tour)
    refs = list(LINE_REF.finditer(tour))
    wrong = [f"{m[1]} ({m[2]}–{m[3]}): defined at {defs.get(m[1])}" for m in refs
             if (int(m[2]), int(m[3])) not in defs.get(m[1], [])]
    covered = {i for m in refs for i in range(m.start(2) - len("lines "), m.end(3))}
    loose = [m[0] for m in LINE_RANGE.finditer(tour) if m.start() not in covered]
    return wrong + [f"{n!r} names no definition" for n in loose]


def test_code_tour_line_numbers_point_at_their_definitions():
    """Every "`name` (lines a–b)" of docs/code-tour.md spans exactly the definition of `name`,
    also where the reference wraps a line; no line number stands without its name."""
    tour = text(TOUR)
    assert len(LINE_REF.findall(flat(tour))) > 50
    assert not line_ref_problems(tour, definitions())


def test_the_tour_check_catches_a_wrapped_stale_range():
    defs = {"precompute_for_run": [(64, 81)], "train": [(48, 190)]}
    assert not line_ref_problems("`precompute_for_run`\n(lines 64–81)", defs)
    assert line_ref_problems("`precompute_for_run`\n(lines 10–20)", defs)
    assert line_ref_problems("`precompute_for_run` (`dpo/x.py`\nlines 10–20)", defs)
    assert line_ref_problems("as (`precompute_for_run`,\n10–20) does", defs)
    assert line_ref_problems("`train` (lines 48–190), then the loop (125–181)", defs)
