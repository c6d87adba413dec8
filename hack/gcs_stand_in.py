"""gcp-storage-emulator, started with its files written atomically.

The emulator rewrites its whole metadata file (`.meta`) in place on every change. Killed in the
middle of that write (the soak's GCS restart does exactly this), it leaves the file empty or cut
and never starts again, where real Cloud Storage loses nothing. So the stand-in writes every file
(the metadata and the objects) under a temporary name and renames it over the old one;
everything else is the emulator's own code.
Arguments are the emulator's (`start --host ... --port ...`).
"""

import os
import sys

from gcp_storage_emulator import storage
from gcp_storage_emulator.__main__ import main

_write_bytes = storage._FileStore.write_bytes


def _write_bytes_atomically(self, rel: str, content: bytes) -> None:
    """On disk: the whole new file under a temporary name, then renamed over the old one."""
    if self._use_memory:
        return _write_bytes(self, rel, content)
    path = self._disk_path(rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(content)
    os.replace(temporary, path)


storage._FileStore.write_bytes = _write_bytes_atomically

if __name__ == "__main__":
    sys.exit(main())
