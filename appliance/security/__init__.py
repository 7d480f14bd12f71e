"""The security core: users, TOTP, roles, encryption, secrets, the audit log, devices."""
