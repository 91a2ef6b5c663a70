"""Files on disk: atomic writes, the run directory layout, logs and bundles. Knows no models or images."""

from roadwork_cli.io.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from roadwork_cli.io.run import RunDir

__all__ = ["RunDir", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "read_json"]
