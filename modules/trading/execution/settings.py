"""Settings of the `execution` service: `[execution]` in circles.toml, `CIRCLES_EXECUTION__…`.

Paper trading is the default; trading live needs `mode = "live"` AND `live_confirmed = true`,
and then the exchange's API key and secret from the secret store. A mode chosen at run time
with the `mode` command (the panel's Trading settings) is kept and wins over `mode` at the
next start (mode.py).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import Field, field_validator, model_validator

from appliance.bus.topics import slug
from appliance.config import Section
from modules.trading.exchange import ExchangeSettings


class ExecutionSettings(Section):
    account: str = Field("paper", min_length=1, max_length=64,
                         description="the trading account: intents, orders and trade events; "
                                     "its slug (`Main` → `main`) keys topics, rows and secrets")
    mode: Literal["paper", "live"] = "paper"
    live_confirmed: bool = Field(False, description="must be true, with mode = live, to trade "
                                                    "real money")
    exchange: ExchangeSettings = ExchangeSettings()
    # Paper fill model: prices move against us, fees are paid, and a bar's volume limits
    # how much can fill, so paper results are not better than live ones would be.
    slippage_bps: Decimal = Field(Decimal(5), ge=0, le=1000)
    fee_bps: Decimal = Field(Decimal(10), ge=0, le=1000)
    fill_at: Literal["next_open", "close"] = Field(
        "next_open", description="next_open: at the open of the first bar after the intent's "
                                 "bar; close: at once, at the close of the intent's bar")
    max_volume_fraction: Decimal = Field(Decimal("0.1"), gt=0, le=1,
                                         description="at most this share of a bar's volume "
                                                     "fills on that bar; the rest stays open")
    starting_balance: Decimal = Field(Decimal(10000), ge=0, max_digits=30, decimal_places=8,
                                      description="the paper account's deposit (0: none)")
    quote_currency: str = Field("USDT", min_length=1, max_length=32)
    max_intent_age_bars: int = Field(2, ge=0, description="an intent whose bar is more than "
                                     "this many bars older than its feed's newest bar is refused "
                                     "as stale; live, also when its bar closed longer ago than "
                                     "this many timeframes by the wall clock")
    min_qty: Decimal = Field(Decimal("1e-8"), gt=0, description="smaller deltas are ignored")
    halt_wait_s: float = Field(10.0, ge=0, description="after start, how long intents wait "
                               "for the retained trading halt before being refused")
    resend_after_s: float = Field(5.0, gt=0, description="re-send unconfirmed trade events")
    poll_s: float = Field(2.0, gt=0, description="live: seconds between polls of open orders")
    positions_interval_s: float = Field(5.0, gt=0, description="republish marked positions "
                                        "at most this often when marks changed")
    switch_timeout_s: float = Field(8.0, gt=0, description="the `mode` command: how long "
                                    "going live waits for the exchange to take the keys")

    @field_validator("account")
    @classmethod
    def _usable_account(cls, account: str) -> str:
        slug(account)  # ValueError when nothing of it is usable in a topic
        return account

    @model_validator(mode="after")
    def _live_needs_confirmation(self) -> ExecutionSettings:
        if self.mode == "live" and not self.live_confirmed:
            raise ValueError("execution.live_confirmed must be true to trade live (mode = "
                             "\"live\" sends real orders with real money); set it, or use "
                             "mode = \"paper\"")
        return self
