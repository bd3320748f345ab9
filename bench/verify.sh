#!/usr/bin/env bash
# `idlewire verify` over N nodes: wall time one node after another vs in parallel, and the
# per-host table. Needs root.
#   bench/verify.sh [N=5]        N booted x86_64 images (QEMU/TCG; needs QEMU and OVMF, make
#                                deps-test); env: IDLEWIRE_CACHE, OUT (work dir), MEM (MiB per VM, 512)
#                                VMs boot staggered (TCG boots are CPU-heavy).
#   bench/verify.sh --fleet [-n 5] [--rounds 3]
#                                N systemd-nspawn hosts (tests/fleet.py) converged once with
#                                playbooks/site.yml (shaping on), then --workers 1 vs --workers N,
#                                alternating, median of the rounds (bench/verify_fleet.py);
#                                env: IDLEWIRE_CACHE (the x86_64 rootfs), PYTHON (default .venv/bin/python)
# Everything started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fleet" ]; then
  shift
  exec "${PYTHON:-.venv/bin/python}" bench/verify_fleet.py "$@"
fi
N=${1:-5}
MEM=${MEM:-512}
OUT=${OUT:-$(mktemp -d /tmp/idlewire-bench-verify.XXXXXX)}
BIN=.venv/bin
mkdir -p "$OUT"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

[ -f "$OUT/key" ] || ssh-keygen -q -t ed25519 -N "" -C bench -f "$OUT/key"
printf -- "---\nhostname: bench\nssh_authorized_keys:\n  - %s\n" "$(cat "$OUT/key.pub")" > "$OUT/site.yml"
echo "building the x86_64 image (cached stages are reused)…"
img=$($BIN/idlewire build --target x86_64 --config "$OUT/site.yml" --out "$OUT/img" --no-xz --json \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["image"])')

inv="$OUT/inventory.yml"
printf -- "---\nall:\n  vars:\n    ansible_user: idlewire\n    ansible_ssh_private_key_file: %s\n  hosts:\n" "$OUT/key" > "$inv"
t_boot=$(date +%s)
for i in $(seq 1 "$N"); do
  d="$OUT/vm$i"; mkdir -p "$d"
  cp --sparse=always "$img" "$d/disk.img"
  cp /usr/share/OVMF/OVMF_VARS_4M.fd "$d/vars.fd"
  port=$(free_port)
  qemu-system-x86_64 -machine q35 -m "$MEM" -smp 1 -nographic -monitor none -no-reboot \
    -drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
    -drive if=pflash,format=raw,file="$d/vars.fd" -drive if=virtio,format=raw,file="$d/disk.img" \
    -netdev user,id=n0,hostfwd=tcp:127.0.0.1:"$port"-:22 -device virtio-net-pci,netdev=n0 \
    -serial file:"$d/serial.log" >/dev/null 2>"$d/qemu.err" </dev/null &
  pids+=($!)
  printf "    node-%02d:\n      ansible_host: 127.0.0.1\n      ansible_port: %s\n" "$i" "$port" >> "$inv"
  # stagger: the next VM starts when this one answers SSH (or after 240 s)
  for _ in $(seq 1 80); do
    ssh -i "$OUT/key" -p "$port" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
        -o LogLevel=ERROR -o ConnectTimeout=5 idlewire@127.0.0.1 true 2>/dev/null && break
    sleep 3
  done
  echo "node-$(printf %02d "$i") up after $(( $(date +%s) - t_boot ))s (ssh port $port)"
done
# all agents up and settled before measuring
sleep 10

run() {  # run WORKERS LABEL
  local t0 t1
  t0=$(date +%s.%N)
  $BIN/idlewire verify -i "$inv" --workers "$1" --junit "$OUT/junit-$2.xml" > "$OUT/table-$2.txt" 2>"$OUT/err-$2.txt" || true
  t1=$(date +%s.%N)
  python3 -c "print(f'{$t1 - $t0:.1f}')"
}
# Alternate the modes (the machine's load drifts): serial, parallel, 2 workers, serial, parallel.
declare -A times
for round in 1 2; do
  for w in 1 0 2; do
    [ "$round" = 2 ] && [ "$w" = 2 ] && continue
    echo "round $round: idlewire verify, $N nodes, --workers $w…"
    times[$w]="${times[$w]:-} $(run "$w" "w$w-r$round")"
  done
done
cat "$OUT/table-w0-r1.txt"
cat "$OUT/err-w0-r1.txt"
echo
echo "wall time over $N nodes (each run; load average now: $(cut -d' ' -f1-3 /proc/loadavg)):"
echo "  one after another (--workers 1):${times[1]} s"
echo "  2 workers         (--workers 2):${times[2]} s"
echo "  all at once       (--workers 0):${times[0]} s"
python3 - "${times[1]}" "${times[0]}" <<'PY'
import sys
s, p = (sorted(map(float, a.split())) for a in sys.argv[1:3])
print(f"  best serial / best parallel = {s[0]:.1f}/{p[0]:.1f} = {s[0] / p[0]:.2f}x")
PY
echo "inventory, JUnit and tables in $OUT"
