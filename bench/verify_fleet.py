"""`idlewire verify` over N converged nspawn hosts (tests/fleet.py): wall time one host after
another (--workers 1) vs all at once (--workers N), median of the rounds, alternating so that a
drifting machine load hits both alike; the per-host table of the last parallel run; the load
average before and after. Run through `bench/verify.sh --fleet [-n 5] [--rounds 3]` (root).

The hosts are converged once with playbooks/site.yml from the fleet's inventory (shaping on), so
every check of the suite runs, nft/tc/WireGuard included.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

from fleet import Fleet  # noqa: E402
from idlewire.cmd_verify import _parse_junit  # noqa: E402
from netlab import Lab  # noqa: E402

RECAP = re.compile(r"^(\S+)\s+: ok=\d+\s+changed=\d+\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def converge(fleet: Fleet) -> float:
    bin_dir = str(Path(sys.executable).parent)
    t = time.monotonic()
    res = fleet.run(f"{bin_dir}/ansible-playbook", "-i", str(fleet.inventory), "playbooks/site.yml",
                    check=False, env={"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin"})
    rows = RECAP.findall(res.stdout)
    bad = [r[0] for r in rows if int(r[1]) or int(r[2])]
    if res.returncode != 0 or len(rows) != len(fleet.hosts) or bad:
        sys.exit(f"converge failed ({bad or 'exit ' + str(res.returncode)}):\n{res.stdout[-3000:]}")
    return time.monotonic() - t


def wait_agents(fleet: Fleet, timeout: float = 60) -> None:
    probe = ("python3 -c \"import urllib.request as u; u.urlopen('http://127.0.0.1:8740/health', "
             "timeout=2)\"")
    for h in fleet.hosts:
        deadline = time.monotonic() + timeout
        while fleet.ssh(h, probe, check=False).returncode != 0:
            if time.monotonic() > deadline:
                sys.exit(f"{h.name}: the agent does not answer /health after {timeout:.0f}s")
            time.sleep(1)


def verify(fleet: Fleet, workers: int, junit: Path) -> tuple[float, str, str]:
    """(wall seconds, table on stdout, summary on stderr) of one `idlewire verify` run."""
    t = time.monotonic()
    res = fleet.run(sys.executable, "-m", "idlewire", "verify", "-i", str(fleet.inventory),
                    "--workers", str(workers), "--junit", str(junit), check=False,
                    env={"COLUMNS": "160", "PYTHONPATH": os.pathsep.join(
                        [str(ROOT / "tools"), str(ROOT / "agent"), os.environ.get("PYTHONPATH", "")])})
    wall = time.monotonic() - t
    if res.returncode not in (0, 1) or not junit.exists():
        sys.exit(f"idlewire verify --workers {workers} did not run (exit {res.returncode}):\n"
                 f"{res.stderr[-2000:]}")
    return wall, res.stdout, res.stderr.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=5, help="hosts (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="runs per worker count (default 3; the median is "
                                                          "reported)")
    args = ap.parse_args()
    if args.n < 2 or args.rounds < 1:
        sys.exit("bench/verify.sh --fleet: -n must be at least 2 and --rounds at least 1")
    print(f"load average before: {load()} ({os.cpu_count()} CPUs)", flush=True)
    with tempfile.TemporaryDirectory(prefix="iwbench-verify-") as tmp, Lab() as lab, \
            Fleet(lab, args.n, Path(tmp)) as fleet:
        print(f"{args.n} nspawn hosts up; converging with playbooks/site.yml…", flush=True)
        print(f"converged in {converge(fleet):.1f}s", flush=True)
        wait_agents(fleet)
        times: dict[int, list[float]] = {1: [], args.n: []}
        table = summary = ""
        statuses: set[str] = set()
        for r in range(1, args.rounds + 1):
            for w in (1, args.n):
                junit = Path(tmp) / f"verify-w{w}-r{r}.xml"
                wall, table, summary = verify(fleet, w, junit)
                results = _parse_junit(junit, [h.name for h in fleet.hosts])
                statuses |= {x.status for x in results}
                times[w].append(wall)
                print(f"round {r}: --workers {w}: {wall:.1f}s ({summary.splitlines()[-1]})", flush=True)
        print(table, end="")
        print(summary.splitlines()[-1])
        med1, medn = statistics.median(times[1]), statistics.median(times[args.n])
        print(f"\nidlewire verify over {args.n} nspawn hosts, wall time per run (s):")
        print(f"  --workers 1:  {' '.join(f'{t:.1f}' for t in times[1])}   median {med1:.1f}")
        print(f"  --workers {args.n}:  {' '.join(f'{t:.1f}' for t in times[args.n])}   median {medn:.1f}")
        print(f"  median serial / median parallel = {med1 / medn:.2f}x")
        print(f"load average after: {load()}")
        if statuses != {"ok"}:
            print(f"note: not every host passed every run ({sorted(statuses)}): see the table")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
