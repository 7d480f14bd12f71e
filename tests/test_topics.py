from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance import services
from appliance.bus import Filter, Topic, registry, slug
from appliance.bus.payloads import HomeState
from appliance.bus.roles import acl_filters
from appliance.errors import ValidationFailed
from modules.backup.settings import RESERVED_JOBS


@pytest.mark.parametrize("name,expected", [
    ("BTC/USDT", "btc-usdt"), ("#US30", "us30"), ("EUR/USD.pro", "eur-usd-pro"),
    ("Living Room", "living-room"), ("trade_logger", "trade_logger"), ("  A--B  ", "a--b"),
])
def test_slug(name: str, expected: str) -> None:
    assert slug(name) == expected


def test_slug_refuses_a_name_with_nothing_usable() -> None:
    with pytest.raises(ValueError):
        slug("///")


@given(st.text(min_size=1, max_size=40))
def test_slug_output_is_always_a_valid_level(name: str) -> None:
    try:
        value = slug(name)
    except ValueError:
        return
    assert value and all(c.isascii() and (c.isalnum() or c in "_-") for c in value)
    assert value == value.lower() and slug(value) == value


@pytest.mark.parametrize("bad", ["", "a/+/b", "a/#", "a\x00b"])
def test_topic_refuses_wildcards_and_empty(bad: str) -> None:
    with pytest.raises(ValueError):
        Topic(bad)


@pytest.mark.parametrize("bad", ["a/b+", "a/#/b", "a/b#"])
def test_filter_refuses_misplaced_wildcards(bad: str) -> None:
    with pytest.raises(ValueError):
        Filter(bad)


@pytest.mark.parametrize("flt,topic,hit", [
    ("circles/+/status", "circles/health/status", True),
    ("circles/+/status", "circles/health/x/status", False),
    ("circles/#", "circles", True),
    ("circles/#", "circles/a/b/c", True),
    ("+/+", "a/b", True),
    ("+", "a/b", False),
    ("#", "$SYS/broker", False),
    ("$SYS/#", "$SYS/broker", True),
    ("a/b", "a/b", True),
])
def test_filter_matches(flt: str, topic: str, hit: bool) -> None:
    assert Filter(flt).matches(topic) is hit


def test_spec_builds_parses_and_slugifies() -> None:
    spec = registry.HOME_STATE
    topic = spec.topic(device="Living Room", entity="Temp 1")
    assert str(topic) == "circles/home/living-room/temp-1/state"
    assert spec.parse(str(topic)) == {"device": "living-room", "entity": "temp-1"}
    assert spec.parse("circles/home/x/state") is None
    assert str(spec.filter(device="kitchen")) == "circles/home/kitchen/+/state"
    with pytest.raises(ValueError, match="missing"):
        spec.topic(device="x")


def test_spec_encodes_and_validates_payloads() -> None:
    spec = registry.HOME_STATE
    data = spec.encode(HomeState(value=21.5, unit="°C", ts="2026-01-01T00:00:00+00:00"))
    assert spec.decode(data).value == 21.5
    with pytest.raises(ValidationFailed, match="(?i)invalid JSON"):
        spec.decode(b"{oops")
    with pytest.raises(ValidationFailed, match="value"):
        spec.decode(b'{"unit": "C"}')
    with pytest.raises(ValidationFailed, match="UTF-8"):
        spec.decode(b"\xff")
    with pytest.raises(ValidationFailed, match="exceeds"):
        spec.decode(b" " * (300 * 1024))
    assert registry.SERVICE_STATUS.decode(b"online") == "online"
    with pytest.raises(TypeError):
        registry.SERVICE_STATUS.encode(HomeState(value=1))


def test_every_topic_is_declared_once() -> None:
    templates = [s.template for s in registry.SPECS]
    assert len(templates) == len(set(templates))
    assert len({s.name for s in registry.SPECS}) == len(registry.SPECS)
    assert registry.spec_for("circles/health/state") is registry.HEALTH_STATE


def _could_meet(a: str, b: str) -> bool:
    """Whether some topic fits both templates: same depth, and each level the same word or
    a `{name}` in one of them that can take the other's word (`{service}` takes only the
    names of services; a backup job's name is never one of RESERVED_JOBS, which its settings
    refuse; an account or a device is whatever its owner calls it)."""
    def fits(level: str, word: str) -> bool:
        if level == "{job}" and word in RESERVED_JOBS:
            return False
        return level == word or level.startswith("{") and (
            level != "{service}" or word.startswith("{") or word in services.names())

    x, y = a.split("/"), b.split("/")
    return len(x) == len(y) and all(fits(p, q) or fits(q, p) for p, q in zip(x, y, strict=True))


def test_no_topic_can_be_read_as_two() -> None:
    """A topic of one spec never fits another's template, whatever the names in it: an
    account called `cmd` must not turn a position into a command, or a command into one."""
    specs = registry.SPECS
    clashes = [(a.name, b.name) for i, a in enumerate(specs) for b in specs[i + 1:]
               if _could_meet(a.template, b.template)]
    assert clashes == []


def test_roles_follow_the_design_table() -> None:
    pubs, subs = acl_filters("service", "health")
    assert "circles/health/#" in pubs and "circles/dlq/health" in pubs
    assert "circles/health/state" in pubs and "circles/dlq/other" not in pubs
    assert "circles/reply/health/+" in subs and "circles/reply/+/+" not in subs
    pubs, subs = acl_filters("esp32", "kitchen")
    assert all("kitchen" in t for t in pubs)
    assert "circles/home/kitchen/+/set" in subs and "homeassistant/status" in subs
    pubs, subs = acl_filters("mt5", "12345")
    assert "circles/mt5/12345/#" in pubs and all(t.startswith("circles/mt5/12345/") for t in pubs)
    assert {"circles/trading/halt", "circles/mt5/12345/ack", "circles/mt5/12345/cmd/#"} <= set(subs)
    pubs, subs = acl_filters("homeassistant")
    assert "circles/home/+/+/set" in pubs and "homeassistant/#" in subs
    assert not any(t.startswith("circles/trade/") for t in pubs)
    assert acl_filters("observer") == ([], ["circles/#"])
    with pytest.raises(ValueError):
        acl_filters("esp32")
