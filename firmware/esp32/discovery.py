"""Home Assistant MQTT discovery for the node's own entities: one retained config per
entity under `homeassistant/sensor/<device>/<entity>/config`, the same shape as the
appliance's own configs (appliance/ha_discovery.py), available while the node's status
topic says `online`."""

import json

from version import VERSION

COMPONENT = "sensor"
VALUE_TEMPLATE = "{{ value_json.value }}"
APPLIANCE_ID = "circles"  # the appliance's own Home Assistant device, which the node hangs off
ONLINE = "online"
OFFLINE = "offline"


def fill(template, **values):
    for key in values:
        template = template.replace("{" + key + "}", values[key])
    return template


def device_block(cfg):
    return {"identifiers": ["circles-" + cfg["device"]], "name": cfg["name"],
            "manufacturer": "Circles", "model": "ESP32 sensor node", "sw_version": VERSION,
            "via_device": APPLIANCE_ID}


def config_for(cfg, channel):
    """(topic, JSON payload) of one entity's config."""
    device = cfg["device"]
    doc = {
        "name": channel.name,
        "unique_id": device + "." + channel.entity,
        "default_entity_id": (COMPONENT + "." + device + "_" + channel.entity).replace("-", "_"),
        "state_topic": fill(cfg["topics"]["state"], entity=channel.entity),
        "value_template": VALUE_TEMPLATE,
        "state_class": "measurement",
        "availability": [{"topic": cfg["topics"]["status"], "payload_available": ONLINE,
                          "payload_not_available": OFFLINE}],
        "availability_mode": "all",
        "device": device_block(cfg),
    }
    if channel.unit:
        doc["unit_of_measurement"] = channel.unit
    if channel.device_class:
        doc["device_class"] = channel.device_class
    topic = fill(cfg["topics"]["discovery"], component=COMPONENT, object=channel.entity)
    return topic, json.dumps(doc, separators=(",", ":"))


def configs(cfg, sensors):
    """Every entity's (topic, payload), in the order of config.json."""
    out = []
    for sensor in sensors:
        for channel in sensor.channels:
            out.append(config_for(cfg, channel))
    return out
