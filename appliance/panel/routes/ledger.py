"""The ledger: its chains, verify now (with the first bad `seq`), an export bundle to
download, and the API keys of the HTTP ingest (admins)."""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask

from appliance.panel import api_keys
from appliance.panel.deps import KeysManager, Panel, PanelDep, Viewer
from appliance.panel.pages import redirect, render
from appliance.security import audit as events
from appliance.security.permissions import Permission, Principal

api = APIRouter(prefix="/api/v1/ledger", tags=["ledger"])
pages = APIRouter(prefix="/ledger", include_in_schema=False)


class KeyBody(BaseModel):
    account: str = Field(min_length=1, max_length=64)
    label: str = Field("", max_length=200)


def chains(panel: Panel) -> list[dict[str, Any]]:
    ledger = panel.ledger
    out = []
    for chain in ledger.chains():
        seq, head = ledger.head(chain)
        out.append({"chain": chain, "records": ledger.count(chain), "head_seq": seq,
                    "head_hash": head})
    return out


def verify(panel: Panel, chain: str | None) -> list[dict[str, Any]]:
    names = [chain] if chain else panel.ledger.chains()
    results = []
    for name in names:
        verdict = panel.ledger.verify(name)
        results.append({"chain": name, "ok": verdict.ok, "records": verdict.records,
                        "signed_through": verdict.signed_through,
                        "first_bad_seq": verdict.first_bad_seq, "reason": verdict.reason})
    return results


async def export(panel: Panel, by: Principal, chain: str) -> FileResponse:
    if chain not in await asyncio.to_thread(panel.ledger.chains):
        raise HTTPException(404, f"no chain {chain!r}")
    handle, path = tempfile.mkstemp(prefix="circles-export-", suffix=".jsonl")

    def write() -> int:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            count = panel.ledger.export(chain, out)
        panel.audit.record(events.LEDGER_EXPORT, actor=by.actor, target=chain, records=count)
        return count

    try:
        await asyncio.to_thread(write)
    except BaseException:
        os.unlink(path)
        raise
    filename = chain.replace(":", "-") + ".jsonl"
    return FileResponse(path, media_type="application/x-ndjson", filename=filename,
                        background=BackgroundTask(os.unlink, path))


@api.get("")
async def ledger_chains(_: Viewer, panel: PanelDep) -> list[dict[str, Any]]:
    """Each chain (one per trading account, and `audit`): records and head."""
    return await asyncio.to_thread(chains, panel)


@api.get("/verify")
async def ledger_verify(_: Viewer, panel: PanelDep,
                        chain: str | None = None) -> list[dict[str, Any]]:
    """Check the hash chain and the signed checkpoints now; a broken chain names its first
    bad `seq`."""
    return await asyncio.to_thread(verify, panel, chain)


@api.get("/export")
async def ledger_export(by: Viewer, panel: PanelDep,
                        chain: Annotated[str, Query()]) -> FileResponse:
    """The chain's export bundle (docs/ledger.md), checkable with `circles-verify` and the
    public key alone. Audit-logged."""
    return await export(panel, by, chain)


@api.get("/keys")
async def keys(_: KeysManager, panel: PanelDep) -> list[dict[str, Any]]:
    """The ingest API keys (never the keys themselves)."""
    return [asdict(k) for k in await asyncio.to_thread(api_keys.listing, panel.engine)]


@api.post("/keys", status_code=201)
async def key_create(body: KeyBody, by: KeysManager, panel: PanelDep) -> dict[str, Any]:
    """A new ingest key for an account; `key` is shown in this answer and never again."""
    try:
        made, key = await asyncio.to_thread(api_keys.issue, panel.audit, body.account,
                                            body.label, actor=by.actor)
    except ValueError as exc:
        raise HTTPException(422, f"account: {exc}") from None
    return asdict(made) | {"key": key}


@api.delete("/keys/{key_id}")
async def key_revoke(key_id: int, by: KeysManager, panel: PanelDep) -> dict[str, Any]:
    if not await asyncio.to_thread(api_keys.withdraw, panel.audit, key_id, actor=by.actor):
        raise HTTPException(404, f"no active API key {key_id}")
    return {"revoked": key_id}


# -- pages -------------------------------------------------------------------------------------
@pages.get("")
async def ledger_page(request: Request, user: Viewer, panel: PanelDep,
                      check: bool = False) -> Response:
    listed = await asyncio.to_thread(chains, panel)
    verdicts = await asyncio.to_thread(verify, panel, None) if check else None
    keys_list = await asyncio.to_thread(api_keys.listing, panel.engine) \
        if user.can(Permission.KEYS_MANAGE) else None
    return render(request, "ledger.html", chains=listed, verdicts=verdicts, keys=keys_list)


@pages.get("/export")
async def export_page(by: Viewer, panel: PanelDep, chain: str) -> FileResponse:
    return await export(panel, by, chain)


@pages.post("/keys")
async def key_create_page(request: Request, by: KeysManager, panel: PanelDep,
                          account: Annotated[str, Form(max_length=64)],
                          label: Annotated[str, Form(max_length=200)] = "") -> Response:
    try:
        made, key = await asyncio.to_thread(api_keys.issue, panel.audit, account, label,
                                            actor=by.actor)
    except ValueError as exc:
        return redirect("/ledger", f"Not created: account: {exc}")
    listed = await asyncio.to_thread(chains, panel)
    keys_list = await asyncio.to_thread(api_keys.listing, panel.engine)
    return render(request, "ledger.html", chains=listed, verdicts=None, keys=keys_list,
                  new_key=key, new_key_info=made)


@pages.post("/keys/{key_id}/revoke")
async def key_revoke_page(key_id: int, by: KeysManager, panel: PanelDep) -> Response:
    done = await asyncio.to_thread(api_keys.withdraw, panel.audit, key_id, actor=by.actor)
    return redirect("/ledger", f"API key {key_id} revoked." if done
                    else f"No active API key {key_id}.")
