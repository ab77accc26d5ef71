"""The defect of one row, raised while normalising, rendering or tokenizing it."""
from __future__ import annotations


class RowProblem(Exception):
    """A defect in one row; caught per row and recorded as ``"<reason>: <detail>"``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
