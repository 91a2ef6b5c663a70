"""Near-duplicate images: a perceptual hash per image and clusters of images whose hashes are close.

Exact copies (same bytes) are folded by ``split`` through their sha256; this module finds the images that differ in
bytes but not in content: re-encodes, resizes, small crops, burst frames of a parked car. Such images share their
label and most of their score, so two of them in different splits are leakage, and several in val_calib are not
independent draws.

Two images are near-duplicates when two cheap fingerprints agree:

1. the DCT perceptual hash of the ``imagehash`` library (``imagehash.phash``, 64 bits: grey, resized to 32x32, 2-D
   DCT, the top-left 8x8 low-frequency coefficients compared with their median; photos longer than 512 px are
   box-reduced first, for speed) differs in at most ``data.near_duplicate_bits`` bits (default 8), and
2. their 8x8 colour thumbnails (box averages) differ by at most ``data.near_duplicate_max_difference`` grey levels
   on average (mean absolute difference over the 192 values, 0-255; default 8).

The hash finds candidates fast but is blind to colour and to what its median threshold discards: unrelated synthetic
scenes, which all share one perspective street, are within 8 bits for 1.8e-4 of pairs (198 of 1.1 M pairs over 1,500
scenes) and a uniform black frame hashes like a uniform white one. Their thumbnails differ by 10.5 grey levels or
more, while JPEG re-encodes (quality 30), 0.5x resizes and crops of up to 3 % of each side differ by at most 6.7.
Measured on synthetic scenes (tests/data/test_near_duplicates.py, figures in the README): every re-encode and resize
is found, most corner crops of 2-3 % per side, about a third of those of 5 % per side (a whole-image hash does not
follow big shifts); no two unrelated scenes of 1,500 are merged, one pair of the demo's 5,000.

Clusters are the connected components of the graph "near-duplicate" (union-find), so chains merge. Candidate pairs
come from multi-index hashing: with threshold t the 64 bits are cut into t + 1 chunks, and two hashes within t bits
agree exactly on at least one chunk (pigeonhole), so only hashes sharing a chunk value are compared: about
``(t + 1) * n**2 / 2**(64 / (t + 1))`` distance evaluations in numpy when the bits are independent: 100k images at
t = 8 took 4-7 s on a busy 2-core machine, 48 s when a quarter of the bits were the same in every hash. Images with
identical hashes are compared through their thumbnails with a few representatives ("leaders") each, so a flood of
blank frames costs one comparison per frame and leader.

Example:
    >>> from PIL import Image
    >>> phash, thumb = fingerprint(Image.new("RGB", (64, 48), (120, 80, 40)))
    >>> phash, len(thumb)
    ('8000000000000000', 256)
    >>> find_clusters({"a": 0x0F0F, "b": 0x0F0E, "c": 0xFFFF_0000_0000_0000}, 2)
    {'a': 'a', 'b': 'a'}
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np

HASH_BITS = 64
DEFAULT_THRESHOLD_BITS = 8
DEFAULT_MAX_DIFFERENCE = 8.0
THUMBNAIL_SIDE = 8
_PREREDUCE_TO = 256  # images longer than twice this are box-reduced to 256..511 px before hashing
_BLOCK_ELEMENTS = 1 << 22  # distance evaluations per numpy block: ~32 MB of uint64, whatever the bucket size


def _reduced(image):
    longest = max(image.size)
    if longest > 2 * _PREREDUCE_TO:
        # Box-reduce big photos first: the fingerprints look at 32x32 at most, and LANCZOS over a 12 MP image costs as
        # much as decoding it (0.17 s); the box average keeps what a 32x32 thumbnail shows.
        return image.reduce(longest // _PREREDUCE_TO)
    return image


def perceptual_hash(image) -> str:
    """The 64-bit DCT perceptual hash of a decoded image, as 16 hex digits.

    Args:
        image: A decoded ``PIL.Image`` (any mode; it is converted to grey by the hash).

    Returns:
        16 lower-case hex digits (``imagehash``'s own string form, so it can be compared with its tools).
    """
    import imagehash

    return str(imagehash.phash(_reduced(image), hash_size=8))


def fingerprint(image) -> tuple[str, str]:
    """The perceptual hash (16 hex digits) and the 8x8 RGB box thumbnail (base64 of 192 bytes) of a decoded image."""
    from PIL import Image

    small = _reduced(image)
    thumb = small.convert("RGB").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BOX)
    return perceptual_hash(small), base64.b64encode(thumb.tobytes()).decode("ascii")


def thumbnail_values(text: str) -> np.ndarray:
    """The 192 thumbnail values (float32, 0-255) of a base64 thumbnail from :func:`fingerprint`."""
    return np.frombuffer(base64.b64decode(text), dtype=np.uint8).astype(np.float32)


def hash_value(hex_hash: str) -> int:
    """The integer of a 16-hex-digit hash."""
    return int(hex_hash, 16)


def hamming(a: int, b: int) -> int:
    """Number of differing bits of two hashes."""
    return bin(a ^ b).count("1")


_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount_by_table(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 through a byte table (numpy < 2 has no ``bitwise_count``)."""
    as_bytes = np.ascontiguousarray(values).reshape(*values.shape, 1).view(np.uint8)
    return _BYTE_POPCOUNT[as_bytes].sum(axis=-1, dtype=np.uint8)


def _popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    return _popcount_by_table(values)


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression keeps later finds short
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def _chunks(threshold: int) -> list[tuple[int, int]]:
    """``(shift, width)`` of the ``threshold + 1`` bit chunks that tile the 64-bit hash (widths differ by <= 1)."""
    count = min(threshold + 1, HASH_BITS)
    widths = [HASH_BITS // count + (1 if i < HASH_BITS % count else 0) for i in range(count)]
    shifts = [sum(widths[:i]) for i in range(count)]
    return list(zip(shifts, widths, strict=True))


def close_pairs(hashes: np.ndarray, threshold: int) -> Iterable[tuple[int, int]]:
    """Index pairs ``(i, j)``, i < j, of distinct hashes at Hamming distance <= ``threshold`` (a pair may repeat).

    Args:
        hashes: uint64 array of unique hash values.
        threshold: Largest distance in bits (0..63).
    """
    n = len(hashes)
    if n < 2 or threshold < 1:
        return
    for shift, width in _chunks(threshold):
        keys = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], n]
        for start, end in zip(starts, ends, strict=True):
            if end - start < 2:
                continue
            members = order[start:end]
            values = hashes[members]
            block_rows = max(1, _BLOCK_ELEMENTS // len(members))
            for top in range(0, len(members), block_rows):
                block = values[top : top + block_rows]
                hits = _popcount(block[:, None] ^ values[None, :]) <= threshold
                # Hashes are unique, so each row hits itself once: most blocks hold nothing else, and counting is
                # several times cheaper than listing the hits.
                if np.count_nonzero(hits) <= len(block):
                    continue
                hit_rows, hit_cols = np.nonzero(hits)
                first, second = members[top + hit_rows], members[hit_cols]
                keep = first < second
                yield from zip(first[keep].tolist(), second[keep].tolist(), strict=True)


def find_clusters(
    hashes: Mapping[str, int],
    threshold: int,
    thumbnails: Mapping[str, str | None] | None = None,
    max_difference: float = DEFAULT_MAX_DIFFERENCE,
) -> dict[str, str]:
    """Near-duplicate clusters: connected components of "hashes within ``threshold`` bits and thumbnails alike".

    Args:
        hashes: Sample id -> 64-bit hash value.
        threshold: Largest Hamming distance in bits; 0 means identical hashes only.
        thumbnails: Sample id -> base64 thumbnail from :func:`fingerprint`; a pair is confirmed when the mean absolute
            difference of their thumbnails is at most ``max_difference``. None (or a sample without one): the hash
            alone decides.
        max_difference: Largest mean absolute thumbnail difference (grey levels, 0-255).

    Returns:
        Sample id -> cluster id, for the members of clusters of two or more images only; the cluster id is the
        smallest sample id of the cluster, so it depends on the members alone (not on reading order).
    """
    ids = sorted(hashes)
    if len(ids) < 2:
        return {}
    values = np.array([hashes[i] for i in ids], dtype=np.uint64)
    thumbs = [thumbnails.get(i) if thumbnails is not None else None for i in ids]
    arrays = [thumbnail_values(t) if t is not None else None for t in thumbs]
    unique, inverse = np.unique(values, return_inverse=True)
    union = _UnionFind(len(ids))

    def alike(i: int, j: int) -> bool:
        if arrays[i] is None or arrays[j] is None:
            return True
        return float(np.abs(arrays[i] - arrays[j]).mean()) <= max_difference

    # Samples of one hash value: each joins every leader it resembles, or becomes a leader (in id order, so the
    # result is deterministic); exact for the usual one or two images per value, linear for floods of blank frames.
    leaders: list[list[int]] = [[] for _ in range(len(unique))]
    for i, u in enumerate(inverse.ravel().tolist()):
        matched = [leader for leader in leaders[u] if alike(leader, i)]
        for leader in matched:
            union.union(leader, i)
        if not matched:
            leaders[u].append(i)
    for a, b in close_pairs(unique, threshold):
        for i in leaders[a]:
            for j in leaders[b]:
                if alike(i, j):
                    union.union(i, j)
    roots = [union.find(i) for i in range(len(ids))]
    size = Counter(roots)
    cluster_of_root: dict[int, str] = {}
    for sample_id, root in zip(ids, roots, strict=True):  # ids are sorted: the first member seen is the smallest
        if size[root] > 1:
            cluster_of_root.setdefault(root, sample_id)
    return {sample_id: cluster_of_root[root] for sample_id, root in zip(ids, roots, strict=True) if size[root] > 1}


def summarize(
    clusters: Mapping[str, str],
    split_of: Mapping[str, str],
    split_names: Iterable[str],
    threshold: int,
    max_difference: float = DEFAULT_MAX_DIFFERENCE,
    labels: Mapping[str, int] | None = None,
):
    """The near-duplicate report of ``split`` and ``splits.json``.

    Args:
        clusters: Sample id -> cluster id (members of clusters of two or more only), from :func:`find_clusters`.
        split_of: Sample id -> split name.
        split_names: Splits in report order.
        threshold: The Hamming threshold used.
        max_difference: The thumbnail difference used.
        labels: Sample id -> label; when given, ``mixed_labels`` counts clusters whose images disagree.

    Returns:
        ``{"threshold_bits", "max_difference", "clusters", "images", "largest", "per_split": {split: {"clusters",
        "images"}}, "across_splits", "split_pairs": {"a/b": clusters with members in both}[, "mixed_labels"]}``. In
        ``per_split`` a cluster counts for a split when two or more of its images are in it (near-duplicates inside
        that split); ``images`` counts those images. ``across_splits`` counts clusters with members in more than one
        split: leakage. A near-duplicate labelled both ways is a labelling error or a cluster that should not be one.
    """
    names = list(split_names)
    members: dict[str, list[str]] = {}
    for sample_id, cluster in clusters.items():
        members.setdefault(cluster, []).append(sample_id)
    per_split = {name: {"clusters": 0, "images": 0} for name in names}
    pairs: Counter = Counter()
    across = 0
    for ids in members.values():
        counts = Counter(split_of[i] for i in ids if i in split_of)
        for name, count in counts.items():
            if count > 1:
                per_split[name]["clusters"] += 1
                per_split[name]["images"] += count
        present = [name for name in names if counts.get(name)]
        if len(present) > 1:
            across += 1
            for a in range(len(present)):
                for b in range(a + 1, len(present)):
                    pairs[f"{present[a]}/{present[b]}"] += 1
    report = {
        "threshold_bits": threshold,
        "max_difference": max_difference,
        "clusters": len(members),
        "images": len(clusters),
        "largest": max((len(ids) for ids in members.values()), default=0),
        "per_split": per_split,
        "across_splits": across,
        "split_pairs": {key: pairs[key] for key in sorted(pairs, key=lambda k: [names.index(p) for p in k.split("/")])},
    }
    if labels is not None:
        report["mixed_labels"] = sum(len({labels[i] for i in ids}) > 1 for ids in members.values())
    return report
