"""Stage 2, bake: apply the same Ansible roles as live nodes get, over a chroot connection.

The rootfs tarball is unpacked into the cache, `playbooks/bake.yml` runs against it with
community.general.chroot (inside a private mount namespace, so /proc, /sys and /dev vanish with
the process however it ends), then the tree is made ready for imaging: machine identity wiped,
fstab and boot files written. The result is cached by a hash of every input.

The roles are applied one at a time (ROLES, bake.yml's order, one play each with --tags ROLE),
and the tree after each but the last is kept as a layer, keyed by the layer before it and by
what this role reads: its own files, the files it installs from outside them, and the values of
the variables its text names (followed through the roles' defaults and the site's values). A
change to one role or to a variable only it reads re-applies that role and the ones after it,
onto a copy of the layer before it. Every bake, cold or not, goes the same way (each role after
the first starts from a copy of the previous layer), so both give the same tree.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from ..config import Site, Target, digest
from ..errors import UserError
from ..paths import data_dir
from . import ids, sbom
from .ids import DiskIds, derive_ids
from .runner import Runner, require_tools
from .sbom import copyright_licences

BAKE_FORMAT = 3
#: The roles bake.yml applies, in its order (tests/unit/test_build_layers.py checks they agree).
ROLES = ("base", "firewall", "agent")
#: Files a role installs from outside its own directory.
ROLE_SOURCES = {"agent": ("agent/idlewire_agent",)}
#: Ways a role could read a variable its text does not name: then every variable is its input.
_DYNAMIC = ("lookup('vars'", 'lookup("vars"', "vars[", "hostvars", "varnames", "include_vars")
#: What the bake applies (in paths.data_dir()), and this stage's own code: a change to any file
#: below these changes the bake key.
BAKE_INPUTS = ("ansible.cfg", "playbooks", "roles", "agent/idlewire_agent", "image/boot")
BAKE_CODE = (Path(__file__), Path(ids.__file__), Path(sbom.__file__))
#: Keeps the ESP's kernel and initrd in step with /boot (systemd-boot targets); see the script.
ESP_SYNC = data_dir() / "image/boot/idlewire-esp-sync"


def tree_hash(paths: tuple[str, ...] = BAKE_INPUTS) -> str:
    h = hashlib.sha256()
    root = data_dir()
    for rel in paths:
        base = root / rel
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for f in files:
            if "__pycache__" in f.parts or f.suffix == ".pyc":
                continue
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    for f in BAKE_CODE:  # named the same from a checkout and from an installed wheel
        h.update(f"idlewire/build/{f.name}".encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _idents(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))


def _role_text(role: str) -> str:
    base = data_dir() / "roles" / role
    return "\n".join(f.read_text(errors="replace") for f in sorted(base.rglob("*"))
                     if f.is_file() and "__pycache__" not in f.parts)


@functools.cache
def _definitions() -> dict[str, list[str]]:
    """Every variable the roles' defaults and vars define: name → its definitions (as JSON)."""
    defs: dict[str, list[str]] = {}
    for role in ROLES:
        for sub in ("defaults", "vars"):
            for f in sorted((data_dir() / "roles" / role / sub).rglob("*.yml")):
                for name, value in (yaml.safe_load(f.read_text()) or {}).items():
                    defs.setdefault(name, []).append(json.dumps(value, sort_keys=True, default=str))
    return defs


def role_inputs(role: str, variables: dict) -> dict:
    """What one role reads: the values of the variables its text names, followed through the
    roles' defaults and the site's values; every ansible_* and idlewire_* variable."""
    text = _role_text(role)
    if any(d in text for d in _DYNAMIC):
        return {"vars": variables, "defs": _definitions()}
    defs = _definitions()
    seen: set[str] = set()
    todo = _idents(text) | {n for n in variables if n.startswith(("ansible_", "idlewire_"))}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for value in defs.get(name, []) + ([json.dumps(variables[name], sort_keys=True, default=str)]
                                           if name in variables else []):
            todo |= _idents(value) - seen
    return {"vars": {n: variables[n] for n in sorted(seen) if n in variables},
            "defs": {n: defs[n] for n in sorted(seen) if n in defs}}


def layer_keys(target: Target, site: Site, rootfs_tar: Path) -> list[str]:
    """One key per role: the tree after roles[:i+1], from the rootfs and what each role reads."""
    variables = bake_vars(target, site)
    common = tree_hash(("ansible.cfg", "playbooks"))
    keys, prev = [], rootfs_tar.name
    for role in ROLES:
        prev = digest({"format": BAKE_FORMAT, "prev": prev, "target": target.name, "common": common,
                       "role": role, "files": tree_hash((f"roles/{role}", *ROLE_SOURCES.get(role, ()))),
                       "inputs": role_inputs(role, variables)})[:16]
        keys.append(prev)
    return keys


def bake_key(target: Target, site: Site, rootfs_tar: Path) -> str:
    return digest({
        "format": BAKE_FORMAT, "rootfs": rootfs_tar.name, "tree": tree_hash(),
        "site": site.inputs(), "target": [target.name, target.loader, target.cmdline,
                                          [p.__dict__ for p in target.partitions]],
    })[:16]


def build_epoch(rootfs_tar: Path) -> int:
    """The one timestamp of a build: SOURCE_DATE_EPOCH when set, else when the rootfs was made.

    Every file the bake writes is clamped to it, and the filesystem tools' clocks are frozen at it,
    so the image does not depend on when (or how fast) it was baked.
    """
    if sde := os.environ.get("SOURCE_DATE_EPOCH", "").strip():
        if not sde.isdigit():
            raise UserError(f"SOURCE_DATE_EPOCH={sde!r} is not a whole number of seconds since 1970")
        return int(sde)
    return int(rootfs_tar.stat().st_mtime)


def bake_vars(target: Target, site: Site) -> dict:
    return {
        **site.vars,
        "idlewire_baking": True,
        "idlewire_target": target.name,
        "base_hostname": site.hostname,
        "base_timezone": site.timezone,
        "idlewire_mode": site.mode,
        "base_ssh_authorized_keys": list(site.ssh_authorized_keys),
        "ansible_python_interpreter": "/usr/bin/python3",
    }


def build_bake(target: Target, site: Site, rootfs_tar: Path, cache: Path,
               run: Runner) -> tuple[Path, bool]:
    """Return (the bake directory: rootfs/, bootfs/, bake.json; whether it was cached)."""
    key = bake_key(target, site, rootfs_tar)
    out = cache / "bake" / f"{target.name}-{key}"
    if (out / "bake.json").exists():
        run.note(f"cached: {out}")
        return out, True
    require_tools("tar", "unshare", "mount", "dpkg-query")
    if os.geteuid() != 0:
        raise UserError("baking needs root (chroot and mounts); run `sudo idlewire build ...`")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    root, boot = tmp / "rootfs", tmp / "bootfs"
    tmp.mkdir(parents=True)
    boot.mkdir()
    ids = derive_ids(key, target.table)
    when = build_epoch(rootfs_tar)
    _apply_roles(target, site, rootfs_tar, cache, root, tmp, run, when)
    _finalize(target, root, boot, ids, run)
    details = package_details(root)
    clamp_times(root, when)
    clamp_times(boot, when)
    (tmp / "bake.json").write_text(json.dumps({
        "key": key, "rootfs": rootfs_tar.name, "target": target.name, "epoch": when,
        "ids": ids.to_dict(), "packages": {name: d["version"] for name, d in details.items()},
        "package_details": details,
        "components": {"idlewire-agent": tree_hash(("agent/idlewire_agent",)),
                       "idlewire-roles": tree_hash(("ansible.cfg", "playbooks", "roles"))},
    }, indent=1, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    _prune(out)
    return out, False


def _layer_dir(cache: Path, target: Target, i: int, key: str) -> Path:
    return cache / "layers" / f"{target.name}-{i + 1}-{ROLES[i]}-{key}"


def _copy_tree(src: Path, dst: Path, run: Runner) -> None:
    """A whole root filesystem: owners, modes, times, links, hard links, xattrs, sparse files."""
    run.run(["cp", "-a", "--reflink=auto", "--sparse=always", "--", src, dst])


def _apply_roles(target: Target, site: Site, rootfs_tar: Path, cache: Path, root: Path, workdir: Path,
                 run: Runner, when: int) -> None:
    """The roles onto `root`, from the deepest layer cached (else from the rootfs), each kept."""
    keys = layer_keys(target, site, rootfs_tar)
    start = 0
    for i in range(len(ROLES) - 2, -1, -1):  # the last role's tree is the bake itself
        if (_layer_dir(cache, target, i, keys[i]) / ".done").exists():
            start = i + 1
            break
    if start:
        layer = _layer_dir(cache, target, start - 1, keys[start - 1])
        run.note(f"roles {', '.join(ROLES[:start])} cached: {layer}")
        _copy_tree(layer / "rootfs", root, run)
    else:
        root.mkdir()
        run.run(["tar", "-xpf", rootfs_tar, "-C", root, "--numeric-owner",
                 "--xattrs", "--xattrs-include=*"])
        # Throwaway host keys for `sshd -t` in the roles' validate steps (the rootfs has none, so
        # that it is reproducible); _finalize removes them: each unit makes its own at first boot.
        run.run(["ssh-keygen", "-A", "-f", root])
    variables = bake_vars(target, site)
    for i in range(start, len(ROLES)):
        _run_playbook(root, variables, workdir, run, target.architecture, when, role=ROLES[i])
        if i == len(ROLES) - 1:
            break
        # Kept as a layer; the next role starts from a copy of it, in a cold bake as in a re-bake.
        layer = _layer_dir(cache, target, i, keys[i])
        partial = layer.with_name(layer.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        root.rename(partial / "rootfs")
        (partial / ".done").write_text(json.dumps({"role": ROLES[i], "key": keys[i]}) + "\n")
        shutil.rmtree(layer, ignore_errors=True)
        partial.rename(layer)
        _prune(layer)
        _copy_tree(layer / "rootfs", root, run)


# Host architecture names as Debian spells them.
_DEB_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def _host_python_mounts() -> tuple[str, str]:
    """Shell commands that make this host's Python runnable inside a foreign-architecture chroot.

    Module code is architecture-independent, but under qemu-user every module run costs seconds
    (an emulated interpreter importing Ansible's module_utils). So for a foreign rootfs the host's
    own interpreter, its standard library, its C library and dynamic loader are bind-mounted
    read-only under the chroot's /run (a tmpfs private to this bake) and started through the loader;
    whatever the modules execute (useradd, visudo, systemctl, ...) is still the target's own
    binary, emulated. Returns (mount commands, interpreter path inside the chroot).
    """
    base = Path(sys.base_prefix)
    exe = Path(sys._base_executable).resolve()  # the interpreter behind the venv
    loader = Path("/lib64/ld-linux-x86-64.so.2") if platform.machine() == "x86_64" else \
        Path("/lib/ld-linux-aarch64.so.1")
    syslib = Path(f"/usr/lib/{platform.machine()}-linux-gnu")
    h = "$R/run/iwhost"
    binds = [(base, f"{h}/base"), (syslib, f"{h}/syslib"), (loader, f"{h}/ld.so")]
    cmds = [f'mkdir -p "{h}/base" "{h}/syslib" && touch "{h}/ld.so"']
    for src, dst in binds:
        cmds.append(f'mount --bind "{src}" "{dst}" && mount -o remount,ro,bind "{dst}"')
    rel = exe.relative_to(base)
    cmds.append(
        f"printf '#!/bin/sh\\nexec /run/iwhost/ld.so --library-path /run/iwhost/base/lib:/run/iwhost/syslib"
        f" /run/iwhost/base/{rel} \"$@\"\\n' > \"{h}/python3\" && chmod 755 \"{h}/python3\""
    )
    return " && ".join(cmds), "/run/iwhost/python3"


def _run_playbook(root: Path, variables: dict, workdir: Path, run: Runner, architecture: str,
                  when: int, role: str | None = None) -> None:
    vars_file = workdir / "vars.json"
    policy = root / "usr/sbin/policy-rc.d"  # no service starts inside the chroot
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    venv_bin = Path(sys.executable).parent  # ansible-playbook comes with the idlewire venv
    if not (venv_bin / "ansible-playbook").exists():
        raise UserError(f"ansible-playbook is not installed next to {sys.executable}; run `make deps`")
    mounts = ('mount -t proc proc "$R/proc" && mount -t sysfs sysfs "$R/sys"'
              ' && mount --rbind /dev "$R/dev" && mount -t tmpfs -o mode=0755 tmpfs "$R/run"')
    if architecture != _DEB_ARCH.get(platform.machine()):
        host_mounts, interpreter = _host_python_mounts()
        mounts += " && " + host_mounts
        variables = {**variables, "ansible_python_interpreter": interpreter, "idlewire_emulated": True}
        run.note(f"foreign rootfs ({architecture}): modules run with the host's Python, tools emulated")
    # The interpreter is the chroot host's own variable (an inventory host var), not an extra var:
    # extra vars would also bind the tasks the roles delegate to the build host (localhost).
    # idlewire_bake_root lets a role put files into the root from the build host in one step.
    variables = dict(variables)
    host_vars = {"ansible_connection": "community.general.chroot",
                 "ansible_python_interpreter": variables.pop("ansible_python_interpreter")}
    inventory = workdir / "inventory.json"
    inventory.write_text(json.dumps({"all": {"hosts": {str(root): host_vars}}}))
    vars_file.write_text(json.dumps({**variables, "idlewire_bake_root": str(root)}))
    env = {
        "R": str(root),
        "ANSIBLE_CONFIG": str(data_dir() / "ansible.cfg"),
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_NOCOLOR": "1",
        # One chroot exec per task instead of mkdir/put/chmod/run/rm: each is a /bin/sh of the
        # target, emulated on a foreign rootfs. ansible.cfg's [ssh_connection] setting is ssh's own.
        "ANSIBLE_PIPELINING": "True",
        # Per-task times in the build log: where a slow bake spends its time.
        "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_tasks",
        # useradd & co. stamp /etc/shadow with "today" unless told the build's date; nothing run
        # in the chroot leaves bytecode stamped with the bake's clock.
        "SOURCE_DATE_EPOCH": str(when),
        "PYTHONDONTWRITEBYTECODE": "1",
        "ANSIBLE_LOCAL_TEMP": str(workdir / "ansible-local"),
        "PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    }
    try:
        run.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", mounts + ' && exec "$@"', "sh",
                 venv_bin / "ansible-playbook", "-i", inventory, *(["--tags", role] if role else []),
                 data_dir() / "playbooks/bake.yml", "-e", f"@{vars_file}"], env=env, cwd=data_dir())
    finally:
        policy.unlink(missing_ok=True)
        vars_file.unlink(missing_ok=True)
        inventory.unlink(missing_ok=True)


def _finalize(target: Target, root: Path, boot: Path, ids: DiskIds, run: Runner) -> None:
    """Make the tree an image: no machine identity, fstab, boot files in their own tree."""
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # new host keys on every unit's first boot
    (root / "etc/machine-id").write_text("")  # empty: systemd initialises it at first boot
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.is_file() and not dbus_id.is_symlink():
        dbus_id.unlink()
    for leftover in ("root/.ansible", "var/cache/apt/archives", "tmp"):
        path = root / leftover
        if path.is_dir():
            shutil.rmtree(path)
    (root / "tmp").mkdir(mode=0o1777, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)

    bootp = target.boot
    (root / "etc/fstab").write_text(
        "# <file system> <mount point> <type> <options> <dump> <pass>\n"
        f"UUID={ids.root_fs_uuid} / ext4 defaults,noatime,commit=60 0 1\n"
        f"UUID={ids.boot_fs_uuid} {bootp.mount} vfat defaults,noatime,umask=0077,nofail 0 2\n"
    )
    cmdline = f"root=PARTUUID={ids.root_partuuid} rootfstype=ext4 {target.cmdline}".strip()
    if target.loader == "raspi-firmware":
        fw = root / "boot/firmware"
        for item in sorted(fw.iterdir()):
            shutil.move(str(item), boot / item.name)
        if not (boot / "config.txt").exists():
            raise UserError(f"{target.path}: raspi-firmware wrote no config.txt; is the package "
                            "'raspi-firmware' in the target's packages?")
        (boot / "cmdline.txt").write_text(cmdline + "\n")
    else:
        efi = root / "usr/lib/systemd/boot/efi/systemd-bootx64.efi"
        if not efi.exists():
            raise UserError(f"{target.path}: systemd-boot needs the package 'systemd-boot-efi'")
        (boot / "EFI/BOOT").mkdir(parents=True)
        shutil.copy2(efi, boot / "EFI/BOOT/BOOTX64.EFI")
        (boot / "loader/entries").mkdir(parents=True)
        (boot / "loader/loader.conf").write_text("default idlewire.conf\ntimeout 0\n")
        _kernel_files(root)  # a clear error when the kernel or its initrd is missing
        # The node's own kernel hooks run the same script on every kernel or initrd update.
        (boot / "loader/entries/idlewire.conf").write_text(f"title idlewire\noptions {cmdline}\n")
        out = subprocess.run([str(ESP_SYNC)], env={**os.environ, "IDLEWIRE_ESP": str(boot),
                                                   "IDLEWIRE_BOOT": str(root / "boot")},
                             capture_output=True, text=True, check=True)
        run.note(out.stdout.strip())
        sbin = root / "usr/local/sbin"
        sbin.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ESP_SYNC, sbin / "idlewire-esp-sync")
        for hooks in ("etc/kernel/postinst.d", "etc/initramfs/post-update.d"):
            (root / hooks).mkdir(parents=True, exist_ok=True)
            link = root / hooks / "zz-idlewire-esp"
            link.unlink(missing_ok=True)
            link.symlink_to("/usr/local/sbin/idlewire-esp-sync")
    run.note(f"kernel command line: {cmdline}")


#: mkfs.ext4 -d copies each file's access time, and reading a file for the copy updates it
#: (relatime), so the first assemble of a bake would differ from the next. An access time in the
#: future is never updated by relatime; the node mounts with noatime, so it stays a constant.
PINNED_ATIME = 4102444800  # 2100-01-01T00:00:00Z


def clamp_times(tree: Path, when: int) -> int:
    """No modification time after `when` (the bake's own writes), every access time pinned.

    Returns how many paths were clamped. Children first, so that a directory's time is set last.
    """
    limit, atime, clamped = when * 10**9, PINNED_ATIME * 10**9, 0
    for dirpath, dirnames, filenames in os.walk(tree, topdown=False):
        for name in (*filenames, *dirnames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            clamped += st.st_mtime_ns > limit
            os.utime(path, ns=(atime, min(st.st_mtime_ns, limit)), follow_symlinks=False)
    st = os.lstat(tree)
    os.utime(tree, ns=(atime, min(st.st_mtime_ns, limit)))
    return clamped


def _kernel_files(root: Path) -> tuple[Path, Path]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise UserError("the rootfs has no kernel in /boot; add a linux-image-* package to the target")
    version = kernels[-1].name.removeprefix("vmlinuz-")
    initrd = root / "boot" / f"initrd.img-{version}"
    if not initrd.exists():
        raise UserError(f"the rootfs has no initrd for kernel {version}; is initramfs-tools installed?")
    return kernels[-1], initrd


def package_details(root: Path) -> dict[str, dict[str, str | list[str]]]:
    """Every installed package: version, architecture, source package and version, licences."""
    fields = ("version", "architecture", "source", "source_version")
    out = subprocess.run(
        ["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f",
         "${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\t${source:Package}\t"
         "${source:Version}\n"],
        capture_output=True, text=True, check=True,
    ).stdout
    details = {}
    for line in sorted(out.splitlines()):
        status, name, *values = line.split("\t")
        if not status.startswith("ii"):
            continue  # removed, config files only
        details[name] = {**dict(zip(fields, values, strict=True)),
                         "licences": copyright_licences(root, name)}
    return dict(sorted(details.items()))


def _prune(keep: Path, limit: int = 3) -> None:
    """Keep the newest few bakes of a target: each is a whole root filesystem."""
    prefix = keep.name.rsplit("-", 1)[0] + "-"
    olds = sorted((p for p in keep.parent.iterdir()
                   if p.name.startswith(prefix) and p != keep and not p.name.endswith(".partial")
                   and len(p.name) == len(keep.name)),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for old in olds[limit - 1:]:
        shutil.rmtree(old, ignore_errors=True)
