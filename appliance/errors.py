"""The exception tree every Circles package raises from."""

from __future__ import annotations


class CirclesError(Exception):
    """Base of every error Circles raises on purpose."""


class TemporaryError(CirclesError):
    """Worth retrying with backoff (a broker restart, a locked database)."""


class OperationalError(CirclesError):
    """Report and stop: retrying will not help."""


class ConfigError(CirclesError):
    """The configuration is wrong; the process exits with EX_CONFIG (78)."""

    exit_code = 78


class AuthError(CirclesError):
    """Credentials were refused or are missing."""


class ValidationFailed(CirclesError):
    """A payload did not match its model; the message names the reason."""
