"""The GCS stand-in itself: its state survives the kills the soak inflicts on it."""

import json
import threading

from emulators import GcsEmulator, ensure_bucket


def test_the_gcs_stand_ins_metadata_is_never_seen_cut(tmp_path):
    """gcp-storage-emulator rewrites `.meta` on every change; written in place, a reader (or a
    restart after a kill) catches it empty or half-written now and then. The stand-in renames a
    whole new file over it, so every read parses."""
    with GcsEmulator(tmp_path / "gcs").start() as emulator:
        bucket = ensure_bucket(emulator.client("stand-in"), "meta-bucket")
        meta = tmp_path / "gcs" / ".cloudstorage" / ".meta"
        done = threading.Event()

        def upload():
            for number in range(150):
                bucket.blob(f"o/{number}").upload_from_string(b"x" * 100)
            done.set()
        writer = threading.Thread(target=upload)
        writer.start()
        reads = cut = 0
        while not done.is_set():
            try:
                json.loads(meta.read_bytes())
            except FileNotFoundError:
                continue
            except ValueError:
                cut += 1
            reads += 1
        writer.join()
        assert reads > 100, "the reader must have raced the writes"
        assert cut == 0, f"{cut} of {reads} reads found .meta cut"
        emulator.kill()
        emulator.start()
        assert len(list(emulator.client("stand-in").list_blobs("meta-bucket"))) == 150
