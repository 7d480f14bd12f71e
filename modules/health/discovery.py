"""The box's vital signs as Home Assistant entities, read from the retained health state."""

from __future__ import annotations

from appliance.bus import registry
from appliance.ha_discovery import APPLIANCE_ID, Entity


def entities() -> list[Entity]:
    state = str(registry.HEALTH_STATE.topic())

    def sensor(key: str, name: str, unit: str, device_class: str | None = None,
               icon: str | None = None) -> Entity:
        config: dict[str, str | None] = {"state_topic": state, "value_template": f"{{{{ value_json.{key} }}}}",
                  "unit_of_measurement": unit, "state_class": "measurement",
                  "entity_category": "diagnostic"}
        config |= {"device_class": device_class} if device_class else {"icon": icon}
        return Entity("sensor", APPLIANCE_ID, key, name, config)

    return [
        sensor("cpu_temp_c", "CPU temperature", "°C", "temperature"),
        sensor("cpu_percent", "CPU", "%", icon="mdi:cpu-64-bit"),
        sensor("memory_percent", "Memory used", "%", icon="mdi:memory"),
        sensor("disk_percent", "Disk used", "%", icon="mdi:harddisk"),
        Entity("binary_sensor", APPLIANCE_ID, "clock_synchronized", "Clock synchronised", {
            "state_topic": state, "entity_category": "diagnostic", "icon": "mdi:clock-check",
            # null (cannot tell) is "None": Home Assistant's word for unknown.
            "value_template": "{{ 'None' if value_json.clock_synchronized is none else "
                              "('ON' if value_json.clock_synchronized else 'OFF') }}",
            "payload_on": "ON", "payload_off": "OFF"}),
    ]
