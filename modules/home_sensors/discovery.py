"""The Home Assistant entity of each device on the box (announced by `appliance.ha_discovery`)."""

from __future__ import annotations

from typing import Any

from appliance.bus import registry
from appliance.ha_discovery import APPLIANCE_ID, VALUE, Entity
from modules.home_sensors.drivers.base import OFF, ON, Driver
from modules.home_sensors.settings import DeviceSettings


def entity(device: DeviceSettings, driver: type[Driver]) -> Entity:
    shape = driver.shape
    state = str(registry.HOME_STATE.topic(device=device.name, entity=device.entity_name))
    command = str(registry.HOME_SET.topic(device=device.name, entity=device.entity_name))
    config: dict[str, Any] = {"state_topic": state, "value_template": VALUE}
    if shape.component in ("binary_sensor", "switch"):
        config |= {"payload_on": ON, "payload_off": OFF}
    if shape.component == "switch":
        config |= {"command_topic": command, "state_on": ON, "state_off": OFF}
    if shape.component == "light":  # brightness in percent; ON/OFF and numbers share a topic
        config = {"state_topic": state, "command_topic": command,
                  "state_value_template": "{{ 'ON' if value_json.value > 0 else 'OFF' }}",
                  "brightness_state_topic": state, "brightness_command_topic": command,
                  "brightness_value_template": VALUE, "brightness_scale": 100,
                  "on_command_type": "brightness"}
    if shape.component == "sensor":
        config |= {"unit_of_measurement": shape.unit, "state_class": shape.state_class}
    config["device_class"] = device.options.device_class or shape.device_class
    config = {k: v for k, v in config.items() if v is not None}
    label = device.label or device.name.replace("-", " ").capitalize()
    info: dict[str, Any] = {"identifiers": [f"circles-{device.name}"], "name": label,
                            "manufacturer": "Circles", "model": driver.kind,
                            "via_device": APPLIANCE_ID}
    if device.room:
        info["suggested_area"] = device.room
    status = str(registry.HOME_STATUS.topic(device=device.name))
    return Entity(shape.component, device.name, device.entity_name,
                  device.entity_name.replace("_", " ").capitalize(), config, info,
                  availability=(status,), owned=(state, status))
