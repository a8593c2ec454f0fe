"""Stage-5 reader: hidden features of a pretrained model's transformer layer, for k-means.

fairseq's ``dump_hubert_feature.py`` hard-codes CUDA and 16 kHz mono; this reader serves
music models on CPU or GPU:

* the checkpoint loads through fairseq's ``load_model_ensemble_and_task`` (any model whose
  ``extract_features(source, padding_mask=None, mask=False, output_layer=None)`` follows
  HuBERT's signature: ``pahubert``, ``demucs_v2_hubert``, ...);
* audio is read at the model's rate and channel count, in chunks of ``max_chunk`` seconds
  (each decoded with a seek), so hour-long files fit in memory;
* tokens are mapped onto the 100 Hz frame rule: a chunk of ``n`` samples gives exactly
  ``frames.num_frames(n, sr)`` rows (a coarser token rate, e.g. a 21.5 Hz Demucs
  bottleneck, repeats each token over the frames it covers), and the whole file gives
  ``num_frames(ref_len, sample_rate)`` rows at the manifest's rate.
"""
import logging
from typing import Optional

import torch

from .. import frames
from ..data.audio import audio_info, read_audio
from .base import FeatureReader

logger = logging.getLogger(__name__)

DEFAULT_MAX_CHUNK_SECONDS = 60.0


def tokens_to_frames(feats: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(tokens, dim) -> (num_frames, dim): frame f takes the token that covers it."""
    tokens = feats.shape[0]
    if tokens == num_frames:
        return feats
    index = torch.arange(num_frames, device=feats.device) * tokens // max(num_frames, 1)
    return feats[index.clamp_max(tokens - 1)]


class HubertFeatureReader(FeatureReader):
    """``get_feats(path, ref_len=None) -> (frames, dim)`` from transformer layer ``layer`` (1-based).

    Args:
        ckpt: fairseq checkpoint of a pretraining run (``checkpoint_best.pt``).
        layer: transformer layer whose output is read, counted from 1 (HuBERT uses 6 of 12).
        sample_rate: the rate the manifest's num_samples are counted at (frame count rule);
            the audio itself is read at the model's own rate.
        device: ``cpu`` or ``cuda``.
        max_chunk: longest piece of audio, in seconds, given to the model at once.
        arg_overrides: fairseq ``arg_overrides`` for loading, e.g. ``{"label_dir": ...}``
            if the pretraining labels moved.
    """

    def __init__(self, ckpt: str, layer: int, sample_rate: int, device: str = "cpu",
                 max_chunk: Optional[float] = None, arg_overrides: Optional[dict] = None):
        from ..registry import register

        register()  # our models and the checkpoint allow-list (deferred in our CLIs)
        from fairseq import checkpoint_utils

        super().__init__(sample_rate, channels=None)
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False; use --device cpu")
        from ..checkpoint import PRETRAINING, expecting

        with expecting(PRETRAINING):  # a pahubert pretraining model, checked before anything is built
            models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(ckpt)],
                                                                            arg_overrides=arg_overrides)
        self.model = models[0].eval().to(device)
        self.device = device
        self.model_sample_rate = int(task.cfg.sample_rate)
        self.model_channels = int(getattr(task.cfg, "audio_channels"))
        num_layers = getattr(cfg.model, "encoder_layers", None)
        if layer < 1 or (num_layers is not None and layer > num_layers):
            raise ValueError(f"layer {layer} out of range: the model has {num_layers} transformer layers (1-based)")
        self.layer = layer
        self.dim = int(getattr(cfg.model, "encoder_embed_dim", -1))
        seconds = DEFAULT_MAX_CHUNK_SECONDS if max_chunk is None else float(max_chunk)
        hop = frames.hop_length(self.model_sample_rate)
        self.chunk = max(hop, int(seconds * self.model_sample_rate) // hop * hop)  # whole frames
        logger.info(f"{type(self.model).__name__} from {ckpt}: layer {layer}, dim {self.dim}, "
                    f"{self.model_sample_rate} Hz x {self.model_channels} ch, chunks of {self.chunk} samples, {device}")

    def chunks(self, total: int):
        """(offset, length) pieces of at most ``self.chunk`` samples; a short tail joins the last."""
        starts = list(range(0, total, self.chunk))
        if len(starts) > 1 and total - starts[-1] < self.chunk // 2:
            starts.pop()
        ends = starts[1:] + [total]
        return [(s, e - s) for s, e in zip(starts, ends)]

    def _forward(self, read_piece, total: int) -> torch.Tensor:
        """Run the model over ``total`` samples (model rate) in chunks; ``read_piece(offset, length)``
        returns ``(model_channels, length)``. Returns ``(frames, dim)`` on the CPU."""
        pieces = []
        for offset, length in self.chunks(total):
            n = frames.num_frames(length, self.model_sample_rate)
            if n == 0:
                continue
            wav = read_piece(offset, length)
            feats, _ = self.model.extract_features(wav[None].to(self.device), padding_mask=None, mask=False,
                                                   output_layer=self.layer)  # (1, tokens, dim)
            pieces.append(tokens_to_frames(feats[0].float(), n).cpu())
        return torch.cat(pieces) if pieces else torch.zeros(0, self.dim)

    @torch.inference_mode()
    def extract(self, wav: torch.Tensor) -> torch.Tensor:
        """Features of ``wav`` ``(channels, samples)`` at ``self.sample_rate`` -> ``(frames, dim)``."""
        import torchaudio.functional as AF

        from ..data.audio import apply_channel_policy

        want = frames.num_frames(wav.shape[-1], self.sample_rate)
        if self.sample_rate != self.model_sample_rate:
            wav = AF.resample(wav, self.sample_rate, self.model_sample_rate)
        wav = torch.from_numpy(apply_channel_policy(wav.numpy(), self.model_channels))
        feats = self._forward(lambda offset, length: wav[:, offset:offset + length], wav.shape[-1])
        return frames.fit_frames(feats, want)

    @torch.inference_mode()
    def get_feats(self, path, ref_len: Optional[int] = None) -> torch.Tensor:
        """Features of the file at ``path``: float32 ``(frames, dim)`` on the CPU."""
        info = audio_info(path)
        feats = self._forward(
            lambda offset, length: read_audio(path, self.model_sample_rate, self.model_channels, offset=offset,
                                              num_samples=length, info=info)[0],
            info.samples_at(self.model_sample_rate))
        want = frames.num_frames(ref_len if ref_len is not None else info.samples_at(self.sample_rate),
                                 self.sample_rate)
        try:
            return frames.fit_frames(feats, want)
        except ValueError as e:
            raise ValueError(f"{path}: {e} (manifest says {ref_len} samples at {self.sample_rate} Hz; "
                             f"is the manifest stale or at another rate?)") from None
