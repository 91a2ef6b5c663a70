"""Near-duplicate images: a perceptual hash per image and clusters of images whose hashes are close.

Exact copies (same bytes) are folded by ``split`` through their sha256; this module finds the images that differ in
bytes but not in content: re-encodes, resizes, small crops, burst frames of a parked car. Such images share their
label and most of their score, so two of them in different splits are leakage, and several in val_calib are not
independent draws.

The hash is the DCT perceptual hash of the ``imagehash`` library (``imagehash.phash``, 64 bits): grey, resized to
32x32 (photos longer than 512 px are box-reduced first, for speed), 2-D DCT, the top-left 8x8 low-frequency
coefficients compared with their median. Every hash has (almost) exactly 32 bits set, so distances are even.
Measured on 300 synthetic scenes (tests/data/test_near_duplicates.py and the README): JPEG re-encodes (quality 95,
60, 30) and 0.5x resizes move at most 4 bits; a centred crop of 5 % of the area (2.5 % of each side) stays within 6
bits for 99 % of scenes, a corner crop of 2 % of each side for 92 %, a corner crop of 5 % of each side for only 16 %
(a whole-image hash does not follow large shifts). Unrelated synthetic scenes -- all the same perspective street, a
hard case -- are within 6 bits for 0 to 4.5e-5 of pairs (2.6e-5 over 1,500 scenes), natural-looking random images
are at least 16 bits apart.

Clusters are the connected components of the graph "Hamming distance <= threshold" (union-find), so chains merge.
Candidate pairs come from multi-index hashing: with threshold t the 64 bits are cut into t + 1 chunks, and two hashes
within t bits agree exactly on at least one chunk (pigeonhole), so only hashes sharing a chunk value are compared.
Identical hashes are merged first, so a flood of blank frames costs one comparison. The work is about
``(t + 1) * n**2 / 2**(64 / (t + 1))`` distance evaluations in numpy: at 100k images and t = 6 about 7e7, seconds.

Example:
    >>> from PIL import Image
    >>> perceptual_hash(Image.new("RGB", (64, 48), (120, 80, 40)))
    '8000000000000000'
    >>> find_clusters({"a": 0x0F0F, "b": 0x0F0E, "c": 0xFFFF_0000_0000_0000}, 2)
    {'a': 'a', 'b': 'a'}
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np

HASH_BITS = 64
DEFAULT_THRESHOLD_BITS = 6
_PREREDUCE_TO = 256  # images longer than twice this are box-reduced to 256..511 px before hashing
_BLOCK_ELEMENTS = 1 << 22  # distance evaluations per numpy block: ~32 MB of uint64, whatever the bucket size


def perceptual_hash(image) -> str:
    """The 64-bit DCT perceptual hash of a decoded image, as 16 hex digits.

    Args:
        image: A decoded ``PIL.Image`` (any mode; it is converted to grey by the hash).

    Returns:
        16 lower-case hex digits (``imagehash``'s own string form, so it can be compared with its tools).
    """
    import imagehash

    longest = max(image.size)
    if longest > 2 * _PREREDUCE_TO:
        # Box-reduce big photos first: the hash only looks at 32x32, and LANCZOS over a 12 MP image costs as much as
        # decoding it (0.17 s); the box average keeps what a 32x32 thumbnail shows.
        image = image.reduce(longest // _PREREDUCE_TO)
    return str(imagehash.phash(image, hash_size=8))


def hash_value(hex_hash: str) -> int:
    """The integer of a 16-hex-digit hash."""
    return int(hex_hash, 16)


def hamming(a: int, b: int) -> int:
    """Number of differing bits of two hashes."""
    return bin(a ^ b).count("1")


_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy >= 2 has it built in; a byte table otherwise)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    as_bytes = values.reshape(*values.shape, 1).view(np.uint8)
    return _BYTE_POPCOUNT[as_bytes].sum(axis=-1, dtype=np.uint8)


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
            rows = max(1, _BLOCK_ELEMENTS // len(members))
            for top in range(0, len(members), rows):
                block = values[top : top + rows]
                distance = _popcount(block[:, None] ^ values[None, :])
                for a, b in zip(*np.nonzero(distance <= threshold), strict=True):
                    i, j = int(members[top + a]), int(members[b])
                    if i < j:
                        yield i, j


def find_clusters(hashes: Mapping[str, int], threshold: int) -> dict[str, str]:
    """Near-duplicate clusters: connected components of "Hamming distance <= threshold".

    Args:
        hashes: Sample id -> 64-bit hash value.
        threshold: Largest distance in bits that makes two images near-duplicates; 0 merges identical hashes only.

    Returns:
        Sample id -> cluster id, for the members of clusters of two or more images only; the cluster id is the
        smallest sample id of the cluster, so it depends on the members alone (not on reading order).
    """
    ids = sorted(hashes)
    if len(ids) < 2:
        return {}
    values = np.array([hashes[i] for i in ids], dtype=np.uint64)
    unique, inverse = np.unique(values, return_inverse=True)
    union = _UnionFind(len(unique))
    for i, j in close_pairs(unique, threshold):
        union.union(i, j)
    roots = [union.find(int(u)) for u in inverse.ravel()]
    size = Counter(roots)
    cluster_of_root: dict[int, str] = {}
    for sample_id, root in zip(ids, roots, strict=True):  # ids are sorted: the first member seen is the smallest
        if size[root] > 1:
            cluster_of_root.setdefault(root, sample_id)
    return {sample_id: cluster_of_root[root] for sample_id, root in zip(ids, roots, strict=True) if size[root] > 1}


def summarize(clusters: Mapping[str, str], split_of: Mapping[str, str], split_names: Iterable[str], threshold: int):
    """The near-duplicate report of ``split`` and ``splits.json``.

    Args:
        clusters: Sample id -> cluster id (members of clusters of two or more only), from :func:`find_clusters`.
        split_of: Sample id -> split name.
        split_names: Splits in report order.
        threshold: The Hamming threshold used.

    Returns:
        ``{"threshold_bits", "clusters", "images", "largest", "per_split": {split: {"clusters", "images"}},
        "across_splits", "split_pairs": {"a/b": clusters with members in both}}``. In ``per_split`` a cluster counts
        for a split when two or more of its images are in it (near-duplicates inside that split); ``images`` counts
        those images. ``across_splits`` counts clusters with members in more than one split: leakage.
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
    return {
        "threshold_bits": threshold,
        "clusters": len(members),
        "images": len(clusters),
        "largest": max((len(ids) for ids in members.values()), default=0),
        "per_split": per_split,
        "across_splits": across,
        "split_pairs": {key: pairs[key] for key in sorted(pairs, key=lambda k: [names.index(p) for p in k.split("/")])},
    }
