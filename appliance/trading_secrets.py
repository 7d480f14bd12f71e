"""What an exchange account's API key and secret are called in the secret store.

One rule, used by the execution service (which reads them to trade live) and by the panel
(which stores them): `exchange-<account>-api-key` and `exchange-<account>-secret`, the
account as a topic level (`Main` → `main`).
"""

from __future__ import annotations

from appliance.bus.topics import slug


def exchange_secret_names(account: str) -> tuple[str, str]:
    """The secret store names of `account`'s exchange API key and secret
    (`exchange-main-api-key`, `exchange-main-secret`); ValueError for an account with
    nothing usable in a topic level."""
    name = slug(account)
    return f"exchange-{name}-api-key", f"exchange-{name}-secret"
