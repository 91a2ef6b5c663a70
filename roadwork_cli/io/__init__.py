"""Files and streams: atomic writes, the run directory, bundles, input expansion and output records, provenance and
progress bars. Knows no models or images."""

from roadwork_cli.io.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from roadwork_cli.io.run import RunDir

__all__ = ["RunDir", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "read_json"]
