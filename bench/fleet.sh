#!/usr/bin/env bash
# Wall time to converge N fresh systemd-nspawn hosts (tests/fleet.py) with playbooks/site.yml:
# forks=1 vs forks=10, SSH pipelining off vs on, and the second (idempotent) run's time.
#   sudo bench/fleet.sh [-n 10] [--forks 1,10]     env: IDLEWIRE_CACHE (rootfs cache)
# Every configuration starts from fresh hosts; all hosts, mounts and namespaces go on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python bench/fleet.py "$@"
