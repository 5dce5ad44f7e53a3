"""Cases of tests/test_compiled.py: Winograd convolutions."""

from __future__ import annotations

from compiled_cases import Case

CASES: list[Case] = []
