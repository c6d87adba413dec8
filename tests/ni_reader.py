"""An NI Stems file checked the way the programs that load one read it: FFmpeg's own MP4 demuxer
and AAC decoder (PyAV), and an MP4 parser we did not write (mutagen) for the `moov/udta/stem`
box and the tracks' `tkhd` flags.

NI_SCHEMA holds the fields of NI's stem metadata (version 1) as NI's Stem Creator writes them
(the default metadata stempeg ships for it) and as Mixxx's reader (StemInfoImporter) takes them:
a version, four stems with a name and a #RRGGBB colour, and the mastering DSP's compressor and
limiter settings.
"""

import json

import av
import jsonschema
import mutagen.mp4
import numpy as np

AAC_FRAME = 1024
NUMBER = {"type": "number"}
COMPRESSOR = (
    "input_gain",
    "output_gain",
    "threshold",
    "dry_wet",
    "attack",
    "release",
    "ratio",
    "hp_cutoff",
)
NI_SCHEMA = {
    "type": "object",
    "required": ["version", "mastering_dsp", "stems"],
    "properties": {
        "version": {"const": 1},
        "mastering_dsp": {
            "type": "object",
            "required": ["compressor", "limiter"],
            "properties": {
                "compressor": {
                    "type": "object",
                    "required": ["enabled", *COMPRESSOR],
                    "properties": {
                        "enabled": {"type": "boolean"},
                        **dict.fromkeys(COMPRESSOR, NUMBER),
                    },
                },
                "limiter": {
                    "type": "object",
                    "required": ["enabled", "threshold", "ceiling", "release"],
                    "properties": {
                        "enabled": {"type": "boolean"},
                        "threshold": NUMBER,
                        "ceiling": NUMBER,
                        "release": NUMBER,
                    },
                },
            },
        },
        "stems": {
            "type": "array",
            "minItems": 4,
            "maxItems": 4,
            "items": {
                "type": "object",
                "required": ["name", "color"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "color": {"type": "string", "pattern": "^#[0-9A-Fa-f]{6}$"},
                },
            },
        },
    },
}
NAMES = ["Drums", "Bass", "Other", "Vocals"]


def decode(path, stream: int = 0) -> np.ndarray:
    """(2, n) float32 of one audio stream, as FFmpeg's demuxer and decoder give it."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray() for f in container.decode(audio=stream)]
    return np.concatenate(frames, axis=1).astype(np.float32)


def sdr_at(reference: np.ndarray, got: np.ndarray, lag: int) -> float:
    """How close `got`, read `lag` samples later, is to `reference` (dB)."""
    n = reference.shape[-1] - abs(lag)
    ref = reference[..., :n] if lag >= 0 else reference[..., -lag:]
    est = got[..., lag : lag + n] if lag >= 0 else got[..., :n]
    noise = np.sum((ref.astype(np.float64) - est) ** 2)
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(noise, 1e-30)))


def box_and_flags(path) -> tuple:
    """(the stem box's payload, each track's tkhd flags), as mutagen's atom parser reads them."""
    with open(path, "rb") as handle:
        atoms = mutagen.mp4.Atoms(handle)
        found, payload = atoms.path(b"moov", b"udta", b"stem")[-1].read(handle)
        assert found
        flags = []
        for trak in atoms[b"moov"].findall(b"trak"):
            found, tkhd = next(trak.findall(b"tkhd")).read(handle)
            flags.append(int.from_bytes(tkhd[1:4], "big"))
    return payload, flags


def check_ni_stems(path, mix: np.ndarray, stems: list | None, min_db: float = 12.0) -> dict:
    """Check the NI Stems file at `path` against the decoded original `mix` ((2, n) or (n, 2))
    and its four stems (drums, bass, other, vocals; None: the mix alone): five stereo AAC
    streams, the mix the default, each as long as the original by FFmpeg's edit list and decoded
    to it plus at most the last AAC frame's padding, sample-aligned (no lag is closer than
    none), and the metadata box. Returns the box's JSON."""
    references = [np.asarray(r) for r in [mix, *(stems or [])]]
    references = [r.T if r.shape[0] != 2 else r for r in references]
    n = references[0].shape[-1]
    with av.open(str(path)) as container:
        streams = container.streams.audio
        assert len(streams) == 5 and len(container.streams) == 5
        for index, stream in enumerate(streams):
            context = stream.codec_context
            assert (context.name, context.sample_rate, context.channels) == ("aac", 44100, 2)
            assert bool(stream.disposition & av.stream.Disposition.default) == (index == 0)
            assert stream.duration == n  # the edit list: the exact length, priming cut
    for index in range(5):
        got = decode(path, index)
        assert n <= got.shape[-1] < n + AAC_FRAME, (index, got.shape, n)
        if index >= len(references):
            continue
        reference = references[index]
        if np.abs(reference).max() < 1e-4:  # a silent stem: nothing to align
            assert np.abs(got).max() < 1e-3
            continue
        aligned = sdr_at(reference, got, 0)
        assert aligned > min_db, (index, aligned)
        # a whole AAC frame off is what unhandled priming looks like; it is checked on the mix
        # (music), as the small random models' stems repeat with the STFT's 1024-sample hop
        lags = (-AAC_FRAME, -2, -1, 1, 2, AAC_FRAME) if index == 0 else (-2, -1, 1, 2)
        for lag in lags:
            assert sdr_at(reference, got, lag) < aligned - 3, (index, lag)
    payload, flags = box_and_flags(path)
    metadata = json.loads(payload)
    jsonschema.validate(metadata, NI_SCHEMA)
    assert [stem["name"] for stem in metadata["stems"]] == NAMES
    assert [bool(f & 1) for f in flags] == [True, False, False, False, False]  # enabled bit
    return metadata
