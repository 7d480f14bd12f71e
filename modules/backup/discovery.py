"""The backups as Home Assistant entities, read from the retained result, drill and alert."""

from __future__ import annotations

from appliance.bus import registry
from appliance.ha_discovery import APPLIANCE_ID, Entity

OK_OR_FAILED = "{{ 'ok' if value_json.ok else 'failed' }}"


def entities(jobs: list[str]) -> list[Entity]:
    """Per job: when it last succeeded (a timestamp, with the last run's details as
    attributes), the last run's and the last drill's outcome, and a "local only" problem;
    for the box: the alert. A removed job's entities go with their retained topics."""
    alert = str(registry.BACKUP_ALERT.topic())
    found = [Entity("binary_sensor", APPLIANCE_ID, "backup_alert", "Backup overdue", {
        "state_topic": alert, "json_attributes_topic": alert, "device_class": "problem",
        "value_template": "{{ 'ON' if value_json.alert else 'OFF' }}",
        "payload_on": "ON", "payload_off": "OFF"})]
    for job in jobs:
        result = str(registry.BACKUP_RESULT.topic(job=job))
        drill = str(registry.BACKUP_DRILL.topic(job=job))
        found += [
            Entity("sensor", APPLIANCE_ID, f"backup_{job}_last_success",
                   f"Backup {job} last success", {
                       "state_topic": result, "json_attributes_topic": result,
                       "device_class": "timestamp",
                       # "None" is Home Assistant's word for unknown: never succeeded yet.
                       "value_template": "{{ value_json.last_success or 'None' }}"},
                   owned=(result,)),
            Entity("sensor", APPLIANCE_ID, f"backup_{job}_result", f"Backup {job} last run", {
                "state_topic": result, "value_template": OK_OR_FAILED, "icon": "mdi:backup-restore"}),
            Entity("sensor", APPLIANCE_ID, f"backup_{job}_drill", f"Backup {job} restore drill", {
                "state_topic": drill, "json_attributes_topic": drill, "value_template": OK_OR_FAILED,
                "icon": "mdi:backup-restore", "entity_category": "diagnostic"}, owned=(drill,)),
            # Kept on the box's own disk: gone with it (a dead SD card, a theft, a fire).
            Entity("binary_sensor", APPLIANCE_ID, f"backup_{job}_local_only",
                   f"Backup {job} local only", {
                       "state_topic": result, "device_class": "problem",
                       "value_template": "{{ 'ON' if value_json.local_only else 'OFF' }}",
                       "payload_on": "ON", "payload_off": "OFF"}),
        ]
    return found
