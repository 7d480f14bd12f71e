"""The trade server's side of a simulated MetaTrader 5 account (`appliance.mt5_sim`): the
deal history and open positions (netting: one position per symbol) over a random-walk market,
and the deal files (JSON lines, numbers written with their decimals) a terminal keeps."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from appliance.bus.mt5 import MT5Deal
from appliance.errors import ValidationFailed
from appliance.files import write_atomically

log = logging.getLogger("circles.mt5-sim")


VERSION = "1.0"
FIRST_TICKET, FIRST_ORDER = 50001, 61001
CENT, LOT = Decimal("0.01"), Decimal("0.01")
DAY_MS = 86_400_000


def _lots(text: str) -> tuple[Decimal, ...]:
    return tuple(Decimal(v) for v in text.split())


@dataclass(frozen=True)
class Symbol:
    name: str
    digits: int
    start: float
    move: float  # typical relative move between two deals
    contract: int  # units per lot: profit = price change × lots × contract
    commission_per_lot: Decimal  # charged on entry only
    lots: tuple[Decimal, ...]
    swap_per_lot: float  # a typical night's swap (charged, so taken negative)

    def quote(self, price: float) -> Decimal:
        return Decimal(str(price)).quantize(Decimal(1).scaleb(-self.digits))


SYMBOLS: dict[str, Symbol] = {s.name: s for s in (
    Symbol("EURUSD", 5, 1.08500, 0.0006, 100_000, Decimal("7.00"),
           _lots("0.01 0.05 0.10 0.20 0.50 1.00"), 6.5),
    Symbol("XAUUSD", 2, 2350.00, 0.0015, 100, Decimal("7.00"), _lots("0.01 0.02 0.05 0.10 0.20"),
           25.0),
    Symbol("#US30", 1, 39000.0, 0.0012, 1, Decimal("0.00"), _lots("0.10 0.50 1.00 2.00 5.00"),
           4.0),
)}


# -- deals as JSON lines ------------------------------------------------------------------------
def deal_json(deal: MT5Deal) -> str:
    """The deal as the EA writes it: keys in the protocol's order, numbers as JSON numbers with
    their decimals as given (`0.10`, `1.08512`: `DoubleToString(x, digits)`)."""
    parts = []
    for key in MT5Deal.model_fields:
        value = getattr(deal, key)
        if isinstance(value, Decimal):
            text = format(value if value else abs(value), "f")  # never "-0.00"
        else:
            text = json.dumps(value, ensure_ascii=False)
        parts.append(f"{json.dumps(key)}: {text}")
    return "{" + ", ".join(parts) + "}"


def read_deals(path: Path) -> list[MT5Deal]:
    deals: dict[int, MT5Deal] = {}
    if not path.exists():
        return []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            deal = MT5Deal.model_validate_json(line)
        except (ValueError, ValidationFailed) as exc:  # a line torn by a crash while appended
            log.warning("%s line %d unreadable, skipped: %s", path, number, exc)
            continue
        deals[deal.ticket] = deal
    return list(deals.values())


def append_deals(path: Path, deals: Iterable[MT5Deal]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a",
              encoding="utf-8") as out:
        for deal in deals:
            out.write(deal_json(deal) + "\n")
        out.flush()
        os.fsync(out.fileno())


def rewrite_deals(path: Path, deals: Iterable[MT5Deal]) -> None:
    data = "".join(deal_json(d) + "\n" for d in deals).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda f: f.write(data))


# -- the trade server's side ----------------------------------------------------------------------
@dataclass
class Position:
    id: int
    symbol: str
    side: str  # buy or sell
    volume: Decimal
    price: Decimal
    magic: int


def _opposite(side: str) -> str:
    return "sell" if side == "buy" else "buy"


class Terminal:
    """An account's deal history and open positions (netting), and the market it trades in.
    With a `seed`, `step()` makes the same deals every time (their `time_msc` aside)."""

    def __init__(self, *, seed: int | None = None, gmt_offset_s: int = 7200,
                 currency: str = "USD", login: int = 5001234,
                 magics: Iterable[int] = (1001, 1002),
                 clock: Callable[[], float] = time.time) -> None:
        self.rng = random.Random(seed)
        self.gmt_offset_s, self.currency, self.login = gmt_offset_s, currency, login
        self.magics = tuple(magics)
        self.clock = clock
        self.history: dict[int, MT5Deal] = {}
        self.positions: dict[str, Position] = {}
        self.prices = {name: s.start for name, s in SYMBOLS.items()}
        self.balance = Decimal("0.00")
        self.next_ticket, self.next_order = FIRST_TICKET, FIRST_ORDER
        self.last_msc = 0

    def server_msc(self) -> int:
        """Now, in the trade server's time (ms)."""
        return round(self.clock() * 1000) + self.gmt_offset_s * 1000

    def load(self, deals: Iterable[MT5Deal]) -> None:
        """Replay a saved history: positions, balance, prices and numbering go on from it."""
        for deal in sorted(deals, key=lambda d: d.ticket):
            if deal.ticket not in self.history:
                self._apply(deal)

    def record(self, **fields: Any) -> MT5Deal:
        """A deal with the next ticket, stamped now in server time; amounts are rounded as
        MT5 keeps them (lots 0.01, prices to the symbol's digits, money to the cent)."""
        symbol = SYMBOLS.get(fields.get("symbol", ""))
        for key in ("volume", "price", "profit", "commission", "swap", "fee"):
            if key in fields:
                value = Decimal(str(fields[key]))
                step = (Decimal(1).scaleb(-symbol.digits) if key == "price" and symbol
                        else LOT if key == "volume" else CENT)
                fields[key] = value if key == "price" and not symbol else value.quantize(step)
        msc = max(self.server_msc(), self.last_msc + 1)
        values: dict[str, Any] = {
            "ticket": self.next_ticket, "volume": Decimal("0.00"), "price": Decimal("0.00"),
            "profit": Decimal("0.00"), "commission": Decimal("0.00"), "swap": Decimal("0.00"),
            "fee": Decimal("0.00"), "time_msc": msc, "gmt_offset_s": self.gmt_offset_s,
            "currency": self.currency, "login": self.login, **fields}
        deal = MT5Deal.model_validate(values)
        if deal.ticket in self.history:
            raise ValueError(f"ticket {deal.ticket} is already in the history")
        self._apply(deal)
        return deal

    def _apply(self, deal: MT5Deal) -> None:
        self.history[deal.ticket] = deal
        self.next_ticket = max(self.next_ticket, deal.ticket + 1)
        self.next_order = max(self.next_order, deal.order + 1, deal.position + 1)
        self.last_msc = max(self.last_msc, deal.time_msc)
        self.balance += deal.profit + deal.commission + deal.swap + deal.fee
        if deal.type not in ("buy", "sell") or not deal.symbol:
            return
        if deal.symbol in self.prices:
            self.prices[deal.symbol] = float(deal.price)
        held = self.positions.get(deal.symbol)
        if deal.entry == "in":
            if held is None:
                self.positions[deal.symbol] = Position(deal.position, deal.symbol, deal.type,
                                                       deal.volume, deal.price, deal.magic)
            else:
                total = held.volume + deal.volume
                held.price = (held.price * held.volume + deal.price * deal.volume) / total
                held.volume = total
        elif held is not None and deal.entry in ("out", "out_by"):
            held.volume -= deal.volume
            if held.volume <= 0:
                del self.positions[deal.symbol]
        elif held is not None and deal.entry == "inout":
            held.side, held.volume, held.price = deal.type, deal.volume - held.volume, deal.price

    # -- operations -----------------------------------------------------------------------
    def deposit(self, amount: Decimal, comment: str = "Deposit") -> MT5Deal:
        return self.record(type="balance", profit=amount, reason="client", comment=comment)

    def withdraw(self, amount: Decimal, comment: str = "Withdrawal") -> MT5Deal:
        return self.record(type="balance", profit=-abs(amount), reason="client", comment=comment)

    def open(self, symbol: str, side: str = "buy", volume: Decimal | str = "0.10",
             magic: int | None = None) -> MT5Deal:
        """Open a position, or add to the one on `symbol` (same side)."""
        sym = self._symbol(symbol)
        if side not in ("buy", "sell"):
            raise ValueError(f"side {side!r}: buy or sell")
        lots = Decimal(str(volume)).quantize(LOT)
        held = self.positions.get(symbol)
        if held is not None and held.side != side:
            raise ValueError(f"{symbol} is held {held.side}: close() or reverse() it")
        order = self._order()
        return self.record(
            order=order, position=held.id if held else order, symbol=symbol, type=side,
            entry="in", volume=lots, price=sym.quote(self.prices[symbol]),
            commission=-(sym.commission_per_lot * lots),
            magic=held.magic if held else (self.magics[0] if magic is None else magic),
            reason="expert")

    def close(self, symbol: str, volume: Decimal | str | None = None,
              reason: str = "expert") -> MT5Deal:
        """Close the position on `symbol`, wholly or `volume` of it."""
        sym, held = self._symbol(symbol), self._held(symbol)
        lots = held.volume if volume is None else min(Decimal(str(volume)).quantize(LOT),
                                                      held.volume)
        price = sym.quote(self.prices[symbol])
        swap = Decimal(0)
        if self.rng.random() < 0.35:  # held overnight
            swap = -(lots * Decimal(str(round(self.rng.uniform(0.1, 1.0) * sym.swap_per_lot, 2))))
        return self.record(
            order=self._order(), position=held.id, symbol=symbol, type=_opposite(held.side),
            entry="out", volume=lots, price=price, profit=self._profit(held, price, lots),
            swap=swap, magic=held.magic, reason=reason,
            comment=f"[{reason} {price}]" if reason in ("sl", "tp") else "")

    def reverse(self, symbol: str, volume: Decimal | str) -> MT5Deal:
        """One deal that closes the position on `symbol` and opens `volume` the other way
        (`inout`); the position keeps its id, commission is charged on the new part."""
        sym, held = self._symbol(symbol), self._held(symbol)
        lots = Decimal(str(volume)).quantize(LOT)
        price = sym.quote(self.prices[symbol])
        return self.record(
            order=self._order(), position=held.id, symbol=symbol, type=_opposite(held.side),
            entry="inout", volume=held.volume + lots, price=price,
            profit=self._profit(held, price, held.volume),
            commission=-(sym.commission_per_lot * lots), magic=held.magic, reason="expert")

    def step(self, may_open: bool = True) -> MT5Deal | None:
        """The market moves and one deal happens: the deposit first, then opens, adds,
        partial and full closes, a reversal now and then, and an occasional withdrawal.
        Without `may_open` nothing is opened, added or reversed; None when nothing is left
        to do."""
        for name, sym in SYMBOLS.items():
            self.prices[name] *= 1 + self.rng.gauss(0.0, sym.move)
        if not self.history:
            return self.deposit(Decimal("10000.00"))
        if self.rng.random() < 0.03 and self.balance > 2000:
            return self.withdraw(Decimal(self.rng.choice((100, 200, 250, 500))))
        symbol = self.rng.choice(list(SYMBOLS))
        sym, held = SYMBOLS[symbol], self.positions.get(symbol)
        if held is None:
            if may_open:
                return self.open(symbol, self.rng.choice(("buy", "sell")),
                                 self.rng.choice(sym.lots), self.rng.choice(self.magics))
            return self.close(next(iter(self.positions))) if self.positions else None
        roll = self.rng.random()
        if may_open and roll < 0.15:
            return self.open(symbol, held.side, self.rng.choice(sym.lots))
        if may_open and roll < 0.25:
            return self.reverse(symbol, self.rng.choice(sym.lots))
        if roll < 0.55 and held.volume >= 2 * LOT:
            return self.close(symbol, max(LOT, (held.volume / 2).quantize(LOT)))
        reason = self.rng.choices(("expert", "sl", "tp"), weights=(6, 2, 2))[0]
        return self.close(symbol, reason=reason)

    def _symbol(self, symbol: str) -> Symbol:
        if symbol not in SYMBOLS:
            raise ValueError(f"symbol {symbol!r}: one of {', '.join(SYMBOLS)}")
        return SYMBOLS[symbol]

    def _held(self, symbol: str) -> Position:
        if symbol not in self.positions:
            raise ValueError(f"no open position on {symbol}")
        return self.positions[symbol]

    def _order(self) -> int:
        order, self.next_order = self.next_order, self.next_order + 1
        return order

    @staticmethod
    def _profit(held: Position, price: Decimal, lots: Decimal) -> Decimal:
        direction = 1 if held.side == "buy" else -1
        return (price - held.price) * lots * SYMBOLS[held.symbol].contract * direction
