"""HTDemucs' network on ONNX Runtime (CPU_BACKEND=onnx), an opt-in CPU path.

Measured on the 2-core dev host: a warmed-up session runs a window in ~0.75x PyTorch's time,
but its first two windows are slow and it loses its lead once the six encoders share the
cores, so end to end it was no faster than PyTorch there and PyTorch stays the default.
Larger CPUs may differ: `CPU_BACKEND=onnx hack/bench` measures it.

HTDemucs is STFT -> network (two U-Nets joined by a cross-transformer) -> inverse STFT. ONNX
has no complex tensors, so the STFT and its inverse stay in PyTorch (demucs' own `_spec`,
`_magnitude`, `_mask`, `_ispec`) and only the network between them runs in onnxruntime. It is
exported once per model weights and library versions into a cache folder (`stem-job
prefetch-model` does it when CPU_BACKEND=onnx); outputs match PyTorch to ~80-95 dB.
"""

import hashlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)
EXPORT_VERSION = 1          # bump when Network changes: older cached exports are not reused


class Network(torch.nn.Module):
    """HTDemucs.forward between the spectrogram and the mask (demucs 4.1), for export.

    (mix, magnitude) -> (frequency-branch output before the mask, time-branch output)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, mix, mag):
        m = self.model
        batch, _, bins, frames = mag.shape
        mean, std = mag.mean(dim=(1, 2, 3), keepdim=True), mag.std(dim=(1, 2, 3), keepdim=True)
        x = (mag - mean) / (1e-5 + std)
        meant, stdt = mix.mean(dim=(1, 2), keepdim=True), mix.std(dim=(1, 2), keepdim=True)
        xt = (mix - meant) / (1e-5 + stdt)
        saved, saved_t, lengths, lengths_t = [], [], [], []
        for idx, encode in enumerate(m.encoder):
            lengths.append(x.shape[-1])
            inject = None
            if idx < len(m.tencoder):
                lengths_t.append(xt.shape[-1])
                xt = m.tencoder[idx](xt)
                if m.tencoder[idx].empty:
                    inject = xt           # branches merge here
                else:
                    saved_t.append(xt)
            x = encode(x, inject)
            if idx == 0 and m.freq_emb is not None:
                emb = m.freq_emb(torch.arange(x.shape[-2])).t()[None, :, :, None].expand_as(x)
                x = x + m.freq_emb_scale * emb
            saved.append(x)
        if m.crosstransformer:
            if m.bottom_channels:
                f = x.shape[2]
                x = m.channel_upsampler(x.flatten(2)).unflatten(2, (f, -1))
                xt = m.channel_upsampler_t(xt)
            x, xt = m.crosstransformer(x, xt)
            if m.bottom_channels:
                x = m.channel_downsampler(x.flatten(2)).unflatten(2, (f, -1))
                xt = m.channel_downsampler_t(xt)
        for idx, decode in enumerate(m.decoder):
            x, pre = decode(x, saved.pop(-1), lengths.pop(-1))
            offset = m.depth - len(m.tdecoder)
            if idx >= offset:
                tdec = m.tdecoder[idx - offset]
                if tdec.empty:
                    xt, _ = tdec(pre[:, :, 0], None, lengths_t.pop(-1))
                else:
                    xt, _ = tdec(xt, saved_t.pop(-1), lengths_t.pop(-1))
        sources = len(m.sources)
        x = x.view(batch, sources, -1, bins, frames) * std[:, None] + mean[:, None]
        xt = xt.view(batch, sources, -1, mix.shape[-1]) * stdt[:, None] + meant[:, None]
        return x, xt


def is_htdemucs(model) -> bool:
    from demucs.htdemucs import HTDemucs
    return isinstance(model, HTDemucs)


def fingerprint(model, segment: int) -> str:
    """Names an export: the weights, the window length and every library that shapes the graph."""
    import demucs
    import onnxruntime
    digest = hashlib.blake2b(digest_size=12)
    digest.update(f"{EXPORT_VERSION} {segment} {torch.__version__} {onnxruntime.__version__} "
                  f"{demucs.__version__} {type(model).__name__}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_folder(configured: str = "") -> Path:
    """ONNX_CACHE_DIR, else $XDG_CACHE_HOME/stem-job, else ~/.cache/stem-job."""
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stem-job"


def export(model, segment: int, target: Path) -> None:
    """Export the network for one (1, 2, segment) window, atomically (temp name, rename)."""
    from .storage import atomic_write
    mix = torch.zeros(1, model.audio_channels, segment)
    with torch.inference_mode():
        mag = model._magnitude(model._spec(mix))
    graph = io.BytesIO()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)   # its fused op has no ONNX export
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(Network(model).eval(), (mix, mag), graph, opset_version=17,
                              dynamo=False, input_names=["mix", "mag"],
                              output_names=["freq", "time"])
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, graph.getvalue())


def exported(model, segment: int, cache_dir: str = "") -> Path:
    """The cached export for this model, made now when missing (a few seconds per model)."""
    name = f"htdemucs-network-{fingerprint(model, segment)}.onnx"
    folder = cache_folder(cache_dir)
    path = folder / name
    if path.is_file():
        return path
    try:
        export(model, segment, path)
    except OSError as exc:              # read-only cache: export for this process only
        log.warning("ONNX cache %s not writable (%s); exporting to a temp folder", folder, exc)
        path = Path(tempfile.mkdtemp(prefix="stem-job-onnx-")) / name
        export(model, segment, path)
    log.info("exported the network of %s to %s", type(model).__name__, path)
    return path


class OnnxHTDemucs:
    """Called like the HTDemucs it wraps, on full (batch, 2, segment) windows, CPU only."""

    def __init__(self, model, cache_dir: str = "", threads: int | None = None):
        import onnxruntime
        self.model = model
        self.segment = int(model.segment * model.samplerate)
        path = exported(model, self.segment, cache_dir)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # measured on a 2-core host: spinning workers gain nothing once the six encoders
        # share the cores, the memory-pattern planner makes the second run ~2x slower, and
        # without ORT's own arena freed buffers go back to tcmalloc (first window ~1 s less
        # system time, ~200 MB less peak RSS)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_mem_pattern = False
        options.enable_cpu_mem_arena = False
        self.session = onnxruntime.InferenceSession(str(path), options,
                                                    providers=["CPUExecutionProvider"])

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        assert windows.shape[-1] == self.segment, (windows.shape, self.segment)
        return torch.cat([self._one(window[None]) for window in windows])

    def _one(self, mix: torch.Tensor) -> torch.Tensor:
        m = self.model
        z = m._spec(mix)
        freq, time = self.session.run(None, {"mix": mix.numpy(),
                                             "mag": np.ascontiguousarray(m._magnitude(z).numpy())})
        return m._ispec(m._mask(z, torch.from_numpy(freq)), self.segment) + torch.from_numpy(time)
