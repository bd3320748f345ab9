"""The typed build configuration: a target (image/targets/*.yml) and a site file.

Loaded once, validated completely (every error names its file and field), then passed down to
the build stages as plain frozen dataclasses.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from idlewire_agent import schema

from .errors import UserError
from .paths import data_dir

TARGETS_DIR = data_dir() / "image" / "targets"
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*$")
_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


@dataclass(frozen=True)
class Partition:
    name: str
    filesystem: str  # vfat | ext4
    label: str
    mount: str  # where the node mounts it: /, /boot/firmware, /boot/efi
    size: int | None  # bytes; None: sized to its contents ("auto")


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    suite: str
    architecture: str
    mirror: str
    components: tuple[str, ...]
    packages: tuple[str, ...]
    initramfs_modules: tuple[str, ...]
    table: str  # gpt | dos
    partitions: tuple[Partition, ...]
    loader: str  # systemd-boot | raspi-firmware
    cmdline: str
    path: Path = field(compare=False)

    @property
    def root(self) -> Partition:
        return next(p for p in self.partitions if p.mount == "/")

    @property
    def boot(self) -> Partition:
        return next(p for p in self.partitions if p.mount != "/")

    def rootfs_inputs(self) -> dict[str, Any]:
        """What decides the content of the Debian root filesystem (the rootfs cache key)."""
        return {
            "suite": self.suite,
            "architecture": self.architecture,
            "mirror": self.mirror,
            "components": list(self.components),
            "packages": sorted(self.packages),
            "initramfs_modules": sorted(self.initramfs_modules),
        }


@dataclass(frozen=True)
class Site:
    hostname: str = "idlewire"
    ssh_authorized_keys: tuple[str, ...] = ()
    timezone: str = "Etc/UTC"
    mode: str = "node"  # how the node sits in the home (schema home.mode): playbooks' idlewire_mode
    vars: dict[str, Any] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)

    def inputs(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        return d


def digest(obj: Any) -> str:
    """A stable hash of JSON-able data: cache keys, derived UUIDs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def parse_size(value: Any, where: str) -> int:
    if isinstance(value, int) and value > 0:
        return value
    m = _SIZE_RE.match(str(value))
    if not m or int(m.group(1)) == 0:
        raise UserError(f"{where}: expected a size such as 256MiB or 2GiB, got {value!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _load_yaml(path: Path, expected: str = "a mapping of settings at the top level") -> dict[str, Any]:
    import yaml  # here, not at the top: `idlewire flash` reads no YAML unless given a unit (~8 ms)

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (some editors write one) is not content
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}{at}: not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected {expected}")
    return data


class _Fields:
    """Typed access to one YAML mapping that names file and field in every complaint."""

    def __init__(self, path: Path, data: dict[str, Any], prefix: str = ""):
        self.path, self.data, self.prefix = path, data, prefix

    def where(self, key: str) -> str:
        return f"{self.path}: field '{self.prefix}{key}'"

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., what: str = "") -> Any:
        if key not in self.data or self.data[key] is None:
            if default is ...:
                raise UserError(f"{self.where(key)} is missing; expected {what or _kind(kind)}")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _tuple(kind)):
            raise UserError(
                f"{self.where(key)}: expected {what or _kind(kind)}, got {type(value).__name__} {value!r}"
            )
        return value

    def strings(self, key: str, default: Any = ...) -> tuple[str, ...]:
        value = self.get(key, list, default, "a list of strings")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise UserError(f"{self.where(key)}[{i}]: expected a non-empty string, got {item!r}")
        return tuple(value)

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> str:
        value = self.get(key, str, default, f"one of {', '.join(choices)}")
        if value not in choices:
            raise UserError(f"{self.where(key)}: expected one of {', '.join(choices)}, got {value!r}")
        return value

    def unknown(self, known: set[str]) -> None:
        extra = sorted(set(self.data) - known)
        if extra:
            raise UserError(
                f"{self.where(extra[0])}: unknown setting; known ones are {', '.join(sorted(known))}"
            )


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "a whole number", list: "a list", dict: "a mapping", bool: "true or false"}
    return " or ".join(names.get(k, k.__name__) for k in _tuple(kind))


def available_targets() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.yml"))


def load_target(name_or_path: str) -> Target:
    """A target by name (image/targets/NAME.yml) or by the path of a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yml", ".yaml"):
        path = TARGETS_DIR / f"{name_or_path}.yml"
        if not path.exists():
            raise UserError(
                f"unknown target {name_or_path!r}; available: {', '.join(available_targets())} "
                f"(or give the path of a target .yml)"
            )
    f = _Fields(path, _load_yaml(path))
    f.unknown({"name", "description", "suite", "architecture", "mirror", "components", "packages",
               "initramfs_modules", "layout", "boot"})
    # Checked in the order a reader meets them in the file.
    name = f.get("name", str)
    description = f.get("description", str, "")
    suite = f.get("suite", str)
    architecture = f.choice("architecture", ("amd64", "arm64"))
    mirror = f.get("mirror", str, "http://deb.debian.org/debian")
    components = f.strings("components", ["main"])
    packages = f.strings("packages")
    initramfs_modules = f.strings("initramfs_modules", [])
    layout = _Fields(path, f.get("layout", dict), "layout.")
    layout.unknown({"table", "partitions"})
    raw_parts = layout.get("partitions", list, what="a list of partitions")
    parts = []
    for i, raw in enumerate(raw_parts):
        if not isinstance(raw, dict):
            raise UserError(f"{layout.where('partitions')}[{i}]: expected a mapping")
        pf = _Fields(path, raw, f"layout.partitions[{i}].")
        pf.unknown({"name", "filesystem", "label", "mount", "size"})
        size = pf.get("size", (str, int))
        parts.append(Partition(
            name=pf.get("name", str),
            filesystem=pf.choice("filesystem", ("vfat", "ext4")),
            label=pf.get("label", str),
            mount=pf.choice("mount", ("/", "/boot/firmware", "/boot/efi")),
            size=None if size == "auto" else parse_size(size, pf.where("size")),
        ))
    mounts = [p.mount for p in parts]
    if len(parts) != 2 or mounts.count("/") != 1 or parts[-1].mount != "/":
        raise UserError(
            f"{layout.where('partitions')}: expected two partitions, a boot partition "
            "(vfat, mount /boot/firmware or /boot/efi) followed by the root partition (ext4, mount /)"
        )
    if parts[0].filesystem != "vfat" or parts[1].filesystem != "ext4" or parts[0].size is None:
        raise UserError(
            f"{layout.where('partitions')}: the boot partition must be vfat with a fixed size "
            "and the root partition ext4"
        )
    boot = _Fields(path, f.get("boot", dict), "boot.")
    boot.unknown({"loader", "cmdline"})
    target = Target(
        name=name,
        description=description,
        suite=suite,
        architecture=architecture,
        mirror=mirror,
        components=components,
        packages=packages,
        initramfs_modules=initramfs_modules,
        table=layout.choice("table", ("gpt", "dos")),
        partitions=tuple(parts),
        loader=boot.choice("loader", ("systemd-boot", "raspi-firmware")),
        cmdline=boot.get("cmdline", str, ""),
        path=path,
    )
    if target.loader == "systemd-boot" and (target.table != "gpt" or parts[0].mount != "/boot/efi"):
        raise UserError(f"{boot.where('loader')}: systemd-boot needs layout.table gpt and an ESP at /boot/efi")
    return target


def _schema_check(f: _Fields, name: str, key, value, index: str = ""):
    """A value checked by its key in the agent's schema (the rule the node applies), one line."""
    try:
        return key.check_item(value) if index else key.check(value)
    except schema.Invalid as exc:
        raise UserError(f"{f.where(name)}{index}: expected {exc}, got {schema.shown(value)}") from None


def role_prefixes() -> set[str]:
    return {p.name for p in (data_dir() / "roles").iterdir() if p.is_dir()}


def load_site(path: Path | None) -> Site:
    """The site file: what one deployment sets (login keys, hostname, role variables)."""
    if path is None:
        return Site()
    f = _Fields(path, _load_yaml(path))
    f.unknown({"hostname", "ssh_authorized_keys", "timezone", "mode", "vars"})
    hostname = _schema_check(f, "hostname", schema.UNIT["hostname"], f.get("hostname", str, "idlewire"))
    keys = [_schema_check(f, "ssh_authorized_keys", schema.STAMP["ssh_authorized_keys"], key, f"[{i}]")
            for i, key in enumerate(f.strings("ssh_authorized_keys", []))]
    mode_key = schema.NODE["home"]["mode"]
    mode = _schema_check(f, "mode", mode_key, f.get("mode", str, mode_key.default))
    variables = f.get("vars", dict, {})
    prefixes = role_prefixes()
    for key in variables:
        if not isinstance(key, str) or key.split("_", 1)[0] not in prefixes:
            raise UserError(f"{f.where('vars')}: {key!r} is not a role variable; role variables "
                            f"start with a role name: {', '.join(sorted(p + '_' for p in prefixes))}")
    return Site(hostname=hostname, ssh_authorized_keys=tuple(keys),
                timezone=f.get("timezone", str, "Etc/UTC"), mode=mode, vars=dict(variables), path=path)
