"""retention.select (pure): borg's prune rules on worked examples, and properties."""

from __future__ import annotations

import datetime
import time
from zoneinfo import ZoneInfo

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from libvbackup import errors
from libvbackup.manifest import Point
from libvbackup.retention import RULES, Policy, completion, select

UTC = datetime.timezone.utc


def pt(name: str, completed: str) -> Point:
    return Point(checkpoint=name, parent=None, level="full", mode="pull", started="", completed=completed,
                 seconds=0.0, disks={})


def at(t: datetime.datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds")


def daily_points(first: datetime.date, days: int, hours=(12,)) -> list[Point]:
    out = []
    for n in range(days):
        day = first + datetime.timedelta(days=n)
        for h in hours:
            t = datetime.datetime(day.year, day.month, day.day, h, tzinfo=UTC)
            out.append(pt(f"{day:%m%d}-{h:02}", at(t)))
    return out


def test_a_point_a_day_for_100_days_daily_7_weekly_4_monthly_6():
    # 1 January to 10 April 2026 (a Friday), one point at noon UTC each day.
    points = daily_points(datetime.date(2026, 1, 1), 100)
    s = select(points, Policy(daily=7, weekly=4, monthly=6), tz=UTC)
    assert s.kept == {
        # monthly: April is used up by the daily keep of 10 April; January runs out, so the
        # oldest point is kept too.
        "0101-12": "monthly[oldest] #4", "0131-12": "monthly #3", "0228-12": "monthly #2",
        # weekly: W15 (6-12 April) and W14 (30 March-5 April) start with points kept daily.
        "0308-12": "weekly #4", "0315-12": "weekly #3", "0322-12": "weekly #2", "0329-12": "weekly #1",
        "0331-12": "monthly #1",
        "0404-12": "daily #7", "0405-12": "daily #6", "0406-12": "daily #5", "0407-12": "daily #4",
        "0408-12": "daily #3", "0409-12": "daily #2", "0410-12": "daily #1",
    }
    assert list(s.kept) == sorted(s.kept)  # the manifest's order
    assert len(s.removed) == 85 and set(s.removed).isdisjoint(s.kept)


def test_several_points_a_day_keep_the_newest_of_each_day():
    points = daily_points(datetime.date(2026, 5, 1), 10, hours=(8, 14, 20))
    s = select(points, Policy(last=2, daily=3), tz=UTC)
    # The 10th's newest point is kept by "last", so the 10th is used up for "daily".
    assert s.kept == {"0507-20": "daily #3", "0508-20": "daily #2", "0509-20": "daily #1",
                      "0510-14": "last #2", "0510-20": "last #1"}


def test_a_period_whose_first_point_is_kept_is_consumed_without_counting():
    points = [pt("a", "2026-05-01T12:00:00+00:00"), pt("b", "2026-05-02T09:00:00+00:00"),
              pt("c", "2026-05-02T21:00:00+00:00")]
    # borg: 2 May opens with c, kept by "last": the day counts nothing, and b (same day)
    # is not a candidate either; 1 May gives daily #1.
    assert select(points, Policy(last=1, daily=1), tz=UTC).kept == {"a": "daily #1", "c": "last #1"}
    assert select(points, Policy(last=1, daily=1), tz=UTC).removed == ("b",)
    # last 1 + daily 2 over one point a day keeps three points, not two.
    days = daily_points(datetime.date(2026, 6, 1), 5)
    assert select(days, Policy(last=1, daily=2), tz=UTC).kept == {
        "0603-12": "daily #2", "0604-12": "daily #1", "0605-12": "last #1"}


def test_gaps_and_the_oldest_point_of_a_rule_that_runs_out():
    points = [pt("jan1", "2026-01-01T10:00:00Z"), pt("jan2", "2026-01-02T10:00:00Z"),
              pt("jan10", "2026-01-10T10:00:00Z"), pt("feb15", "2026-02-15T10:00:00Z"),
              pt("jun1", "2026-06-01T10:00:00Z")]
    # Days without a point are no periods: daily 3 keeps the three newest days that have one.
    assert select(points, Policy(daily=3), tz=UTC).kept == {
        "jan10": "daily #3", "feb15": "daily #2", "jun1": "daily #1"}
    assert select(points, Policy(monthly=10), tz=UTC).kept == {
        "jan1": "monthly[oldest] #4", "jan10": "monthly #3", "feb15": "monthly #2", "jun1": "monthly #1"}
    # A rule that reaches N keeps no oldest point.
    assert select(points, Policy(monthly=3), tz=UTC).removed == ("jan1", "jan2")
    # The oldest point is not counted twice when a rule already keeps it.
    assert select(points[:1], Policy(daily=5), tz=UTC).kept == {"jan1": "daily #1"}
    assert select(points, Policy(last=5, yearly=3), tz=UTC).kept == {
        p.checkpoint: f"last #{5 - i}" for i, p in enumerate(points)}


def test_yearly_and_every_rule_in_order():
    points = [pt(f"y{y}", f"{y}-06-01T00:00:00Z") for y in range(2018, 2027)]
    s = select(points, Policy(last=1, daily=1, weekly=1, monthly=1, yearly=3), tz=UTC)
    # One point a year: each rule skips the periods of the points earlier rules kept and
    # takes the next one, so the rules spread over the years rather than pile on the newest.
    assert s.kept == {"y2020": "yearly #3", "y2021": "yearly #2", "y2022": "yearly #1",
                      "y2023": "monthly #1", "y2024": "weekly #1", "y2025": "daily #1", "y2026": "last #1"}
    assert s.removed == ("y2018", "y2019")


def test_iso_weeks_cross_the_new_year():
    # Monday 29 December 2025 begins week 1 of 2026 (%G-%V); Sunday the 28th ends 2025-W52.
    points = [pt("dec27", "2025-12-27T12:00:00Z"), pt("dec28", "2025-12-28T12:00:00Z"),
              pt("dec29", "2025-12-29T12:00:00Z"), pt("dec31", "2025-12-31T12:00:00Z"),
              pt("jan02", "2026-01-02T12:00:00Z")]
    assert select(points, Policy(weekly=2), tz=UTC).kept == {"dec28": "weekly #2", "jan02": "weekly #1"}
    assert select(points, Policy(yearly=2), tz=UTC).kept == {"dec31": "yearly #2", "jan02": "yearly #1"}


def test_periods_are_those_of_the_time_zone():
    points = [pt("feb28", "2026-02-28T12:00:00+00:00"), pt("mar1", "2026-03-01T10:00:00+00:00"),
              pt("late", "2026-03-01T23:30:00+00:00")]
    assert select(points, Policy(daily=2), tz=UTC).kept == {"feb28": "daily #2", "late": "daily #1"}
    # In Paris (UTC+1 in March) "late" is 2 March 00:30: each point is a day of its own.
    assert select(points, Policy(daily=2), tz=ZoneInfo("Europe/Paris")).kept == {
        "mar1": "daily #2", "late": "daily #1"}
    months = [pt("a", "2026-02-15T12:00:00Z"), pt("b", "2026-02-20T12:00:00Z"), pt("c", "2026-03-01T03:00:00Z")]
    assert select(months, Policy(monthly=2), tz=UTC).kept == {"b": "monthly #2", "c": "monthly #1"}
    # In New York c is 28 February 22:00: one month only, so the oldest point is kept.
    assert select(months, Policy(monthly=2), tz=ZoneInfo("America/New_York")).kept == {
        "a": "monthly[oldest] #2", "c": "monthly #1"}
    # Offsets in the manifest are honoured; a time without one is UTC.
    assert completion(pt("x", "2026-03-01T01:00:00+02:00")) == datetime.datetime(2026, 2, 28, 23, tzinfo=UTC)
    assert completion(pt("x", "2026-03-01T01:00:00")) == datetime.datetime(2026, 3, 1, 1, tzinfo=UTC)


def test_no_tz_means_the_local_time_zone(monkeypatch):
    months = [pt("a", "2026-02-15T12:00:00Z"), pt("b", "2026-02-20T12:00:00Z"), pt("c", "2026-03-01T03:00:00Z")]
    try:
        for zone, kept in (("America/New_York", {"a", "c"}), ("UTC", {"b", "c"})):
            monkeypatch.setenv("TZ", zone)
            time.tzset()
            assert set(select(months, Policy(monthly=2)).kept) == kept
    finally:
        monkeypatch.undo()
        time.tzset()


def test_order_is_by_completion_time_ties_by_manifest_order_and_the_last_point_stays():
    same = [pt("a", "2026-01-01T12:00:00Z"), pt("b", "2026-01-01T12:00:00Z"), pt("c", "2026-01-01T12:00:00Z")]
    assert select(same, Policy(last=2), tz=UTC).kept == {"b": "last #2", "c": "last #1"}
    # The clock went backwards before c: b is the newest by time, c the newest point (the one
    # the next incremental backup extends): both stay.
    back = [pt("a", "2026-01-01T12:00:00Z"), pt("b", "2026-01-03T12:00:00Z"), pt("c", "2026-01-02T12:00:00Z")]
    assert select(back, Policy(last=1), tz=UTC).kept == {"b": "last #1", "c": "newest"}
    assert select(back, Policy(last=2), tz=UTC).kept == {"b": "last #1", "c": "last #2"}


def test_points_without_a_completion_time():
    points = [pt("a", ""), pt("b", ""), pt("c", "")]
    assert select(points, Policy(last=2)).kept == {"b": "last #2", "c": "last #1"}  # the manifest's order
    with pytest.raises(errors.RepositoryError, match="'a' records no completion time"):
        select(points, Policy(daily=1))
    assert select([], Policy(last=1)).kept == {}


@pytest.mark.parametrize("policy,message", [
    (Policy(), "at least 1 point"),
    (Policy(last=0, daily=0), "at least 1 point"),
    (Policy(daily=-1), "--keep-daily -1"),
    (Policy(last=True), "--keep-last True"),
])
def test_bad_policies_are_usage_errors(policy, message):
    with pytest.raises(errors.UsageError, match=message):
        select([pt("a", "2026-01-01T00:00:00Z")], policy)


def test_policy_text():
    assert str(Policy(last=1, monthly=6)) == "last 1, monthly 6"


# --------------------------------------------------------------------------- properties

BASE = datetime.datetime(2024, 1, 1, tzinfo=UTC)


@st.composite
def histories(draw):
    n = draw(st.integers(1, 40))
    # Seconds within 3 years, some close together (several a day), some equal (ties).
    offsets = draw(st.lists(st.one_of(st.integers(0, 3 * 366 * 86400), st.integers(0, 5 * 86400)),
                            min_size=n, max_size=n))
    if draw(st.booleans()):
        offsets.sort()  # as a manifest normally is; otherwise the clock jumped around
    return [pt(f"p{i}", at(BASE + datetime.timedelta(seconds=s))) for i, s in enumerate(offsets)]


policies = st.builds(Policy, last=st.integers(0, 6), daily=st.integers(0, 6), weekly=st.integers(0, 6),
                     monthly=st.integers(0, 6), yearly=st.integers(0, 4))
zones = st.sampled_from([UTC, datetime.timezone(datetime.timedelta(hours=-11)),
                         datetime.timezone(datetime.timedelta(hours=13, minutes=45)), ZoneInfo("Europe/Paris")])


def _period(rule, t):
    return {"daily": (t.year, t.month, t.day), "weekly": tuple(t.isocalendar())[:2],
            "monthly": (t.year, t.month), "yearly": t.year}[rule]


@settings(max_examples=300, deadline=None)
@given(histories(), policies, zones)
def test_selection_properties(points, policy, tz):
    assume(any(getattr(policy, r) for r in RULES))
    s = select(points, policy, tz)
    names = [p.checkpoint for p in points]
    assert s == select(points, policy, tz)  # deterministic
    assert set(s.kept) | set(s.removed) == set(names) and not set(s.kept) & set(s.removed)
    assert list(s.kept) == [n for n in names if n in s.kept]  # the manifest's order
    assert list(s.removed) == [n for n in names if n not in s.kept]
    key = {p.checkpoint: (completion(p), i) for i, p in enumerate(points)}
    newest_by_time = max(names, key=key.get)
    assert names[-1] in s.kept and newest_by_time in s.kept
    oldest_by_time = min(names, key=key.get)
    for rule in RULES:
        n = getattr(policy, rule)
        mine = {p: why for p, why in s.kept.items() if why.split(" #")[0] in (rule, f"{rule}[oldest]")}
        assert len(mine) <= n
        assert sorted(int(why.split("#")[1]) for why in mine.values()) == list(range(1, len(mine) + 1))
        for p, why in mine.items():
            if why.startswith(f"{rule}[oldest]"):
                assert p == oldest_by_time
            elif rule != "last":  # each is the newest point of its period
                mine_period = _period(rule, key[p][0].astimezone(tz))
                assert all(key[q] <= key[p] for q in names if _period(rule, key[q][0].astimezone(tz)) == mine_period)
    # Keeping more by any rule never removes a point that was kept.
    for rule in RULES:
        more = Policy(**{r: getattr(policy, r) + (r == rule) for r in RULES})
        assert set(s.kept) <= set(select(points, more, tz).kept)
    # "last N" alone on a manifest in time order is the newest N points.
    if policy == Policy(last=policy.last) and [key[n] for n in names] == sorted(key[n] for n in names):
        assert list(s.kept) == names[-policy.last:]
