#!/usr/bin/env bash
# Two cold builds of one target from this checkout, each in its own empty cache, with the same
# site file and SOURCE_DATE_EPOCH: prints the sha256 of each image and exits 1 if they differ,
# naming the paths of the baked trees that differ (content, mode, owner, mtime, xattrs).
#   usage: bench/repro.sh [TARGET]     (default x86_64; run as root; ~2 cold builds of time)
#   BENCH_KEEP=DIR keeps both builds in DIR.
#   BENCH_ROOTFS=TAR starts both from one cached rootfs tarball (this target's, built with this
#   SOURCE_DATE_EPOCH, e.g. a kept cache-1/rootfs/*.tar): checks the bake, assemble and artifacts
#   alone, in minutes instead of two cold Debian installs (~18 min each for arm64 under qemu-user).
set -euo pipefail
cd "$(dirname "$0")/.."
t=${1:-x86_64}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 1764547200)}
if [ -n "${BENCH_KEEP:-}" ]; then
  work=$BENCH_KEEP; mkdir -p "$work"
else
  work=$(mktemp -d /var/tmp/idlewire-repro.XXXXXX)
  trap 'rm -rf "$work"' EXIT
fi
if [ -n "${BENCH_ROOTFS:-}" ]; then  # a copy of its own: the loop below empties cache-1 and cache-2
  mkdir -p "$work/seed" && cp -f "$BENCH_ROOTFS" "$work/seed/" && BENCH_ROOTFS="$work/seed/${BENCH_ROOTFS##*/}"
fi
[ -f "$work/key" ] || ssh-keygen -q -t ed25519 -N '' -C repro -f "$work/key"
printf -- "---\nssh_authorized_keys: ['%s']\n" "$(cat "$work/key.pub")" > "$work/site.yml"
for n in 1 2; do
  rm -rf "$work/cache-$n" "$work/out-$n"
  if [ -n "${BENCH_ROOTFS:-}" ]; then
    mkdir -p "$work/cache-$n/rootfs" && cp "$BENCH_ROOTFS" "$work/cache-$n/rootfs/"
  fi
  IDLEWIRE_CACHE="$work/cache-$n" .venv/bin/idlewire build --target "$t" --config "$work/site.yml" \
    --out "$work/out-$n" --json > "$work/build-$n.json"
done
sums=()
for n in 1 2; do
  img=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['image'])" "$work/build-$n.json")
  sums+=("$(sha256sum "$img" | cut -d' ' -f1)")
  echo "build $n ($work/cache-$n): $(sha256sum "$img" | cut -d' ' -f1)  ${img##*/}"
  for f in "${img%.img}".{img.zst,manifest.json,cdx.json}; do
    [ -f "$f" ] && echo "          $(sha256sum "$f" | cut -d' ' -f1)  ${f##*/}"
  done
  echo "          $(sha256sum "$work/cache-$n"/rootfs/*.tar | cut -d' ' -f1)  rootfs tarball"
done
[ "${sums[0]}" = "${sums[1]}" ] && { echo "same bytes (SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)"; exit 0; }
echo "DIFFERENT: paths of the baked trees that differ:"
python3 - "$work"/cache-1/bake/*/ "$work"/cache-2/bake/*/ <<'EOF'
import hashlib, os, sys
def walk(top):
    out = {}
    for d, dirs, files in os.walk(top):
        for n in dirs + files:
            p = os.path.join(d, n); st = os.lstat(p)
            body = os.readlink(p) if os.path.islink(p) else (
                hashlib.sha256(open(p, 'rb').read()).hexdigest() if os.path.isfile(p) else '')
            xattrs = sorted((x, os.getxattr(p, x, follow_symlinks=False)) for x in os.listxattr(p, follow_symlinks=False))
            out[os.path.relpath(p, top)] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, body, xattrs)
    return out
a, b = walk(sys.argv[1]), walk(sys.argv[2])
diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and not k.endswith('bake.json'))
for k in diff[:50]:
    print(' ', k, 'missing' if k not in a or k not in b else
          [f for f, x, y in zip(('mode', 'uid', 'gid', 'mtime', 'content', 'xattrs'), a[k], b[k]) if x != y])
print(f'  {len(diff)} path(s)')
EOF
exit 1
