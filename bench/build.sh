#!/usr/bin/env bash
# Measures what a builder waits for: a cold build (empty cache: Debian download, rootfs, bake,
# assemble, zstd), a rebuild after changing one role variable (rootfs cached: re-bake only), and
# what each compressor costs and saves on the rebuilt image: zstd -T0 -3 (the default), xz -1
# (the default until issue 19) and xz -9 (--release).
#   usage: bench/build.sh [TARGET ...]        (default: rpi4-arm64 x86_64; run as root)
#   BENCH_KEEP=DIR keeps the caches and images in DIR (default: a temporary directory, removed).
#   BENCH_COMPRESSORS="zstd -T0 -3;xz -T0 -1" limits the compressors measured (xz -9 takes minutes).
# Before issue 19 (xz -1 default, no pipelining), on 2 cores: rpi4-arm64 rebuild 139 s (bake 95 s,
# xz 41 s), x86_64 cold 130 s (xz 49 s). The goal for the rpi4-arm64 rebuild: ≤ 60 s. Since the
# layered bake, the rebuild re-applies only the agent role (agent_price_per_gb is its variable).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/scripts/deps.sh image >/dev/null
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(rpi4-arm64 x86_64)
if [ -n "${BENCH_KEEP:-}" ]; then
  work=$BENCH_KEEP; mkdir -p "$work"
else
  work=$(mktemp -d /var/tmp/idlewire-bench.XXXXXX)
  trap 'rm -rf "$work"' EXIT
fi
[ -f "$work/key" ] || ssh-keygen -q -t ed25519 -N '' -C bench -f "$work/key"
site() { printf -- "---\nssh_authorized_keys: ['%s']\nvars:\n  agent_price_per_gb: %s\n" "$(cat "$work/key.pub")" "$1"; }
site 0.5 > "$work/site-a.yml"
site 0.75 > "$work/site-b.yml"   # one role variable changed

json() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }
mib() { python3 -c "import os,sys; print(f'{os.stat(sys.argv[1]).st_size / 2**20:.0f}')" "$1"; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

for t in "${targets[@]}"; do
  export IDLEWIRE_CACHE="$work/cache-$t"
  rm -rf "$IDLEWIRE_CACHE"
  t0=$(now)
  .venv/bin/idlewire build --target "$t" --config "$work/site-a.yml" --out "$work/out-$t" --json > "$work/cold-$t.json" 2>"$work/cold-$t.err"
  cold=$(since "$t0")
  t0=$(now)
  .venv/bin/idlewire build --target "$t" --config "$work/site-b.yml" --out "$work/out-$t" --json > "$work/re-$t.json" 2>"$work/re-$t.err"
  re=$(since "$t0")
  json "$work/re-$t.json" "d['cached'] == {'rootfs': True, 'bake': False} or sys.exit(f'not a re-bake: {d}')" >/dev/null
  img=$(json "$work/re-$t.json" "d['image']")
  echo "== $t"
  printf '  %-34s %8s s   stages %s\n' "cold build (zstd)" "$cold" "$(json "$work/cold-$t.json" "{k: round(v) for k, v in d['seconds'].items()}")"
  printf '  %-34s %8s s   stages %s; roles re-applied: %s of 3 (the rest from cached layers)\n' \
    "rebuild, one role variable changed" "$re" "$(json "$work/re-$t.json" "{k: round(v) for k, v in d['seconds'].items()}")" \
    "$(grep -c '^PLAY RECAP' "$work/out-$t/logs/idlewire-$t-"*.log)"
  printf '  %-34s %8s MiB (apparent), %s MiB used\n' "image" "$(mib "$img")" "$(( $(du -B1 "$img" | cut -f1) / 1048576 ))"
  declare -A secs=() size=()
  IFS=';' read -r -a compressors <<<"${BENCH_COMPRESSORS:-zstd -T0 -3;xz -T0 -1;xz -T0 -9}"
  for c in "${compressors[@]}"; do
    read -r tool _ <<<"$c"
    out="$work/bench-$t.img.${tool/zstd/zst}"
    t0=$(now)
    $c -q -c "$img" > "$out"
    secs[$c]=$(since "$t0"); size[$c]=$(mib "$out"); rm -f "$out"
    printf '  %-34s %8s s   %6s MiB\n' "$c" "${secs[$c]}" "${size[$c]}"
  done
  python3 - "${secs[zstd -T0 -3]:-0}" "${secs[xz -T0 -1]:-0}" "${size[zstd -T0 -3]:-0}" "${size[xz -T0 -1]:-0}" \
    "${size[xz -T0 -9]:-0}" <<'EOF'
import sys
zs, xs, zm, xm, x9 = map(float, sys.argv[1:])
if zs and xs:
    print(f"  zstd vs xz -1 (the old default): {xs / max(zs, 0.1):.1f}x faster, {zm / max(xm, 1):.2f}x the size"
          + (f"; xz -9 (--release) is {x9 / max(zm, 1):.2f}x zstd's size" if x9 else ""))
EOF
  unset secs size
done
