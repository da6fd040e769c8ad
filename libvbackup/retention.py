"""Which backup points a retention policy keeps (pure): borgbackup's ``prune`` rules.

A ``Policy`` says how many points to keep by each rule: ``last`` (the newest points, one by
one), ``daily``, ``weekly`` (ISO 8601 weeks, ``%G-%V``: Monday to Sunday, the week holding
4 January is week 1), ``monthly`` and ``yearly``. ``select`` applies it:

1. The points are ordered newest first by ``completed`` (ISO 8601; a time without an offset
   is UTC, as the manifest writes it), two points completed in the same second by their order
   in the manifest, the later one newer. Calendar periods are those of the local time zone
   (``tz``: any ``tzinfo``, for tests; None: the system's local time, as borg does).
2. The rules run one after the other in the order last, daily, weekly, monthly, yearly; a rule
   of 0 does nothing. Each walks the points newest first. A point whose period (the rule's day,
   week, month or year of its completion time; for ``last`` every point is a period of its own)
   differs from the period of the point walked just before it opens a new period. The point
   opening a period is kept by the rule, numbered ``daily #1``, ``daily #2``, …, unless an
   earlier rule already kept it: then the period is used up all the same, nothing is counted,
   and no other point of that period is kept by this rule. The rule stops once it has kept N.
3. A rule that walked every point without keeping N keeps the oldest point as well, unless
   it is already kept (``monthly[oldest] #4``): the start of the history is what a sparse
   series of backups least wants to lose.
4. The point the manifest lists last (the newest, which the next incremental backup extends)
   is always kept: the first rule keeps it anyway, except after the clock went backwards, when
   it is kept with the reason ``newest``.
5. Every other point is removed. A policy whose rules are all 0 keeps nothing, which a backup
   tool never does: it is a usage error.

Compared with borg's ``prune_split`` (``helpers/misc.py`` in 1.2, ``archiver/prune_cmd.py`` in
2.0), which ``tests/unit/test_retention.py`` reproduces on worked examples: the same walk,
the same "a period whose first point an earlier rule kept is consumed without counting", the
same ``[oldest]`` rule and the same order of rules. The differences: borg's ``--keep-last``
is ``--keep-secondly`` (two archives of the same second count once), here ``last`` counts every
point, as ``prune --keep N`` always did; borg's ties in time keep the input order, here the
manifest's order breaks them; there is no ``--keep-within``, hourly, minutely or quarterly
rule, and no negative N (borg's code then keeps every period); the newest point's guarantee
(4) is ours. Like borg, a policy without any rule is refused.

A point without a completion time (only hand-made manifests lack one) cannot be placed by a
calendar rule: a RepositoryError. With ``last`` alone, such a manifest is taken in its order.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Callable, Hashable, Mapping, Sequence

from .errors import RepositoryError, UsageError
from .manifest import Point

RULES = ("last", "daily", "weekly", "monthly", "yearly")  # in the order they are applied


def _day(t: datetime.datetime) -> Hashable:
    return (t.year, t.month, t.day)


def _week(t: datetime.datetime) -> Hashable:
    iso = t.isocalendar()  # %G-%V: 29 Dec 2025 is in week 1 of 2026
    return (iso.year, iso.week)


def _month(t: datetime.datetime) -> Hashable:
    return (t.year, t.month)


def _year(t: datetime.datetime) -> Hashable:
    return t.year


_PERIODS: dict[str, Callable[[datetime.datetime], Hashable]] = {
    "daily": _day, "weekly": _week, "monthly": _month, "yearly": _year}


@dataclasses.dataclass(frozen=True)
class Policy:
    """How many points each rule keeps (0: the rule is not used)."""

    last: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def check(self) -> None:
        for rule in RULES:
            n = getattr(self, rule)
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise UsageError(f"--keep-{rule} {n!r}: give a whole number, 0 or more")
        if not any(getattr(self, rule) for rule in RULES):
            raise UsageError("prune needs a rule that keeps at least 1 point: --keep-last/--keep, "
                             "--keep-daily, --keep-weekly, --keep-monthly or --keep-yearly")

    @property
    def calendar(self) -> bool:
        """Some rule needs the points' completion times."""
        return any(getattr(self, rule) for rule in RULES if rule != "last")

    def __str__(self) -> str:
        return ", ".join(f"{rule} {getattr(self, rule)}" for rule in RULES if getattr(self, rule))


@dataclasses.dataclass(frozen=True)
class Selection:
    kept: Mapping[str, str]  # point -> why it is kept ("daily #2"), in the manifest's order
    removed: tuple[str, ...]  # in the manifest's order


def completion(p: Point) -> datetime.datetime | None:
    """A point's completion time (aware), or None when the manifest holds none that parses."""
    try:
        t = datetime.datetime.fromisoformat(p.completed)
    except (TypeError, ValueError):
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=datetime.timezone.utc)


def select(points: Sequence[Point], policy: Policy, tz: datetime.tzinfo | None = None) -> Selection:
    """The points ``policy`` keeps, each with its reason, and those it removes (module doc).

    ``points`` in the manifest's order (oldest first). A calendar rule needs every point's
    completion time: a point without one is a RepositoryError.
    """
    policy.check()
    points = list(points)
    if not points:
        return Selection({}, ())
    times = [completion(p) for p in points]
    if None in times:
        if policy.calendar:
            bad = points[times.index(None)]
            raise RepositoryError(f"point {bad.checkpoint!r} records no completion time "
                                  f"({bad.completed!r}), so calendar rules cannot place it",
                                  "prune with --keep-last only")
        order = list(range(len(points)))[::-1]  # the manifest's order is the order of completion
    else:
        order = sorted(range(len(points)), key=lambda i: (times[i], i), reverse=True)

    reasons: dict[str, str] = {}
    for rule in RULES:
        n = getattr(policy, rule)
        if n == 0:
            continue
        period = _PERIODS.get(rule)
        kept = 0
        previous: Hashable = object()  # equal to no period
        i = order[0]
        for i in order:
            # "last": a point is a period of its own (its position is unique).
            current = period(times[i].astimezone(tz)) if period else i
            if current == previous:
                continue
            previous = current
            name = points[i].checkpoint
            if name in reasons:
                continue  # kept by an earlier rule: the period is used up, nothing counted
            kept += 1
            reasons[name] = f"{rule} #{kept}"
            if kept == n:
                break
        if kept < n and points[i].checkpoint not in reasons:  # i: the oldest point here
            kept += 1
            reasons[points[i].checkpoint] = f"{rule}[oldest] #{kept}"
    newest = points[-1].checkpoint
    if newest not in reasons:  # only after the clock went backwards
        reasons[newest] = "newest"
    return Selection(
        {p.checkpoint: reasons[p.checkpoint] for p in points if p.checkpoint in reasons},
        tuple(p.checkpoint for p in points if p.checkpoint not in reasons),
    )
