"""Log lines on the console (the USB serial port on the ESP32, stdout on the unix port):
`<time> <LEVEL> <message>`. Secrets are never passed here."""

import clock


def _line(level, message):
    print(f"{clock.now_iso() or clock.uptime()} {level} {message}")


def info(message):
    _line("INFO", message)


def warn(message):
    _line("WARN", message)


def error(message):
    _line("ERROR", message)
