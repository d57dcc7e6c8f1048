#!/bin/sh
# GET /cgi-bin/status: who this guest is and how long it has run, so a test
# can tell a re-adopted VM (same boot_id, uptime grew) from a rebooted one.
read -r up _ < /proc/uptime
boot_id=$(cat /proc/sys/kernel/random/boot_id)
addr=$(cat /run/procurator-ip 2>/dev/null || echo none)
printf 'Content-Type: application/json\r\n\r\n'
printf '{"boot_id": "%s", "uptime": %s, "ip": "%s", "hostname": "%s"}\n' \
  "$boot_id" "$up" "$addr" "$(hostname)"
