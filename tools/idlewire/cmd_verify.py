"""`idlewire verify -i INVENTORY`: the node suite (tests/infra) against many nodes in parallel."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from .clikit import App, LazyConsole, Opt
from .errors import UserError
from .paths import data_dir

err = LazyConsole(stderr=True, highlight=False)


def register(app: App) -> None:
    app.command(name="verify")(verify)


@dataclass
class HostResult:
    name: str
    passed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (test, first line of the message)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def unreachable(self) -> bool:
        return bool(self.failed) and not self.passed and all(
            re.search(r"NoValidConnections|Unable to connect|timed out|Authentication failed|"
                      r"SSHException|No route|Connection refused", m) for _, m in self.failed)

    @property
    def status(self) -> str:
        if self.unreachable:
            return "unreachable"
        return "FAIL" if self.failed or not self.passed else "ok"

    def as_dict(self) -> dict:
        return {"host": self.name, "status": self.status, "passed": self.passed,
                "failed": [{"test": t, "message": m} for t, m in self.failed],
                "skipped": [{"test": t, "reason": m} for t, m in self.skipped]}


def verify(
    inventory: Annotated[Path, Opt("--inventory", "-i", help="Ansible inventory (YAML/INI) "
                                   "listing the nodes, as for playbooks/site.yml.")],
    limit: Annotated[str | None, Opt("--limit", "-l", help="Ansible host pattern: only these "
                                     "hosts or groups (node-01, 'pi:&eu', 'node-0*').")] = None,
    workers: Annotated[int, Opt("--workers", "-n", help="Nodes checked at once (pytest-xdist); "
                                "0: as many as nodes, up to 16; 1: one after another.")] = 0,
    junit: Annotated[Path, Opt("--junit", help="JUnit XML report to write (for CI).")] =
        Path("idlewire-verify.xml"),
    identity: Annotated[Path | None, Opt("--identity", help="SSH private key when the "
                                         "inventory sets no ansible_ssh_private_key_file.")] = None,
    keyword: Annotated[str | None, Opt("-k", metavar="EXPRESSION", help="Only checks matching this pytest "
                                       "expression (e.g. 'ssh or password').")] = None,
    as_json: Annotated[bool, Opt("--json", help="Print the per-host results as JSON.")] = False,
) -> None:
    """Check nodes against their declared state: the testinfra suite in tests/infra, per host.

    Expected values come from the roles' defaults overridden by the inventory's variables.
    Prints a pass/fail table per host (the failing checks by name) and writes JUnit XML.
    Exit status 1 when any node fails a check or cannot be reached.

    The same suite runs with stock testinfra:
      pytest --hosts=ssh://idlewire@NODE tests/infra
    """
    if not inventory.exists():
        raise UserError(f"{inventory}: no such inventory file")
    root = data_dir()
    suite = root / "tests" / "infra"
    if not suite.is_dir():
        raise UserError(f"the node suite {suite} is missing: reinstall idlewire (its wheel ships the suite)")
    if workers < 0:
        raise UserError(f"--workers {workers}: expected 0 (automatic), 1 (serial) or more")
    hosts = _inventory_hosts(inventory, limit)
    if not hosts:
        raise UserError(f"{inventory}: no hosts" + (f" match --limit {limit!r}" if limit else "")
                        + "; list nodes under all: hosts: or a group")
    n = min(len(hosts), 16) if workers == 0 else min(workers, len(hosts))
    with tempfile.TemporaryDirectory(prefix="idlewire-verify-") as tmp:
        tmpd = Path(tmp)
        cfg = tmpd / "ssh_config"
        cfg.write_text(_ssh_config(hosts, identity))
        vars_file = tmpd / "vars.json"
        vars_file.write_text(json.dumps({"hosts": {h: v for h, v in hosts.items()}}, default=str))
        xml_tmp = tmpd / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", str(suite), "--rootdir", str(root), "-p", "no:cacheprovider",
               "-q", "--no-header", "-o", "junit_family=xunit2", f"--junitxml={xml_tmp}",
               "--hosts=" + ",".join(f"paramiko://{h}" for h in hosts),
               f"--ssh-config={cfg}", f"--iw-vars={vars_file}"]
        cmd += ["-n", str(n), "--dist", "loadgroup"] if n > 1 else ["-p", "no:xdist"]
        if keyword:
            cmd += ["-k", keyword]
        if not as_json:
            err.print(f"[dim]checking {len(hosts)} node(s) with {n} worker(s)…[/dim]")
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
        wall = time.monotonic() - t0
        if not xml_tmp.exists():
            last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-5:]
            raise UserError("the verification suite did not run (pytest exit "
                            f"{proc.returncode}): {' | '.join(last)}")
        results = _parse_junit(xml_tmp, list(hosts))
        junit.parent.mkdir(parents=True, exist_ok=True)
        part = junit.with_name(junit.name + ".part")
        shutil.copyfile(xml_tmp, part)
        part.replace(junit)
    bad = [r for r in results if r.status != "ok"]
    if as_json:
        print(json.dumps({"hosts": [r.as_dict() for r in results], "workers": n,
                          "seconds": round(wall, 2), "junit": str(junit)}, indent=1))
    else:
        _print_table(results)
        err.print(f"{len(results)} node(s), {len(bad)} failing, {n} worker(s), {wall:.1f}s; JUnit: {junit}")
    if bad:
        raise SystemExit(1)


def _ansible_inventory_bin() -> str:
    here = Path(sys.executable).parent / "ansible-inventory"
    return str(here) if here.exists() else (shutil.which("ansible-inventory") or "ansible-inventory")


def _inventory_hosts(inventory: Path, limit: str | None) -> dict[str, dict]:
    """{inventory name: host variables} after --limit, as Ansible resolves them."""
    cmd = [_ansible_inventory_bin(), "-i", str(inventory.resolve()), "--list"]  # runs in data_dir()
    if limit:
        cmd += ["--limit", limit]
    env = {**os.environ, "ANSIBLE_VERBOSITY": "0", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=data_dir())
    except FileNotFoundError:
        raise UserError("ansible-inventory not found: install idlewire with its dependencies "
                        "(make deps)") from None
    if proc.returncode != 0:
        msg = " ".join(proc.stderr.strip().splitlines()[-2:])
        raise UserError(f"{inventory}: ansible-inventory failed: {msg}")
    data = json.loads(proc.stdout)
    hostvars = data.get("_meta", {}).get("hostvars", {})
    names: list[str] = []

    def walk(group: str) -> None:
        for h in data.get(group, {}).get("hosts", []):
            if h not in names:
                names.append(h)
        for child in data.get(group, {}).get("children", []):
            walk(child)

    walk("all")
    return {h: hostvars.get(h, {}) for h in names}


def _ssh_config(hosts: dict[str, dict], identity: Path | None) -> str:
    """An ssh_config with one Host block per inventory name (testinfra's paramiko backend reads it)."""
    out = []
    for name, v in hosts.items():
        lines = [f"Host {name}", f"  HostName {v.get('ansible_host', name)}",
                 f"  Port {int(v.get('ansible_port', 22))}"]
        user = v.get("ansible_user") or v.get("ansible_ssh_user")
        if user:
            lines.append(f"  User {user}")
        key = v.get("ansible_ssh_private_key_file") or (str(identity) if identity else None)
        if key:
            lines.append(f"  IdentityFile {os.path.expanduser(str(key))}")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _parse_junit(path: Path, names: list[str]) -> list[HostResult]:
    import xml.etree.ElementTree as ET

    results = {n: HostResult(n) for n in names}
    for case in ET.parse(path).getroot().iter("testcase"):  # noqa: S314 (our own pytest wrote it)
        m = re.match(r"^(.*)\[paramiko://([^\]]+)\]$", case.get("name", ""))
        if not m or m.group(2) not in results:
            problem = case.find("error")
            if problem is not None:  # the suite itself broke: say so rather than a silent "no checks"
                raise UserError("the verification suite failed to run: "
                                + _last_line(problem.text or problem.get("message", "")))
            continue
        test, r = m.group(1), results[m.group(2)]
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        skipped = case.find("skipped")
        if failure is not None:
            r.failed.append((test, _first_line(failure.get("message", "") or failure.text or "")))
        elif skipped is not None:
            r.skipped.append((test, _first_line(skipped.get("message", ""))))
        else:
            r.passed.append(test)
    return list(results.values())


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no message)"


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:160]
    return ""


def _print_table(results: list[HostResult]) -> None:
    from rich.console import Console as RichConsole
    from rich.table import Table

    table = Table(title="idlewire verify", show_lines=False)
    for col in ("host", "result", "passed", "failed", "skipped", "failing checks"):
        table.add_column(col, justify="right" if col in ("passed", "failed", "skipped") else "left")
    for r in results:
        style = {"ok": "green", "FAIL": "red", "unreachable": "yellow"}[r.status]
        failing = "; ".join(f"{t}: {m}" if r.unreachable is False else f"{t}" for t, m in r.failed[:4])
        if r.unreachable:
            failing = r.failed[0][1]
        elif not r.failed and not r.passed:
            failing = "no checks ran (all skipped or deselected)"
        elif len(r.failed) > 4:
            failing += f"; … {len(r.failed) - 4} more"
        table.add_row(r.name, f"[{style}]{r.status}[/{style}]", str(len(r.passed)), str(len(r.failed)),
                      str(len(r.skipped)), failing)
    RichConsole(width=max(160, shutil.get_terminal_size().columns)).print(table)
