"""Gate a run on its metrics.jsonl: `python -m automodel_mimo.metrics.check FILE "loss@last < 0.3" ...`.

Each check is `<key>@<agg> <op> <number>`. Rows without the key are skipped, since train and
eval rows carry different keys. Exit 0: all pass; 1: a check failed; 2: the check itself is
broken (bad expression, missing file, key never logged), so a typo never reads as a pass or a
plain regression.
"""

from __future__ import annotations

import json
import math
import operator
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

USAGE = 'usage: python -m automodel_mimo.metrics.check METRICS_JSONL "KEY@AGG OP NUMBER" ...'

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
}
_AGGS: dict[str, Callable[[list[float]], float]] = {
    "last": lambda v: v[-1],
    "first": lambda v: v[0],
    "max": max,
    "min": min,
    "mean": lambda v: math.fsum(v) / len(v),
}
_EXPR = re.compile(r"\s*(?P<key>[^\s@]+)@(?P<agg>\w+)\s*(?P<op><=|>=|==|<|>)\s*(?P<num>\S+)\s*")


class CheckError(ValueError):
    """The check cannot be evaluated (exit 2), as opposed to evaluating to FAIL (exit 1)."""


def check(rows: Sequence[dict], expr: str) -> tuple[bool, float, str]:
    """Evaluate one `<key>@<agg> <op> <number>` expression over metric rows."""
    key, agg, op, threshold = _parse(expr)
    value = _aggregate(_values(rows, key), agg)
    ok = _OPS[op](value, float(threshold))
    return ok, value, f"{'PASS' if ok else 'FAIL'} {key}@{agg} = {value:.6g} {op} {threshold}"


def _parse(expr: str) -> tuple[str, str, str, str]:
    m = _EXPR.fullmatch(expr)
    if m is None:
        raise CheckError(f"malformed check {expr!r}; expected e.g. 'loss@last < 0.3'")
    if m["agg"] not in _AGGS:
        raise CheckError(f"unknown aggregation {m['agg']!r} in {expr!r}; use one of {', '.join(_AGGS)}")
    try:
        float(m["num"])
    except ValueError:
        raise CheckError(f"threshold {m['num']!r} in {expr!r} is not a number") from None
    return m["key"], m["agg"], m["op"], m["num"]


def _values(rows: Sequence[dict], key: str) -> list[float]:
    values = []
    for row in rows:
        if key not in row:
            continue
        v = row[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise CheckError(f"{key!r} is not a number at step {row.get('step')}: {v!r}")
        values.append(float(v))
    if not values:
        raise CheckError(f"key {key!r} never appears in the metrics")
    return values


def _aggregate(values: list[float], agg: str) -> float:
    # max/min over a list holding NaN depend on its position; a NaN anywhere must fail the check.
    if agg in ("max", "min", "mean") and any(math.isnan(v) for v in values):
        return math.nan
    return _AGGS[agg](values)


def load_rows(path: str | Path) -> list[dict]:
    """Read metrics.jsonl, one JSON object per line."""
    path = Path(path)
    if not path.is_file():
        raise CheckError(f"metrics file not found: {path}")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise CheckError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: print one PASS/FAIL line per check; exit 0 all pass, 1 any fail, 2 broken check."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        rows = load_rows(args[0])
    except CheckError as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 2
    status = 0
    for expr in args[1:]:  # report every check, so one bad line does not hide the others
        try:
            ok, _, line = check(rows, expr)
        except CheckError as e:
            print(f"ERROR {e}", file=sys.stderr)
            status = 2
            continue
        print(line)
        status = status or (0 if ok else 1)
    return status


if __name__ == "__main__":
    sys.exit(main())
