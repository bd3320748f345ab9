"""Wall time to converge N fresh nspawn hosts with playbooks/site.yml: forks 1 vs N, SSH
pipelining off vs on, and the second (idempotent) run. Run through bench/fleet.sh (root)."""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fleet import Fleet  # noqa: E402
from netlab import Lab  # noqa: E402

RECAP = re.compile(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def converge(fleet: Fleet, forks: int, pipelining: bool) -> tuple[float, int, int]:
    """(seconds, total changed, hosts failed or unreachable)."""
    bin_dir = str(Path(sys.executable).parent)
    t = time.monotonic()
    res = fleet.run(f"{bin_dir}/ansible-playbook", "-i", str(fleet.inventory), "playbooks/site.yml",
                    "--forks", str(forks), check=False,
                    env={"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
                         "ANSIBLE_PIPELINING": "True" if pipelining else "False"})
    dt = time.monotonic() - t
    rows = RECAP.findall(res.stdout)
    bad = sum(1 for r in rows if int(r[2]) or int(r[3])) + (len(fleet.hosts) - len(rows))
    return dt, sum(int(r[1]) for r in rows), bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=10, help="hosts (default 10)")
    ap.add_argument("--forks", default="1,10", help="fork counts to compare (default 1,10)")
    args = ap.parse_args()
    print(f"{'hosts':>5} {'forks':>5} {'pipelining':>10} {'1st run s':>10} {'2nd run s':>10} "
          f"{'changed 2nd':>11} {'failed':>6}", flush=True)
    for forks in [int(f) for f in args.forks.split(",")]:
        for pipelining in (False, True):
            with tempfile.TemporaryDirectory(prefix="iwbench-fleet-") as tmp, Lab() as lab, \
                    Fleet(lab, args.n, Path(tmp)) as fleet:
                first, _, bad1 = converge(fleet, forks, pipelining)
                second, changed, bad2 = converge(fleet, forks, pipelining)
            print(f"{args.n:>5} {forks:>5} {'on' if pipelining else 'off':>10} {first:>10.1f} "
                  f"{second:>10.1f} {changed:>11} {bad1 + bad2:>6}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
