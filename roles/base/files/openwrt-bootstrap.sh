# idlewire on OpenWrt, step 0: flash/RAM budget check, then the packages (opkg, or apk on OpenWrt 25+).
# Needs no Python: roles/base/tasks/bootstrap.yml runs it with ansible.builtin.raw as `sh -c SCRIPT`
# (busybox ash on the router; the tests run it with dash and busybox sh).
#
# Inputs (environment):
#   IW_HOST          name used in messages (the inventory name)
#   IW_PACKAGES      "NAME:KIB NAME:KIB ..." packages and their estimated installed size
#   IW_RESERVE_KIB   flash kept free on top of the packages (agent, ledger, configuration)
#   IW_MIN_RAM_KIB   refuse below this MemTotal
#   IW_ENFORCE       1: refuse below the floors; 0: report and go on
#   IW_CHECK         1: report what would be installed, change nothing (check mode)
#   IW_PKG           auto (apk if present, else opkg) | opkg | apk
#   IW_MEMINFO       file with a MemTotal line (default /proc/meminfo)
#   IW_FLASH         path whose free space is checked (default /overlay, or / without an overlay)
#   IW_DF            command printing `df -P -k` output for IW_FLASH (default "df -Pk")
# Output: one line. "ok: ..." (nothing to do), "would install: ..." (check mode), "installed: ..."
# (changed), or "error: HOST: ..." with exit 2 (below a floor) or 3 (package manager failed).

host=${IW_HOST:-$(cat /proc/sys/kernel/hostname 2>/dev/null)}
meminfo=${IW_MEMINFO:-/proc/meminfo}
df_cmd=${IW_DF:-df -Pk}
if [ -z "$IW_FLASH" ]; then
	if [ -d /overlay ]; then IW_FLASH=/overlay; else IW_FLASH=/; fi
fi
see='see "OpenWrt budget" in roles/base/README.md'

fail() {
	echo "error: $host: $2"
	exit "$1"
}

isnum() {
	case "$1" in '' | *[!0-9]*) return 1 ;; *) return 0 ;; esac
}

pkg=${IW_PKG:-auto}
if [ "$pkg" = auto ]; then
	if command -v apk >/dev/null 2>&1; then
		pkg=apk
	elif command -v opkg >/dev/null 2>&1; then
		pkg=opkg
	else
		fail 2 "neither apk nor opkg found: not an OpenWrt system?"
	fi
fi
case "$pkg" in opkg | apk) ;; *) fail 2 "IW_PKG=$pkg: use auto, opkg or apk" ;; esac

mem=$(awk '$1 == "MemTotal:" { print $2; exit }' "$meminfo" 2>/dev/null)
isnum "$mem" || fail 2 "cannot read MemTotal from $meminfo"
if [ "$mem" -lt "${IW_MIN_RAM_KIB:-0}" ] && [ "${IW_ENFORCE:-1}" = 1 ]; then
	fail 2 "$mem KiB RAM (MemTotal), below idlewire's floor of $IW_MIN_RAM_KIB KiB on OpenWrt; $see"
fi

installed() {
	if [ "$pkg" = apk ]; then
		apk info -e "$1" >/dev/null 2>&1
	else
		opkg list-installed "$1" 2>/dev/null | grep -q "^$1 "
	fi
}

missing=
need=0
floor=${IW_RESERVE_KIB:-0}
count=0
for spec in $IW_PACKAGES; do
	name=${spec%%:*}
	kib=${spec##*:}
	isnum "$kib" || fail 2 "package size of $name is not a number of KiB: $spec"
	floor=$((floor + kib))
	count=$((count + 1))
	if ! installed "$name"; then
		missing="$missing $name"
		need=$((need + kib))
	fi
done

if [ -z "$missing" ]; then
	echo "ok: $host: $count packages present ($pkg)"
	exit 0
fi

need=$((need + ${IW_RESERVE_KIB:-0}))
free=$($df_cmd "$IW_FLASH" 2>/dev/null | awk 'NR == 2 { print $4 }')
isnum "$free" || fail 2 "cannot read the free space of $IW_FLASH from '$df_cmd'"
if [ "$free" -lt "$need" ] && [ "${IW_ENFORCE:-1}" = 1 ]; then
	fail 2 "$free KiB free flash on $IW_FLASH, below the $need KiB the missing packages need\
 (floor on a fresh router: $floor KiB); $see"
fi

if [ "${IW_CHECK:-0}" = 1 ]; then
	echo "would install:$missing ($pkg)"
	exit 0
fi

log=/tmp/idlewire-bootstrap.log
# shellcheck disable=SC2086 # $missing is a list of package names
if [ "$pkg" = apk ]; then
	{ apk update && apk add $missing; } >"$log" 2>&1
else
	{ opkg update && opkg install $missing; } >"$log" 2>&1
fi
rc=$?
[ "$rc" -eq 0 ] || fail 3 "$pkg failed (exit $rc): $(tail -n 1 "$log"); full log in $log"
for name in $missing; do
	installed "$name" || fail 3 "$pkg reported success but $name is not installed; log in $log"
done
echo "installed:$missing ($pkg)"
