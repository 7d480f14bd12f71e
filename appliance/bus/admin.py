"""The broker-admin client: clients and roles of Mosquitto's dynamic-security plugin,
changed at run time over `$CONTROL/dynamic-security/v1`.

A change takes effect at once: a new client may connect, a deleted one is disconnected.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from appliance.bus.broker import ADMIN_SECRET, ADMIN_USER
from appliance.bus.mqtt import BrokerAddress, MqttBus
from appliance.bus.roles import KINDS, role, role_name
from appliance.bus.topics import Filter
from appliance.errors import AuthError, ConfigError, OperationalError
from appliance.security.secrets import ensure_secret, read_secret

CONTROL = "$CONTROL/dynamic-security/v1"
# The client of the `circles` command line (simulate, import, test trades, metrics): a
# service-kind client, so it may send what services send and ask what services ask.
CLI_CLIENT = "cli"
RESPONSE = Filter(CONTROL + "/response")


def client_secret(username: str) -> str:
    return f"mqtt-{username}"


class BrokerAdmin:
    def __init__(self, bus: MqttBus) -> None:
        self.bus = bus

    @classmethod
    async def connect(cls, host: str, port: int, state_dir: Path, **address: Any) -> BrokerAdmin:
        password = read_secret(ADMIN_SECRET, state_dir)
        if password is None:
            raise ConfigError(f"broker: secret {ADMIN_SECRET} missing; run `circles broker init`")
        bus = MqttBus(ADMIN_USER, BrokerAddress(host, port, ADMIN_USER, password, **address),
                      client_id=f"{ADMIN_USER}-{uuid.uuid4().hex[:8]}", status=False,
                      persistent=False)
        await bus.connect(timeout=10)
        try:
            await bus.subscribe([(RESPONSE, 1)])
        except BaseException:
            await bus.close()
            raise
        return cls(bus)

    async def close(self) -> None:
        await self.bus.close()

    async def execute(self, *commands: dict[str, Any], allow: Iterable[str] = ()) -> list[dict[str, Any]]:
        """Run commands; OperationalError on an error not listed in `allow`."""
        tag = uuid.uuid4().hex
        tagged = [{**c, "correlationData": f"{tag}-{i}"} for i, c in enumerate(commands)]
        await self.bus.publish(CONTROL, json.dumps({"commands": tagged}).encode(), qos=1)
        answers: dict[str, dict[str, Any]] = {}
        deadline = asyncio.get_running_loop().time() + 10
        while len(answers) < len(tagged):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise OperationalError("the broker did not answer a dynamic-security command")
            for message in await self.bus.receive(16, timeout=left):
                self.bus.ack(message)
                for response in json.loads(message.payload).get("responses", []):
                    corr = response.get("correlationData", "")
                    if corr.startswith(tag):
                        answers[corr] = response
        results = [answers[c["correlationData"]] for c in tagged]
        for command, result in zip(commands, results, strict=True):
            error = result.get("error")
            if error and error not in allow:
                raise OperationalError(f"dynamic-security {command['command']}: {error}")
        return results

    # -- roles ------------------------------------------------------------------------------
    async def list_roles(self) -> list[str]:
        (result,) = await self.execute({"command": "listRoles", "count": -1})
        return list(result["data"]["roles"])

    async def ensure_role(self, wanted: dict[str, Any]) -> bool:
        """Create the role or bring its ACLs to `wanted`; True if anything changed."""
        name = wanted["rolename"]
        (found,) = await self.execute({"command": "getRole", "rolename": name},
                                      allow=["Role not found"])
        if found.get("error"):
            await self.execute({"command": "createRole", **wanted})
            return True
        key = lambda a: (a["acltype"], a["topic"], bool(a["allow"]))  # noqa: E731
        have = {key(a) for a in found["data"]["role"].get("acls", [])}
        want = {key(a) for a in wanted["acls"]}
        changes = [{"command": "removeRoleACL", "rolename": name, "acltype": t, "topic": topic}
                   for t, topic, _ in have - want]
        changes += [{"command": "addRoleACL", "rolename": name, "acltype": t, "topic": topic,
                     "allow": allow, "priority": 0} for t, topic, allow in want - have]
        if changes:
            await self.execute(*changes)
        return bool(changes)

    async def delete_role(self, name: str) -> None:
        await self.execute({"command": "deleteRole", "rolename": name}, allow=["Role not found"])

    # -- clients ----------------------------------------------------------------------------
    async def list_clients(self) -> list[str]:
        (result,) = await self.execute({"command": "listClients", "count": -1})
        return list(result["data"]["clients"])

    async def get_client(self, username: str) -> dict[str, Any] | None:
        (result,) = await self.execute({"command": "getClient", "username": username},
                                       allow=["Client not found"])
        return None if result.get("error") else dict(result["data"]["client"])

    async def ensure_client(self, kind: str, name: str, password: str) -> bool:
        """A client of `kind` with its role; True when it was created. An existing client keeps
        its password unless the broker refuses `password`, which is then set."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; one of {sorted(KINDS)}")
        rolename = role_name(kind, name)
        await self.ensure_role(role(kind, name))
        found = await self.get_client(name)
        if found is None:
            await self.execute({"command": "createClient", "username": name, "password": password,
                                "textname": f"{kind} {name}",
                                "roles": [{"rolename": rolename, "priority": 0}]})
            return True
        # Setting a password disconnects the client, so only when the stored one fails.
        changes: list[dict[str, Any]] = []
        if not await self.password_works(name, password):
            changes.append({"command": "setClientPassword", "username": name, "password": password})
        if rolename not in {r["rolename"] for r in found.get("roles", [])}:
            changes.append({"command": "addClientRole", "username": name, "rolename": rolename,
                            "priority": 0})
        if changes:
            await self.execute(*changes)
        return False

    async def password_works(self, username: str, password: str) -> bool:
        """Whether the broker accepts these credentials (a throwaway connection)."""
        probe = MqttBus(username, replace(self.bus.address, username=username, password=password),
                        client_id=f"{username}-check-{uuid.uuid4().hex[:8]}", status=False,
                        persistent=False)
        try:
            await probe.connect(timeout=5)
            return True
        except AuthError:
            return False
        finally:
            await probe.close()

    async def delete_client(self, name: str, kind: str | None = None) -> None:
        """Delete a client (it is disconnected at once) and its own role."""
        await self.execute({"command": "deleteClient", "username": name},
                           allow=["Client not found"])
        if kind and KINDS[kind].identity:
            await self.delete_role(role_name(kind, name))

    async def sync(self, services: Iterable[str], state_dir: Path) -> list[str]:
        """Shared roles up to date, and one client per service (and the command line's)
        whose password is the secret `mqtt-<name>` (created if missing). Returns the clients
        created."""
        for kind, k in KINDS.items():
            if not k.identity:
                await self.ensure_role(role(kind))
        created = []
        for service in [*services, CLI_CLIENT]:
            password = ensure_secret(client_secret(service), state_dir)
            if await self.ensure_client("service", service, password):
                created.append(service)
        return created

