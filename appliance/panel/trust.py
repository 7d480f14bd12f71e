"""The box's root certificate (`panel.ca_cert`), loaded and checked by the `panel` service
and offered by `routes/trust.py`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from appliance.errors import ConfigError


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
