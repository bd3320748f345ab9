# uci-ensure --apply|--check PACKAGE.SECTION.OPTION=VALUE ...
# Sets each UCI option whose value differs and commits the packages it touched; prints
# "changed: KEY" for each option set (or that --check finds different) and nothing when all match.
# Run by roles/base/tasks/openwrt.yml as `sh -c SCRIPT uci-ensure ...` (busybox ash on the router).
case "$1" in
	--apply) check=0 ;;
	--check) check=1 ;;
	*) echo "usage: uci-ensure --apply|--check PACKAGE.SECTION.OPTION=VALUE ..." >&2; exit 2 ;;
esac
shift
touched=
for kv in "$@"; do
	key=${kv%%=*}
	value=${kv#*=}
	case "$kv" in *=*) ;; *) echo "error: $kv: expected PACKAGE.SECTION.OPTION=VALUE" >&2; exit 2 ;; esac
	[ "$(uci -q get "$key")" = "$value" ] && continue
	echo "changed: $key"
	[ "$check" = 1 ] && continue
	uci set "$key=$value" || { echo "error: uci set $key failed" >&2; exit 3; }
	package=${key%%.*}
	case " $touched " in *" $package "*) ;; *) touched="$touched $package" ;; esac
done
for package in $touched; do
	uci commit "$package" || { echo "error: uci commit $package failed" >&2; exit 3; }
done
exit 0
