"""The box's root certificate, for anyone: a phone must trust it before it can trust the
panel's HTTPS and the broker's TLS listener, which certificates of the box's own small CA
secure. It is public information, so `/ca.crt` needs no login; the login page shows its
SHA-256 fingerprint, to compare with what the phone shows before trusting it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from fastapi import APIRouter, HTTPException, Response, status

from appliance.errors import ConfigError
from appliance.panel.deps import PanelDep

router = APIRouter(tags=["trust"], include_in_schema=False)


@dataclass(frozen=True)
class CaCert:
    pem: bytes
    fingerprint: str  # SHA-256 as phones show it: AB:12:…

    @classmethod
    def load(cls, path: Path) -> CaCert:
        """The certificate in `path`, checked: a PEM certificate of a CA (ConfigError naming
        `panel.ca_cert` otherwise)."""
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"config: panel.ca_cert: cannot read {path}: {exc.strerror}"
                              ) from None
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise ConfigError(f"config: panel.ca_cert: {path} is not a PEM certificate") from None
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise ConfigError(f"config: panel.ca_cert: {path} is not a CA's certificate "
                              "(its BasicConstraints must say ca=True)")
        return cls(pem, cert.fingerprint(hashes.SHA256()).hex(":").upper())


@router.get("/ca.crt")
async def ca_cert(panel: PanelDep) -> Response:
    if panel.ca is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            "This box offers no certificate (panel.ca_cert is not set).")
    return Response(panel.ca.pem, media_type="application/x-x509-ca-cert",
                    headers={"content-disposition": 'attachment; filename="circles-ca.crt"'})
