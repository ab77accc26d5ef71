"""The account of a tokenization: how many pairs were kept, truncated and dropped, and why.

Its own module because the report outlives the tokenizing: ``dpo.data.cache`` stores it beside the
tokenized rows (as JSON) and hands it back on a hit, and the trainer prints it and refuses a set of
rows that leaves no pair (``NoPairsLeft``), whether the rows were tokenized now or loaded.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from dpo.data.formats import DROP_REASONS

# Reasons whose detail the report prints: the row indices alone do not say what went wrong.
REPORTED_DETAILS = ("template_error", "template_mismatch", "not_raw_text", "needs_chat_template",
                    "image_unreadable", "image_count_mismatch", "image_truncated")


@dataclass
class FilterReport:
    """What ``tokenize_preferences`` kept, truncated and dropped (by reason, with example rows)."""

    total: int
    kept: int
    truncated: int
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[int]] = field(default_factory=dict)  # first row indices per reason
    # The first distinct details per reason (for template_error, the template's own message).
    details: dict[str, list[str]] = field(default_factory=dict)
    # Kept pairs with tools that the chat template does not render (Gemma 3's ignores them).
    tools_unrendered: int = 0

    MAX_EXAMPLES = 5

    @classmethod
    def from_rows(
        cls, problems: Sequence[str], row_indices: Sequence[int], truncated: Sequence[bool],
        tools_unrendered: int = 0,
    ) -> FilterReport:
        """Count the rows' problems (``""`` for a kept row); examples are the lowest rows."""
        report = cls(total=len(problems), kept=0, truncated=sum(truncated),
                     tools_unrendered=tools_unrendered)
        for problem, row in sorted(zip(problems, row_indices), key=lambda pr: pr[1]):
            if not problem:
                report.kept += 1
                continue
            reason, _, detail = problem.partition(":")
            report.dropped[reason] = report.dropped.get(reason, 0) + 1
            examples = report.examples.setdefault(reason, [])
            if len(examples) < cls.MAX_EXAMPLES:
                examples.append(row)
            details = report.details.setdefault(reason, [])
            if len(details) < cls.MAX_EXAMPLES and detail.strip() not in details:
                details.append(detail.strip())
        order = {reason: i for i, reason in enumerate(DROP_REASONS)}
        report.dropped = dict(sorted(report.dropped.items(), key=lambda kv: order[kv[0]]))
        return report

    def __str__(self) -> str:
        line = f"kept {self.kept} of {self.total} pairs ({self.truncated} truncated)"
        if not self.dropped:
            return line + ", dropped none" + self._warnings()
        reasons = []
        for reason, count in self.dropped.items():
            rows = ", ".join(str(row) for row in self.examples[reason])
            more = ", ..." if count > len(self.examples[reason]) else ""
            if reason in REPORTED_DETAILS:
                more += "".join(f'; "{detail}"' for detail in self.details[reason])
            reasons.append(f"{reason} {count} (rows {rows}{more})")
        return f"{line}, dropped {self.total - self.kept}: " + "; ".join(reasons) + \
            self._warnings()

    def _warnings(self) -> str:
        if not self.tools_unrendered:
            return ""
        return (f"; warning: the chat template does not render tools, so {self.tools_unrendered}"
                f" pairs are trained without the tools they were given")


class NoPairsLeft(ValueError):
    """Every row was dropped; ``report`` says why, so a caller can name the rows' set."""

    def __init__(self, report: FilterReport):
        super().__init__(f"no usable preference pairs are left: {report}")
        self.report = report
