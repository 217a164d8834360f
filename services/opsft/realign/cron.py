"""Cron expressions for `opsft schedule`: the classic 5 fields, with fire times computed by cronsim.

    minute hour day-of-month month day-of-week      e.g. "0 3 * * *" (03:00 every day)

Fields take what cron takes (`*`, numbers, ranges `a-b`, lists, steps `*/n` and `a-b/n`, the names
`jan` and `mon`, day-of-week 7 = Sunday; when both day fields are restricted, a day matches if
EITHER does), plus cronsim's `L`, `LW` and `mon#2`. The macros `@hourly @daily @midnight @weekly
@monthly @yearly @annually` are expanded here. A bad expression is a ValueError naming it.

    next_fire_time("*/15 9-17 * * mon-fri", datetime(2026, 11, 6, 17, 50, tzinfo=ZoneInfo("Europe/Paris")))
    fire_times("0 3 * * *", now, 5)          # the next 5

Give an aware datetime (a zoneinfo.ZoneInfo zone): the answers are in that zone and follow its
daylight-saving changes as (Debian) cron does, through cronsim 2.9:
- a time skipped when the clocks go forward fires at the jump: "30 2 * * *" in Europe/Paris on
  2026-03-29 fires at 03:00+02:00;
- when the clocks go back, a schedule with a wildcard minute or hour ("*/30 * * * *", "0 * * * *")
  fires in both copies of the repeated hour (every real 30 minutes), while one at a fixed hour and
  minute ("30 2 * * *") fires once, in the first copy (croniter 7.0 fires such a job twice).
A naive datetime is taken as a wall clock without daylight saving (answers are naive too).
Plain Python, no Ray: `python -c "from opsft.realign.cron import next_fire_time"`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from cronsim import CronSim, CronSimError

MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
          "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
FIELD_NAMES = "minute hour day-of-month month day-of-week"
# cronsim's words, said with what is wrong (its "Bad day-of-month" also means: no month of the
# expression has that day, e.g. "0 0 30 2 *")
HINTS = {"Bad day-of-month": "bad day-of-month (out of 1-31, or a day that none of its months has)"}


@dataclass(frozen=True)
class Cron:
    """A validated expression: `text` as given, `expr` its 5 fields (a macro expanded)."""

    text: str
    expr: str


def parse_cron(expr: str) -> Cron:
    """Check a 5-field expression (or a macro); ValueError with the expression and what is wrong."""
    if not isinstance(expr, str):
        raise ValueError(f"cron {expr!r}: not a string")
    fields = MACROS.get(expr.strip().lower(), expr.strip())
    n = len(fields.split())
    if n != 5:
        raise ValueError(f"cron {expr!r}: needs 5 fields ({FIELD_NAMES}), got {n}")
    try:
        CronSim(fields, datetime(2000, 1, 1))
    except CronSimError as exc:
        raise ValueError(f"cron {expr!r}: {HINTS.get(str(exc), str(exc).lower())}") from None
    return Cron(expr, fields)


def _instant(t: datetime) -> datetime:
    """What to compare: the UTC instant of an aware time (a same-zone comparison ignores `fold`)."""
    return t.astimezone(UTC) if t.tzinfo is not None else t


def fire_times(expr: str | Cron, after: datetime, n: int) -> list[datetime]:
    """The first `n` fire times strictly after `after`, in after's zone (seconds are always 0)."""
    cron = parse_cron(expr) if isinstance(expr, str) else expr
    found: list[datetime] = []
    last = _instant(after)
    it = CronSim(cron.expr, after)
    try:
        while len(found) < n:
            t = next(it)
            # For a fixed hour and minute cronsim walks the wall clock, which forgets which copy of a
            # repeated hour `after` was in: never answer a time that is not after the previous one.
            if _instant(t) > last:
                found.append(t)
                last = _instant(t)
    except StopIteration:
        raise ValueError(f"cron {cron.text!r} never fires (no matching time within 50 years after "
                         f"{after.isoformat()})") from None
    return found


def next_fire_time(expr: str | Cron, after: datetime) -> datetime:
    """The first time strictly after `after` at which `expr` fires."""
    return fire_times(expr, after, 1)[0]
