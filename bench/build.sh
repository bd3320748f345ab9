#!/usr/bin/env bash
# Measures what a builder waits for: a cold build (empty cache: Debian download, rootfs, bake,
# assemble, xz), a rebuild after changing one role variable (rootfs cached: re-bake only), and
# the sizes of what gets flashed or downloaded.
#   usage: bench/build.sh [TARGET ...]        (default: rpi4-arm64 x86_64; run as root)
set -euo pipefail
cd "$(dirname "$0")/.."
tools/scripts/deps.sh image >/dev/null
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(rpi4-arm64 x86_64)
work=$(mktemp -d /var/tmp/idlewire-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
ssh-keygen -q -t ed25519 -N '' -C bench -f "$work/key"
site() { printf -- "---\nssh_authorized_keys: ['%s']\nvars:\n  agent_price_per_gb: %s\n" "$(cat "$work/key.pub")" "$1"; }
site 0.5 > "$work/site-a.yml"
site 0.75 > "$work/site-b.yml"   # one role variable changed

secs() { python3 -c "import json,sys; print(round(sum(json.load(open(sys.argv[1]))['seconds'].values())))" "$1"; }
mib() { echo $(( $(stat -c %s "$1") / 1048576 )); }
used_mib() { echo $(( $(du -B1 "$1" | cut -f1) / 1048576 )); }

printf '%-12s %10s %12s %14s %14s %10s\n' target "cold (s)" "rebuild (s)" ".img (MiB)" ".img used" ".xz (MiB)"
for t in "${targets[@]}"; do
  export IDLEWIRE_CACHE="$work/cache-$t"
  .venv/bin/idlewire build --target "$t" --config "$work/site-a.yml" --out "$work/out-$t" --json > "$work/cold.json" 2>"$work/cold-$t.err"
  .venv/bin/idlewire build --target "$t" --config "$work/site-b.yml" --out "$work/out-$t" --json > "$work/re.json" 2>"$work/re-$t.err"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); assert d['cached']=={'rootfs':True,'bake':False}, d" "$work/re.json"
  img=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['image'])" "$work/re.json")
  printf '%-12s %10s %12s %14s %14s %10s\n' "$t" "$(secs "$work/cold.json")" "$(secs "$work/re.json")" \
    "$(mib "$img")" "$(used_mib "$img")" "$(mib "$img.xz")"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('   stages (rebuild):', {k: round(v) for k, v in d['seconds'].items()})" "$work/re.json"
done
