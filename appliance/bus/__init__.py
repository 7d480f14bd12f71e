"""The bus: the only package that knows the MQTT client library.

Services use `Bus` (the protocol), the registry's `TopicSpec`s, and the messages
it yields; `MqttBus` talks to Mosquitto, `MemoryBus` stays in the process.
"""

from appliance.bus.base import OFFLINE, ONLINE, BaseBus, Bus, new_request_id
from appliance.bus.memory import MemoryBroker, MemoryBus
from appliance.bus.message import Message, Received
from appliance.bus.mqtt import BrokerAddress, MqttBus
from appliance.bus.topics import Filter, Topic, TopicSpec, slug

__all__ = [
    "OFFLINE", "ONLINE", "BaseBus", "BrokerAddress", "Bus", "Filter", "MemoryBroker",
    "MemoryBus", "Message", "MqttBus", "Received", "Topic", "TopicSpec", "new_request_id", "slug",
]
