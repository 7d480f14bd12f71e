"""What the risk service shows in Home Assistant: the trading halt as a switch (ON = halted,
its commands through Home Assistant's own command topic) and as a binary sensor, and
today's PnL."""

from __future__ import annotations

from appliance.bus import registry
from appliance.ha_discovery import APPLIANCE_ID, Entity

HA_COMMAND = "trading_halt"  # circles/ha/cmd/trading_halt
ON, OFF = "ON", "OFF"
HALTED = "{{ 'ON' if value_json.halted else 'OFF' }}"


def entities() -> list[Entity]:
    halt = str(registry.TRADING_HALT.topic())
    return [
        Entity("switch", APPLIANCE_ID, "trading_halt", "Trading halt", {
            "icon": "mdi:hand-back-left",
            "command_topic": str(registry.HA_CMD.topic(command=HA_COMMAND)),
            "payload_on": ON, "payload_off": OFF, "state_topic": halt,
            "value_template": HALTED, "state_on": ON, "state_off": OFF,
            "qos": registry.HA_CMD.qos, "retain": False}),
        Entity("binary_sensor", APPLIANCE_ID, "trading_halted", "Trading halted", {
            "state_topic": halt, "value_template": HALTED, "payload_on": ON,
            "payload_off": OFF, "device_class": "problem"}),
        Entity("sensor", APPLIANCE_ID, "pnl_today", "Today's PnL", {
            "state_topic": str(registry.RISK_STATE.topic()),
            # "None" (no PnL known yet) is Home Assistant's word for unknown.
            "value_template": "{{ value_json.figures.pnl_today }}",
            "state_class": "measurement", "icon": "mdi:cash"}),
    ]
