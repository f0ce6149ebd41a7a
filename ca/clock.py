"""Time as an injected dependency, so tests move time instead of sleeping."""

from __future__ import annotations

import datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime.datetime:
        """The current time, timezone-aware UTC."""
        ...


class SystemClock:
    def now(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC)


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, start: datetime.datetime | None = None) -> None:
        self._now = start or datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)

    def now(self) -> datetime.datetime:
        return self._now

    def advance(self, delta: datetime.timedelta) -> None:
        self._now += delta

    def set(self, when: datetime.datetime) -> None:
        self._now = when
