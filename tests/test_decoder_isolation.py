"""The decoding child as a crafted file would find it: fenced (job/audio/confine.py), opening
nothing but the original, believed little, and timed by what the file truly declares.

Every case runs the real child process (or, for the network, a process fenced by the very
function the child calls) against real listeners and real files."""

import contextlib
import json
import os
import signal
import socketserver
import subprocess
import sys
import threading
import time

import lameenc
import numpy as np
import pytest
from synthetic import music, write_audio
from test_audio import decoder_child, in_background

from job.audio import child
from job.audio.child import Limits, child_env, decode_aside
from job.errors import Cancel, JobError

REFUSED = ("not_audio", "corrupt_audio")


class Listener(socketserver.TCPServer):
    """A TCP listener on loopback counting the connections it is offered (and closing them)."""

    def __init__(self):
        self.accepted = 0
        super().__init__(("127.0.0.1", 0), socketserver.BaseRequestHandler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    def verify_request(self, request, client_address):
        self.accepted += 1
        return False

    def close(self):
        self.shutdown()
        self.server_close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


def connect_from(port: int, fenced: bool) -> subprocess.CompletedProcess:
    """A process with the child's environment tries to reach `port` on loopback."""
    fence = "from job.audio import confine; print(json.dumps(confine.confine()));" if fenced else ""
    program = (
        f"import json, socket; {fence}"
        f"socket.create_connection(('127.0.0.1', {port}), timeout=5).close(); print('connected')"
    )
    return subprocess.run(
        [sys.executable, "-P", "-c", program],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_fenced_process_cannot_reach_a_loopback_listener(listener):
    unfenced = connect_from(listener.port, fenced=False)
    assert unfenced.returncode == 0 and "connected" in unfenced.stdout, unfenced.stderr
    assert listener.accepted == 1, "the listener counts what reaches it"
    fenced = connect_from(listener.port, fenced=True)
    assert fenced.returncode != 0 and "PermissionError" in fenced.stderr, fenced.stdout
    assert json.loads(fenced.stdout.splitlines()[0])["seccomp"] == "loaded"
    time.sleep(0.2)
    assert listener.accepted == 1, "the fenced process reached the listener"


def test_the_childs_fences_are_tried_and_logged_once_by_its_parent(tmp_path):
    """The real child in a real parent holding a secret: its socket, the parent's environ and
    a file to write are refused, and the parent says so in one line for two decodes."""
    song = write_audio(tmp_path / "a.flac", music(2.0, seed=4))
    program = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout);"
        "from job.audio.child import decode_aside;"
        f"[decode_aside({str(song)!r}, {str(tmp_path)!r} + f'/{{i}}.f32', 60) for i in (1, 2)]"
    )
    env = {**os.environ, "HTTP_TOKEN": "a-secret-the-child-must-not-read"}
    done = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if "decoding child" in line]
    assert len(lines) == 1, done.stdout
    assert "decoding child fenced" in lines[0], lines[0]
    for fence in ("network refused", "parentEnviron refused", "writes refused", "seccomp loaded"):
        assert fence in lines[0], lines[0]


def test_where_seccomp_is_refused_the_job_runs_on_and_says_what_held(tmp_path):
    """A sandbox whose own filter refuses seccomp (as a stricter profile than Docker's may):
    the decode still completes, and the parent warns once which fences did not hold."""
    song = write_audio(tmp_path / "a.flac", music(2.0, seed=4))
    program = (
        "import errno, logging, sys, pyseccomp as s;"
        "f = s.SyscallFilter(s.ALLOW); f.add_rule(s.ERRNO(errno.EPERM), 'seccomp');"
        "f.add_rule(s.ERRNO(errno.EPERM), 'prctl', s.Arg(0, s.EQ, 22)); f.load();"
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout);"
        "from job.audio.child import decode_aside;"
        f"print(decode_aside({str(song)!r}, {str(tmp_path / 'mix.f32')!r}, 60).length)"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == str(2 * 44100), "the decode completed"
    lines = [line for line in done.stdout.splitlines() if "decoding child" in line]
    assert len(lines) == 1 and lines[0].startswith("WARNING"), done.stdout
    assert "seccomp refused" in lines[0] and "network open" in lines[0], lines[0]


def playlists(folder, port) -> dict:
    """Files that name other files or URLs, and the local file they would read."""
    write_audio(folder / "song.flac", music(3.0, seed=5))
    url = f"http://127.0.0.1:{port}"
    segment = "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{}\n#EXT-X-ENDLIST\n"
    texts = {
        "remote.m3u8": segment.format(f"{url}/segment.ts"),
        "variant.m3u8": f"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\n{url}/variant.m3u8\n",
        "local.m3u8": segment.format("song.flac"),
        "remote.ffconcat": f"ffconcat version 1.0\nfile '{url}/song.flac'\n",
        "local.ffconcat": "ffconcat version 1.0\nfile 'song.flac'\n",
        "absolute.ffconcat": f"ffconcat version 1.0\nfile '{folder / 'song.flac'}'\n",
    }
    for name, text in texts.items():
        (folder / name).write_text(text)
    return {name: folder / name for name in texts}


def test_playlists_open_nothing_and_are_not_audio(tmp_path, listener):
    for name, path in playlists(tmp_path, listener.port).items():
        with pytest.raises(JobError) as refused:
            decode_aside(path, tmp_path / "mix.f32", 60)
        assert refused.value.code in REFUSED, f"{name}: {refused.value.code}"
    time.sleep(0.2)
    assert listener.accepted == 0, "FFmpeg reached out to the network"


def answer_from(tmp_path, message: dict, target_bytes: int = 0):
    """The parent's verdict on `message`, sent by a real process as a subverted child would."""
    target = tmp_path / "mix.f32"
    target.write_bytes(bytes(target_bytes))
    read, write = os.pipe()
    said = tmp_path / "answer.json"
    said.write_text(json.dumps(message))
    program = (
        "import sys; from multiprocessing.connection import Connection;"
        "Connection(int(sys.argv[1]), readable=False).send_bytes(open(sys.argv[2], 'rb').read())"
    )
    liar = subprocess.Popen([sys.executable, "-c", program, str(write), said], pass_fds=(write,))
    os.close(write)
    answer = child.Connection(read, writable=False)
    try:
        heard = child._answer(liar, answer, 1000, 60, None, Limits(), None)
    finally:
        answer.close()
        liar.wait()
    return child._believed(heard, target, Limits())


@pytest.mark.parametrize(
    "message",
    [
        {"error": ["config", "stop every worker"]},  # a setting: would exit 78, keep all
        {"error": ["storage_unavailable", "retry me forever"]},  # a retry, on every worker
        {"error": ["no_such_code", "?"]},  # unregistered
        {"error": "not a pair"},
        {"decoded": {"length": 10**9, "mean": 0.0, "std": 1.0}},  # not what it wrote
        {"decoded": "nonsense"},
    ],
)
def test_a_subverted_child_cannot_choose_the_jobs_fate(tmp_path, message):
    with pytest.raises(JobError) as caught:
        answer_from(tmp_path, message)
    assert caught.value.code == "corrupt_audio" and not caught.value.retryable


def test_what_a_subverted_child_says_reaches_nobody_at_length(tmp_path, caplog):
    text = "\x1b[2J" + "A" * 5000  # under the answer's own bound, MAX_ANSWER
    with pytest.raises(JobError) as caught, caplog.at_level("WARNING"):
        answer_from(tmp_path, {"error": ["not_audio", text], "warnings": [text] * 100})
    assert caught.value.code == "not_audio"
    assert len(caught.value.message) <= child.MAX_TEXT and caught.value.message.isprintable()
    warned = [r.getMessage() for r in caplog.records if r.name == "job.audio.decode"]
    assert len(warned) == child.MAX_WARNINGS
    assert all(len(w) <= child.MAX_TEXT and w.isprintable() for w in warned)


# -- the time budget: the probe's own until the file declares its length -------------------
def mp3_whose_length_is_guessed_short(path, seconds: float):
    """An MP3 without a Xing header that starts at 320 kb/s and goes on at 32 kb/s: FFmpeg
    estimates its length from the first frames' bitrate, about a tenth of the truth."""
    audio = np.tile(music(2.0, seed=6), int(seconds // 2))

    def part(block, kbps):
        encoder = lameenc.Encoder()
        encoder.set_in_sample_rate(44100)
        encoder.set_channels(2)
        encoder.set_quality(9)
        encoder.set_bit_rate(kbps)
        pcm = (np.clip(block.T, -1, 1) * 32767).astype(np.int16).tobytes()
        return bytes(encoder.encode(pcm) + encoder.flush())

    path.write_bytes(part(audio[:, : 2 * 44100], 320) + part(audio[:, 2 * 44100 :], 32))
    return path


def test_a_child_stalled_before_the_file_declares_its_length_has_the_probes_budget(tmp_path):
    """Not base + factor x MAX_DURATION_S (three quarters of an hour by default): a file
    that stalls the probe is stopped within the probe's own small budget."""
    path = write_audio(tmp_path / "a.flac", music(5.0, seed=3))
    cancel = Cancel()
    limits = Limits(time_base_s=2.0, time_factor=0.25)
    thread, outcome = in_background(
        lambda: decode_aside(path, tmp_path / "mix.f32", 3600, cancel=cancel, limits=limits)
    )
    os.kill(decoder_child(), signal.SIGSTOP)  # before it can have opened the file
    thread.join(20.0)
    cancel.set()  # on failure: let the thread go
    thread.join()
    error = outcome.get("error")
    assert isinstance(error, JobError) and error.code == "decode_timeout", outcome
    assert "budget of 2 s" in error.message, error.message


def test_a_length_ffmpeg_only_estimates_never_shrinks_the_budget(tmp_path):
    """The file's bitrate estimate says a tenth of its length; a decode that takes longer
    than the estimate allows (here: the child held for a while) still completes."""
    path = mp3_whose_length_is_guessed_short(tmp_path / "a.mp3", 60.0)  # "7.8 s", says FFmpeg
    target = tmp_path / "mix.f32"
    limits = Limits(time_base_s=5.0, time_factor=0.05)  # estimate: ~5.4 s; MAX_DURATION_S: 35 s
    thread, outcome = in_background(lambda: decode_aside(path, target, 600, limits=limits))
    pid = decoder_child()
    deadline = time.monotonic() + 20
    while not (target.exists() and target.stat().st_size):  # decoding: past the declaration
        assert time.monotonic() < deadline and thread.is_alive(), outcome
        time.sleep(0.002)
    os.kill(pid, signal.SIGSTOP)
    time.sleep(5.5)  # longer than the budget the estimate would give
    with contextlib.suppress(ProcessLookupError):  # gone if its budget ran out meanwhile
        os.kill(pid, signal.SIGCONT)
    thread.join(60)
    assert "value" in outcome, outcome.get("error")
    assert abs(outcome["value"].duration_s - 60.0) < 0.5
