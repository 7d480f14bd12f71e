"""Files from the phone: list a folder, upload (with a progress bar, or a plain form),
download, delete, and share a file by a link that expires.

Anyone logged in lists and downloads; uploading, deleting and sharing need `files.write`
(operators and admins), and each is written to the audit log (the name, the size, the
expiry; never the bytes, never a link's token). A share link is the store's presigned URL
(plain MinIO or S3), else `/files/shared/<token>`, signed by the box for that version of
the file: that route needs no login (it is the point of a link), answers 410 once it has
expired, 404 for a link it did not make or whose file is gone or replaced, and a bare 503
when the store fails (the why goes to the log, never to a stranger).

The two upload routes are on a router of their own (`uploads`): the app takes bodies up to
`panel.max_upload_mb` there, and far smaller ones everywhere else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Form, HTTPException, Query, Request, Response, status
from pydantic import BaseModel, Field
from starlette.datastructures import FormData, UploadFile

from appliance.panel.auth import login_of
from appliance.panel.deps import FilesWriter, Panel, PanelDep, Viewer
from appliance.panel.files import (
    EXPIRIES,
    EXPIRY_WORDS,
    MAX_LISTED,
    PREFIX,
    Download,
    FileSpace,
    Share,
    content_type,
    crumbs,
    file_row,
    folder_of,
    join,
    key_of,
    listing,
    open_file,
    parent,
    read_link,
    share,
)
from appliance.panel.pages import redirect, render
from appliance.security import audit as events
from appliance.security.permissions import Permission, Principal
from appliance.storage import links
from appliance.storage.base import NotFound, ObjectInfo, StorageError, StorageUnavailable, Store
from appliance.values import size_text

api = APIRouter(prefix="/api/v1/files", tags=["files"])
pages = APIRouter(prefix="/files", include_in_schema=False)
uploads = APIRouter()
log = logging.getLogger("circles.panel")
TRUE = ("true", "on", "1", "yes")
CANNOT_SERVE = "this file cannot be served right now"
T = TypeVar("T")
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"},
        "folder": {"type": "string", "description": "where it goes (default: the top)"},
        "name": {"type": "string", "description": "its name (default: the file's own); may "
                                                  "hold folders: 2024/cat.jpg"},
        "overwrite": {"type": "boolean", "description": "replace a file of that name"}}}}}}}


class ShareBody(BaseModel):
    expires: Literal["1h", "1d", "7d"] = Field("1d", description="how long the link works")


def _space(panel: Panel) -> tuple[FileSpace, Store]:
    if panel.files is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "files are not served by this panel")
    if panel.files.store is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            f"files are not available: {panel.files.problem}")
    return panel.files, panel.files.store


def _refused(exc: StorageError) -> HTTPException:
    code = (status.HTTP_404_NOT_FOUND if isinstance(exc, NotFound)
            else status.HTTP_503_SERVICE_UNAVAILABLE if isinstance(exc, StorageUnavailable)
            else status.HTTP_502_BAD_GATEWAY)
    return HTTPException(code, str(exc))


def _key(path: str) -> str:
    try:
        return key_of(path)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None


async def _in_store(key: str, call: Callable[..., T], *args: Any) -> T:
    """`call(*args)` in a thread; a storage error about `key` as the answer it means."""
    try:
        return await asyncio.to_thread(call, *args)
    except NotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"no file {key.removeprefix(PREFIX)!r}") from None
    except StorageError as exc:
        raise _refused(exc) from None


def _field(form: FormData, name: str) -> str:
    value = form.get(name) or ""
    if not isinstance(value, str):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"{name}: text, not a file")
    return value


def _too_large(space: FileSpace) -> HTTPException:
    return HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
                         f"the file is larger than this box takes ({size_text(space.max_upload)}, "
                         "panel.max_upload_mb)")


def _put(store: Store, key: str, upload: UploadFile, kind: str, overwrite: bool) -> tuple[ObjectInfo, bool]:
    """Store the spooled upload (blocking); whether a file of that name was replaced."""
    existed = store.exists(key)
    if existed and not overwrite:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"{key.removeprefix(PREFIX)!r} already exists: choose another name, "
                            "or replace it (overwrite)")
    upload.file.seek(0)
    length = upload.size if upload.size is not None else -1
    return store.put(key, upload.file, length=length, content_type=kind), existed


async def upload(request: Request, panel: Panel, by: Principal) -> dict[str, Any]:
    """Take the multipart upload of `request` (the fields of UPLOAD_BODY) into the store.
    The app's body limit on `uploads` (FileSpace.max_body) has refused a larger body before
    it was read; the file is spooled by Starlette (to a temporary file past 1 MiB) and
    streamed from there, never whole in memory."""
    space, store = _space(panel)
    form = await request.form(max_files=1, max_fields=8)
    try:
        sent = form.get("file")
        if not isinstance(sent, UploadFile) or not sent.filename:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                "choose a file to upload (the form field 'file')")
        name = _field(form, "name") or sent.filename
        path = join(_field(form, "folder"), name)
        key = _key(path)
        if (sent.size or 0) > space.max_upload:
            raise _too_large(space)
        overwrite = _field(form, "overwrite").lower() in TRUE
        try:
            info, replaced = await asyncio.to_thread(
                _put, store, key, sent, content_type(name, sent.content_type), overwrite)
        except StorageError as exc:
            raise _refused(exc) from None
        except ValueError as exc:  # the name is a folder's, or a folder would be a file's
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    finally:
        await form.close()
    await asyncio.to_thread(panel.audit.record, events.FILE_UPLOAD, actor=by.actor, target=path,
                            size=info.size, replaced=replaced)
    return file_row(info) | {"replaced": replaced}


async def download(store: Store, key: str) -> Download:
    """The file as an attachment, opened before the answer begins: a file that is missing or
    cannot be read now is a 404 or 503, never a 200 cut short."""
    return Download(await _in_store(key, open_file, store, key))


async def remove(panel: Panel, by: Principal, path: str) -> None:
    _, store = _space(panel)
    key = _key(path)
    await _in_store(key, store.stat, key)
    await _in_store(key, store.delete, key)
    await asyncio.to_thread(panel.audit.record, events.FILE_DELETE, actor=by.actor, target=path)


async def make_share(request: Request, panel: Panel, by: Principal, path: str,
                     expires: str) -> Share:
    """A download link of the file at `path` lasting `expires` (a key of EXPIRIES)."""
    space, store = _space(panel)
    if expires not in EXPIRIES:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"a link lasts {', '.join(EXPIRIES)}, not {expires!r}")
    key = _key(path)
    info = await _in_store(key, store.stat, key)
    try:
        made = await asyncio.to_thread(share, space, store, info, EXPIRIES[expires],
                                       str(request.base_url), datetime.now(UTC))
    except StorageError as exc:
        raise _refused(exc) from None
    await asyncio.to_thread(panel.audit.record, events.FILE_SHARE, actor=by.actor, target=path,
                            expires_at=made.expires_at.isoformat(), kind=made.kind)
    return made


def _share_answer(path: str, made: Share) -> dict[str, Any]:
    return {"path": path, "url": made.url, "expires_at": made.expires_at.isoformat(),
            "kind": made.kind}


# -- API ---------------------------------------------------------------------------------------
@api.get("")
async def files_api(_: Viewer, panel: PanelDep, folder: str = "",
                    recursive: bool = False) -> dict[str, Any]:
    """One folder (`folder`, default the top): its sub-folders, with how many files each
    holds, and its files (`path`, `size`, `modified`, `content_type`); with `recursive`,
    every file below it. At most 1000 of each: `truncated` says when there were more."""
    store = _space(panel)[1]
    try:
        return await asyncio.to_thread(listing, store, folder_of(folder), recursive=recursive)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    except StorageError as exc:
        raise _refused(exc) from None


@uploads.post("/api/v1/files", tags=["files"], status_code=201, openapi_extra=UPLOAD_BODY)
async def upload_api(request: Request, by: FilesWriter, panel: PanelDep) -> dict[str, Any]:
    """Upload one file (multipart: `file`, and `folder`, `name`, `overwrite`). 409 when the
    name is taken and `overwrite` is not true, 413 past `panel.max_upload_mb` (a body
    declared larger: before any of it is read), 422 for a bad name. Audit-logged."""
    return await upload(request, panel, by)


@api.get("/{path:path}")
async def download_api(path: str, _: Viewer, panel: PanelDep) -> Download:
    """The file's bytes, as an attachment with its name and type."""
    return await download(_space(panel)[1], _key(path))


@api.delete("/{path:path}")
async def delete_api(path: str, by: FilesWriter, panel: PanelDep) -> dict[str, str]:
    """Delete a file; its share links stop working. Audit-logged."""
    await remove(panel, by, path)
    return {"deleted": path}


@api.post("/{path:path}/share")
async def share_api(path: str, body: ShareBody, request: Request, by: FilesWriter,
                    panel: PanelDep) -> dict[str, Any]:
    """A link anyone may download the file from until `expires_at` (`kind`: "presigned",
    the store's own URL, or "signed", a link to this panel). Audit-logged with its expiry."""
    return _share_answer(path, await make_share(request, panel, by, path, body.expires))


# -- pages -------------------------------------------------------------------------------------
async def _page(request: Request, user: Principal, panel: Panel, folder: str,
                status_code: int = 200, **context: Any) -> Response:
    error = context.pop("error", None)
    listed: dict[str, Any] = {"folder": "", "folders": [], "files": [], "truncated": False}
    try:
        _, store = _space(panel)
        folder = folder_of(folder)
        listed = await asyncio.to_thread(listing, store, folder)
    except HTTPException as exc:
        error = error or exc.detail
    except (ValueError, StorageError) as exc:
        error = error or str(exc)
    listed["files"] = [f | {"size_text": size_text(f["size"])} for f in listed["files"]]
    space = panel.files
    return render(request, "files.html", status_code, listed=listed, folder=listed["folder"],
                  crumbs=crumbs(listed["folder"]), write=user.can(Permission.FILES_WRITE),
                  available=space is not None and space.store is not None,
                  max_upload=space.max_upload if space else 0,
                  max_upload_text=size_text(space.max_upload) if space else "",
                  expiries=EXPIRY_WORDS, max_listed=MAX_LISTED, error=error, **context)


def _folder_url(path: str) -> str:
    return f"/files?folder={quote(parent(path))}"


@pages.get("")
async def files_page(request: Request, user: Viewer, panel: PanelDep,
                     folder: str = Query("", max_length=1024),
                     shared: str = Query("", max_length=64)) -> Response:
    """A folder; with `shared`, also the share link just made there (see `share_page`)."""
    login = login_of(request)
    made = panel.files.shown.get(login.session_id if login else None, shared) \
        if shared and panel.files else None
    return await _page(request, user, panel, folder, shared=made)


@uploads.post("/files", include_in_schema=False)
async def upload_page(request: Request, by: FilesWriter, panel: PanelDep,
                      folder: str = Query("", max_length=1024)) -> Response:
    """The upload form without script; `folder` (the page it came from) is where to go back."""
    try:
        made = await upload(request, panel, by)
    except HTTPException as exc:
        return await _page(request, by, panel, folder, exc.status_code,
                           error=f"Not uploaded: {exc.detail}")
    return redirect(_folder_url(made["path"]),
                    f"Uploaded {made['path']} ({size_text(made['size'])}).")


@pages.get("/remove")
async def remove_confirm_page(request: Request, _: FilesWriter,
                              path: str = Query(max_length=1024)) -> Response:
    return render(request, "file_remove.html", path=path, filename=path.rsplit("/", 1)[-1],
                  back=_folder_url(path))


@pages.post("/remove")
async def remove_page(by: FilesWriter, panel: PanelDep,
                      path: Annotated[str, Form(max_length=1024)]) -> Response:
    try:
        await remove(panel, by, path)
    except HTTPException as exc:
        return redirect(_folder_url(path), f"Not deleted: {exc.detail}")
    return redirect(_folder_url(path), f"Deleted {path}.")


@pages.post("/share")
async def share_page(request: Request, by: FilesWriter, panel: PanelDep,
                     path: Annotated[str, Form(max_length=1024)],
                     expires: Annotated[str, Form(max_length=8)]) -> Response:
    """Make the link, then go to the folder's page showing it: a reload there shows the same
    link again, it makes no other."""
    try:
        made = await make_share(request, panel, by, path, expires)
    except HTTPException as exc:
        return await _page(request, by, panel, parent(path), exc.status_code,
                           error=f"Not shared: {exc.detail}")
    login = login_of(request)
    ref = _space(panel)[0].shown.add(login.session_id if login else None, _share_answer(
        path, made) | {"name": path.rsplit("/", 1)[-1], "lasts": EXPIRY_WORDS[expires]})
    return redirect(f"{_folder_url(path)}&shared={ref}")


@pages.get("/shared/{token}")
async def shared(token: str, panel: PanelDep) -> Response:
    """A shared file, for anyone holding a link that has not expired (no login). A stranger
    learns 404, 410 or a bare 503, nothing of the store or the box."""
    space = panel.files
    if space is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, CANNOT_SERVE)
    try:
        key, of = read_link(token, space.link_secret, datetime.now(UTC))
    except links.LinkExpired:
        raise HTTPException(status.HTTP_410_GONE, "this link has expired") from None
    except ValueError:  # links.LinkInvalid
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such file") from None
    try:
        if space.store is None:
            raise StorageUnavailable(f"the store is not open: {space.problem}")
        return Download(await asyncio.to_thread(open_file, space.store, key, of=of))
    except NotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such file") from None
    except StorageError as exc:
        log.error(f"files: a shared link of {key} cannot be served: {exc}", extra={"key": key})
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, CANNOT_SERVE) from None
