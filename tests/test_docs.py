"""The README states the served contract's limits as the code defines them (one definition; the docs follow)."""

from __future__ import annotations

import re
from pathlib import Path

from satseg.contract import DEFAULT_MAX_PROMPTS, MAX_PROMPT_CHARS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_contract_table_states_the_prompt_limits() -> None:
    (row,) = [line for line in README.read_text().splitlines() if line.startswith("| `PROMPTS` |")]
    stated = re.search(r"1 to (\d+), none blank, each at most (\d+) characters", row)
    assert stated is not None, row
    assert (int(stated[1]), int(stated[2])) == (DEFAULT_MAX_PROMPTS, MAX_PROMPT_CHARS)
