"""Bundle writing and verification: checksums, unsafe members, format versions."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

from roadwork_cli.errors import BundleError
from roadwork_cli.io.bundle import (
    BUNDLE_FORMAT_VERSION,
    MANIFEST_NAME,
    read_bundle,
    verify_bundle,
    write_bundle,
)

MEMBERS = {"model.json": b'{"backbone": "tiny_vit"}', "weights.safetensors": bytes(range(256)) * 8}


def _manifest_for(members: dict[str, bytes], version: int = BUNDLE_FORMAT_VERSION) -> bytes:
    manifest = {
        "format_version": version,
        "roadwork_version": "0.1.0",
        "versions": {},
        "created": "2026-01-01T00:00:00+00:00",
        "members": {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in members.items()},
    }
    return json.dumps(manifest).encode()


def _hand_tar(path, entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> None:
    """Write a tar with exactly these entries (name/bytes pairs or raw TarInfo for links)."""
    with tarfile.open(path, "w") as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                name, data = entry
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_round_trip_records_versions_and_checksums(tmp_path):
    path = write_bundle(tmp_path / "b.tar", MEMBERS, versions={"python": "3.11", "torch": "2.x"})
    contents = read_bundle(path)
    assert contents.members == MEMBERS
    manifest = contents.manifest
    assert manifest.format_version == BUNDLE_FORMAT_VERSION
    assert manifest.versions == {"python": "3.11", "torch": "2.x"}
    assert manifest.members["weights.safetensors"].size == len(MEMBERS["weights.safetensors"])
    assert manifest.members["model.json"].sha256 == hashlib.sha256(MEMBERS["model.json"]).hexdigest()
    assert verify_bundle(path) == manifest


def test_members_can_come_from_files(tmp_path):
    src = tmp_path / "metrics.csv"
    src.write_bytes(b"epoch,loss\n1,0.5\n")
    path = write_bundle(tmp_path / "b.tar", {"metrics.csv": src})
    assert read_bundle(path).members["metrics.csv"] == src.read_bytes()


def test_one_flipped_byte_is_refused_naming_the_member(tmp_path):
    path = write_bundle(tmp_path / "b.tar", MEMBERS)
    raw = bytearray(path.read_bytes())
    payload = MEMBERS["weights.safetensors"]
    offset = bytes(raw).index(payload) + 100
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))
    for check in (read_bundle, verify_bundle):
        with pytest.raises(BundleError, match="weights.safetensors"):
            check(path)


def test_dotdot_member_is_refused(tmp_path):
    members = {"model.json": b"{}", "../evil": b"pwned"}
    path = tmp_path / "bad.tar"
    _hand_tar(path, [(MANIFEST_NAME, _manifest_for({"model.json": b"{}"})), *members.items()])
    for check in (read_bundle, verify_bundle):
        with pytest.raises(BundleError, match=r"\.\./evil"):
            check(path)


def test_dotdot_listed_in_manifest_is_refused_too(tmp_path):
    members = {"a/../../evil": b"pwned"}
    path = tmp_path / "bad.tar"
    _hand_tar(path, [(MANIFEST_NAME, _manifest_for(members)), *members.items()])
    with pytest.raises(BundleError, match="evil"):
        read_bundle(path)


def test_absolute_member_is_refused(tmp_path):
    target = tmp_path / "abs_evil"
    members = {str(target): b"pwned"}
    path = tmp_path / "bad.tar"
    _hand_tar(path, [(MANIFEST_NAME, _manifest_for({})), *members.items()])
    with pytest.raises(BundleError, match="absolute"):
        read_bundle(path)


def test_symlink_member_is_refused(tmp_path):
    link = tarfile.TarInfo("model.json")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    path = tmp_path / "bad.tar"
    _hand_tar(path, [(MANIFEST_NAME, _manifest_for({})), link])
    for check in (read_bundle, verify_bundle):
        with pytest.raises(BundleError, match="model.json.*link"):
            check(path)


def test_hardlink_and_fifo_members_are_refused(tmp_path):
    for kind, label in ((tarfile.LNKTYPE, "link"), (tarfile.FIFOTYPE, "regular file")):
        info = tarfile.TarInfo("x")
        info.type = kind
        info.linkname = "model.json" if kind == tarfile.LNKTYPE else ""
        path = tmp_path / f"bad{kind!r}.tar"
        _hand_tar(path, [(MANIFEST_NAME, _manifest_for({})), info])
        with pytest.raises(BundleError, match=label):
            verify_bundle(path)


def test_unlisted_and_missing_members_are_refused(tmp_path):
    path = tmp_path / "extra.tar"
    _hand_tar(path, [(MANIFEST_NAME, _manifest_for({"model.json": b"{}"})), ("model.json", b"{}"), ("x.py", b"1")])
    with pytest.raises(BundleError, match="'x.py' is not listed"):
        read_bundle(path)
    path = tmp_path / "missing.tar"
    _hand_tar(
        path, [(MANIFEST_NAME, _manifest_for({"model.json": b"{}", "scaling.json": b"{}"})), ("model.json", b"{}")]
    )
    with pytest.raises(BundleError, match="'scaling.json' is listed .* missing"):
        read_bundle(path)


def test_newer_format_version_is_refused_naming_both_versions(tmp_path):
    newer = BUNDLE_FORMAT_VERSION + 1
    path = tmp_path / "new.tar"
    _hand_tar(path, [(MANIFEST_NAME, _manifest_for({"model.json": b"{}"}, version=newer)), ("model.json", b"{}")])
    with pytest.raises(BundleError) as info:
        read_bundle(path)
    assert str(newer) in str(info.value) and str(BUNDLE_FORMAT_VERSION) in str(info.value)


def test_not_a_tar_and_no_manifest(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar file at all" * 10)
    with pytest.raises(BundleError):
        read_bundle(junk)
    path = tmp_path / "nomanifest.tar"
    _hand_tar(path, [("model.json", b"{}")])
    with pytest.raises(BundleError, match="manifest"):
        read_bundle(path)


def test_writer_refuses_unsafe_names(tmp_path):
    with pytest.raises(BundleError):
        write_bundle(tmp_path / "b.tar", {"../x": b""})
    with pytest.raises(BundleError):
        write_bundle(tmp_path / "b.tar", {MANIFEST_NAME: b"{}"})
    assert not (tmp_path / "b.tar").exists()


def test_manifest_extras_round_trip_and_stay_out_when_empty(tmp_path):
    extras = {"onnx": {"verification": {"max_abs_diff": 1.5e-7, "samples": 4}}}
    path = write_bundle(tmp_path / "b.tar", MEMBERS, extras=extras)
    manifest = read_bundle(path).manifest
    assert manifest.extras == extras and manifest.to_dict()["extras"] == extras
    assert verify_bundle(path) == manifest
    plain = write_bundle(tmp_path / "plain.tar", MEMBERS)
    assert "extras" not in read_bundle(plain).manifest.to_dict()
    with pytest.raises(ValueError):
        write_bundle(tmp_path / "nan.tar", MEMBERS, extras={"diff": float("nan")})  # not JSON: refused at writing
    bad = tmp_path / "bad.tar"
    manifest_bytes = json.loads(_manifest_for(MEMBERS)) | {"extras": [1, 2]}
    _hand_tar(bad, [(MANIFEST_NAME, json.dumps(manifest_bytes).encode()), *MEMBERS.items()])
    with pytest.raises(BundleError, match="extras"):
        read_bundle(bad)
