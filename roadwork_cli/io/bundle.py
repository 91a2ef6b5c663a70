"""The deployment bundle on disk: a plain tar with a checksummed manifest. Knows no models or images.

A bundle is ``manifest.json`` plus members. The manifest records the format version, the versions of the software
that wrote it and, for every other member, its sha256 and size. Readers verify *everything* before any member is
used: member names (no absolute paths, no ``..``, no links, devices or fifos), that the member set equals the
manifest's, and every checksum. A single flipped byte or a smuggled ``../evil`` member makes the whole bundle
unusable, with an error naming the member.

Example:
    >>> write_bundle("b.tar", {"model.json": b"{}"}, versions={"python": "3.11"})  # doctest: +SKIP
    >>> read_bundle("b.tar").members["model.json"]  # doctest: +SKIP
    b'{}'
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from roadwork_cli.errors import BundleError
from roadwork_cli.io.atomic import atomic_path, dumps_json
from roadwork_cli.version import __version__

BUNDLE_FORMAT_VERSION = 1
"""Newest bundle format this code reads and the one it writes."""

MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class MemberInfo:
    """One manifest entry."""

    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of a bundle.

    Attributes:
        format_version: Bundle format (``BUNDLE_FORMAT_VERSION`` when written by this code).
        roadwork_version: Version of roadwork that wrote the bundle.
        versions: Software versions the writer passed in (python, torch, timm, ...).
        created: ISO-8601 UTC time of writing.
        members: Name -> sha256 and size of every member except the manifest itself.
        extras: JSON facts the writer attached (e.g. ``onnx``: how the ONNX graph was verified at export); written
            only when non-empty.
    """

    format_version: int
    roadwork_version: str
    versions: dict[str, str]
    created: str
    members: dict[str, MemberInfo]
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "format_version": self.format_version,
            "roadwork_version": self.roadwork_version,
            "versions": dict(self.versions),
            "created": self.created,
            "members": {name: {"sha256": m.sha256, "size": m.size} for name, m in sorted(self.members.items())},
        }
        if self.extras:
            data["extras"] = json.loads(json.dumps(self.extras))
        return data


@dataclass
class BundleContents:
    """A verified bundle read into memory."""

    manifest: Manifest
    members: dict[str, bytes] = field(default_factory=dict)

    def json(self, name: str) -> Any:
        """Parse a JSON member; a missing member or bad JSON is a BundleError naming it."""
        if name not in self.members:
            raise BundleError(f"Bundle has no member {name!r}.")
        try:
            return json.loads(self.members[name].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"Bundle member {name!r} is not valid JSON: {exc}") from None


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_member_name(name: str) -> str:
    """Return ``name`` if it is a safe relative POSIX path inside the bundle, else raise BundleError.

    Refuses empty names, absolute paths (``/x``, ``C:\\x``, ``\\\\host``), backslashes, ``..`` and ``.`` parts.
    """
    if not name or "\x00" in name:
        raise BundleError(f"Bundle member {name!r} has an empty or invalid name.")
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"Bundle member {name!r} has an absolute or non-POSIX path; refused.")
    parts = PurePosixPath(name).parts
    if any(part in ("..", ".", "") for part in parts) or name.endswith("/"):
        raise BundleError(f"Bundle member {name!r} contains '..' or '.' path parts; refused.")
    return name


def write_bundle(
    path: str | os.PathLike[str],
    members: Mapping[str, bytes | str | os.PathLike[str]],
    versions: Mapping[str, str] | None = None,
    created: datetime | None = None,
    extras: Mapping[str, Any] | None = None,
) -> Path:
    """Write a bundle atomically: ``manifest.json`` first, then ``members`` in sorted order.

    Args:
        path: Target tar file; replaced atomically (a reader never sees a half-written bundle).
        members: Member name -> content, either bytes or a path of a file to copy in.
        versions: Software versions to record (python, torch, timm, ...).
        created: Creation time to record (default: now, UTC).
        extras: JSON-able facts to record in the manifest beside the checksums (``Manifest.extras``).

    Returns:
        The bundle path.
    """
    entries: dict[str, tuple[MemberInfo, bytes | Path]] = {}
    for name, content in members.items():
        check_member_name(name)
        if name == MANIFEST_NAME:
            raise BundleError(f"{MANIFEST_NAME!r} is written by write_bundle itself; do not pass it as a member.")
        if isinstance(content, bytes):
            entries[name] = (MemberInfo(_sha256_bytes(content), len(content)), content)
        else:
            file = Path(content)
            digest = hashlib.sha256()
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(_CHUNK), b""):
                    digest.update(chunk)
            entries[name] = (MemberInfo(digest.hexdigest(), file.stat().st_size), file)
    when = (created or datetime.now(timezone.utc)).astimezone(timezone.utc)
    manifest = Manifest(
        format_version=BUNDLE_FORMAT_VERSION,
        roadwork_version=__version__,
        versions={str(k): str(v) for k, v in (versions or {}).items()},
        created=when.isoformat(timespec="seconds"),
        members={name: info for name, (info, _) in entries.items()},
        extras=json.loads(json.dumps(dict(extras or {}), allow_nan=False)),  # JSON now, not at a reader
    )
    manifest_bytes = dumps_json(manifest.to_dict()).encode("utf-8")
    mtime = int(when.timestamp())

    def _info(name: str, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.type = size, mtime, 0o644, tarfile.REGTYPE
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_info(MANIFEST_NAME, len(manifest_bytes)), io.BytesIO(manifest_bytes))
            for name in sorted(entries):
                info, content = entries[name]
                if isinstance(content, bytes):
                    tar.addfile(_info(name, info.size), io.BytesIO(content))
                else:
                    with open(content, "rb") as handle:
                        tar.addfile(_info(name, info.size), handle)
    return Path(path)


def _parse_manifest(data: bytes) -> Manifest:
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"Bundle member {MANIFEST_NAME!r} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise BundleError(f"Bundle member {MANIFEST_NAME!r} must hold a JSON object.")
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"Bundle member {MANIFEST_NAME!r} has no integer format_version (got {version!r}).")
    if version > BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"Bundle format version {version} is newer than the supported version {BUNDLE_FORMAT_VERSION}; "
            "upgrade roadwork to read it."
        )
    if version < 1:
        raise BundleError(f"Bundle format version {version} is invalid (supported: 1..{BUNDLE_FORMAT_VERSION}).")
    members_raw = raw.get("members")
    if not isinstance(members_raw, dict):
        raise BundleError(f"Bundle member {MANIFEST_NAME!r} has no 'members' object.")
    members: dict[str, MemberInfo] = {}
    for name, entry in members_raw.items():
        check_member_name(name)
        if name == MANIFEST_NAME:
            raise BundleError(f"{MANIFEST_NAME!r} must not list itself as a member.")
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        size = entry.get("size") if isinstance(entry, dict) else None
        if not isinstance(sha, str) or len(sha) != 64 or not isinstance(size, int) or size < 0:
            raise BundleError(f"Manifest entry of bundle member {name!r} needs a sha256 hex string and a size.")
        members[name] = MemberInfo(sha.lower(), size)
    versions = raw.get("versions") or {}
    extras = raw.get("extras") or {}
    if not isinstance(extras, dict):
        raise BundleError(f"Bundle member {MANIFEST_NAME!r} has 'extras' that are not a JSON object.")
    return Manifest(
        format_version=version,
        roadwork_version=str(raw.get("roadwork_version", "unknown")),
        versions={str(k): str(v) for k, v in versions.items()} if isinstance(versions, dict) else {},
        created=str(raw.get("created", "")),
        members=members,
        extras=extras,
    )


def _check_tar_member(info: tarfile.TarInfo) -> None:
    check_member_name(info.name)
    if info.issym() or info.islnk():
        raise BundleError(f"Bundle member {info.name!r} is a link; refused.")
    if not info.isreg():
        raise BundleError(f"Bundle member {info.name!r} is not a regular file (device, fifo or folder); refused.")


def _open_tar(path: Path) -> tarfile.TarFile:
    if not path.is_file():
        raise BundleError(f"Bundle {path} does not exist or is not a file.")
    try:
        return tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(f"Bundle {path} is not a readable tar file: {exc}") from None


def _scan(tar: tarfile.TarFile, path: Path) -> tuple[Manifest, dict[str, tarfile.TarInfo]]:
    """Check every tar header and the manifest; the member set must equal the manifest's."""
    try:
        infos = tar.getmembers()
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(f"Bundle {path} is a damaged tar file: {exc}") from None
    by_name: dict[str, tarfile.TarInfo] = {}
    for info in infos:
        _check_tar_member(info)
        if info.name in by_name:
            raise BundleError(f"Bundle member {info.name!r} appears twice; refused.")
        by_name[info.name] = info
    manifest_info = by_name.pop(MANIFEST_NAME, None)
    if manifest_info is None:
        raise BundleError(f"Bundle {path} has no {MANIFEST_NAME}; it was not written by `roadwork export`.")
    if manifest_info.size > MAX_MANIFEST_BYTES:
        raise BundleError(f"Bundle member {MANIFEST_NAME!r} is implausibly large ({manifest_info.size} bytes).")
    manifest = _parse_manifest(_read_member(tar, manifest_info))
    for name in by_name:
        if name not in manifest.members:
            raise BundleError(f"Bundle member {name!r} is not listed in the manifest; refused.")
    for name, entry in manifest.members.items():
        if name not in by_name:
            raise BundleError(f"Bundle member {name!r} is listed in the manifest but missing from the bundle.")
        if by_name[name].size != entry.size:
            raise BundleError(
                f"Bundle member {name!r} has {by_name[name].size} bytes but the manifest says {entry.size}."
            )
    return manifest, by_name


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(info)
    if handle is None:
        raise BundleError(f"Bundle member {info.name!r} cannot be read.")
    try:
        return handle.read()
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(f"Bundle member {info.name!r} cannot be read: {exc}") from None


def _check_digest(name: str, data: bytes, entry: MemberInfo) -> None:
    if len(data) != entry.size:
        raise BundleError(f"Bundle member {name!r} has {len(data)} bytes but the manifest says {entry.size}.")
    if _sha256_bytes(data) != entry.sha256:
        raise BundleError(f"Bundle member {name!r} fails its sha256 check: the bundle is corrupt or was altered.")


def read_bundle(path: str | os.PathLike[str]) -> BundleContents:
    """Verify a bundle completely and return its members in memory.

    Raises:
        BundleError: Unsafe or unlisted member, missing member, size or sha256 mismatch, or a newer format version.
    """
    bundle = Path(path)
    with _open_tar(bundle) as tar:
        manifest, infos = _scan(tar, bundle)
        contents = BundleContents(manifest=manifest)
        for name, info in infos.items():
            data = _read_member(tar, info)
            _check_digest(name, data, manifest.members[name])
            contents.members[name] = data
    return contents


def verify_bundle(path: str | os.PathLike[str]) -> Manifest:
    """Check a bundle without keeping its members (streamed hashing); return the manifest."""
    bundle = Path(path)
    with _open_tar(bundle) as tar:
        manifest, infos = _scan(tar, bundle)
        for name, info in infos.items():
            handle = tar.extractfile(info)
            if handle is None:
                raise BundleError(f"Bundle member {name!r} cannot be read.")
            digest, size = hashlib.sha256(), 0
            for chunk in iter(lambda h=handle: h.read(_CHUNK), b""):
                digest.update(chunk)
                size += len(chunk)
            entry = manifest.members[name]
            if size != entry.size or digest.hexdigest() != entry.sha256:
                raise BundleError(
                    f"Bundle member {name!r} fails its sha256 check: the bundle is corrupt or was altered."
                )
    return manifest
