"""Checks written once and run against every registered service (`circles run <name>`)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path

import pytest

from appliance.bus import registry
from appliance.bus.payloads import DeadLetter
from tests.helpers import Collector, ServiceProcess, TestBroker


def status_topic(name: str) -> str:
    return str(registry.SERVICE_STATUS.topic(service=name))


async def start(broker: TestBroker, name: str, tmp_path: Path, **env: str) -> tuple[ServiceProcess, Collector]:
    watch = await Collector.start(broker, status_topic(name), str(registry.DLQ.topic(service=name)))
    proc = ServiceProcess(name, broker.env(**env), tmp_path)
    await watch.wait(lambda ms: any(m.topic == status_topic(name) and m.payload == b"online"
                                    for m in ms), 15, f"{name} online")
    return proc, watch


async def test_online_then_offline_on_sigterm(broker: TestBroker, service_name: str, tmp_path: Path) -> None:
    proc, watch = await start(broker, service_name, tmp_path)
    try:
        watch.messages.clear()
        began = time.monotonic()
        proc.signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 10)
        assert code == 0, proc.log
        assert time.monotonic() - began < 5
        await watch.wait(lambda ms: any(m.payload == b"offline" for m in ms), 5, "offline")
        offline = [m for m in watch.messages if m.payload == b"offline"][0]
        assert offline.sender == service_name  # its own clean-stop publish, not the broker's will
    finally:
        proc.stop()
        await watch.close()


async def test_last_will_on_kill_9(broker: TestBroker, service_name: str, tmp_path: Path) -> None:
    proc, watch = await start(broker, service_name, tmp_path)
    try:
        watch.messages.clear()
        proc.signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
        await watch.wait(lambda ms: any(m.payload == b"offline" for m in ms), 10, "last will")
        offline = [m for m in watch.messages if m.payload == b"offline"][0]
        assert offline.sender is None  # published by the broker from the will
    finally:
        proc.stop()
        await watch.close()


async def test_malformed_payload_goes_to_dlq_and_service_lives(
        broker: TestBroker, service_name: str, tmp_path: Path) -> None:
    proc, watch = await start(broker, service_name, tmp_path)
    tester = broker.bus()
    await tester.connect()
    try:
        cmd = str(registry.SERVICE_CMD.topic(service=service_name, command="ping"))
        await tester.publish(cmd, b"{not json", qos=1, wait=True)
        await tester.publish(cmd, b"\xff\xfe binary", qos=1, wait=True)
        dlq = str(registry.DLQ.topic(service=service_name))
        letters = await watch.wait(lambda ms: [m for m in ms if m.topic == dlq][:2] if
                                   len([m for m in ms if m.topic == dlq]) >= 2 else None,
                                   10, "two dead letters")
        first, second = (DeadLetter.model_validate_json(m.payload) for m in letters)
        assert first.topic == cmd and first.payload == "{not json" and first.encoding == "utf-8"
        assert "JSON" in first.reason
        assert second.encoding == "base64" and "UTF-8" in second.reason
        reply = await tester.request(service_name, "ping", timeout=10)
        assert reply.ok and reply.result["service"] == service_name
        assert proc.process.poll() is None
    finally:
        await tester.close()
        proc.stop()
        await watch.close()


def _notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    return sock, path


def _read_notifications(sock: socket.socket, seconds: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            lines += sock.recv(4096).decode().splitlines()
        except TimeoutError:
            pass
    return lines


async def test_ready_and_watchdog_on_notify_socket(
        broker: TestBroker, service_name: str, tmp_path: Path) -> None:
    sock, path = _notify_socket(tmp_path)
    watch = await Collector.start(broker, status_topic(service_name))
    proc = ServiceProcess(service_name, broker.env(NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000"),
                          tmp_path)
    try:
        lines = await asyncio.to_thread(_read_notifications, sock, 6.0)
        assert "READY=1" in lines, proc.log
        ready_at = lines.index("READY=1")
        # READY only after the broker connection and subscriptions: online follows at once.
        assert any(m.payload == b"online" for m in watch.messages)
        assert lines[ready_at + 1:].count("WATCHDOG=1") >= 4, lines
        proc.signal(signal.SIGTERM)
        lines = await asyncio.to_thread(_read_notifications, sock, 1.0)
        assert "STOPPING=1" in lines
    finally:
        proc.stop()
        sock.close()
        await watch.close()


async def test_reconnects_after_broker_restart_without_losing_qos1(
        own_broker: TestBroker, service_name: str, tmp_path: Path) -> None:
    """Commands queued for the service while it is frozen survive a broker restart and are
    all answered after it reconnects."""
    proc, watch = await start(own_broker, service_name, tmp_path)
    replies = await Collector.start(own_broker, "circles/reply/tester-persist/#",
                                    name="tester-persist", client_id="tester-persist",
                                    persistent=True)
    sender = own_broker.bus(name="tester-persist")
    await sender.connect()
    try:
        proc.signal(signal.SIGSTOP)
        cmd = str(registry.SERVICE_CMD.topic(service=service_name, command="ping"))
        wanted = {f"ping-{i}".encode() for i in range(20)}
        for corr in sorted(wanted):
            await sender.publish(cmd, b"{}", qos=1, wait=True, correlation=corr,
                                 response_topic=f"circles/reply/tester-persist/{corr.decode()}")
        await sender.close()
        await replies.close()
        own_broker.restart()
        proc.signal(signal.SIGCONT)
        replies = await Collector.start(own_broker, "circles/reply/tester-persist/#",
                                        name="tester-persist", client_id="tester-persist",
                                        persistent=True)
        got = await replies.wait(
            lambda ms: wanted <= {m.correlation for m in ms} or None, 30, "all 20 replies")
        assert got
        assert all(json.loads(m.payload)["ok"] for m in replies.messages)
        assert proc.process.poll() is None
    finally:
        proc.signal(signal.SIGCONT)
        proc.stop()
        await replies.close()
        await watch.close()


def test_sigterm_while_the_broker_is_unreachable_exits_0(
        broker: TestBroker, service_name: str, tmp_path: Path) -> None:
    from appliance.supervisor import free_port

    proc = ServiceProcess(service_name, broker.env(CIRCLES_BUS__PORT=str(free_port(40000))),
                          tmp_path)
    time.sleep(1.5)
    began = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 0, proc.log
    assert time.monotonic() - began < 5


@pytest.mark.parametrize("key,value", [("CIRCLES_BUS__PORT", "not-a-port"),
                                       ("CIRCLES_LOG__LEVEL", "LOUD")])
def test_bad_config_exits_78_naming_the_key(
        broker: TestBroker, service_name: str, tmp_path: Path, key: str, value: str) -> None:
    proc = ServiceProcess(service_name, broker.env(**{key: value}), tmp_path)
    assert proc.wait(15) == 78
    lines = proc.log.strip().splitlines()
    assert len(lines) == 1
    dotted = key.removeprefix("CIRCLES_").lower().replace("__", ".")
    assert dotted in lines[0], lines
