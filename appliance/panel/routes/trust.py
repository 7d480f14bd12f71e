"""The box's root certificate, for anyone: a phone must trust it before it can trust the
panel's HTTPS and the broker's TLS listener, which certificates of the box's own small CA
secure. It is public information, so `/ca.crt` needs no login; the login page shows its
SHA-256 fingerprint, to compare with what the phone shows before trusting it."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response, status

from appliance.panel.deps import PanelDep

router = APIRouter(tags=["trust"], include_in_schema=False)


@router.get("/ca.crt")
async def ca_cert(panel: PanelDep) -> Response:
    if panel.ca is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            "This box offers no certificate (panel.ca_cert is not set).")
    return Response(panel.ca.pem, media_type="application/x-x509-ca-cert",
                    headers={"content-disposition": 'attachment; filename="circles-ca.crt"'})
