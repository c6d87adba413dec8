"""A corpus of real-world-shaped originals, written here by FFmpeg's own encoders and muxers
(through PyAV), lameenc and soundfile: no binary fixtures, seconds of audio per file.

Each `Case` writes one file and says what decoding it must give: `completed` with a length
(exact where the codec is sample-exact, else within the codec's priming/padding), or
`failed` with a stable code. The broken cases are made by cutting or patching good ones the
way uploads break (a cut transfer, a lying header, an upload of the wrong file).
"""

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import lameenc
import numpy as np
import soundfile
from synthetic import music

RATE = 44100
WINDOW = 343980  # one 7.8 s model window at 44.1 kHz
LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1", 8: "7.1"}


def signal(seconds: float, rate: int = RATE, channels: int = 2, seed: int = 0) -> np.ndarray:
    """(channels, n) float32 music-like audio; extra channels get their own mixes."""
    base = music(seconds, seed=seed, rate=rate)
    if channels == 1:
        return base.mean(0, keepdims=True)
    rows = [base[i % 2] * (1.0 - 0.1 * (i // 2)) for i in range(channels)]
    return np.stack(rows).astype(np.float32)


def samples(seconds: float, rate: int = RATE) -> int:
    return int(seconds * rate)


def encode(
    path: Path,
    codec: str,
    audio: np.ndarray,
    rate: int = RATE,
    fmt: str | None = None,
    options: dict | None = None,
    container_options: dict | None = None,
    bit_rate: int | None = None,
    setup=None,
) -> Path:
    """Write `audio` with one FFmpeg encoder and muxer; FFmpeg converts the sample format."""
    with av.open(str(path), "w", format=fmt, options=container_options or {}) as container:
        stream = container.add_stream(
            codec, rate=rate, layout=LAYOUTS[audio.shape[0]], options=options or {}
        )
        if bit_rate:
            stream.codec_context.bit_rate = bit_rate
        if setup:
            setup(stream.codec_context)
        _mux_audio(container, stream, audio, rate)
    return path


def _mux_audio(container, stream, audio, rate):
    layout = LAYOUTS[audio.shape[0]]
    target = stream.codec_context.format or stream.codec_context.codec.audio_formats[0]
    resampler = av.AudioResampler(
        format=target.name,
        layout=layout,
        rate=rate,
        frame_size=stream.codec_context.frame_size or None,
    )
    for start in range(0, audio.shape[1], 4096):
        block = audio[:, start : start + 4096]
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(block.T.reshape(1, -1)), format="flt", layout=layout
        )
        frame.sample_rate = rate
        frame.pts = None
        for converted in resampler.resample(frame):
            _send(container, stream, converted)
    for converted in resampler.resample(None):
        _send(container, stream, converted)
    _send(container, stream, None)


def _send(container, stream, frame):
    """Encode one frame (None: flush the encoder) and mux what comes out."""
    for packet in stream.encode(frame):
        container.mux(packet)


def lame(path: Path, audio: np.ndarray, rate: int = RATE, vbr: bool = False) -> Path:
    """An MP3 as lameenc writes it: no Xing/LAME header, so FFmpeg can only estimate its length."""
    encoder = lameenc.Encoder()
    encoder.set_in_sample_rate(rate)
    encoder.set_channels(audio.shape[0])
    encoder.set_quality(2)
    if vbr:
        encoder.set_vbr(4)
        encoder.set_vbr_quality(2)
    else:
        encoder.set_bit_rate(128)
    pcm = (np.clip(audio.T, -1, 1) * 32767).astype(np.int16).tobytes()
    path.write_bytes(bytes(encoder.encode(pcm) + encoder.flush()))
    return path


def sf(
    path: Path,
    audio: np.ndarray,
    rate: int = RATE,
    fmt: str | None = None,
    subtype: str | None = None,
) -> Path:
    soundfile.write(path, audio.T, rate, format=fmt, subtype=subtype)
    return path


def mp3_vbr_with_xing(path: Path, audio: np.ndarray) -> Path:
    def vbr(context):
        context.qscale = True
        context.global_quality = 4 * 118  # FF_QP2LAMBDA * lame -V 4

    return encode(path, "libmp3lame", audio, setup=vbr)


def mp3_free_format(path: Path) -> Path:
    """Free-format MPEG-1 layer III: header bitrate index 0, every frame 384 bytes (128k @ 48k)."""
    raw = encode(
        path,
        "libmp3lame",
        signal(2.0, 48000),
        rate=48000,
        bit_rate=128000,
        container_options={"write_xing": "0", "id3v2_version": "0"},
    ).read_bytes()
    data = bytearray(raw)
    for offset in range(0, len(data) - 3, 384):
        assert data[offset] == 0xFF and data[offset + 1] & 0xE0 == 0xE0, "frames must be 384 bytes"
        data[offset + 2] &= 0x0F  # bitrate index 0: "free"
    path.write_bytes(bytes(data))
    return path


def jpeg(size: int = 600) -> bytes:
    """A noisy (incompressible, so large) JPEG made by FFmpeg's mjpeg encoder."""
    context = av.CodecContext.create("mjpeg", "w")
    context.width = context.height = size
    context.pix_fmt = "yuvj420p"
    context.time_base = Fraction(1, 25)
    context.qscale = True
    context.global_quality = 118
    image = np.random.default_rng(3).integers(0, 256, (size, size, 3), dtype=np.uint8)
    frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuvj420p")
    return b"".join(bytes(p) for p in context.encode(frame) + context.encode(None))


def id3v2_with_cover(cover: bytes) -> bytes:
    """An ID3v2.3 tag holding a title and the cover art (APIC), as taggers write them."""

    def frame(name, body):
        return name + struct.pack(">I", len(body)) + b"\0\0" + body

    # padding
    body = (
        frame(b"TIT2", b"\0Corpus track")
        + frame(b"APIC", b"\0image/jpeg\0\x03\0" + cover)
        + b"\0" * 4096
    )
    size = len(body)
    syncsafe = bytes([(size >> 21) & 0x7F, (size >> 14) & 0x7F, (size >> 7) & 0x7F, size & 0x7F])
    return b"ID3\x03\x00\x00" + syncsafe + body


def music_video(path: Path, seconds: float = 2.0) -> Path:
    """H.264 video + AAC audio in MP4, as a music video is delivered."""
    audio = signal(seconds)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=25, options={"preset": "ultrafast"})
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        sound = container.add_stream("aac", rate=RATE, layout="stereo")
        for i in range(int(seconds * 25)):
            image = np.full((64, 64, 3), (i * 5) % 255, np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            _send(container, video, frame)
        _send(container, video, None)
        _mux_audio(container, sound, audio, RATE)
    return path


def two_audio_streams(path: Path, default_second: bool) -> Path:
    """Matroska with a stereo AAC and a 5.1 AC-3 stream (a mix and its surround version)."""
    stereo, surround = signal(2.0), signal(1.0, channels=6, seed=2)
    with av.open(str(path), "w", format="matroska") as container:
        first = container.add_stream("aac", rate=RATE, layout="stereo")
        second = container.add_stream("ac3", rate=RATE, layout="5.1")
        if default_second:
            first.disposition = av.stream.Disposition(0)
            second.disposition = av.stream.Disposition.default
        _mux_audio(container, first, stereo, RATE)
        _mux_audio(container, second, surround, RATE)
    return path


def dsf(path: Path, seconds: float = 0.5, channels: int = 2) -> Path:
    """DSD64 in a DSF file (Sony's layout), its 1-bit stream density-modulated by music."""
    rate = 64 * RATE
    n = int(seconds * rate) // 4096 * 4096
    slow = signal(seconds, channels=channels)
    level = np.repeat(slow, 64, axis=1)[:, :n] * 0.5 + 0.5
    bits = np.random.default_rng(5).random((channels, n)) < level
    block = 4096
    data = b"".join(
        np.packbits(bits[c, start : start + block * 8], bitorder="little").tobytes()
        for start in range(0, n, block * 8)
        for c in range(channels)
    )
    fmt = b"fmt " + struct.pack("<QIIIIIIQII", 52, 1, 0, channels, channels, rate, 1, n, block, 0)
    body = fmt + b"data" + struct.pack("<Q", 12 + len(data)) + data
    total = 28 + len(body)
    path.write_bytes(b"DSD " + struct.pack("<QQQ", 28, total, 0) + body)
    return path


def riff_wav_with_bad_float(path: Path) -> Path:
    audio = signal(1.0)
    audio[0, 1000:1100] = np.nan
    audio[1, 2000:2010] = np.inf
    audio[0, 3000:3010] = -np.inf
    return sf(path, audio, subtype="FLOAT")


def flac_total_samples(data: bytes, total: int) -> bytes:
    """The FLAC with STREAMINFO's 36-bit total-samples field set to `total` (0: unknown)."""
    assert data[:4] == b"fLaC"
    info = bytearray(data[8:42])
    word = int.from_bytes(info[10:18], "big")
    word = (word & ~((1 << 36) - 1)) | total
    info[10:18] = word.to_bytes(8, "big")
    info[18:34] = b"\0" * 16  # the MD5 no longer matches: unset it
    return data[:8] + bytes(info) + data[42:]


def silence_flac(path: Path, seconds: float, rate: int = 8000, stream_total: bool = False) -> Path:
    """Digital silence compresses to almost nothing: a decompression bomb's raw material."""
    path = encode(
        path,
        "flac",
        np.zeros((1, int(seconds * rate)), np.float32),
        rate=rate,
        options={"compression_level": "0"},
    )
    if stream_total:
        path.write_bytes(flac_total_samples(path.read_bytes(), 0))
    return path


def bomb_at_1_hz(path: Path) -> Path:
    """A FLAC at a sample rate of 1 Hz, its length undeclared, one frame of 4,608 samples:
    9 KB on disk, and each sample becomes 44,100 at 44.1 kHz (1.6 GB of float32 at once).
    Not a Case: decoded without the child's memory limit it takes that memory."""
    whole = encode(
        path.with_suffix(".whole.flac"),
        "flac",
        np.zeros((2, 4608), np.float32),
        rate=1,
        options={"frame_size": "4608"},
    )
    return _patched(path, whole, lambda d: flac_total_samples(d, 0))


def cut(path: Path, source: Path, fraction: float | None = None, keep: int | None = None) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: keep if keep is not None else int(len(data) * fraction)])
    return path


def moov_at_end_cut(path: Path, folder: Path) -> Path:
    """An M4A cut inside its index: the moov box written last is only partly there."""
    whole = encode(folder / "whole.m4a", "aac", signal(2.0), fmt="ipod")
    data = whole.read_bytes()
    moov = data.rfind(b"moov") - 4
    assert moov > data.find(b"mdat"), "the muxer writes moov after mdat unless told otherwise"
    path.write_bytes(data[: moov + (len(data) - moov) // 2])
    return path


ASF_DATA = bytes.fromhex("3626b2758e66cf11a6d900aa0062ce6c")
ASF_PACKET = 5945  # the packet size of the real-world WMA this case is shaped on


def wma(path: Path, seconds: float = 2.0) -> Path:
    """WMA v2 in ASF with fixed 5,945-byte packets; the Data Object's packets start 50 bytes
    after its GUID."""
    return encode(
        path,
        "wmav2",
        signal(seconds),
        fmt="asf",
        bit_rate=128000,
        container_options={"packet_size": str(ASF_PACKET)},
    )


def wma_cut_in_packet(path: Path, folder: Path) -> Path:
    """Ends inside a packet: the third holds 2,669 of its 5,945 bytes (a cut transfer)."""
    data = wma(folder / "whole.wma").read_bytes()
    first = data.find(ASF_DATA) + 50
    return _bytes(path, data[: first + 2 * ASF_PACKET + 2669])


def wma_damaged_packet(path: Path, folder: Path) -> Path:
    """200 bytes of noise inside the fourth packet's payload: the decoder conceals it."""
    data = bytearray(wma(folder / "whole.wma").read_bytes())
    garbled = data.find(ASF_DATA) + 50 + 3 * ASF_PACKET + 1000
    data[garbled : garbled + 200] = np.random.default_rng(1).bytes(200)
    return _bytes(path, bytes(data))


def riff_chunk(name: bytes, body: bytes) -> bytes:
    return name + struct.pack("<I", len(body)) + body + b"\0" * (len(body) & 1)


def wav_tagged(path: Path, stale: int = 0, keep: int | None = None) -> Path:
    """A 1.0 s WAV with a LIST/INFO chunk after its data, as tag editors write them; `stale`:
    the RIFF size claims that many bytes more than the file holds (the editor shrank the tag
    and left the size); `keep`: the file cut to that many bytes."""
    pcm = (signal(1.0).T * 20000).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 2, RATE, RATE * 4, 4, 16)
    info = riff_chunk(b"INAM", b"Corpus track\0") + riff_chunk(b"IART", b"Tag editor\0")
    body = (
        b"WAVE"
        + riff_chunk(b"fmt ", fmt)
        + riff_chunk(b"data", pcm)
        + riff_chunk(b"LIST", b"INFO" + info)
    )
    data = b"RIFF" + struct.pack("<I", len(body) + stale) + body
    return _bytes(path, data[:keep])


def zip_file(path: Path) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("song.txt", "not a song " * 2000)
    return path


def png(path: Path) -> Path:
    def chunk(kind, body):
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    rows = b"".join(b"\0" + bytes(range(64)) * 3 for _ in range(64))
    header = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


def elf(path: Path) -> Path:
    import sys

    path.write_bytes(Path(sys.executable).resolve().read_bytes()[:300_000])
    return path


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Path], Path]  # folder -> the file written in it
    code: str | None = None  # the failure code; None: it must complete
    length: int | None = None  # decoded samples at 44.1 kHz when completed
    slack: int = 0  # allowed |length - expected|: a lossy codec's padding
    channels: int = 2  # the source's channel count


def _w(name, writer, *args, **kwargs):
    """A Case maker writing `name` in the folder with writer(path, *args, **kwargs)."""
    return lambda folder: writer(folder / name, *args, **kwargs)


S2 = signal(2.0)
S2_48K = signal(2.0, 48000)
N2 = samples(2.0)
LOSSY = 4000  # priming + padding of AAC/Opus/Vorbis/AC-3/WMA, resampled

CASES = [
    # --- MP3
    Case("mp3_cbr", _w("a.mp3", encode, "libmp3lame", S2, bit_rate=192000), length=N2),
    Case("mp3_vbr_xing", _w("a.mp3", mp3_vbr_with_xing, S2), length=N2),
    Case(
        "mp3_vbr_no_xing", _w("a.mp3", lame, signal(6.0), vbr=True), length=samples(6.0), slack=3000
    ),
    Case("mp3_cbr_no_xing", _w("a.mp3", lame, S2), length=N2, slack=3000),
    Case(
        "mp3_mpeg2_22k",
        _w("a.mp3", encode, "libmp3lame", signal(2.0, 22050), rate=22050),
        length=N2,
        slack=2,
    ),
    Case(
        "mp3_mpeg25_8k",
        _w("a.mp3", encode, "libmp3lame", signal(2.0, 8000, 1), rate=8000),
        length=N2,
        slack=6,
        channels=1,
    ),
    # FFmpeg's MP3 demuxer cannot find the frames of a free-format stream: refused, as damaged
    Case("mp3_free_format", lambda f: mp3_free_format(f / "a.mp3"), "corrupt_audio"),
    Case("mp3_shorter_than_a_frame", _w("a.mp3", encode, "libmp3lame", signal(0.01)), length=441),
    Case(
        "mp3_junk_before",
        lambda f: _prefix(
            f / "a.mp3", np.random.default_rng(7).bytes(3000), encode(f / "b.mp3", "libmp3lame", S2)
        ),
        length=N2,
        slack=3000,
    ),
    Case(
        "mp3_huge_id3_cover",
        lambda f: _prefix(f / "a.mp3", id3v2_with_cover(jpeg()), lame(f / "b.mp3", S2)),
        length=N2,
        slack=3000,
    ),
    # --- AAC, ALAC
    Case("aac_m4a", _w("a.m4a", encode, "aac", S2, fmt="ipod"), length=N2, slack=LOSSY),
    Case("aac_mp4", _w("a.mp4", encode, "aac", S2, fmt="mp4"), length=N2, slack=LOSSY),
    Case("aac_adts", _w("a.aac", encode, "aac", S2, fmt="adts"), length=N2, slack=LOSSY),
    Case("alac_m4a", _w("a.m4a", encode, "alac", S2, fmt="ipod"), length=N2),
    # FFmpeg's CAF muxer keeps only part of ALAC's last (partial) 4096-sample frame
    Case("alac_caf", _w("a.caf", encode, "alac", S2, fmt="caf"), length=N2, slack=4096),
    # --- FLAC
    Case("flac_8bit", _w("a.flac", sf, S2, subtype="PCM_S8"), length=N2),
    Case("flac_16bit", _w("a.flac", encode, "flac", S2), length=N2),
    Case(
        "flac_24bit_96k", _w("a.flac", sf, signal(1.0, 96000), 96000, subtype="PCM_24"), length=RATE
    ),
    Case(
        "flac_192k_mono", _w("a.flac", sf, signal(1.0, 192000, 1), 192000), length=RATE, channels=1
    ),
    Case(
        "flac_stream_no_total",
        lambda f: _patched(
            f / "a.flac", encode(f / "b.flac", "flac", S2), lambda d: flac_total_samples(d, 0)
        ),
        length=N2,
    ),
    # --- Opus, Vorbis
    Case(
        "opus_ogg",
        _w("a.opus", encode, "libopus", S2_48K, rate=48000, fmt="ogg"),
        length=N2,
        slack=LOSSY,
    ),
    Case(
        "opus_webm",
        _w("a.webm", encode, "libopus", S2_48K, rate=48000, fmt="webm"),
        length=N2,
        slack=LOSSY,
    ),
    Case("vorbis_ogg", _w("a.ogg", sf, S2, fmt="OGG", subtype="VORBIS"), length=N2, slack=LOSSY),
    Case(
        "vorbis_mkv",
        _w("a.mka", encode, "vorbis", S2, fmt="matroska", options={"strict": "experimental"}),
        length=N2,
        slack=LOSSY,
    ),
    # --- WAV family, AIFF, CAF
    Case("wav_s16", _w("a.wav", encode, "pcm_s16le", S2), length=N2),
    Case(
        "wav_rf64",
        _w("a.wav", encode, "pcm_s16le", S2, container_options={"rf64": "always"}),
        length=N2,
    ),
    Case("rf64_soundfile", _w("a.wav", sf, S2, fmt="RF64"), length=N2),
    Case("w64", _w("a.w64", encode, "pcm_s24le", S2, fmt="w64"), length=N2),
    Case("aiff", _w("a.aiff", encode, "pcm_s16be", S2, fmt="aiff"), length=N2),
    Case("aifc_float", _w("a.aifc", sf, S2, fmt="AIFF", subtype="FLOAT"), length=N2),
    Case("caf_pcm", _w("a.caf", sf, S2, fmt="CAF", subtype="PCM_24"), length=N2),
    *[
        Case(f"wav_{codec}", _w("a.wav", encode, codec, S2), length=N2)
        for codec in (
            "pcm_u8",
            "pcm_s24le",
            "pcm_s32le",
            "pcm_f32le",
            "pcm_f64le",
            "pcm_mulaw",
            "pcm_alaw",
        )
    ],
    # --- other codecs
    Case("wavpack", _w("a.wv", encode, "wavpack", S2), length=N2),
    Case("tta", _w("a.tta", encode, "tta", S2), length=N2),
    Case(
        "ac3_5_1",
        _w("a.ac3", encode, "ac3", signal(2.0, channels=6), fmt="ac3"),
        length=N2,
        slack=LOSSY,
        channels=6,
    ),
    Case("eac3", _w("a.eac3", encode, "eac3", S2, fmt="eac3"), length=N2, slack=LOSSY),
    Case("mp2", _w("a.mp2", encode, "mp2", S2, fmt="mp2"), length=N2, slack=LOSSY),
    Case(
        "wma", _w("a.wma", encode, "wmav2", S2, fmt="asf", bit_rate=128000), length=N2, slack=LOSSY
    ),
    Case(
        "wma_damaged_packet_mid",
        lambda f: wma_damaged_packet(f / "a.wma", f),
        length=N2,
        slack=LOSSY,
    ),
    Case("dsd_dsf", _w("a.dsf", dsf), length=samples(0.5), slack=2000),
    # --- shapes
    Case(
        "mono_8k",
        _w("a.wav", encode, "pcm_s16le", signal(2.0, 8000, 1), rate=8000),
        length=N2,
        channels=1,
    ),
    Case(
        "surround_7_1", _w("a.flac", encode, "flac", signal(2.0, channels=8)), length=N2, channels=8
    ),
    Case("very_short_wav", _w("a.wav", encode, "pcm_s16le", signal(0.002)), length=88),
    Case("exactly_one_window", _w("a.flac", encode, "flac", signal(WINDOW / RATE)), length=WINDOW),
    Case(
        "long_silence",
        _w("a.flac", encode, "flac", np.zeros((2, samples(6.0)), np.float32)),
        length=samples(6.0),
    ),
    # a tag editor's WAV: the RIFF size is stale, the data and LIST chunks are whole
    Case("wav_stale_riff_size", _w("a.wav", wav_tagged, stale=148), length=RATE),
    Case(
        "wav_cut_in_trailing_tag",
        lambda f: wav_tagged(f / "a.wav", keep=RATE * 4 + 44 + 20),
        length=RATE,
    ),
    Case("dc_offset", _w("a.wav", encode, "pcm_s16le", S2 * 0.5 + 0.4), length=N2),
    Case(
        "clipped_square",
        _w(
            "a.wav",
            encode,
            "pcm_s16le",
            np.sign(np.sin(np.arange(N2) / 20.0))[None].repeat(2, 0).astype(np.float32),
        ),
        length=N2,
    ),
    Case("nan_inf_float_wav", lambda f: riff_wav_with_bad_float(f / "a.wav"), length=RATE),
    Case("music_video", lambda f: music_video(f / "a.mp4"), length=N2, slack=LOSSY),
    Case(
        "two_streams_none_default",
        lambda f: two_audio_streams(f / "a.mkv", False),
        length=N2,
        slack=LOSSY,
    ),
    Case(
        "two_streams_second_default",
        lambda f: two_audio_streams(f / "a.mkv", True),
        length=RATE,
        slack=LOSSY,
        channels=6,
    ),
    Case("flac_named_mp3", _w("a.mp3", encode, "flac", S2, fmt="flac"), length=N2),
    Case(
        "declared_shorter_than_present",
        lambda f: _patched(
            f / "a.flac", encode(f / "b.flac", "flac", S2), lambda d: flac_total_samples(d, RATE)
        ),
        length=N2,
    ),
    # --- broken
    Case("zero_length", lambda f: _bytes(f / "a.mp3", b""), "empty_input"),
    Case(
        "text_file",
        lambda f: _bytes(f / "a.mp3", b"Track 1 - lyrics and credits.\n" * 3000),
        "not_audio",
    ),
    Case(
        "pdf",
        lambda f: _bytes(f / "a.wav", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n" * 50),
        "not_audio",
    ),
    Case("png_image", lambda f: png(f / "a.flac"), "not_audio"),
    Case("jpeg_image", lambda f: _bytes(f / "a.mp3", jpeg(64)), "not_audio"),
    Case("zip_archive", lambda f: zip_file(f / "a.m4a"), "not_audio"),
    Case("executable", lambda f: elf(f / "a.mp3"), "not_audio"),
    Case(
        "random_bytes",
        lambda f: _bytes(f / "a.wav", np.random.default_rng(0).bytes(200_000)),
        "not_audio",
    ),
    Case("video_without_audio", lambda f: _video_only(f / "a.mp4"), "not_audio"),
    Case("wav_header_only", _w("a.wav", sf, np.zeros((2, 0), np.float32)), "empty_audio"),
    Case(
        "wav_cut",
        lambda f: cut(f / "a.wav", encode(f / "b.wav", "pcm_s16le", S2), 0.4),
        "truncated_audio",
    ),
    Case(
        "rf64_cut",
        lambda f: cut(
            f / "a.wav",
            encode(f / "b.wav", "pcm_s16le", S2, container_options={"rf64": "always"}),
            0.4,
        ),
        "truncated_audio",
    ),
    Case(
        "w64_cut",
        lambda f: cut(f / "a.w64", encode(f / "b.w64", "pcm_s16le", S2, fmt="w64"), 0.4),
        "truncated_audio",
    ),
    Case(
        "wav_tagged_cut_in_data",
        lambda f: wav_tagged(f / "a.wav", keep=RATE * 2),
        "truncated_audio",
    ),
    Case(
        "wma_ends_inside_a_packet", lambda f: wma_cut_in_packet(f / "a.wma", f), "truncated_audio"
    ),
    Case(
        "flac_header_only",
        lambda f: cut(f / "a.flac", encode(f / "b.flac", "flac", S2), keep=8 + 34 + 4 + 40),
        "corrupt_audio",
    ),
    Case(
        "flac_cut_mid_frame",
        lambda f: cut(f / "a.flac", encode(f / "b.flac", "flac", S2), 0.5),
        "truncated_audio",
    ),
    Case(
        "mp3_xing_cut",
        lambda f: cut(f / "a.mp3", encode(f / "b.mp3", "libmp3lame", S2), 0.5),
        "truncated_audio",
    ),
    Case(
        "mp3_no_xing_cut_mid_frame",
        lambda f: cut(f / "a.mp3", lame(f / "b.mp3", S2), keep=20_000),
        length=20_000 * 8 * RATE // 128_000,
        slack=1500,
    ),
    Case(
        "m4a_cut_in_mdat",
        lambda f: cut(
            f / "a.m4a",
            encode(f / "b.m4a", "aac", S2, fmt="ipod", container_options={"movflags": "faststart"}),
            0.5,
        ),
        "truncated_audio",
    ),
    Case("m4a_cut_in_index", lambda f: moov_at_end_cut(f / "a.m4a", f), "truncated_audio"),
    Case(
        "aiff_cut",
        lambda f: cut(f / "a.aiff", encode(f / "b.aiff", "pcm_s16be", S2, fmt="aiff"), 0.5),
        "truncated_audio",
    ),
    Case(
        "wavpack_cut",
        lambda f: cut(f / "a.wv", encode(f / "b.wv", "wavpack", S2), 0.5),
        "truncated_audio",
    ),
    Case(
        "declared_longer_than_present",
        lambda f: _patched(
            f / "a.flac", encode(f / "b.flac", "flac", S2), lambda d: flac_total_samples(d, 3 * N2)
        ),
        "truncated_audio",
    ),
    Case(
        "bomb_declared_hours",
        lambda f: _patched(
            f / "a.flac",
            encode(f / "b.flac", "flac", S2),
            lambda d: flac_total_samples(d, 3 * 3600 * RATE),
        ),
        "too_long",
    ),
    Case(
        "bomb_silence_undeclared",
        lambda f: silence_flac(f / "a.flac", 120, stream_total=True),
        "too_long",
    ),
]


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _prefix(path: Path, head: bytes, source: Path) -> Path:
    return _bytes(path, head + source.read_bytes())


def _patched(path: Path, source: Path, patch) -> Path:
    return _bytes(path, patch(source.read_bytes()))


def _video_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=25)
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(
                np.full((64, 64, 3), i * 20, np.uint8), format="rgb24"
            )
            frame.pts = i
            _send(container, video, frame)
        _send(container, video, None)
    return path


MAX_DURATION_S = 30.0  # the corpus' limit: the bombs hold more, all else less
# also run through the real CLI: a case per family of what used to go wrong, every broken kind
END_TO_END = {
    "mp3_vbr_no_xing",
    "mp3_huge_id3_cover",
    "music_video",
    "opus_ogg",
    "ac3_5_1",
    "dsd_dsf",
    "exactly_one_window",
    "very_short_wav",
    "nan_inf_float_wav",
    "zero_length",
    "text_file",
    "executable",
    "video_without_audio",
    "wav_header_only",
    "wav_cut",
    "mp3_xing_cut",
    "m4a_cut_in_index",
    "flac_header_only",
    "mp3_free_format",
    "wma_ends_inside_a_packet",
    "wav_stale_riff_size",
    "declared_longer_than_present",
    "bomb_declared_hours",
    "bomb_silence_undeclared",
}
