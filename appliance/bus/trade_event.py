"""TRADE_EVENT v1: one fill or cash flow, from any source (docs/trade_event.md is the spec).

Numbers are `Decimal` end to end: a payload may write them as JSON numbers or strings, they
are parsed without passing through a float, and they are stored as exact strings.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, ClassVar, Literal, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from appliance.bus.topics import slug
from appliance.errors import ValidationFailed

MAX_EVENT_BYTES = 16 * 1024
MAX_FUTURE = timedelta(minutes=5)
# Numbers are exact decimals of at most 60 digits, 30 of them after the point (pydantic
# refuses NaN and infinities itself): 1e30 is far beyond any real price or size.
_MAX_EXPONENT = 30
_MAX_DEPTH = 8  # nesting of `extra`

Side = Literal["buy", "sell"]
Kind = Literal["fill", "deposit", "withdrawal"]
Source = Literal["paper", "ccxt", "mt5", "manual", "sim"]
Text = Field(min_length=1, max_length=128)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a ledger can hold")


# Every JSON number with a fraction or exponent becomes a Decimal, never a float. One decoder
# for all calls: json.loads with hooks would build a new one each time.
_DECODER = json.JSONDecoder(parse_float=Decimal, parse_constant=_reject_constant)


def parse_json(data: str | bytes | bytearray) -> Any:
    """JSON with exact decimals; ValidationFailed with the reason when it is not JSON."""
    try:
        return _DECODER.decode(data if isinstance(data, str) else bytes(data).decode())
    except RecursionError:
        raise ValidationFailed("invalid JSON: nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise ValidationFailed(f"invalid JSON: {exc}") from None


def _fits(value: Decimal) -> bool:
    """Finite, and written in plain notation in a bounded number of characters: a zero
    counts too (`0E-1000000` would be a million zeros)."""
    if not value.is_finite():
        return False
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    return -_MAX_EXPONENT <= exponent and (not value or value.adjusted() <= _MAX_EXPONENT)


def _check_extra(value: Any, where: str = "extra", depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        raise ValueError(f"{where}: nested deeper than {_MAX_DEPTH} levels")
    if isinstance(value, float):
        value = Decimal(repr(value))
    if isinstance(value, Decimal):
        if not _fits(value):
            raise ValueError(f"{where}: {value} is not a finite number of at most "
                             f"{_MAX_EXPONENT} digits before or after the point")
        return value
    if isinstance(value, dict):
        return {str(k): _check_extra(v, f"{where}.{k}", depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_check_extra(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    return value


class ExactJson(BaseModel):
    """A model whose JSON numbers are read as exact decimals, never through a float."""

    max_bytes: ClassVar[int] = MAX_EVENT_BYTES

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, *, strict: bool | None = None,
                            context: Any | None = None, **kwargs: Any) -> Self:
        if len(json_data) > cls.max_bytes:
            raise ValidationFailed(f"payload of {len(json_data)} bytes exceeds {cls.max_bytes}")
        data = parse_json(json_data)
        if not isinstance(data, dict):
            raise ValidationFailed(f"a {cls.__name__} is a JSON object, not {type(data).__name__}")
        return cls.model_validate(data, strict=strict, context=context)


class TradeEvent(ExactJson):
    """A fill (`kind="fill"`) or a cash flow (`deposit`, `withdrawal`) of one account."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    event_id: str = Text
    source: Source
    # It becomes a topic level, so it needs a character the slug keeps.
    account_id: str = Field(min_length=1, max_length=128, pattern=r"[A-Za-z0-9_]")
    strategy_id: str = Field("default", min_length=1, max_length=128)
    symbol: str = Text
    side: Side | None = None
    qty: Decimal = Field(gt=0, max_digits=60, decimal_places=_MAX_EXPONENT)
    price: Decimal = Field(Decimal(1), gt=0, max_digits=60, decimal_places=_MAX_EXPONENT)
    fee: Decimal = Field(Decimal(0), ge=0, max_digits=60, decimal_places=_MAX_EXPONENT)
    fee_currency: str | None = Field(None, max_length=32)
    ts: AwareDatetime
    order_id: str | None = Field(None, max_length=128)
    position_id: str | None = Field(None, max_length=128)
    kind: Kind = "fill"
    realized_pnl: Decimal | None = Field(None, max_digits=60, decimal_places=_MAX_EXPONENT)
    extra: dict[str, Any] = {}

    @field_validator("extra")
    @classmethod
    def _plain_extra(cls, value: dict[str, Any]) -> dict[str, Any]:
        checked: dict[str, Any] = _check_extra(value) if value else value
        return checked

    @field_validator("ts")
    @classmethod
    def _utc_not_future(cls, value: datetime) -> datetime:
        try:
            value = value.astimezone(UTC)
        except OverflowError:
            raise ValueError(f"ts {value.isoformat()} is out of range in UTC") from None
        if value - datetime.now(UTC) > MAX_FUTURE:
            raise ValueError(f"ts {value.isoformat()} is more than 5 minutes in the future")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TradeEvent:
        if self.kind == "fill" and self.side is None:
            raise ValueError("a fill needs a side (buy or sell)")
        # pydantic's digit limits let a zero through whatever its exponent
        for name in ("qty", "price", "fee", "realized_pnl"):
            value = getattr(self, name)
            if value is not None and not _fits(value):
                raise ValueError(f"{name}: {value} has more than {_MAX_EXPONENT} decimal places")
        return self

    @property
    def account(self) -> str:
        """The account as a topic level (and chain name part)."""
        return slug(self.account_id)

    @property
    def key(self) -> str:
        return event_key(self.source, self.account, self.event_id)

    def stored(self) -> dict[str, Any]:
        """The event as the ledger stores it (Decimals and the UTC time are written exactly
        by the ledger's canonical JSON)."""
        return self.model_dump()


def event_key(source: str, account: str, event_id: str) -> str:
    """The idempotency key: one event per (source, account, event_id)."""
    return f"{source}|{slug(account)}|{event_id}"


def chain_for(account: str) -> str:
    """The ledger chain of one trading account."""
    return f"trade:{slug(account)}"


class AcceptedEvent(BaseModel):
    event_id: str
    source: str
    seq: int
    hash: str
    duplicate: bool = False


class RejectedEvent(BaseModel):
    event_id: str | None = None
    source: str | None = None
    reason: str


class TradeAck(BaseModel):
    """What `circles/trade/<account>/ack` carries after a commit: which events are kept (with
    their place in the chain) and which were refused for good (so a publisher stops re-sending)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    account: str
    accepted: list[AcceptedEvent] = []
    rejected: list[RejectedEvent] = []


class TradeMetrics(BaseModel):
    """Retained on `circles/trade/<account>/metrics`: the account's metrics as of ledger `seq`
    (docs/metrics.md defines them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    account: str
    seq: int
    ts: str
    metrics: dict[str, Any]
