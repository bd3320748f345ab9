"""Identifiers of one image, derived from its inputs so that the same inputs give the same bits."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass

from ..config import digest

_NS = uuid.UUID("5b0c7e52-6f0a-4c1e-9d4e-1d1e0a1f6c11")


@dataclass(frozen=True)
class DiskIds:
    disk_id: str  # GPT disk GUID, or the 8-hex-digit DOS disk identifier
    boot_partuuid: str
    root_partuuid: str
    root_fs_uuid: str
    root_hash_seed: str
    boot_fs_serial: str  # FAT volume ID, 8 hex digits

    @property
    def boot_fs_uuid(self) -> str:
        """The FAT serial as blkid/fstab spell it: XXXX-XXXX."""
        return f"{self.boot_fs_serial[:4]}-{self.boot_fs_serial[4:]}".upper()

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def derive_ids(key: str, table: str) -> DiskIds:
    def u(name: str) -> str:
        return str(uuid.uuid5(_NS, f"{key}:{name}"))

    if table == "dos":
        disk = digest([key, "dos-disk-id"])[:8]
        boot, root = f"{disk}-01", f"{disk}-02"
    else:
        disk, boot, root = u("disk"), u("boot"), u("root")
    return DiskIds(
        disk_id=disk, boot_partuuid=boot, root_partuuid=root,
        root_fs_uuid=u("root-fs"), root_hash_seed=u("root-hash-seed"),
        boot_fs_serial=digest([key, "fat-serial"])[:8],
    )
