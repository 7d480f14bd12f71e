"""Verify an exported ledger bundle with nothing but the standard library and `cryptography`.

    python -m appliance.ledger_verify BUNDLE.jsonl [--public-key KEY.pub]

docs/ledger.md is the format; this file is its reference implementation, and
`appliance.ledger` uses these same functions, so the writer and the verifier cannot drift.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

GENESIS = "0" * 64
TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # how the ledger writes times: UTC, microseconds
FORMAT = "circles-ledger"
VERSION = 1


def _plain(value: Any) -> Any:
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is dict:  # the common case, with its scalars inline (this runs per record)
        out = {}
        for key, item in value.items():
            t = type(item)
            out[key if type(key) is str else str(key)] = (
                item if t is str or t is int or t is bool or item is None else _plain(item))
        return out
    if isinstance(value, (str, int)):  # subclasses (an IntEnum, a str Enum)
        return value
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{value} cannot be stored in the ledger")
        return format(value, "f")  # exact, never an exponent
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("timestamps must carry a time zone")
        # TS_FORMAT, written by the faster isoformat
        return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        raise TypeError("floats are not allowed in the ledger; use Decimal or a string")
    raise TypeError(f"{type(value).__name__} cannot be stored in the ledger")


def _string(value: str) -> bytes:
    """canonical() of a string, without the general machinery."""
    return encode_basestring(value).encode()


def canonical(value: Any) -> bytes:
    """Keys sorted by code point, no whitespace, UTF-8, decimals as plain strings."""
    return json.dumps(_plain(value), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode()


def record_hash(prev_hash: str, chain: str, seq: int, ts: str, data: Any) -> str:
    """sha256 over the previous hash (64 hex characters, ASCII) followed by the canonical JSON
    of {"chain", "data", "seq", "ts"}; hex."""
    return chained_hash(prev_hash, chain, seq, ts, canonical(data))


def chained_hash(prev_hash: str, chain: str, seq: int, ts: str, data_json: bytes) -> str:
    """`record_hash` for data already in canonical JSON: the object's keys in sorted order
    are chain, data, seq, ts, so it is written around `data_json` without parsing it again."""
    body = b"".join((b'{"chain":', _string(chain), b',"data":', data_json, b',"seq":',
                     str(seq).encode(), b',"ts":', _string(ts), b"}"))
    return hashlib.sha256(prev_hash.encode() + body).hexdigest()


def checkpoint_message(chain: str, seq: int, hash_: str, ts: str) -> bytes:
    return canonical({"chain": chain, "seq": seq, "hash": hash_, "ts": ts})


@dataclass
class Verdict:
    ok: bool = True
    records: int = 0
    checkpoints: int = 0
    signed_through: int = 0
    first_bad_seq: int | None = None
    reason: str = ""
    first_seq: int = 1  # > 1 when older records were archived
    anchor_hash: str = GENESIS  # the prev_hash of the first record
    head_hash: str = GENESIS  # of the last record checked
    notes: list[str] = field(default_factory=list)

    def fail(self, seq: int | None, reason: str) -> Verdict:
        self.ok, self.first_bad_seq, self.reason = False, seq, reason
        return self


def verify_records(chain: str, records: Iterable[dict[str, Any]],
                   checkpoints: Iterable[dict[str, Any]], public_key: bytes | None,
                   *, first_seq: int | None = None) -> Verdict:
    """Walk the chain: continuity, links, hashes, then every checkpoint's signature and that
    it names the hash actually at its seq.

    The records start at seq 1 or, once older ones were archived, at a later seq whose
    `prev_hash` must be vouched for by a signed checkpoint at the seq before it (the anchor).
    `first_seq` is where the records must start when the caller knows it (the database
    knows what it archived); otherwise the first record says."""
    verdict = Verdict()
    items = iter(records)
    first = next(items, None)
    if first_seq is None:
        seq = first.get("seq") if first else None
        first_seq = seq if isinstance(seq, int) and seq > 1 else 1
    verdict.first_seq = expected = first_seq
    prev = GENESIS
    hashes: dict[int, str] = {}
    anchored = first_seq == 1 or first is None
    if not anchored and first is not None:
        prev = hashes[first_seq - 1] = verdict.anchor_hash = str(first.get("prev_hash"))
    for rec in itertools.chain([first] if first else [], items):
        seq = rec.get("seq")
        if seq != expected:
            return verdict.fail(expected, f"expected seq {expected}, found {seq}")
        if rec.get("prev_hash") != prev:
            return verdict.fail(seq, "prev_hash does not match the previous record")
        try:
            computed = record_hash(prev, chain, seq, rec["ts"], rec["data"])
        except (KeyError, TypeError, ValueError) as exc:
            return verdict.fail(seq, f"record cannot be hashed: {exc}")
        if computed != rec.get("hash"):
            return verdict.fail(seq, "hash does not match the record's content")
        hashes[seq] = prev = computed
        expected += 1
        verdict.records += 1
    key = Ed25519PublicKey.from_public_bytes(public_key) if public_key else None
    if key is None:
        verdict.notes.append("no public key: signatures not checked")
    for cp in checkpoints:
        seq = cp.get("seq")
        if isinstance(seq, int) and seq < first_seq - 1:
            continue  # it signs an archived record
        if not isinstance(seq, int) or hashes.get(seq) != cp.get("hash"):
            return verdict.fail(seq, "checkpoint names a hash the chain does not have")
        anchored = anchored or seq == first_seq - 1
        if key is None:
            continue
        try:
            key.verify(base64.b64decode(cp["signature"]),
                       checkpoint_message(chain, seq, cp["hash"], cp["ts"]))
        except (InvalidSignature, KeyError, ValueError):
            return verdict.fail(seq, "checkpoint signature is not valid")
        verdict.checkpoints += 1
        verdict.signed_through = max(verdict.signed_through, seq)
    verdict.head_hash = prev
    if not anchored:
        return verdict.fail(first_seq, f"the records start at seq {first_seq} but no signed "
                                       f"checkpoint vouches for seq {first_seq - 1}")
    if first_seq > 1:
        verdict.notes.append(f"records before seq {first_seq} are not here (archived): they are "
                             "checked in their own bundle")
    if verdict.records and verdict.signed_through < expected - 1:
        verdict.notes.append(f"records after seq {verdict.signed_through} are not yet signed")
    return verdict


def verify_bundle(lines: Iterable[str], public_key: bytes | None = None) -> Verdict:
    """Verify a bundle. Without `public_key` the header's key is used: that proves the bundle is
    intact, not who made it; pass the key published by the ledger's owner for that."""
    header: dict[str, Any] | None = None
    records: list[dict[str, Any]] = []
    checkpoints: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line, parse_float=Decimal)
        except ValueError:
            return Verdict().fail(None, f"line {number} is not JSON")
        kind = item.pop("type", None)
        if kind == "header":
            header = item
        elif kind == "record":
            records.append(item)
        elif kind == "checkpoint":
            checkpoints.append(item)
        else:
            return Verdict().fail(None, f"line {number}: unknown type {kind!r}")
    if not header or header.get("format") != FORMAT or header.get("version") != VERSION:
        return Verdict().fail(None, f"not a {FORMAT} v{VERSION} bundle")
    if public_key is None and header.get("public_key"):
        public_key = base64.b64decode(header["public_key"])
    if not checkpoints and records:
        return Verdict().fail(None, "the bundle has no signed checkpoint")
    return verify_records(header["chain"], records, checkpoints, public_key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Verify a Circles ledger bundle.")
    parser.add_argument("bundle")
    parser.add_argument("--public-key", help="file with the owner's Ed25519 public key (base64)")
    args = parser.parse_args(argv)
    key = None
    if args.public_key:
        with open(args.public_key) as handle:
            key = base64.b64decode(handle.read().strip())
    with open(args.bundle, encoding="utf-8") as handle:
        verdict = verify_bundle(handle, key)
    if verdict.ok:
        last = verdict.first_seq + verdict.records - 1
        print(f"ok: {verdict.records} records (seq {verdict.first_seq}..{last}), "
              f"{verdict.checkpoints} signed checkpoints, signed through seq {verdict.signed_through}")
        for note in verdict.notes:
            print(f"note: {note}")
        return 0
    where = f" at seq {verdict.first_bad_seq}" if verdict.first_bad_seq is not None else ""
    print(f"FAILED{where}: {verdict.reason}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
