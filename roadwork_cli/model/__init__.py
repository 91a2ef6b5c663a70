"""Backbones (registry) and the three-output selective head."""
