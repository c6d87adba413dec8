"""The zero-cost stand-in model of `hack/bench --floor`: every source is mix/6.

A real demucs model class (sources, samplerate, audio_channels, segment), saved as a demucs
local repo, so `stem-job` loads it through MODEL_DIR and runs the whole pipeline unchanged:
what remains of the run time is everything but the network (the floor of any deployment).
"""

from fractions import Fraction
from pathlib import Path

import torch

SOURCES = ["drums", "bass", "other", "vocals", "guitar", "piano"]


class MixShare(torch.nn.Module):
    def __init__(
        self, sources=tuple(SOURCES), samplerate=44100, audio_channels=2, segment=Fraction(39, 5)
    ):
        super().__init__()
        self.sources = list(sources)
        self.samplerate = samplerate
        self.audio_channels = audio_channels
        self.segment = segment

    def forward(self, mix):
        # divided once, then copied out: the output is a whole (batch, sources, 2, n) array, as
        # a real model's (or its copy back from a GPU) is, so that nothing downstream reads a
        # broadcast view a real model never gives; the model's own cost stays near nothing
        share = (mix / len(self.sources))[:, None]
        return share.expand(-1, len(self.sources), -1, -1).contiguous()


def write_floor_model(folder, name: str = "htdemucs_6s") -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"klass": MixShare, "args": (), "kwargs": {}, "state": {}}, folder / "floor.th")
    (folder / f"{name}.yaml").write_text("models: ['floor']\n")
    return folder
