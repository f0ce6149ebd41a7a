"""Failed ACME authentications are audited at most N per client address per minute."""

from __future__ import annotations

import datetime

from acme.web import _PerMinuteQuota


def test_quota_per_address_per_minute() -> None:
    quota = _PerMinuteQuota(3)
    t = datetime.datetime(2026, 12, 1, 12, 0, 5, tzinfo=datetime.UTC)
    assert [quota.take("10.0.0.1", t) for _ in range(5)] == [True, True, True, False, False]
    assert quota.take("10.0.0.2", t)  # another address has its own quota
    assert quota.take("10.0.0.1", t + datetime.timedelta(seconds=60))  # a new minute
