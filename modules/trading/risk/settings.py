"""Settings of the `risk` service: section `[risk]`, env `CIRCLES_RISK__<KEY>`.

Every limit can be switched off: `false` in TOML (which has no null), `null` in JSON, or
`off`/`none`/`null`/`false` in the environment.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from appliance.config import Section

_OFF = ("off", "none", "null", "false", "")


def _off(value: Any) -> Any:
    if value is False or value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in _OFF:
        return None
    if value is True:
        raise ValueError("a limit is a number, or false to switch it off")
    return value


def _switch(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in _OFF:
        return None
    return value


def _names(value: Any) -> Any:
    # The environment spells a list as JSON, but `a,b` is what a person types.
    if isinstance(value, str) and not value.lstrip().startswith("["):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


Limit = Annotated[float | None, BeforeValidator(_off)]
Switch = Annotated[bool | None, BeforeValidator(_switch)]


class RiskSettings(Section):
    max_daily_loss_pct: Limit = Field(
        5.0, gt=0, le=100,
        description="loss since the start of the UTC day, % of the day's starting equity")
    max_drawdown_pct: Limit = Field(
        20.0, gt=0, le=100, description="fall of equity from its peak, %")
    max_symbol_exposure: Limit = Field(
        1.0, gt=0, description="|qty × last price| of one symbol / equity")
    max_total_exposure: Limit = Field(
        1.5, gt=0, description="Σ |qty × last price| of an account / equity")
    max_orders_per_minute: Annotated[int | None, BeforeValidator(_off)] = Field(
        30, ge=1, description="new orders in any sliding minute")
    halt_on_stale_market: Switch = Field(
        True, description="halt when a market feed is stale: the market says so, or, for a "
        "live feed, no bar closed within `stale_after_bars` timeframes of the wall clock (a "
        "replay's feeds say `live = false`: their times are old, only the market's flag counts)")
    stale_after_bars: int = Field(
        3, ge=1, le=1000,
        description="a live feed whose last bar (MARKET_FEED's last_bar_ts) closed more than this "
        "many timeframes ago is stale, even if the market, which may be dead, never said so. "
        "The market refreshes that state once per timeframe, so risk sees the last bar up to "
        "a timeframe late: below 3 a healthy feed may look stale")
    max_disk_percent: Limit = Field(95.0, gt=0, le=100, description="disk use of the box, %")
    require_clock_sync: Switch = Field(
        True, description="halt when the health service reports an unsynchronised clock")
    accounts: Annotated[list[str] | None, BeforeValidator(_names)] = Field(
        None, description="the accounts watched; none = every account on the bus")
    state_interval_s: float = Field(10.0, gt=0, description="republish the risk state every T s")
    start_wait_s: float = Field(
        2.0, ge=0, le=60, description="how long to wait for the retained halt at start")
    flatten_timeout_s: float = Field(
        10.0, gt=0, le=25, description="how long to wait for the execution service to flatten")

    def limits(self) -> dict[str, float | None]:
        """The limits as RISK_STATE carries them: a switched-on flag is 1, off is None."""
        return {
            "max_daily_loss_pct": self.max_daily_loss_pct,
            "max_drawdown_pct": self.max_drawdown_pct,
            "max_symbol_exposure": self.max_symbol_exposure,
            "max_total_exposure": self.max_total_exposure,
            "max_orders_per_minute": (float(self.max_orders_per_minute)
                                      if self.max_orders_per_minute is not None else None),
            "halt_on_stale_market": 1.0 if self.halt_on_stale_market else None,
            "max_disk_percent": self.max_disk_percent,
            "require_clock_sync": 1.0 if self.require_clock_sync else None,
        }
