"""Data layer: sources (readers), safe image decoding, leakage-free splits, synthetic scenes, transforms.

Import the submodules directly (``roadwork_cli.data.images``, ``.sources``, ``.splits``, ``.synthetic``); this package
imports nothing so that the torch-free modules stay torch-free (``transforms`` needs torch).
"""
