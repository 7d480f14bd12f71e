"""The `alpha` service of the trading pipeline (docs/trading.md)."""

from __future__ import annotations

from appliance.runtime import Service


class AlphaService(Service):
    name = "alpha"
