"""Sign-in rate limits: failures counted per account and per address, with growing lockouts.

A key (an email, or a client address) that collects `limit` failures within `window_s`
is refused for `window_s`; each further lockout of the same key doubles, up to
`max_lockout_s`, until a success (accounts) or a quiet `max_lockout_s` forgets it. While
refused, even the right password is refused: otherwise the lockout would not slow
guessing. State is per instance and bounded (the least recently touched keys go first);
with N instances an attacker gets at most N times the attempts.

Written here rather than taken from a package: the rate-limit libraries count requests in
windows, and this needs failures only, per-key backoff, and a bound on keys.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

# The 11th wrong password for one account within a minute is refused: 10 honest typos
# are plenty, and a guesser gets 10 a minute at best (then less and less).
ACCOUNT_LIMIT: Final = 10
# An office behind one NAT address has several agents: an address gets more.
ADDRESS_LIMIT: Final = 30
WINDOW_S: Final = 60.0
# Lockouts double up to this (15 minutes); a key quiet this long starts afresh.
MAX_LOCKOUT_S: Final = 900.0
# Keys remembered per kind: each costs about 300 bytes, so 10,000 keys about 3 MB.
MAX_KEYS: Final = 10_000


@dataclass(slots=True)
class _Record:
    failures: deque[float] = field(default_factory=deque)
    strikes: int = 0
    locked_until: float = 0.0
    touched: float = 0.0


class _Counter:
    """Failures of one kind of key (accounts, or addresses)."""

    def __init__(self, limit: int, window_s: float, max_lockout_s: float, max_keys: int) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_lockout_s = max_lockout_s
        self.max_keys = max_keys
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def retry_after(self, key: str, now: float) -> float | None:
        record = self._records.get(key)
        if record is None or record.locked_until <= now:
            return None
        return record.locked_until - now

    def failed(self, key: str, now: float) -> None:
        record = self._records.get(key)
        if record is None or now - record.touched > self.max_lockout_s:
            record = _Record()
            self._records[key] = record
        self._records.move_to_end(key)
        record.touched = now
        failures = record.failures
        while failures and now - failures[0] > self.window_s:
            failures.popleft()
        failures.append(now)
        if len(failures) >= self.limit:
            record.strikes += 1
            lockout = min(self.max_lockout_s, self.window_s * 2 ** (record.strikes - 1))
            record.locked_until = now + lockout
            failures.clear()
        while len(self._records) > self.max_keys:
            self._records.popitem(last=False)

    def forget(self, key: str) -> None:
        self._records.pop(key, None)


class SignInLimiter:
    """Failed sign-ins per account and per address; whether (and how long) to refuse."""

    def __init__(
        self,
        *,
        account_limit: int = ACCOUNT_LIMIT,
        address_limit: int = ADDRESS_LIMIT,
        window_s: float = WINDOW_S,
        max_lockout_s: float = MAX_LOCKOUT_S,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._accounts = _Counter(account_limit, window_s, max_lockout_s, max_keys)
        self._addresses = _Counter(address_limit, window_s, max_lockout_s, max_keys)
        self._clock = clock

    def retry_after(self, account: str | None, address: str) -> int | None:
        """Whole seconds to wait before trying again, or None when a try is allowed."""
        now = self._clock()
        waits = [self._addresses.retry_after(address, now)]
        if account is not None:
            waits.append(self._accounts.retry_after(account, now))
        longest = max((w for w in waits if w is not None), default=None)
        return None if longest is None else max(1, math.ceil(longest))

    def failed(self, account: str | None, address: str) -> None:
        """Count a failure (a wrong password, or an unknown credential when account is None)."""
        now = self._clock()
        self._addresses.failed(address, now)
        if account is not None:
            self._accounts.failed(account, now)

    def succeeded(self, account: str) -> None:
        """A right password: the account's failures are forgotten (the address's are not)."""
        self._accounts.forget(account)
