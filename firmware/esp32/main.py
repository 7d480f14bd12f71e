"""Entry point. On the ESP32 MicroPython runs this file at boot and the node reads
`config.json` next to it; on the unix port: `micropython main.py [path/to/config.json]`."""

import sys

import config
import log
import sensors
from node import Node
from version import VERSION

ON_BOARD = sys.platform not in ("linux", "darwin", "windows")
EXIT_CONFIG = 78  # EX_CONFIG: a supervisor should not restart a node that cannot start


def main():
    path = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else "config.json"
    release = ".".join(str(n) for n in sys.implementation.version[:3])
    log.info(f"Circles sensor node {VERSION} (MicroPython {release} on {sys.platform})")
    try:
        cfg = config.load(path)
        node = Node(cfg, sensors.build(cfg["sensors"]))
    except config.ConfigError as exc:
        log.error(f"configuration: {exc}")
        if not ON_BOARD:
            sys.exit(EXIT_CONFIG)
        return  # stay at the REPL, so the file can be fixed with mpremote
    try:
        node.run()
    except Exception as exc:  # noqa: BLE001 - the last resort: log, then start afresh
        log.error(f"node crashed: {exc!r}")
        sys.print_exception(exc)
        if not ON_BOARD:
            sys.exit(1)
        import time

        import machine

        time.sleep(10)  # a crash loop must leave the REPL reachable
        machine.reset()


main()
