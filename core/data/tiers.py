"""Running tier steps: each document goes through the steps in order; the first one that drops it decides.

A tier step (`data_tier` component) is built into a *judge*: a callable taking one document and returning
None to keep it or a short reason (a string) to drop it. Judges may keep state (deduplication remembers what it
has seen), so prepare builds fresh ones for every run and feeds them the documents in the source's order.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

from tqdm import tqdm

Judge = Callable[[dict], "str | None"]

_VARIABLE = re.compile(r"'[^']*'|\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def reason_pattern(reason: str) -> str:
    """Group reasons that differ only in their numbers or quoted names ("symbol ratio # > #")."""
    return _VARIABLE.sub(lambda m: "'…'" if m.group().startswith("'") else "#", reason)


@dataclass
class StepReport:
    name: str  # the step's type, with "#2", "#3" for repeats of one type
    type: str
    seen: int = 0
    dropped: int = 0
    reasons: Counter = field(default_factory=Counter)  # reason pattern -> count

    def to_json(self, top: int = 10) -> dict:
        return {"name": self.name, "type": self.type, "seen": self.seen, "dropped": self.dropped,
                "reasons": dict(self.reasons.most_common(top))}


def step_names(types: list[str]) -> list[str]:
    seen: Counter = Counter()
    names = []
    for t in types:
        seen[t] += 1
        names.append(t if seen[t] == 1 else f"{t}#{seen[t]}")
    return names


def run_tiers(documents: Iterable[dict], steps: list[tuple[str, str, Judge]], *, progress: bool = False,
              total: int | None = None) -> tuple[list[dict], list[dict], list[StepReport]]:
    """Apply `steps` ((name, type, judge) in order). Returns the kept documents (L1), one record per document
    (`{"id", "source", "chars", "tier", "dropped_by", "reason"}`) and a report per step."""
    reports = [StepReport(name, type_) for name, type_, _ in steps]
    kept, records = [], []
    for doc in tqdm(documents, total=total, desc="tiers", unit="doc", disable=not progress or not steps):
        meta = doc["meta"]
        record = {"id": meta["id"], "source": meta.get("source"), "chars": len(doc["text"]),
                  "tier": 1, "dropped_by": None, "reason": None}
        for report, (_, _, judge) in zip(reports, steps):
            report.seen += 1
            reason = judge(doc)
            if reason is not None:
                reason = str(reason)
                report.dropped += 1
                report.reasons[reason_pattern(reason)] += 1
                record.update(tier=0, dropped_by=report.name, reason=reason)
                break
        else:
            kept.append(doc)
        records.append(record)
    return kept, records, reports
