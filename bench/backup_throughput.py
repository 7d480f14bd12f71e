"""Backup throughput against raw `put_object` of the same file to the same S3 server, same run.

The file (default 200 MB) is mixed as a box's data is: runs of 256 KiB-4 MiB that are either
random bytes (photos, video, archives: incompressible) or generated text (logs, CSV, JSON:
compresses ~5x), about half and half by size.
Baseline: one child process does `minio.Minio.put_object` of the whole file (parts of
PART_SIZE, as the S3 store sends big objects). Backup: another child does a full
`Repository.backup` of the same file (1 MiB chunks hashed, compressed where it pays,
encrypted, sent 4 at a time) into an empty bucket; it reports its own peak RSS.
The server is moto's standalone S3 in its own process on 127.0.0.1.
Prints `raw_put_mb_per_s`, `backup_mb_per_s`, `backup_stored_mb`, `backup_peak_rss_mb`
(target ≤ 100) and last `backup/raw` (target ≥ 0.6), medians over --rounds.
Usage: python bench/backup_throughput.py [--mb 200] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ACCESS, SECRET, REGION = "bench-access", "bench-secret", "us-east-1"
WORDS = ("temperature humidity relay order filled cancelled BTC/USDT EURUSD sensor kitchen "
         "garage backup ledger checkpoint online offline heartbeat").split()


def make_file(path: Path, mb: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    left = mb << 20
    with open(path, "wb") as out:
        while left > 0:
            run = min(left, rng.randint(256 << 10, 4 << 20))
            if rng.random() < 0.5:
                out.write(os.urandom(run))
            else:
                out.write(_text(rng, run))
            left -= run


def _text(rng: random.Random, size: int) -> bytes:
    lines, total = [], 0
    while total < size:
        line = (f"2024-03-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
                f"{rng.randint(0, 59):02d}Z {rng.choice(WORDS)} {rng.choice(WORDS)} "
                f"value={rng.random() * 100:.3f} seq={rng.randint(0, 10**9)}\n").encode()
        lines.append(line)
        total += len(line)
    return b"".join(lines)[:size]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def role_raw(endpoint: str, path: Path) -> None:
    from minio import Minio

    from appliance.storage.base import PART_SIZE

    client = Minio(endpoint, access_key=ACCESS, secret_key=SECRET, secure=False, region=REGION)
    bucket = f"raw-{uuid.uuid4().hex[:12]}"
    client.make_bucket(bucket)
    started = time.perf_counter()
    client.fput_object(bucket, "file.bin", str(path), part_size=PART_SIZE)
    took = time.perf_counter() - started
    print(json.dumps({"seconds": took, "rss_mb": _peak_rss_mb()}))


def role_backup(endpoint: str, path: Path) -> None:
    from appliance.security.crypto import Keyring
    from appliance.storage.s3 import S3Store
    from modules.backup.manifest import Source
    from modules.backup.repo import Repository

    with tempfile.TemporaryDirectory(prefix="circles-bench-") as state:
        keyring = Keyring.load_or_create(Path(state))
        store = S3Store.connect(endpoint, f"backup-{uuid.uuid4().hex[:12]}", access_key=ACCESS,
                                secret_key=SECRET, secure=False, region=REGION)
        repo = Repository(store, keyring)
        st = path.stat()
        source = Source(f"folders/bench/{path.name}", str(path), "file", path, 0o600, st.st_mtime)
        started = time.perf_counter()
        snap = repo.backup("bench", [source])
        took = time.perf_counter() - started
        store.close()
    print(json.dumps({"seconds": took, "rss_mb": _peak_rss_mb(), "stored": snap.uploaded_bytes}))


def _child(role: str, endpoint: str, path: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--role", role, "--endpoint", endpoint, "--file", str(path)],
                         stdout=subprocess.PIPE, text=True, check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _moto(port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("moto's S3 server did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--role", choices=["raw", "backup"])
    parser.add_argument("--endpoint")
    parser.add_argument("--file", type=Path)
    args = parser.parse_args()
    if args.role == "raw":
        role_raw(args.endpoint, args.file)
        return
    if args.role == "backup":
        role_backup(args.endpoint, args.file)
        return

    from appliance.supervisor import free_port

    port = free_port(39700)
    server = _moto(port)
    try:
        with tempfile.TemporaryDirectory(prefix="circles-bench-") as tmp:
            path = Path(tmp) / "mixed.bin"
            make_file(path, args.mb)
            endpoint = f"127.0.0.1:{port}"
            raw, backup = [], []
            for _ in range(args.rounds):  # interleaved, so drift in machine load hits both
                raw.append(_child("raw", endpoint, path))
                backup.append(_child("backup", endpoint, path))
    finally:
        server.terminate()
        server.wait(10)
    raw_rate = args.mb / statistics.median(r["seconds"] for r in raw)
    backup_rate = args.mb / statistics.median(b["seconds"] for b in backup)
    print(f"file_mb = {args.mb}")
    print(f"raw_put_mb_per_s = {raw_rate:.1f}")
    print(f"backup_mb_per_s = {backup_rate:.1f}")
    print(f"backup_stored_mb = {statistics.median(b['stored'] for b in backup) / (1 << 20):.1f}")
    print(f"backup_peak_rss_mb = {max(b['rss_mb'] for b in backup):.0f}")
    print(f"backup/raw = {backup_rate / raw_rate:.2f}")


if __name__ == "__main__":
    main()
