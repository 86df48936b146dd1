"""Counting failed logins and failed token authentications, so guessing hits 429 after a few tries.

DRF's rate throttles run after authentication and count every request, so they cannot see a failed
token; these counters are bumped by the authentication code itself. They live in the configured
cache (locmem in development: per process; Redis in production via CACHE_URL, shared by workers).
"""
import hashlib

from django.conf import settings
from django.core.cache import cache
from rest_framework.throttling import BaseThrottle


def client_ident(request) -> str:
    """The client's address; honours REST_FRAMEWORK["NUM_PROXIES"] (X-Forwarded-For) like DRF does."""
    return BaseThrottle().get_ident(request)


class FailureCounter:
    """At most `limit` failures per key within `window` seconds; the window starts at the first one."""

    def __init__(self, scope: str, *, limit_setting: str, window_setting: str):
        self.scope = scope
        self.limit_setting = limit_setting
        self.window_setting = window_setting

    @property
    def limit(self) -> int:
        return getattr(settings, self.limit_setting)

    @property
    def window(self) -> int:
        return getattr(settings, self.window_setting)

    def _key(self, ident: str) -> str:
        # Hashed: usernames and addresses do not need to sit in the cache in clear.
        return f"tandem:failures:{self.scope}:{hashlib.sha256(ident.encode()).hexdigest()[:32]}"

    def blocked(self, *idents: str) -> bool:
        counts = cache.get_many([self._key(i) for i in idents])
        return any(n >= self.limit for n in counts.values())

    def record(self, *idents: str) -> None:
        for ident in idents:
            key = self._key(ident)
            if not cache.add(key, 1, self.window):
                try:
                    cache.incr(key)
                except ValueError:  # expired between add and incr
                    cache.add(key, 1, self.window)

    def reset(self, *idents: str) -> None:
        cache.delete_many([self._key(i) for i in idents])


token_failures = FailureCounter(
    "token", limit_setting="TANDEM_AUTH_FAILURE_LIMIT", window_setting="TANDEM_AUTH_FAILURE_WINDOW"
)
login_failures = FailureCounter(
    "login", limit_setting="TANDEM_AUTH_FAILURE_LIMIT", window_setting="TANDEM_AUTH_FAILURE_WINDOW"
)

