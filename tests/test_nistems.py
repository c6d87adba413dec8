"""The NI Stems writer and the MP4 box editor it relies on, read back by FFmpeg's demuxer (PyAV)
and by mutagen's MP4 parser."""

import struct

import av
import numpy as np
import pytest
from ni_reader import box_and_flags, check_ni_stems, decode
from synthetic import music, write_audio

from job.audio import mp4box
from job.audio.nistems import NiStemsWriter, metadata


def test_five_tracks_aligned_with_their_sources_and_the_metadata_box(tmp_path):
    """Five different signals in blocks of odd sizes: each track decodes to its own signal,
    sample-aligned (the encoder's priming cut by the edit list), at most one AAC frame longer."""
    n = 3 * 44100 + 777
    tracks = np.stack([music(n / 44100, seed=seed)[:, :n] for seed in range(5)])
    path = tmp_path / "t.stem.mp4"
    writer = NiStemsWriter(path)
    at = 0
    for size in (1, 1023, 5000, 44100, 10**6):
        writer.write(tracks[..., at : at + size])
        at += size
    writer.close()
    assert check_ni_stems(path, tracks[0], list(tracks[1:]), min_db=20) == metadata()


def aac_file(path, faststart: bool):
    """An ordinary AAC .m4a from FFmpeg, its moov after the media data or (faststart) before."""
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=options) as container:
        stream = container.add_stream("aac", rate=44100, layout="stereo")
        signal = music(2.0, seed=3)
        frame = av.AudioFrame.from_ndarray(signal, format="fltp", layout="stereo")
        frame.sample_rate = 44100
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


@pytest.mark.parametrize("faststart", [False, True])
def test_a_box_added_to_moov_moves_no_media_data(tmp_path, faststart):
    """moov last (FFmpeg's default): rewritten where it is. moov first: its old copy becomes
    `free` and the grown one goes last, so every chunk offset still points at the same bytes."""
    path = aac_file(tmp_path / "a.m4a", faststart)
    before = decode(path)
    with open(path, "rb") as handle:
        kinds = [kind for kind, *_ in mp4box.top_level(handle)]
    assert (kinds.index(b"moov") < kinds.index(b"mdat")) == faststart
    mp4box.add_to_moov(path, (b"udta",), b"stem", b'{"version": 1}')
    with open(path, "rb") as handle:
        after_kinds = [kind for kind, *_ in mp4box.top_level(handle)]
    assert after_kinds[-1] == b"moov" and after_kinds.count(b"moov") == 1
    if faststart:
        assert after_kinds[: len(kinds)] == [b"free" if k == b"moov" else k for k in kinds]
    np.testing.assert_array_equal(decode(path), before)
    payload, flags = box_and_flags(path)
    assert payload == b'{"version": 1}' and flags[0] & 1


def test_missing_containers_are_created_and_large_sizes_read():
    mvhd = mp4box.box(b"mvhd", bytes(100))
    moov = mp4box.with_child(mp4box.box(b"moov", mvhd), (b"udta",), mp4box.box(b"stem", b"{}"))
    assert [(k, size) for k, _, _, size in mp4box.walk(moov)] == [(b"moov", 8 + 108 + 18)]
    children = [k for k, *_ in mp4box.walk(moov, 8)]
    assert children == [b"mvhd", b"udta"]
    large = struct.pack(">I4sQ", 1, b"free", 16 + 4) + b"abcd"  # a 64-bit size
    assert list(mp4box.walk(large)) == [(b"free", 0, 16, 20)]


def test_a_broken_file_is_refused_untouched(tmp_path):
    path = write_audio(tmp_path / "a.m4a", music(1.0))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="past the end"):
        mp4box.add_to_moov(path, (b"udta",), b"stem", b"{}")
    assert path.read_bytes() == data[:-100]
