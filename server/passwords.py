"""Password hashing: Argon2id through argon2-cffi, with its default (RFC 9106) parameters.

argon2-cffi's defaults are RFC 9106's second recommended option (64 MiB, 3 passes,
4 lanes): about 0.15 s of one core here. The hash string carries its own parameters and
salt, so stronger defaults in a later release still verify older hashes.
"""

from __future__ import annotations

from typing import Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# Long enough to resist guessing once the sign-in rate limits apply (NIST SP 800-63B asks
# for at least 8); the upper bound keeps one request's hashing work bounded.
MIN_PASSWORD: Final = 10
MAX_PASSWORD: Final = 256

# Verified against when the email is unknown, so that a wrong email takes as long to
# refuse as a wrong password and the timing does not tell which accounts exist.
DUMMY_HASH: Final = (
    "$argon2id$v=19$m=65536,t=3,p=4$WjxkcKwXG3Jej8k1dEIMpQ"
    "$eogjINh3+h4JhvLoScGx4eFMhxuIQdnv+tjwQ/YkDCs"
)


class WeakPassword(ValueError):
    """The password is too short or too long; the message says which."""


def check_password(password: str) -> None:
    """WeakPassword unless the password's length is acceptable."""
    if len(password) < MIN_PASSWORD:
        raise WeakPassword(f"a password needs at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise WeakPassword(f"a password has at most {MAX_PASSWORD} characters")


def hash_password(password: str) -> str:
    """The Argon2id hash string of a password (CPU-bound: run it off the event loop)."""
    check_password(password)
    return PasswordHasher().hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """True when the password matches the hash (CPU-bound: run it off the event loop)."""
    if len(password) > MAX_PASSWORD:
        return False
    try:
        return PasswordHasher().verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False
