"""Home Assistant discovery of the trading-halt switch.

The switch's state is the retained halt itself (ON = halted), its commands go to Home
Assistant's own command topic, and it is available while the risk service is online.
"""

from __future__ import annotations

import json
from typing import TypedDict

from appliance.bus import registry

DEVICE = "circles"
OBJECT = "trading_halt"
HA_COMMAND = "trading_halt"  # circles/ha/cmd/trading_halt
ON, OFF = "ON", "OFF"


class TopicParams(TypedDict):
    """The levels of HA_DISCOVERY's topic: typed, so that `send(..., **topic_params())`
    cannot pass anything but topic levels (a plain dict[str, str] could be `wait`)."""

    component: str
    device: str
    object: str


def topic_params() -> TopicParams:
    """The HA_DISCOVERY parameters of the switch's config topic."""
    return {"component": "switch", "device": DEVICE, "object": OBJECT}


def halt_switch(service: str) -> str:
    """The retained discovery config (JSON) of the switch, announced by `service`."""
    config = {
        "name": "Trading halt",
        "unique_id": f"{DEVICE}_{OBJECT}",
        "object_id": f"{DEVICE}_{OBJECT}",
        "icon": "mdi:hand-back-left",
        "command_topic": str(registry.HA_CMD.topic(command=HA_COMMAND)),
        "payload_on": ON,
        "payload_off": OFF,
        "state_topic": str(registry.TRADING_HALT.topic()),
        "value_template": "{{ 'ON' if value_json.halted else 'OFF' }}",
        "state_on": ON,
        "state_off": OFF,
        "availability_topic": str(registry.SERVICE_STATUS.topic(service=service)),
        "payload_available": "online",
        "payload_not_available": "offline",
        "qos": registry.HA_CMD.qos,
        "retain": False,
        "device": {
            "identifiers": [DEVICE],
            "name": "Circles",
            "manufacturer": "Circles",
            "model": "home-server appliance",
        },
    }
    return json.dumps(config, separators=(",", ":"))
