"""The node's settings: the `config.json` that `circles device add <name> --kind esp32 --out
config.json` writes (broker and topics), plus optional keys a person adds for this node
(Wi-Fi, sensors, timing; see firmware/README.md). A file exactly as the appliance wrote it
loads; only what the node cannot do without is an error."""

import json

SUPPORTED_VERSION = 1

# Optional top-level keys and their defaults.
DEFAULTS = {
    "name": None,  # the device's name in Home Assistant; the device name when missing
    "wifi": None,  # {"ssid": ..., "password": ...}; needed on a board with Wi-Fi only
    "sensors": [],
    "interval_s": 60,  # between two readings of every sensor
    "buffer_size": 200,  # readings kept while the broker is unreachable
    "backoff_max_s": 60,  # ceiling of the wait between two Wi-Fi or broker attempts
    "ntp_host": "pool.ntp.org",
}
BROKER_DEFAULTS = {"port": 1883, "tls": False, "ca_cert": None, "client_id": None,
                   "keepalive_s": 30, "server_hostname": None}
TOPICS = ("state", "set", "status", "discovery", "ha_status")
_SLUG = "abcdefghijklmnopqrstuvwxyz0123456789_-"


class ConfigError(Exception):
    """config.json is missing, unreadable or lacks something the node needs."""


def load(path):
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError:
        raise ConfigError(f"cannot read {path}: copy the file written by `circles device add <name> "
                          f"--kind esp32 --out config.json` to the node") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from None
    return check(doc)


def check(doc):
    """The settings with every default filled in; ConfigError names what is wrong."""
    if not isinstance(doc, dict):
        raise ConfigError("config.json must hold a JSON object")
    version = doc.get("version", SUPPORTED_VERSION)
    if version != SUPPORTED_VERSION:
        raise ConfigError(f"config.json version {version}: this firmware reads version "
                          f"{SUPPORTED_VERSION}; update the firmware")
    cfg = {}
    for key in DEFAULTS:
        cfg[key] = doc.get(key, DEFAULTS[key])
    cfg["version"] = version
    cfg["device"] = _required(doc, "device", str)
    if not is_slug(cfg["device"]):
        device = cfg["device"]
        raise ConfigError(f"device {device!r}: use a-z, 0-9, '-' and '_' (it is a topic level)")
    cfg["broker"] = _broker(_required(doc, "broker", dict), cfg["device"])
    topics = _required(doc, "topics", dict)
    cfg["topics"] = {}
    for key in TOPICS:
        cfg["topics"][key] = _required(topics, key, str, "topics.")
    cfg["name"] = cfg["name"] or cfg["device"]
    for key in ("interval_s", "buffer_size", "backoff_max_s"):
        if not isinstance(cfg[key], (int, float)) or cfg[key] <= 0:
            value = cfg[key]
            raise ConfigError(f"{key} must be a number above 0, not {value!r}")
    cfg["buffer_size"] = int(cfg["buffer_size"])
    if cfg["wifi"] is not None and not (isinstance(cfg["wifi"], dict) and cfg["wifi"].get("ssid")):
        raise ConfigError('wifi must look like {"ssid": "...", "password": "..."}')
    if not isinstance(cfg["sensors"], list):
        raise ConfigError('sensors must be a list like [{"kind": "ds18b20", "pin": 4}]')
    for spec in cfg["sensors"]:
        if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
            raise ConfigError(f"every sensor needs a kind (ds18b20, dht22, fake): {spec!r}")
    return cfg


def _broker(doc, device):
    broker = {}
    for key in BROKER_DEFAULTS:
        broker[key] = doc.get(key, BROKER_DEFAULTS[key])
    broker["host"] = _required(doc, "host", str, "broker.")
    broker["username"] = _required(doc, "username", str, "broker.")
    broker["password"] = _required(doc, "password", str, "broker.")
    broker["client_id"] = broker["client_id"] or device
    if not isinstance(broker["port"], int) or not 0 < broker["port"] < 65536:
        port = broker["port"]
        raise ConfigError(f"broker.port must be a TCP port, not {port!r}")
    if not isinstance(broker["keepalive_s"], int) or not 0 < broker["keepalive_s"] < 65536:
        keepalive = broker["keepalive_s"]
        raise ConfigError(f"broker.keepalive_s must be whole seconds from 1 to 65535, not {keepalive!r}")
    if broker["tls"] and not broker["ca_cert"]:
        raise ConfigError("broker.tls is true but broker.ca_cert is empty: run `circles device "
                          "add` with --tls --ca-file, or paste the CA's PEM text there")
    return broker


def _required(doc, key, kind, where=""):
    value = doc.get(key)
    if value is None or value == "":
        raise ConfigError(f"config.json has no {where}{key}: write it again with `circles device add`")
    if not isinstance(value, kind):
        raise ConfigError(f"{where}{key} has the wrong type: {value!r}")
    return value


def is_slug(value):
    return bool(value) and all(c in _SLUG for c in value)
