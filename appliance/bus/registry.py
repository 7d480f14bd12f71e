"""The topic registry: every topic of the bus is declared here, once.

Services, devices and tests name topics only through these specs
(`SERVICE_STATUS.topic(service="health")`), never as literal strings.
"""

from __future__ import annotations

from pydantic import BaseModel

from appliance.bus import mt5
from appliance.bus import payloads as p
from appliance.bus import trade_event as t
from appliance.bus import trading as tr
from appliance.bus.topics import TopicSpec


def _spec(name: str, template: str, *, qos: int = 1, retained: bool = False,
          model: type[BaseModel] | None = None, pub: str = "", sub: str = "") -> TopicSpec:
    return TopicSpec(name, template, qos, retained, model,
                     frozenset(pub.split()), frozenset(sub.split()))


SERVICE_STATUS = _spec("service_status", "circles/{service}/status", retained=True,
                       pub="service:self", sub="service homeassistant")
DLQ = _spec("dlq", "circles/dlq/{service}", model=p.DeadLetter,
            pub="service:self", sub="service")
SERVICE_CMD = _spec("service_cmd", "circles/{service}/cmd/{command}", model=p.CommandRequest,
                    pub="service", sub="service:self")
REPLY = _spec("reply", "circles/reply/{service}/{request}", model=p.CommandReply,
              pub="service", sub="service:self")
HEALTH_STATE = _spec("health_state", "circles/health/state", retained=True,
                     model=p.HealthState, pub="service:health", sub="service homeassistant")
TRADING_HALT = _spec("trading_halt", "circles/trading/halt", retained=True, model=p.TradingHalt,
                     pub="service:risk", sub="service mt5 homeassistant")
TRADE_EVENT = _spec("trade_event", "circles/trade/{account}/event", model=t.TradeEvent,
                    pub="service", sub="service:trade-logger")
TRADE_ACK = _spec("trade_ack", "circles/trade/{account}/ack", model=t.TradeAck,
                  pub="service:trade-logger", sub="service")
TRADE_METRICS = _spec("trade_metrics", "circles/trade/{account}/metrics", retained=True,
                      model=t.TradeMetrics,
                      pub="service:trade-logger", sub="service homeassistant")
# The trading pipeline (docs/trading.md): market → alpha → ensemble → sizing → execution,
# with risk owning the halt. Feeds are named by exchange, symbol and timeframe; per-account
# topics put the account last (`circles/<service>/<kind>/<account>`), so no account name can
# make one of them read as a command (`circles/<service>/cmd/<command>`).
MARKET_BAR = _spec("market_bar", "circles/market/{exchange}/{symbol}/{timeframe}/bar",
                   model=tr.Bar, pub="service:market", sub="service")
MARKET_FEED = _spec("market_feed", "circles/market/{exchange}/{symbol}/{timeframe}/feed",
                    retained=True, model=tr.FeedState, pub="service:market",
                    sub="service homeassistant")
ALPHA_SIGNALS = _spec("alpha_signals", "circles/alpha/{exchange}/{symbol}/{timeframe}/signals",
                      model=tr.Signals, pub="service:alpha", sub="service")
ENSEMBLE_TARGET = _spec("ensemble_target",
                        "circles/ensemble/{exchange}/{symbol}/{timeframe}/target",
                        model=tr.Target, pub="service:ensemble", sub="service")
ORDER_INTENT = _spec("order_intent", "circles/sizing/intent/{account}", model=tr.OrderIntent,
                     pub="service:sizing", sub="service")
ORDER_UPDATE = _spec("order_update", "circles/execution/order/{account}", model=tr.Order,
                     pub="service:execution", sub="service")
OPEN_ORDERS = _spec("open_orders", "circles/execution/orders/{account}", retained=True,
                    model=tr.Orders, pub="service:execution", sub="service homeassistant")
POSITIONS = _spec("positions", "circles/execution/positions/{account}", retained=True,
                  model=tr.Positions, pub="service:execution", sub="service homeassistant")
RISK_STATE = _spec("risk_state", "circles/risk/state", retained=True, model=tr.RiskState,
                   pub="service:risk", sub="service homeassistant")
# The MT5 wire protocol (docs/mt5_protocol.md): an expert advisor per account, the bridge.
MT5_DEAL = _spec("mt5_deal", "circles/mt5/{account}/deal", model=mt5.MT5Deal,
                 pub="mt5:self", sub="service:mt5-bridge")
MT5_SNAPSHOT = _spec("mt5_snapshot", "circles/mt5/{account}/snapshot", model=mt5.MT5Snapshot,
                     pub="mt5:self", sub="service:mt5-bridge")
MT5_HEARTBEAT = _spec("mt5_heartbeat", "circles/mt5/{account}/heartbeat", qos=0,
                      model=mt5.MT5Heartbeat, pub="mt5:self", sub="service")
MT5_STATUS = _spec("mt5_status", "circles/mt5/{account}/status", retained=True,
                   pub="mt5:self", sub="service homeassistant")
MT5_ACK = _spec("mt5_ack", "circles/mt5/{account}/ack", model=mt5.MT5Ack,
                pub="service:mt5-bridge", sub="mt5:self")
MT5_RESEND = _spec("mt5_resend", "circles/mt5/{account}/cmd/resend", model=mt5.MT5Resend,
                   pub="service:mt5-bridge", sub="mt5:self")
MT5_GAPS = _spec("mt5_gaps", "circles/mt5/{account}/gaps", retained=True, model=mt5.MT5Gaps,
                 pub="service:mt5-bridge", sub="service homeassistant")
# Backups (docs/backup.md): each job's last run and last restore drill, and the alert.
BACKUP_RESULT = _spec("backup_result", "circles/backup/{job}/result", retained=True,
                      model=p.BackupResult, pub="service:backup", sub="service homeassistant")
BACKUP_DRILL = _spec("backup_drill", "circles/backup/{job}/drill", retained=True,
                     model=p.BackupResult, pub="service:backup", sub="service homeassistant")
BACKUP_ALERT = _spec("backup_alert", "circles/backup/alert", retained=True,
                     model=p.BackupAlert, pub="service:backup", sub="service homeassistant")
# Alerts to the owner's phone (docs/notify.md): the last ones sent, for the panel.
NOTIFY_RECENT = _spec("notify_recent", "circles/notify/recent", retained=True,
                      model=p.NotifyRecent, pub="service:notify", sub="service homeassistant")
HOME_STATE = _spec("home_state", "circles/home/{device}/{entity}/state", retained=True,
                   model=p.HomeState, pub="esp32:self service", sub="service homeassistant")
HOME_SET = _spec("home_set", "circles/home/{device}/{entity}/set",
                 pub="homeassistant service", sub="esp32:self service")
HOME_STATUS = _spec("home_status", "circles/home/{device}/status", retained=True,
                    pub="esp32:self service", sub="service homeassistant")
HA_STATUS = _spec("ha_status", "homeassistant/status", retained=True,
                  pub="homeassistant", sub="service esp32")
HA_DISCOVERY = _spec("ha_discovery", "homeassistant/{component}/{device}/{object}/config",
                     retained=True, pub="service esp32:self", sub="homeassistant")
HA_CMD = _spec("ha_cmd", "circles/ha/cmd/{command}", pub="homeassistant", sub="service")

SPECS: tuple[TopicSpec, ...] = tuple(
    value for value in globals().values() if isinstance(value, TopicSpec))


def spec_for(topic: str) -> TopicSpec | None:
    """The first spec whose template matches `topic`."""
    for spec in SPECS:
        if spec.parse(topic) is not None:
            return spec
    return None
