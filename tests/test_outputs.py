"""Outputs beyond the six stems: the instrumental, `no_SOURCE` and `A+B` mixes, chosen outputs,
waveform peaks (BBC audiowaveform JSON v2), loudness (BS.1770) and the silent flag, through
`stem-job run`."""

import json
import math
import threading

import jsonschema
import numpy as np
import pytest
import soundfile
import torch
from conftest import last_json, run_job
from ni_reader import check_ni_stems, decode
from synthetic import SOURCES, music, write_model_folder

from job import outputs
from job.analysis.loudness import LoudnessMeter
from job.analysis.peaks import Peaks
from job.audio.encode import Encoding, MixMeter, StemEncoder, open_encoders
from job.config import Settings
from job.errors import JobError
from job.manifest import is_silent
from job.messages import STEMS
from job.pcm import to_pcm16

RATE = 44100

# The JSON format as doc/DataFormat.md of bbc/audiowaveform describes version 2.
PEAKS_SCHEMA = {
    "type": "object",
    "required": [
        "version",
        "channels",
        "sample_rate",
        "samples_per_pixel",
        "bits",
        "length",
        "data",
    ],
    "properties": {
        "version": {"const": 2},
        "channels": {"type": "integer", "minimum": 1},
        "sample_rate": {"type": "integer", "minimum": 1},
        "samples_per_pixel": {"type": "integer", "minimum": 2},
        "bits": {"enum": [8, 16]},
        "length": {"type": "integer", "minimum": 0},
        "data": {"type": "array", "items": {"type": "integer"}},
    },
}


def reference_peaks(samples: np.ndarray, samples_per_pixel: int, bits: int, split: bool) -> list:
    """audiowaveform's WaveformGenerator::process and WaveformBuffer::saveAsJson, sample by
    sample as its C++ does, on (n, 2) int16 samples."""
    channels = 2 if split else 1
    out, count = [], 0
    low, high = [32767] * channels, [-32768] * channels
    for left, right in samples.tolist():
        values = [left, right] if split else [int((left + right) / 2)]  # C division truncates
        for c, value in enumerate(values):
            low[c], high[c] = min(low[c], value), max(high[c], value)
        count += 1
        if count == samples_per_pixel:
            for c in range(channels):
                out += [low[c], high[c]]
            low, high, count = [32767] * channels, [-32768] * channels, 0
    if count:
        for c in range(channels):
            out += [low[c], high[c]]
    return [int(v / 256) for v in out] if bits == 8 else out


def check_peaks(path, audio_path, samples_per_pixel=256, bits=8, split=False):
    """The peaks file against the schema and against the reference algorithm run on the float
    output read back and rounded to 16-bit PCM, as the MP3 encoder is given it (audiowaveform
    itself truncates float files, which can differ by one 16-bit step)."""
    peaks = json.loads(path.read_text())
    jsonschema.validate(peaks, PEAKS_SCHEMA)
    audio, rate = soundfile.read(audio_path, dtype="float32")
    samples = np.rint(np.clip(audio, -1, 1) * 32767).astype(np.int16)
    channels = 2 if split else 1
    assert (peaks["sample_rate"], peaks["channels"]) == (rate, channels)
    assert (peaks["samples_per_pixel"], peaks["bits"]) == (samples_per_pixel, bits)
    assert peaks["length"] == math.ceil(len(samples) / samples_per_pixel)
    assert len(peaks["data"]) == peaks["length"] * 2 * channels
    assert peaks["data"] == reference_peaks(samples, samples_per_pixel, bits, split)
    limit = 127 if bits == 8 else 32767
    assert max(map(abs, peaks["data"])) <= limit + 1
    return peaks


def read(folder, name):
    audio, rate = soundfile.read(folder / f"{name}.wav", dtype="float32", always_2d=True)
    assert rate == RATE
    return audio.astype(np.float64)


@pytest.mark.parametrize(
    "samples_per_pixel, bits, split",
    [(256, 8, False), (512, 16, True), (37, 8, True), (2, 16, False)],
)
def test_peaks_streamed_in_odd_blocks_are_audiowaveforms(samples_per_pixel, bits, split):
    """Blocks that end mid-pixel, a signal past full scale and one in the last 16-bit steps:
    the pairs are those of the reference algorithm on the whole stream at once."""
    rng = np.random.default_rng(4)
    faint = (rng.integers(-3, 4, (2, 999)) + rng.uniform(-0.5, 0.5, (2, 999))) / 32767
    signal = np.concatenate([np.clip(music(0.3, seed=6) * 9, -1.3, 1.3), faint], axis=1)
    signal = signal.astype(np.float32)
    peaks = Peaks(samples_per_pixel, bits, split)
    for start, size in zip(
        np.r_[0, np.cumsum([1, 255, 3000, 7])], [1, 255, 3000, 7, 10**6], strict=False
    ):
        peaks.add(to_pcm16(signal[:, start : start + size]))
    samples = np.rint(np.clip(signal, -1, 1) * 32767).astype(np.int16).T
    assert np.array_equal(to_pcm16(signal), samples)  # the samples LAME is given, too
    assert peaks.result()["data"] == reference_peaks(samples, samples_per_pixel, bits, split)


# -- output names against a model's sources -------------------------------------------------


def test_names_resolve_against_any_models_sources():
    four, karaoke = ["drums", "bass", "other", "vocals"], ["vocals", "instrumental"]
    asked = ["ni_stems", "bass+drums", "no_vocals", "instrumental", "vocals", "no_drums"]
    assert outputs.plan(asked, four) == (
        "vocals",
        "instrumental",
        "no_drums",
        "no_vocals",
        "bass+drums",
        "ni_stems",
    )
    assert outputs.plan((), four) == tuple(four)  # nothing asked: every source
    assert outputs.parts("instrumental", four) == outputs.parts("no_vocals", four) == (0, 1, 2)
    assert outputs.parts("bass+drums", four) == (0, 1)
    # a model's own `instrumental` source is that source, and no_vocals is the same
    assert outputs.parts("instrumental", karaoke) == outputs.parts("no_vocals", karaoke) == (1,)
    for name, why in [
        ("piano", "'piano' is not a source"),
        ("no_piano", "leaves out 'piano'"),
        ("drums+piano", "sums 'piano'"),
        ("drums+drums", "names a source twice"),
    ]:
        with pytest.raises(JobError, match=why) as refused:
            outputs.plan([name], four)
        assert refused.value.code == "invalid_outputs"
    with pytest.raises(JobError, match="needs a vocals source"):
        outputs.plan(["instrumental"], ["drums", "bass"])


def test_ni_stems_fold_any_sources_into_four():
    """Each NI stem takes the model's source of its name; `other` also takes every source no
    NI stem names; an NI stem the model has no source for is silent."""
    six = ["drums", "bass", "other", "vocals", "guitar", "piano"]
    assert outputs.ni_slots(six) == ((0,), (1,), (2, 4, 5), (3,))
    assert outputs.ni_slots(["vocals", "accompaniment"]) == ((), (), (1,), (0,))


def test_names_are_checked_for_form_before_anything_runs():
    assert outputs.check_names([" Drums+Bass", "drums+bass", "no_x"]) == ("drums+bass", "no_x")
    for bad in (["drums bass"], ["a" * 129], ["../x"], ["drums+"], [f"s{i}" for i in range(33)]):
        with pytest.raises(JobError):
            outputs.check_names(bad)
    for sources in (["drums", "no_bass"], ["Drums"], ["drums", "drums"], ["a+b"]):
        with pytest.raises(ValueError):
            outputs.check_sources(sources)


# -- loudness against EBU Tech 3341's test signals (1 kHz stereo sines) ---------------------


def sine(db: float, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    wave = 10 ** (db / 20) * np.sin(2 * np.pi * 1000 * t)
    return np.stack([wave, wave]).astype(np.float32)


def measure(signal: np.ndarray, block: int = 12345) -> dict:
    meter = LoudnessMeter()
    for start in range(0, signal.shape[1], block):  # odd blocks: streaming, not one call
        meter.add(signal[:, start : start + block])
    return meter.result()


@pytest.mark.parametrize(
    "parts, expected",
    [
        ([(-23, 20)], -23.0),  # Tech 3341 case 1
        ([(-33, 20)], -33.0),  # case 2
        ([(-36, 10), (-23, 60), (-36, 10)], -23.0),  # case 3: relative gate
        ([(-72, 10), (-36, 10), (-23, 60), (-36, 10), (-72, 10)], -23.0),  # case 4: both gates
    ],
)
def test_integrated_loudness_of_ebu_3341_signals(parts, expected):
    signal = np.concatenate([sine(db, seconds) for db, seconds in parts], axis=1)
    found = measure(signal)
    assert abs(found["loudnessLufs"] - expected) <= 0.1, found
    # the loudest part sets the true peak wherever it lies in the stream
    assert abs(found["truePeakDbtp"] - max(db for db, _ in parts)) <= 0.05, found


def test_true_peak_is_between_the_samples():
    """Tech 3341 case 16's signal at 44.1 kHz: a 0.5 FS sine at a quarter of the rate, phase
    45 degrees. Its samples peak at -9.03 dBFS, the waveform between them at -6.02 dBTP."""
    n = np.arange(10 * RATE)
    wave = 0.5 * np.cos(np.pi / 2 * n + np.pi / 4) * np.minimum(1.0, n / RATE)  # faded in
    signal = np.stack([wave, wave]).astype(np.float32)
    assert abs(20 * np.log10(np.abs(signal).max()) + 9.03) < 0.01
    assert abs(measure(signal)["truePeakDbtp"] + 6.02) <= 0.2


def test_digital_silence_has_no_loudness():
    assert measure(np.zeros((2, 5 * RATE), np.float32)) == {
        "loudnessLufs": None,
        "truePeakDbtp": None,
    }


# -- the silent flag through the real encoders --------------------------------------------


def test_silent_flag_from_real_encoders(tmp_path):
    """Blocks of a mix go through the MP3 encoders and meters as in a job: an output that is
    digital silence, 42 LU under the mix (measurable, past the 40 LU threshold) or 60 LU under
    (below BS.1770's -70 LUFS absolute gate) is flagged; one 20 LU under is not. (The small
    model's random weights cannot leave an instrument out; the end-to-end test below makes a
    model that does.)"""
    mix = music(12.0, seed=3)
    levels = {
        "drums": 1.0,
        "bass": 10 ** (-20 / 20),
        "piano": 10 ** (-42 / 20),
        "other": 10 ** (-60 / 20),
        "guitar": 0.0,
    }
    encoders = {
        name: StemEncoder(tmp_path / f"{name}.mp3", "mp3", 320, 3, Peaks()) for name in levels
    }
    meter = MixMeter()
    for start in range(0, mix.shape[1], 4 * RATE):
        block = mix[:, start : start + 4 * RATE]
        meter.put(block)
        for name, gain in levels.items():
            encoders[name].put(block * gain)
    mix_figures = meter.finish()
    figures = {name: encoder.finish() for name, encoder in encoders.items()}
    assert figures["guitar"]["loudnessLufs"] is None and mix_figures["loudnessLufs"] > -26
    assert figures["other"]["loudnessLufs"] is None
    assert abs(figures["drums"]["loudnessLufs"] - mix_figures["loudnessLufs"]) < 0.1
    assert abs(figures["bass"]["loudnessLufs"] - (mix_figures["loudnessLufs"] - 20)) < 0.1
    assert abs(figures["piano"]["loudnessLufs"] - (mix_figures["loudnessLufs"] - 42)) < 0.3
    flags = {
        name: is_silent(f["loudnessLufs"], mix_figures["loudnessLufs"], 40.0)
        for name, f in figures.items()
    }
    assert flags == {"drums": False, "bass": False, "piano": True, "other": True, "guitar": True}
    for name in levels:
        assert (tmp_path / f"{name}.peaks.json").exists()


# -- end to end ------------------------------------------------------------------------------


MIXES = ("instrumental", "no_vocals", "drums+bass", "no_drums")


def test_sources_mixes_and_ni_stems_sums_identity_and_peaks(song, job_env_for, tmp_path):
    """Float WAV output: every mix is the float sum of its stems as the engine made them (to
    float32 precision), `instrumental` and `no_vocals` are the same samples, and each has its
    peaks and loudness. The NI Stems file folds guitar and piano into its `other` stem."""
    env = job_env_for(
        OUTPUT_FORMAT="wav",
        PEAKS_SPLIT_CHANNELS="true",
        PEAKS_BITS="16",
        PEAKS_SAMPLES_PER_PIXEL="512",
    )
    asked = ["ni_stems", *MIXES, *reversed(STEMS)]
    proc = run_job(
        [
            "run",
            "--input",
            str(song),
            "--release-id",
            "rel_o",
            "--track-id",
            "trk_7",
            "--outputs",
            ",".join(asked),
        ],
        env,
    )
    assert proc.returncode == 0, proc.stderr
    result = last_json(proc.stdout)
    folder = tmp_path / "outputs" / "rel_o" / "trk_7"
    manifest = json.loads((folder / "manifest.json").read_text())
    # in canonical order: the model's sources, instrumental, no_ mixes, sums, ni_stems
    canonical = [*SOURCES, "instrumental", "no_drums", "no_vocals", "drums+bass", "ni_stems"]
    assert manifest["outputs"] == canonical
    assert set(result["stems"]) == set(result["outputs"]) == set(manifest["stems"]) == set(asked)

    stems = {name: read(folder, name) for name in STEMS}
    mixes = {name: read(folder, name) for name in MIXES}
    assert np.array_equal(mixes["instrumental"], mixes["no_vocals"])
    scale = np.abs(sum(stems.values())).max()
    for name, parts in [
        ("instrumental", [s for s in STEMS if s != "vocals"]),
        ("no_drums", [s for s in STEMS if s != "drums"]),
        ("drums+bass", ["drums", "bass"]),
    ]:
        error = np.abs(mixes[name] - sum(stems[part] for part in parts)).max()
        assert error <= 8 * np.finfo(np.float32).eps * scale, name

    for name in [*STEMS, *MIXES]:
        entry = manifest["stems"][name]
        assert (
            entry["peaks"] == result["outputs"][name]["peaks"] == f"rel_o/trk_7/{name}.peaks.json"
        )
        assert entry["loudnessLufs"] == result["outputs"][name]["loudnessLufs"]
        assert -70 < entry["loudnessLufs"] < 0 and entry["truePeakDbtp"] < 20
        assert entry["silent"] is False
    for name in ("vocals", "instrumental", "drums+bass"):  # one algorithm for every output
        check_peaks(folder / f"{name}.peaks.json", folder / f"{name}.wav", 512, 16, True)
    assert -70 < manifest["mix"]["loudnessLufs"] < 0

    slots = {"drums": ["drums"], "bass": ["bass"], "other": ["other", "guitar", "piano"]}
    assert manifest["stems"]["ni_stems"]["slots"] == {**slots, "vocals": ["vocals"]}
    folded = {slot: sum(stems[s] for s in names) for slot, names in slots.items()}
    ni_stems = [folded[slot] for slot in slots] + [stems["vocals"]]
    check_ni_stems(folder / "ni_stems.stem.mp4", decode(song), ni_stems)


def test_karaoke_message_writes_two_outputs_and_skip_check_compares_outputs(
    song, job_env_for, tmp_path
):
    karaoke = {
        "releaseId": "rel_k",
        "trackId": "trk_k",
        "originalStemUri": str(song),
        "outputs": ["instrumental", "vocals"],
    }
    folder = tmp_path / "outputs" / "rel_k" / "trk_k"

    def run(message, **env):
        proc = run_job(["run", "--message", json.dumps(message)], job_env_for(**env))
        assert proc.returncode == 0, proc.stderr
        return last_json(proc.stdout), json.loads((folder / "manifest.json").read_text())

    result, manifest = run(karaoke)
    assert sorted(p.name for p in folder.iterdir()) == [
        "instrumental.mp3",
        "instrumental.peaks.json",
        "manifest.json",
        "vocals.mp3",
        "vocals.peaks.json",
    ]
    assert set(result["stems"]) == set(result["outputs"]) == {"vocals", "instrumental"}
    assert manifest["outputs"] == ["vocals", "instrumental"] and not result["reused"]
    for name in ("vocals", "instrumental"):
        peaks = json.loads((folder / f"{name}.peaks.json").read_text())
        jsonschema.validate(peaks, PEAKS_SCHEMA)
        assert (peaks["channels"], peaks["bits"], peaks["samples_per_pixel"]) == (1, 8, 256)
        assert peaks["length"] == math.ceil(manifest["stems"][name]["samples"] / 256)
        assert result["outputs"][name]["silent"] is False
        assert isinstance(result["outputs"][name]["truePeakDbtp"], float)

    again, _ = run(karaoke)
    assert again["reused"] is True and again["outputs"] == result["outputs"]

    # the same track with nothing said about outputs: the six stems are missing, so it runs
    six, manifest = run({k: v for k, v in karaoke.items() if k != "outputs"})
    assert six["reused"] is False and set(six["stems"]) == set(STEMS)
    assert manifest["outputs"] == SOURCES  # the model's sources, in its order
    # env OUTPUTS asks for the karaoke pair again: the six-stem manifest lacks the instrumental
    pair, manifest = run(
        {k: v for k, v in karaoke.items() if k != "outputs"}, OUTPUTS="vocals,instrumental"
    )
    assert pair["reused"] is False and manifest["outputs"] == ["vocals", "instrumental"]


@pytest.mark.parametrize(
    "outputs, needle",
    [
        (["vocals", "kazoo"], "'kazoo' is not a source of this model"),  # known with the model
        (["vocals", "Drums!"], "'Drums!'"),
        ([], "non-empty"),
        ("vocals", "non-empty list"),
        ([3], "int"),
    ],
)
def test_bad_outputs_in_a_message_are_bad_input(song, job_env_for, tmp_path, outputs, needle):
    message = {
        "releaseId": "rel_b",
        "trackId": "trk_b",
        "originalStemUri": str(song),
        "outputs": outputs,
    }
    proc = run_job(["run", "--message", json.dumps(message)], job_env_for())
    assert proc.returncode == 65, proc.stderr
    error = last_json(proc.stdout)["error"]
    assert error["code"] == "invalid_outputs" and needle in error["message"]
    assert not (tmp_path / "outputs" / "rel_b").exists()


def test_bad_outputs_setting_is_a_config_error(song, job_env_for):
    proc = run_job(
        ["run", "--input", str(song), "--release-id", "r", "--track-id", "t"],
        job_env_for(OUTPUTS="vocals,karaoke"),
    )
    assert proc.returncode == 78 and "OUTPUTS" in proc.stderr and "'karaoke'" in proc.stderr
    proc = run_job(
        ["run", "--input", str(song), "--release-id", "r", "--track-id", "t", "--outputs", "drum$"],
        job_env_for(),
    )
    assert proc.returncode == 2 and "drum$" in proc.stderr


@pytest.fixture(scope="module")
def pianoless_model(tmp_path_factory):
    """The tests' small model with its piano output weights zeroed: a model that hears no
    piano, as the released one on a track without a piano (the engine, the encoders and the
    meters are the real ones)."""
    folder = write_model_folder(tmp_path_factory.mktemp("pianoless"))
    [path] = folder.glob("*.th")
    package = torch.load(path, weights_only=False)
    piano = SOURCES.index("piano")
    state = package["state"]
    last = max(int(key.split(".")[1]) for key in state if key.startswith("decoder."))
    for branch, width in (("decoder", 4), ("tdecoder", 2)):  # freq: 2 ch x re/im; time: 2 ch
        for kind in ("weight", "bias"):
            tensor = state[f"{branch}.{last}.conv_tr.{kind}"]
            if kind == "weight":
                tensor[:, piano * width : (piano + 1) * width] = 0
            else:
                tensor[piano * width : (piano + 1) * width] = 0
    torch.save(package, path)
    return folder


def test_stem_of_an_absent_instrument_is_flagged_silent(song, pianoless_model, tmp_path):
    from conftest import job_env

    env = job_env(pianoless_model, tmp_path / "outputs")
    proc = run_job(
        ["run", "--input", str(song), "--release-id", "rel_s", "--track-id", "trk_s"], env
    )
    assert proc.returncode == 0, proc.stderr
    result = last_json(proc.stdout)
    manifest = json.loads((tmp_path / "outputs" / "rel_s" / "trk_s" / "manifest.json").read_text())
    flags = {name: entry["silent"] for name, entry in result["outputs"].items()}
    assert flags == {name: name == "piano" for name in STEMS}
    assert manifest["stems"]["piano"]["silent"] is True
    assert (tmp_path / "outputs" / "rel_s" / "trk_s" / "piano.mp3").exists()  # flagged, kept


def test_an_output_that_cannot_be_opened_leaves_no_encoder_running(tmp_path):
    """When the third output's file cannot be opened, the two encoders opened before it are
    stopped: their threads would otherwise wait on their queues for the rest of a drain."""
    (tmp_path / "bass.mp3").mkdir()
    ours = {thread for thread in threading.enumerate() if thread.name.startswith("encode-")}
    with pytest.raises(IsADirectoryError):
        open_encoders(tmp_path, ("vocals", "drums", "bass", "guitar"), Encoding.of(Settings()))
    left = [t for t in threading.enumerate() if t.name.startswith("encode-") and t not in ours]
    assert left == [], f"encoder threads left waiting: {[t.name for t in left]}"
