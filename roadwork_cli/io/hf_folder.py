"""Read a Hugging Face export folder (``roadwork export --format hf``) back as verified bundle members.

The folder is what ``transformers`` loads as it is (``config.json``, ``model.safetensors`` with ``timm_model.`` keys,
``preprocessor_config.json``) plus what stage 1 needs beyond p: ``roadwork_meta.json`` (sha256 and size of every other
file, thresholds, certificate, fingerprint) and the bundle members under ``roadwork/`` (``model.json``, the head's
``model_best.safetensors``, ``scrc_params.json``, ``scaling.json``). Every listed file is checked against its recorded
sha256 before anything is used; the backbone's weights are cut out of ``model.safetensors`` (its ``timm_model.`` keys
without the folded classifier), torch-free, by rewriting the safetensors header.

Example:
    >>> contents = read_hf_folder("runs/demo/hf")  # doctest: +SKIP
    >>> sorted(contents.members)  # doctest: +SKIP
    ['backbone.safetensors', 'model.json', 'model_best.safetensors', 'scaling.json', 'scrc_params.json']
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from roadwork_cli.errors import BundleError
from roadwork_cli.io.bundle import BundleContents, Manifest, MemberInfo, check_member_name

__all__ = ["HF_META", "HF_META_FORMAT", "is_hf_folder", "read_hf_folder", "safetensors_subset"]

HF_META = "roadwork_meta.json"
HF_META_FORMAT = 1
MAX_META_BYTES = 16 * 1024 * 1024


def is_hf_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder written by ``roadwork export --format hf`` (it holds ``roadwork_meta.json``)."""
    return Path(path).is_dir() and (Path(path) / HF_META).is_file()


def safetensors_subset(data: bytes, rename: dict[str, str]) -> bytes:
    """A safetensors file holding only the tensors named in ``rename`` (old -> new name), bytes unchanged.

    Works on the header alone (8-byte length, JSON, data), so no tensor library is imported.

    Raises:
        BundleError: ``data`` is not a safetensors file, or a name to keep is missing.
    """
    try:
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise BundleError(f"Not a safetensors file: {exc}") from None
    body = data[8 + length :]
    missing = sorted(set(rename) - set(header))
    if missing:
        raise BundleError(f"The weights file lacks {len(missing)} tensors (e.g. {missing[:3]}).")
    out: dict[str, Any] = {}
    chunks: list[bytes] = []
    offset = 0
    for old in sorted(rename, key=lambda name: header[name]["data_offsets"][0]):
        entry = header[old]
        start, end = (int(v) for v in entry["data_offsets"])
        chunks.append(body[start:end])
        out[rename[old]] = {
            "dtype": entry["dtype"],
            "shape": entry["shape"],
            "data_offsets": [offset, offset + end - start],
        }
        offset += end - start
    encoded = json.dumps(out, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    return len(encoded).to_bytes(8, "little") + encoded + b"".join(chunks)


def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / HF_META
    if not path.is_file():
        raise BundleError(f"{folder} is a folder without {HF_META}: not written by `roadwork export --format hf`.")
    if path.stat().st_size > MAX_META_BYTES:
        raise BundleError(f"{path} is larger than {MAX_META_BYTES} bytes; refused.")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from None
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("files"), dict)
        or not isinstance(meta.get("members"), dict)
    ):
        raise BundleError(f"{path} lacks 'files' or 'members'; re-export with `roadwork export --format hf`.")
    if int(meta.get("format", 0)) > HF_META_FORMAT:
        raise BundleError(f"{path} format {meta.get('format')} is newer than the supported {HF_META_FORMAT}.")
    return meta


def read_hf_folder(path: str | os.PathLike[str]) -> BundleContents:
    """Verify an HF export folder (every listed file's size and sha256) and return its bundle members.

    Returns:
        ``BundleContents`` whose members are the ones a bundle.tar would hold (``model.json``,
        ``model_best.safetensors``, ``scrc_params.json``, ``scaling.json``) plus ``backbone.safetensors`` cut out of
        ``model.safetensors``; its manifest lists the folder's files with their checksums.

    Raises:
        BundleError: No or unreadable ``roadwork_meta.json``, a missing file, a file whose size or sha256 differs
            from the recorded one (tampered or truncated), or an unsafe file name.
    """
    folder = Path(path)
    meta = _read_meta(folder)
    files: dict[str, bytes] = {}
    infos: dict[str, MemberInfo] = {}
    for name, entry in sorted(meta["files"].items()):
        check_member_name(name)
        file = folder / name
        if not file.is_file():
            raise BundleError(f"{folder}: {name} is listed in {HF_META} but missing.")
        data = file.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != int(entry.get("size", -1)) or digest != entry.get("sha256"):
            raise BundleError(
                f"{folder}: {name} does not match its sha256 in {HF_META} (recorded {str(entry.get('sha256'))[:16]}…, "
                f"found {digest[:16]}…): the folder was changed after export. Re-export it with `roadwork export "
                "--format hf`, or use the run's bundle.tar."
            )
        files[name] = data
        infos[name] = MemberInfo(sha256=digest, size=len(data))
    members: dict[str, bytes] = {}
    for member, name in meta["members"].items():
        if name not in files:
            raise BundleError(f"{folder}: member {member!r} maps to {name!r}, which {HF_META} does not checksum.")
        members[member] = files[name]
    cut = meta.get("backbone_weights")
    if isinstance(cut, dict):
        source = str(cut.get("file"))
        if source not in files:
            raise BundleError(f"{folder}: the backbone weights file {source!r} is not checksummed in {HF_META}.")
        prefix = str(cut.get("prefix", ""))
        keys = [str(k) for k in cut.get("keys") or []]
        members[str(cut.get("member"))] = safetensors_subset(files[source], {prefix + k: k for k in keys})
    manifest = Manifest(
        format_version=int(meta.get("format", HF_META_FORMAT)),
        roadwork_version=str(meta.get("roadwork_version", "")),
        versions=dict(meta.get("versions") or {}),
        created=str(meta.get("created", "")),
        members=infos,
        extras={"hf_folder": str(folder)},
    )
    return BundleContents(manifest=manifest, members=members)
