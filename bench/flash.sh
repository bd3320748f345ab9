#!/usr/bin/env bash
# Flash and stamp speed against the peers, measured here and printed as ratios.
#
#   sudo bench/flash.sh [RUNS]          (default 3 runs per tool and target after a warm-up round;
#                                        medians are printed)
#
# A 4 GiB image holding ~1 GiB of data (GPT, 256 MiB FAT boot, ext4 root) is made in a scratch
# directory (BENCH_DIR, default /var/tmp/idlewire-bench, ~12 GiB free needed), then written to a
# regular file and to a loop device by:
#   idlewire flash (with and without --no-verify), bmaptool copy, dd bs=4M conv=fsync.
# The image stays in the page cache for every tool alike; every run ends with its data on disk
# (fsync). Then 100 units are stamped (`idlewire stamp --units`, in batches of 10 deleted as they
# go) from BENCH_GOLDEN (a built image, e.g. out/idlewire-x86_64-0.1.0.img) or the bench image.
# Goals: idlewire ≤ 0.9× bmaptool, ≥ 4× faster than dd, verify ≤ 30 % extra on a card, a file's
# read-back within 15 % of the disk's own read floor (below), stamping ≤ 1 s/unit.
# The load average is printed before and after: on a shared machine, compare runs only at like load.
# BENCH_STAMP=0 leaves out the stamping part (~3 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
DIR=${BENCH_DIR:-/var/tmp/idlewire-bench}
PY=${PYTHON:-.venv/bin/python}
read -r -a IDLEWIRE <<< "${IDLEWIRE:-.venv/bin/idlewire}"  # e.g. IDLEWIRE="python -m idlewire"
[ "$(id -u)" = 0 ] || { echo "error: run as root (loop devices)" >&2; exit 2; }
for t in bmaptool dd losetup mkfs.ext4 mkfs.vfat sfdisk; do
  command -v "$t" >/dev/null || { echo "error: $t missing (make deps-test)" >&2; exit 2; }
done
mkdir -p "$DIR"
IMG=$DIR/idlewire-bench-1.img
LOOP=""
cleanup() { [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null || true; rm -rf "$DIR/stamped" "$DIR/target.img" "$DIR/loop.img"; }
trap cleanup EXIT

if [ ! -e "$IMG" ]; then
  echo "making $IMG (4 GiB, ~1 GiB of data)…" >&2
  "$PY" - "$IMG" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from imagelab import make_image
make_image(Path(sys.argv[1]), size=4 << 30, boot_size=256 << 20, data_mib=1000)
EOF
fi
"$PY" - "$IMG" <<'EOF' >&2
import sys
from pathlib import Path
from idlewire import bmap
b = bmap.parse(Path(sys.argv[1]).with_suffix(".bmap"))
print(f"image: {b.image_size / 2**30:.1f} GiB, mapped {b.mapped_blocks * b.block_size / 2**30:.2f} GiB")
EOF
cat "$IMG" > /dev/null  # into the page cache, for every tool alike
# idlewire's modules as bytecode, as an installed package has them (pip compiles at install;
# Debian's py3compile did so for bmaptool): a shell with PYTHONDONTWRITEBYTECODE set would
# otherwise time the compiling of the sources on every run (~0.03 s)
"$PY" -m compileall -q tools agent >/dev/null
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) CPUs)"

truncate -s 0 "$DIR/loop.img"; truncate -s 4200M "$DIR/loop.img"
LOOP=$(losetup -f --show "$DIR/loop.img")

secs() { secs_to /dev/null "$@"; }
secs_to() {  # secs_to FILE CMD…: wall seconds of CMD, its stdout into FILE
  local t0 t1 out=$1; shift
  t0=$(date +%s.%N); "$@" >"$out" 2>/dev/null; t1=$(date +%s.%N); echo "$t1 - $t0" | bc -l
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
# before every run, untimed: the last run's target removed and everything on disk (journal, write-back),
# so that no run pays for the one before it
fresh() { if [ "$1" = file ]; then rm -f "$DIR/target.img"; fi; sync; }
target() { if [ "$1" = file ]; then echo "$DIR/target.img"; else echo "$LOOP"; fi; }

# Runs are interleaved (run 1 of every tool, then run 2, …) so that the load other programs put
# on a shared machine falls on every tool alike. Round 0 is a warm-up, not counted: the first
# writes to a fresh target allocate its blocks (dd's first loop run took 14 s, its later ones 3 s).
TOOLS=(idlewire idlewire-noverify bmaptool dd)
declare -A M R X V
for kind in file loop; do
  for round in $(seq 0 "$RUNS"); do
    for tool in "${TOOLS[@]}"; do
      fresh "$kind"; T=$(target "$kind")
      case $tool in
        idlewire)
          s=$(secs_to "$DIR/last.json" "${IDLEWIRE[@]}" flash --json "$IMG" "$T")
          # the read-back's own time and what it added after the write (it overlaps the write)
          read -r x v < <("$PY" -c 'import json,sys; c=json.load(open(sys.argv[1]))["cards"][0]; print(c.get("verify_extra_seconds", "nan"), c.get("verify_seconds", "nan"))' "$DIR/last.json")
          X[$kind]="${X[$kind]:-} $x"; V[$kind]="${V[$kind]:-} $v" ;;
        idlewire-noverify) s=$(secs "${IDLEWIRE[@]}" flash --no-verify --json "$IMG" "$T") ;;
        bmaptool) s=$(secs bmaptool copy "$IMG" "$T") ;;
        dd) s=$(secs dd if="$IMG" of="$T" bs=4M conv=fsync) ;;
      esac
      [ "$round" = 0 ] && { X[$kind]=""; V[$kind]=""; continue; }
      R[$kind,$tool]="${R[$kind,$tool]:-} $s"
    done
  done
  for tool in "${TOOLS[@]}"; do
    # shellcheck disable=SC2086
    M[$kind,$tool]=$(printf '%s\n' ${R[$kind,$tool]} | median)
    # shellcheck disable=SC2086
    printf '%-5s %-18s median %6.2fs  (runs: %s)\n' "$kind" "$tool" "${M[$kind,$tool]}" "$(printf '%.2f ' ${R[$kind,$tool]})"
  done
done
# The floor of any read-back on this machine's disk: the written file target read once with dd
# iflag=direct (its holes read as zeros without touching the disk: ~ the mapped bytes are read).
rm -f "$DIR/target.img"; "${IDLEWIRE[@]}" flash --no-verify "$IMG" "$DIR/target.img" >/dev/null 2>&1
FLOOR=$(secs dd if="$DIR/target.img" of=/dev/null bs=8M iflag=direct)
# the flashes must really be right: the loop device holds the image (idlewire's own check, then cmp)
"${IDLEWIRE[@]}" flash "$IMG" "$LOOP" >/dev/null 2>&1
cmp -n "$(stat -c %s "$IMG")" "$IMG" "$LOOP" && echo "loop device == image: yes"

echo
echo "load after flashing: $(cut -d' ' -f1-3 /proc/loadavg)"
for kind in file loop; do
  # shellcheck disable=SC2086
  xmed=$(printf '%s\n' ${X[$kind]} | median)
  printf '%-5s idlewire/bmaptool %.2fx, without read-back %.2fx (goal <= 0.9)   dd/idlewire %.1fx faster (goal >= 4)\n' \
    "$kind" \
    "$(echo "${M[$kind,idlewire]} / ${M[$kind,bmaptool]}" | bc -l)" \
    "$(echo "${M[$kind,idlewire-noverify]} / ${M[$kind,bmaptool]}" | bc -l)" \
    "$(echo "${M[$kind,dd]} / ${M[$kind,idlewire]}" | bc -l)"
  printf '%-5s read-back cost +%.0f%% (goal <= 30%%): %.2fs with, %.2fs without; after the write ended it still took %.2fs (median)\n' \
    "$kind" "$(echo "(${M[$kind,idlewire]} / ${M[$kind,idlewire-noverify]} - 1) * 100" | bc -l)" \
    "${M[$kind,idlewire]}" "${M[$kind,idlewire-noverify]}" "$xmed"
done
printf 'file  floor: dd iflag=direct reads the written file back in %.2fs (what any read-back from this disk costs at least)\n' "$FLOOR"
# A file's read-back shares the disk with its write: it is judged against that floor, not against
# the write. Its cost is what it adds to the flash (with - without); its own time runs from its
# first read to its last check (it starts while the write goes on).
# shellcheck disable=SC2086
vmed=$(printf '%s\n' ${V[file]} | median)
cost=$(echo "${M[file,idlewire]} - ${M[file,idlewire-noverify]}" | bc -l)
printf 'file  read-back vs the floor: it adds %.2fs = %.2fx the floor (goal <= 1.15); its own time %.2fs = %.2fx\n' \
  "$cost" "$(echo "$cost / $FLOOR" | bc -l)" "$vmed" "$(echo "$vmed / $FLOOR" | bc -l)"

[ "${BENCH_STAMP:-1}" = 0 ] && exit 0  # BENCH_STAMP=0: the flash figures only
GOLDEN=${BENCH_GOLDEN:-$IMG}
echo
echo "stamping 100 units of $GOLDEN (batches of 10, deleted as they go)…"
total=0 inner=0
for batch in $(seq 0 9); do
  csv=$DIR/units-$batch.csv
  { echo "unit,payout_address"; for i in $(seq 0 9); do printf 'unit-%d%d,addr-%04d\n' "$batch" "$i" "$((batch * 10 + i))"; done; } > "$csv"
  s=$(secs_to "$DIR/last.json" "${IDLEWIRE[@]}" stamp "$GOLDEN" --units "$csv" --out "$DIR/stamped" --json)
  read -r sec how < <("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["seconds"], d["units"][0]["copy"])' "$DIR/last.json")
  total=$(echo "$total + $s" | bc -l); inner=$(echo "$inner + $sec" | bc -l)
  rm -rf "$DIR/stamped" "$csv"
done
mapped=$("$PY" -c 'import sys; from pathlib import Path; from idlewire import bmap, stamp; b = stamp.find_bmap(Path(sys.argv[1])); m = bmap.parse(b) if b else None; print(f"{m.mapped_blocks * m.block_size / 2**20:.0f} MiB mapped" if m else "no bmap")' "$GOLDEN")
printf 'stamp: %.2fs for 100 units, %.3fs per unit (goal <= 1 s), whole command runs included; %.3fs per unit inside the command (copies: %s, %s each)\n' \
  "$total" "$(echo "$total / 100" | bc -l)" "$(echo "$inner / 100" | bc -l)" "$how" "$mapped"
echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
