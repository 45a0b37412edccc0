"""Several objectives: the Pareto front of a sweep's trials, and choosing one member of it by a
rule the user states.

An entry is a dict with "values": {metric: value}. `objectives` is {metric: "max"|"min"}.

A rule (`evaluate.py --choose`):

    val/AP                                          the best by that objective, in its own direction
    max val/AP subject to model/parameters<=2e6     ... among the entries that meet every constraint
    min model/parameters subject to val/AP>=0.3 and val/AP50>0.5

Constraints compare one value with a number (<=, >=, <, >, ==); the metrics are the entries'
values. Ties are broken by the other objectives in the order given, then by the first entry.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

OPERATORS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "<": operator.lt, ">": operator.gt}
_CONSTRAINT = re.compile(r"^\s*(\S+?)\s*(<=|>=|==|<|>)\s*(\S+)\s*$")


class RuleError(ValueError):
    """A rule that cannot be read, or that no entry of the front satisfies."""


def _finite(entry: dict, objectives: dict[str, str]) -> bool:
    values = entry.get("values") or {}
    return all(isinstance(values.get(m), (int, float)) and math.isfinite(values[m]) for m in objectives)


def dominates(a: dict, b: dict, objectives: dict[str, str]) -> bool:
    """a is at least as good as b in every objective and better in one."""
    better = False
    for metric, mode in objectives.items():
        x, y = a["values"][metric], b["values"][metric]
        if mode == "min":
            x, y = -x, -y
        if x < y:
            return False
        better |= x > y
    return better


def front(entries: list[dict], objectives: dict[str, str]) -> list[dict]:
    """The entries no other entry dominates (entries missing a value are left out)."""
    candidates = [e for e in entries if _finite(e, objectives)]
    return [e for e in candidates if not any(dominates(o, e, objectives) for o in candidates if o is not e)]


@dataclass
class Rule:
    metric: str
    mode: str | None  # None: the objective's own direction
    constraints: list[tuple[str, str, float]]

    def __str__(self) -> str:
        text = f"{self.mode + ' ' if self.mode else ''}{self.metric}"
        if self.constraints:
            text += " subject to " + " and ".join(f"{m}{op}{v:g}" for m, op, v in self.constraints)
        return text


def parse_rule(text: str) -> Rule:
    parts = re.split(r"\s+subject\s+to(?:\s+|$)", text.strip(), maxsplit=1)
    head, sep, tail = parts[0], len(parts) > 1, parts[1] if len(parts) > 1 else ""
    words = head.split()
    if len(words) == 2 and words[0] in ("max", "min"):
        mode, metric = words
    elif len(words) == 1 and words[0] not in ("max", "min"):
        mode, metric = None, words[0]
    else:
        raise RuleError(f"rule {text!r}: expected '[max|min] METRIC [subject to METRIC<=NUMBER [and ...]]'")
    constraints = []
    if tail.strip():
        for part in re.split(r"\s+and\s+|,", tail):
            match = _CONSTRAINT.match(part)
            if not match:
                raise RuleError(
                    f"rule {text!r}: constraint {part.strip()!r}: expected METRIC<=NUMBER (or >=, <, >, ==)"
                )
            try:
                constraints.append((match[1], match[2], float(match[3])))
            except ValueError as e:
                raise RuleError(f"rule {text!r}: constraint {part.strip()!r}: {match[3]!r} is not a number") from e
    elif sep:
        raise RuleError(f"rule {text!r}: nothing after 'subject to'")
    return Rule(metric, mode, constraints)


def choose(entries: list[dict], rule: Rule | str, objectives: dict[str, str]) -> dict:
    """The entry `rule` picks; RuleError naming the rule when it names an unknown metric or no
    entry meets its constraints."""
    rule = parse_rule(rule) if isinstance(rule, str) else rule
    known = sorted({k for e in entries for k in (e.get("values") or {})})
    for metric in [rule.metric, *(m for m, _, _ in rule.constraints)]:
        if metric not in known:
            raise RuleError(f"rule '{rule}': {metric!r} is not among the front's values ({', '.join(known)})")
    mode = rule.mode or objectives.get(rule.metric)
    if mode is None:
        raise RuleError(f"rule '{rule}': {rule.metric} is not an objective; say max or min")
    meets = [e for e in entries if all(OPERATORS[op](e["values"].get(m, math.nan), v) for m, op, v in rule.constraints)]
    if not meets:
        listed = "; ".join(str({k: e["values"].get(k) for k in known}) for e in entries)
        raise RuleError(f"rule '{rule}': no member of the front meets the constraints; the front: {listed}")
    order = [(rule.metric, mode)] + [(m, d) for m, d in objectives.items() if m != rule.metric]

    def key(e):
        return tuple(-e["values"][m] if d == "max" else e["values"][m] for m, d in order)

    return min(meets, key=key)
