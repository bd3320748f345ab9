"""`idlewire-agent consume-stamp`: apply the unit stamp `idlewire stamp` left on the boot partition.

Run at every boot by idlewire-firstboot (roles/base), before sshd. When BOOT/idlewire/stamp.toml
exists it is checked with the same schema the host stamped it with (schema.STAMP), then:

  1. node key, unit settings, SSH keys, hostname, Wi-Fi and the PPPoE login go into the root
     filesystem (/etc/idlewire 0700 with node.key 0600, /etc/idlewire/unit.toml, the admin's
     authorized_keys, /etc/hostname, wpa_supplicant + systemd-networkd for Wi-Fi,
     /etc/idlewire/pppoe.conf 0600), each file written under a
     temporary name, synced and renamed;
  2. only then the secrets on the FAT partition (node.key, stamp.toml: it holds the Wi-Fi key
     and the PPPoE password)
     are overwritten with zeros in place, synced and deleted, and BOOT/idlewire/stamp.done
     records the unit and its public key (no secrets).

A stamp with a bad value is refused whole: nothing is applied, one line says why (the journal),
its secrets are erased all the same, and BOOT/idlewire/stamp.refused keeps the reason. An
interrupted run repeats on the next boot (every step can be done twice).
"""

from __future__ import annotations

import base64
import os
import pwd
import time
import tomllib

from . import keys, run, schema

BOOT_MOUNTS = ("/boot/firmware", "/boot/efi")
SECRET_FILES = ("node.key", "stamp.toml")
WIFI_IFACE = "wlan0"


class Refused(Exception):
    """A stamp that is not applied; str() is the one line that says why."""


def _log(msg: str) -> None:
    print(f"idlewire-stamp: {msg}", flush=True)


def boot_dir() -> str | None:
    """The mounted boot partition (mounted here if fstab lists it but it is not mounted yet)."""
    with open("/proc/self/mounts") as f:
        mounted = {line.split()[1] for line in f if len(line.split()) > 1}
    for m in BOOT_MOUNTS:
        if m in mounted:
            return m
    try:
        with open("/etc/fstab") as f:
            listed = [ln.split()[1] for ln in f if ln.strip() and not ln.startswith("#") and len(ln.split()) > 1]
    except OSError:
        return None
    for m in BOOT_MOUNTS:
        try:
            if m in listed and run.run(["mount", m], check=False, timeout=60).returncode == 0:
                return m
        except run.CommandError as exc:
            _log(str(exc))
    return None


def read_stamp(d: str) -> tuple[dict, bytes]:
    """(the stamp's values as the node applies them, the node key file) or Refused."""
    path = os.path.join(d, "stamp.toml")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        with open(os.path.join(d, "node.key"), "rb") as f:
            key = f.read()
    except OSError as exc:
        raise Refused(f"cannot read {exc.filename}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise Refused(f"stamp.toml: not UTF-8 text (byte 0x{raw[exc.start]:02x} at {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise Refused(f"stamp.toml: not valid TOML: {exc}") from None
    values, problems = schema.check_stamp(data)
    if problems:
        raise Refused("stamp.toml: " + "; ".join(problems))
    try:  # the agent's format: base64 of the 32 raw bytes of an ed25519 private key
        raw_key = base64.b64decode(key.strip(), validate=True)
    except ValueError:
        raw_key = b""
    if len(raw_key) != 32:
        raise Refused("node.key: expected base64 of a 32-byte ed25519 private key")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pub = keys.ed25519_public_b64(Ed25519PrivateKey.from_private_bytes(raw_key))
    if pub != values["node_public_key"]:
        raise Refused(f"node_public_key: expected the public key of node.key ({pub}), got "
                      f"{values['node_public_key']!r}")
    return values, key


def _write(path: str, text: str, mode: int, uid: int = 0, gid: int = 0) -> None:
    keys.write_atomic(path, text, mode)
    os.chown(path, uid, gid)


def unit_toml(values: dict) -> str:
    """/etc/idlewire/unit.toml: the stamp's part the agent reads (schema.UNIT), nothing else."""
    return schema.dump_toml({k: values[k] for k in schema.UNIT if k in values},
                            "written at first boot from the unit stamp (idlewire stamp)")


def apply(values: dict, key: bytes, root: str = "/", admin: str = "idlewire") -> None:
    live = os.path.realpath(root) == "/"

    def at(p: str) -> str:
        return os.path.join(root, p.lstrip("/"))

    etc = at("/etc/idlewire")
    os.makedirs(etc, mode=0o700, exist_ok=True)
    _write(f"{etc}/node.key", key.decode().strip() + "\n", 0o600)
    _write(f"{etc}/unit.toml", unit_toml(values), 0o644)

    ssh_keys = values.get("ssh_authorized_keys", [])
    if ssh_keys:
        pw = pwd.getpwnam(admin)
        home = at(pw.pw_dir)
        ssh = os.path.join(home, ".ssh")
        os.makedirs(ssh, mode=0o700, exist_ok=True)
        os.chown(ssh, pw.pw_uid, pw.pw_gid)
        ak = os.path.join(ssh, "authorized_keys")
        try:
            with open(ak) as f:
                old = f.read().splitlines()
        except FileNotFoundError:
            old = []
        new = old + [k for k in ssh_keys if k not in old]
        _write(ak, "\n".join(new) + "\n", 0o600, pw.pw_uid, pw.pw_gid)

    host = values["hostname"]
    _write(at("/etc/hostname"), host + "\n", 0o644)
    try:
        with open(at("/etc/hosts")) as f:
            hosts = [ln for ln in f.read().splitlines() if not ln.startswith("127.0.1.1")]
    except FileNotFoundError:
        hosts = ["127.0.0.1\tlocalhost"]
    _write(at("/etc/hosts"), "\n".join([*hosts, f"127.0.1.1\t{host}"]) + "\n", 0o644)
    if live:
        try:
            with open("/proc/sys/kernel/hostname", "w") as f:
                f.write(host)
        except OSError as exc:
            _log(f"could not set the running hostname: {exc.strerror}")

    wifi = values.get("wifi")
    if wifi:
        conf = ["ctrl_interface=DIR=/run/wpa_supplicant GROUP=netdev", "update_config=0",
                f"country={wifi['country']}", "", "network={",
                f"    ssid={wifi['ssid'].encode().hex()}",  # hex: any bytes, no quoting problems
                f"    psk={wifi['psk_hash']}", "    key_mgmt=WPA-PSK"]
        if wifi.get("hidden"):
            conf.append("    scan_ssid=1")
        conf.append("}")
        # The same network as an access point, for router mode (idlewire-hostapd runs it there, and
        # wpa_supplicant does not): WPA2-PSK from the derived key, and WPA3-SAE beside it when the
        # unit asked for it (wifi.wpa3: then the stamp carries the passphrase, which SAE needs).
        ap = ["interface=" + WIFI_IFACE, "bridge=br-lan", "driver=nl80211", f"country_code={wifi['country']}",
              "ieee80211d=1", "hw_mode=g", "channel=6", "ieee80211n=1", "wmm_enabled=1",
              f"ssid2={wifi['ssid'].encode().hex()}", "wpa=2", "rsn_pairwise=CCMP",
              f"wpa_psk={wifi['psk_hash']}", f"ignore_broadcast_ssid={1 if wifi.get('hidden') else 0}"]
        if wifi.get("sae_password"):  # WPA2/WPA3 transition: SAE needs management frame protection
            ap += ["wpa_key_mgmt=WPA-PSK SAE", f"sae_password={wifi['sae_password']}", "ieee80211w=1",
                   "sae_require_mfp=1"]
        else:
            ap.append("wpa_key_mgmt=WPA-PSK")
        os.makedirs(at("/etc/idlewire"), exist_ok=True)
        _write(at("/etc/idlewire/hostapd.conf"), "\n".join(ap) + "\n", 0o600)
        os.makedirs(at("/etc/wpa_supplicant"), exist_ok=True)
        _write(at(f"/etc/wpa_supplicant/wpa_supplicant-{WIFI_IFACE}.conf"), "\n".join(conf) + "\n", 0o600)
        os.makedirs(at("/etc/systemd/network"), exist_ok=True)
        _write(at("/etc/systemd/network/25-wireless.network"),
               f"[Match]\nName={WIFI_IFACE}\n\n[Network]\nDHCP=yes\nIPv6AcceptRA=yes\n", 0o644)
        service = "/lib/systemd/system/wpa_supplicant@.service"
        if os.path.exists(at(service)):
            wants = at("/etc/systemd/system/multi-user.target.wants")
            os.makedirs(wants, exist_ok=True)
            link = f"{wants}/wpa_supplicant@{WIFI_IFACE}.service"
            if not os.path.lexists(link):
                os.symlink(service, link)
            if live:
                try:
                    run.run(["systemctl", "--no-block", "start", f"wpa_supplicant@{WIFI_IFACE}.service"],
                            check=False, timeout=60)
                except run.CommandError as exc:
                    _log(str(exc))
        else:
            _log("Wi-Fi configured, but this image has no wpa_supplicant; it stays off")
    pppoe = values.get("pppoe")
    if pppoe:
        _write(at(schema.PPPOE_FILE), pppoe_conf(pppoe), 0o600)
    if live:
        os.sync()


def pppd_quote(text: str) -> str:
    """A word of a pppd options file: quoted, with `\\` and `"` escaped (pppd's getword reads
    backslash escapes inside quotes); schema.PPPOE_TEXT admits printable ASCII only."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pppoe_conf(pppoe: dict) -> str:
    """schema.PPPOE_FILE: the ISP's login as pppd options (read by /etc/ppp/peers/idlewire-wan)."""
    return ("# the ISP's PPPoE login, written at first boot from the unit stamp (idlewire stamp)\n"
            f"user {pppd_quote(pppoe['user'])}\npassword {pppd_quote(pppoe['password'])}\n")


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def erase(d: str) -> list[str]:
    """Zero the secret files where they lie on the FAT (same length, in place), then delete them."""
    gone = []
    for name in SECRET_FILES:
        path = os.path.join(d, name)
        if not os.path.lexists(path):
            continue
        if os.path.isfile(path) and not os.path.islink(path):
            size = os.path.getsize(path)
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"\0" * size)
                os.fsync(fd)
            finally:
                os.close(fd)
        os.unlink(path)
        gone.append(name)
    _fsync_dir(d)
    return gone


def _mark(d: str, name: str, fields: dict) -> None:
    """A marker on the FAT (no chmod there): written, synced, renamed."""
    text = schema.dump_toml(fields, f"idlewire: {name} at first boot; the stamp's secrets were erased "
                            "from this partition")
    tmp = os.path.join(d, f"{name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(d, name))
    _fsync_dir(d)


def consume(boot: str | None = None, root: str = "/", admin: str = "idlewire") -> int:
    """0: applied, or nothing to do; 2: the stamp was refused (secrets erased all the same)."""
    boot = boot or boot_dir()
    if boot is None:
        _log("no boot partition mounted at " + " or ".join(BOOT_MOUNTS) + "; nothing to consume")
        return 0
    d = os.path.join(boot, "idlewire")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if not os.path.lexists(os.path.join(d, "stamp.toml")):
        if os.path.lexists(os.path.join(d, "node.key")):  # a key without its stamp: never left behind
            erase(d)
            _log(f"{d}/node.key without stamp.toml: erased, nothing applied")
            return 2
        return 0
    try:
        values, key = read_stamp(d)
    except Refused as exc:
        erase(d)
        _mark(d, "stamp.refused", {"reason": str(exc), "refused_at": now})
        _log(f"{d}/stamp.toml refused, nothing applied, its secrets erased: {exc}")
        return 2
    try:
        apply(values, key, root, admin)
    except (OSError, KeyError) as exc:  # the system, not the stamp: left in place, tried again next boot
        why = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) else f"no user {admin!r}"
        _log(f"{d}/stamp.toml not applied yet ({why}); left in place for the next boot")
        return 1
    erase(d)
    _mark(d, "stamp.done", {"unit": values["unit"], "node_public_key": values["node_public_key"],
                            "consumed_at": now})
    _log(f"unit {values['unit']} ({values['hostname']}) applied; secrets erased from {d}")
    return 0
