"""Cron expressions for `opsft schedule`: a small parser of the classic 5 fields and the next fire time.

    minute hour day-of-month month day-of-week      e.g. "0 3 * * *" (03:00 every day)

Each field takes `*`, a number, a range `a-b`, a list `a,b,c`, and steps `*/n` or `a-b/n`; months
and weekdays also take names (`jan`, `mon`); day-of-week 0 and 7 are both Sunday. As in Vixie cron,
when both day-of-month and day-of-week are restricted, a day matches if EITHER matches. The macros
`@hourly @daily @midnight @weekly @monthly @yearly @annually` are accepted.

    next_fire_time("*/15 9-17 * * mon-fri", datetime(2026, 11, 6, 17, 50))  # -> 2026-11-09 09:00

Times are wall-clock times: a naive datetime gives a naive answer; an aware one gives an answer in
the same tzinfo (with a zoneinfo.ZoneInfo the UTC offset follows daylight saving). Plain Python,
no Ray: `python -c "from opsft.realign.cron import next_fire_time"`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
WEEKDAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
          "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
# (name, lowest, highest, names for lowest..): day-of-week allows 7 (= Sunday) and folds it to 0 below.
FIELDS = [("minute", 0, 59, None), ("hour", 0, 23, None), ("day of month", 1, 31, None),
          ("month", 1, 12, MONTHS), ("day of week", 0, 7, WEEKDAYS)]
SEARCH_YEARS = 8  # a valid expression fires within 8 years (Feb 29 on a given weekday is the slowest)


@dataclass(frozen=True)
class Cron:
    """A parsed expression: the allowed values of each field."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday .. 6 = Saturday
    days_restricted: bool     # day-of-month was not '*'
    weekdays_restricted: bool

    def day_matches(self, day: datetime) -> bool:
        in_month = day.day in self.days
        in_week = (day.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return in_month or in_week
        return in_month and in_week

    def matches(self, when: datetime) -> bool:
        return (when.minute in self.minutes and when.hour in self.hours and when.month in self.months
                and self.day_matches(when))


def _value(token: str, field: tuple, expr: str) -> int:
    name, low, high, names = field
    if names and token.lower() in names:
        return names.index(token.lower()) + low
    if not token.isdigit():
        raise ValueError(f"cron {expr!r}: {name} value {token!r} is not a number"
                         + (f" or one of {names}" if names else ""))
    value = int(token)
    if not low <= value <= high:
        raise ValueError(f"cron {expr!r}: {name} value {value} is outside {low}-{high}")
    return value


def _field(text: str, field: tuple, expr: str) -> set[int]:
    name, low, high, _ = field
    values: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"cron {expr!r}: {name} step {step_text!r} must be a positive number")
            step = int(step_text)
        if base == "*":
            start, stop = low, high
        elif "-" in base:
            a, _, b = base.partition("-")
            start, stop = _value(a, field, expr), _value(b, field, expr)
            if start > stop:
                raise ValueError(f"cron {expr!r}: {name} range {base!r} runs backwards")
        elif base:
            start = _value(base, field, expr)
            stop = high if step_text else start  # "5/10" = from 5 to the end, every 10
        else:
            raise ValueError(f"cron {expr!r}: empty {name} in {text!r}")
        values.update(range(start, stop + 1, step))
    return values


def parse_cron(expr: str) -> Cron:
    """Parse a 5-field expression (or a macro); ValueError names the field that is wrong."""
    text = MACROS.get(expr.strip().lower(), expr)
    parts = text.split()
    if len(parts) != 5:
        raise ValueError(f"cron {expr!r}: needs 5 fields (minute hour day-of-month month day-of-week), "
                         f"got {len(parts)}")
    sets = [_field(p, f, expr) for p, f in zip(parts, FIELDS, strict=True)]
    weekdays = {d % 7 for d in sets[4]}
    return Cron(expr, frozenset(sets[0]), frozenset(sets[1]), frozenset(sets[2]), frozenset(sets[3]),
                frozenset(weekdays), not parts[2].startswith("*"), not parts[4].startswith("*"))


def _next_wall(cron: Cron, after: datetime) -> datetime:
    """The first wall-clock minute strictly after `after` (naive) that matches."""
    t = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    limit = t.replace(year=t.year + SEARCH_YEARS, month=1, day=1, hour=0, minute=0)
    while t < limit:
        if t.month not in cron.months:  # jump to the 1st of the next month
            t = (t.replace(day=1) + timedelta(days=32)).replace(day=1, hour=0, minute=0)
        elif not cron.day_matches(t):
            t = (t + timedelta(days=1)).replace(hour=0, minute=0)
        elif t.hour not in cron.hours:
            t = (t + timedelta(hours=1)).replace(minute=0)
        elif t.minute not in cron.minutes:
            t += timedelta(minutes=1)
        else:
            return t
    raise ValueError(f"cron {cron.text!r} never fires (no matching date within {SEARCH_YEARS} years)")


def next_fire_time(expr: str | Cron, after: datetime) -> datetime:
    """The first time strictly after `after` at which `expr` fires (seconds dropped)."""
    cron = parse_cron(expr) if isinstance(expr, str) else expr
    tz = after.tzinfo
    if tz is None:
        return _next_wall(cron, after)
    return _next_wall(cron, after.replace(tzinfo=None)).replace(tzinfo=tz)
