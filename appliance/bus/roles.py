"""Broker roles generated from the topic registry, one template per kind of client.

Mosquitto 2.0's dynamic-security plugin does not substitute `%u`/`%c` in ACL topics
(checked on 2.0.11), so a kind whose topics carry the client's own name (a service,
an ESP32, an MT5 account) gets one role per client, `<kind>-<name>`, built from the
same template; `homeassistant` and `observer` share one role each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.bus.registry import SPECS
from appliance.bus.topics import Filter, TopicSpec, slug


@dataclass(frozen=True)
class Kind:
    name: str
    identity: str | None  # the template level that holds the client's own name
    publish: tuple[str, ...] = ()  # grants beyond the registry, `{name}` = the client
    subscribe: tuple[str, ...] = ()


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("service", "service", publish=("circles/{name}/#",)),
    Kind("esp32", "device", publish=("circles/home/{name}/#",)),
    Kind("mt5", "account", publish=("circles/mt5/{name}/#",),
         subscribe=("circles/mt5/{name}/cmd/#", "circles/mt5/{name}/ack")),
    Kind("homeassistant", None, subscribe=("homeassistant/#",)),
    Kind("observer", None, subscribe=("circles/#",)),
)}


# Kinds of client a person adds as a device (`circles device add --kind …`).
DEVICE_KINDS: tuple[str, ...] = tuple(k for k in KINDS if k != "service")


def role_name(kind: str, name: str | None = None) -> str:
    return f"{kind}-{slug(name)}" if KINDS[kind].identity and name else kind


def _granted(spec: TopicSpec, entries: frozenset[str], kind: Kind, name: str | None) -> Filter | None:
    for entry in entries:
        who, _, scope = entry.partition(":")
        if who == kind.name and not scope:
            return spec.filter()
        if who == kind.name and scope == "self" and name and kind.identity in spec.params:
            return spec.filter(**{kind.identity: name})
        if who == kind.name and scope and scope != "self" and name and slug(scope) == slug(name):
            return spec.filter()
    return None


def acl_filters(kind: str, name: str | None = None) -> tuple[list[str], list[str]]:
    """(publish filters, subscribe filters) for a client of `kind` called `name`."""
    k = KINDS[kind]
    if k.identity and not name:
        raise ValueError(f"a {kind} client needs a name")
    own = slug(name) if name else ""
    pubs = [t.format(name=own) for t in k.publish]
    subs = [t.format(name=own) for t in k.subscribe]
    for spec in SPECS:
        if (f := _granted(spec, spec.publishers, k, name)) is not None:
            pubs.append(str(f))
        if (f := _granted(spec, spec.subscribers, k, name)) is not None:
            subs.append(str(f))
    return sorted(set(pubs)), sorted(set(subs))


def role(kind: str, name: str | None = None) -> dict[str, Any]:
    """The role as the dynamic-security plugin stores and accepts it."""
    pubs, subs = acl_filters(kind, name)
    acls = [{"acltype": "publishClientSend", "topic": t, "priority": 0, "allow": True}
            for t in pubs]
    acls += [{"acltype": "subscribePattern", "topic": t, "priority": 0, "allow": True}
             for t in subs]
    return {"rolename": role_name(kind, name), "acls": acls}


ADMIN_ROLE: dict[str, Any] = {"rolename": "broker-admin", "acls": [
    {"acltype": t, "topic": "$CONTROL/dynamic-security/#", "priority": 0, "allow": True}
    for t in ("publishClientSend", "publishClientReceive", "subscribePattern")
]}
