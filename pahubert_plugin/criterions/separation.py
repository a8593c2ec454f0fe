"""fairseq criterion ``separation``: L1 on waveforms, optionally plus a multi-resolution STFT loss and a
thresholded signal-to-noise loss.

The model is called as ``model(**sample["net_input"])`` and returns estimates
``(batch, sources, channels, samples)`` matching ``sample["target"]``.  The loss of one
example is the mean over sources of each source's loss; logs carry ``loss`` and
``loss_<source>`` (all sums over examples, normalised by ``sample_size`` = examples).
The multi-resolution STFT term is spectral convergence + log-magnitude L1 per resolution
(Yamamoto et al., Parallel WaveGAN, 2020), averaged over resolutions.
The SNR term is the negative SNR of each source in dB, softly floored at ``snr_max`` dB below the
mixture's power (a variant of the thresholded SNR of Wisdom et al. 2020, floored by the mixture x rather
than by the reference, so that a silent reference gives a bounded loss):
``10 log10((P(s - s_hat) + tau P(x) + eps) / (P(s) + tau P(x) + eps))``, ``tau = 10^(-snr_max / 10)``.
It trains each clip on the decibel scale that speech metrics (SI-SDR) average over, where the L1 loss
weighs loud clips more, and it keeps the estimates' level (unlike SI-SDR).

Mixture invariant training (Wisdom et al., "Unsupervised sound separation using mixture invariant
training", NeurIPS 2020), semi-supervised: batch rows marked ``sample["mixit"]`` are a mixture of two
unlabelled mixtures (``task.mixit_data``). The model's outputs (``slots_per_source`` per source, called
with ``slots=True``) are split between the two mixtures in the way that reconstructs them best, and that
reconstruction's loss (the same loss, the two mixtures in place of the sources) times ``mixit_weight``
is the row's loss (logged as ``loss_mixit``). Labelled rows train the sum of each source's slots.
"""
import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from omegaconf import II

from ..metrics import sdr


@dataclass
class SeparationCriterionConfig(FairseqDataclass):
    wave_weight: float = field(default=1.0, metadata={"help": "weight of the L1 waveform loss"})
    stft_weight: float = field(default=0.0, metadata={"help": "weight of the multi-resolution STFT loss (0: off)"})
    stft_fft_sizes: List[int] = field(default_factory=lambda: [512, 1024, 2048], metadata={
        "help": "FFT sizes of the multi-resolution STFT loss (hop = size / 4, Hann window)"})
    snr_weight: float = field(default=0.0, metadata={
        "help": "weight of the thresholded SNR loss (negative SNR in dB, per source; 0: off); e.g. "
                "criterion.wave_weight=0 criterion.snr_weight=1 trains on SNR alone"})
    snr_max: float = field(default=30.0, metadata={
        "help": "the SNR loss's soft floor in dB: error power snr_max dB under the mixture's adds little more "
                "(a source as loud as the mixture gains at most about snr_max dB, a quieter one less)"})
    mixit_weight: float = field(default=1.0, metadata={
        "help": "weight of the mixture invariant loss of rows that mix two unlabelled mixtures (task.mixit_data)"})
    sources: List[str] = II("task.sources")


def mixit_assignments(outputs: int) -> torch.Tensor:
    """Every way to give each of ``outputs`` outputs to one of two mixtures: ``(2 ** outputs, 2, outputs)``
    of 0/1, each output in exactly one row."""
    first = torch.tensor(list(itertools.product((0.0, 1.0), repeat=outputs)))  # (A, outputs)
    return torch.stack([first, 1.0 - first], dim=1)


SNR_EPS = 1e-10  # power (about -100 dBFS) added to both sides: an all-silent row gives loss 0 and finite gradients


def thresholded_snr_loss(est: torch.Tensor, ref: torch.Tensor, snr_max: float) -> torch.Tensor:
    """``est``/``ref`` ``(batch, sources, channels, samples)`` -> ``(batch, sources)``: the negative SNR in dB,
    error and reference power each plus ``10^(-snr_max/10)`` times the mixture's (the sum of ``ref`` over
    sources) and ``SNR_EPS``. Its best value, at a perfect estimate, is ``-10 log10(1 + P(s) / floor)``: about
    ``-snr_max`` for a source as loud as the mixture, less negative for a quieter one, 0 for a silent one; it
    stays finite, with finite gradients, for silent sources and silent mixtures."""
    est, ref = est.float(), ref.float()
    floor = 10.0 ** (-snr_max / 10.0) * ref.sum(dim=1, keepdim=True).pow(2).mean(dim=(-2, -1)) + SNR_EPS
    samples = ref.shape[-2] * ref.shape[-1]  # metrics.sdr sums powers over channels and samples
    return -sdr(ref, est, eps=floor * samples)  # the MDX SDR, its eps a per-row floor: (batch, 1) broadcasts


def multi_resolution_stft_loss(est: torch.Tensor, ref: torch.Tensor, fft_sizes: List[int]) -> torch.Tensor:
    """``est``/``ref`` ``(batch, sources, channels, samples)`` -> ``(batch, sources)``."""
    b, s, c, t = ref.shape
    total = est.new_zeros(b, s)
    for n_fft in fft_sizes:
        window = torch.hann_window(n_fft, device=est.device)

        def mag(x):  # (batch, sources, channels * freq * frames) magnitudes
            spec = torch.stft(x.reshape(-1, t).float(), n_fft, n_fft // 4, window=window, return_complex=True)
            return spec.abs().clamp_min(1e-7).reshape(b, s, -1)

        m_est, m_ref = mag(est), mag(ref)
        convergence = (m_ref - m_est).norm(dim=-1) / m_ref.norm(dim=-1).clamp_min(1e-7)
        log_l1 = (m_ref.log() - m_est.log()).abs().mean(dim=-1)
        total = total + convergence + log_l1
    return total / len(fft_sizes)


@register_criterion("separation", dataclass=SeparationCriterionConfig)
class SeparationCriterion(FairseqCriterion):
    def __init__(self, task, wave_weight=1.0, stft_weight=0.0, stft_fft_sizes=(512, 1024, 2048), mixit_weight=1.0,
                 sources=(), snr_weight=0.0, snr_max=30.0):
        super().__init__(task)
        for name, value in (("wave_weight", wave_weight), ("stft_weight", stft_weight), ("snr_weight", snr_weight),
                            ("mixit_weight", mixit_weight)):
            if value < 0:
                raise ValueError(f"criterion.{name} must be >= 0, got {value}")
        if wave_weight == 0 and stft_weight == 0 and snr_weight == 0:
            raise ValueError("criterion: wave_weight, stft_weight and snr_weight are all 0; nothing to train on")
        if snr_max <= 0:
            raise ValueError(f"criterion.snr_max must be > 0 dB, got {snr_max}")
        self.wave_weight, self.stft_weight, self.mixit_weight = wave_weight, stft_weight, mixit_weight
        self.snr_weight, self.snr_max = snr_weight, snr_max
        self.stft_fft_sizes = list(stft_fft_sizes)
        self.sources = list(sources) or list(getattr(task, "sources", []))

    def compute_loss(self, estimates: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``(batch, sources, channels, samples)`` each -> (loss summed over the batch,
        ``{"loss_<source>": summed over the batch}``)."""
        if estimates.shape != target.shape:
            raise ValueError(f"model returned {tuple(estimates.shape)}, target is {tuple(target.shape)} "
                             f"(batch, sources, channels, samples)")
        per_source = self.per_source_loss(estimates, target)  # (batch, sources)
        names = self.sources if len(self.sources) == per_source.shape[1] else [
            str(i) for i in range(per_source.shape[1])]
        parts = {f"loss_{n}": per_source[:, j].detach().sum() for j, n in enumerate(names)}
        return per_source.mean(dim=1).sum(), parts

    def per_source_loss(self, estimates: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(batch, sources, channels, samples)`` each -> ``(batch, sources)``."""
        per_source = estimates.new_zeros(estimates.shape[:2])
        if self.wave_weight > 0:
            per_source = per_source + self.wave_weight * (estimates - target).abs().mean(dim=(-2, -1))
        if self.stft_weight > 0:
            per_source = per_source + self.stft_weight * multi_resolution_stft_loss(
                estimates, target, self.stft_fft_sizes)
        if self.snr_weight > 0:
            per_source = per_source + self.snr_weight * thresholded_snr_loss(estimates, target, self.snr_max)
        return per_source

    def mixit_loss(self, outputs: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        """``outputs (batch, M, channels, samples)``, ``refs (batch, 2, channels, samples)`` (the two mixtures
        that were mixed) -> per row, the loss of the assignment of outputs to mixtures that reconstructs them
        best (mean over the two mixtures), ``(batch,)``."""
        b, m = outputs.shape[:2]
        assign = mixit_assignments(m).to(outputs)  # (A, 2, M)
        remix = torch.einsum("aom,bmct->baoct", assign, outputs)  # (batch, A, 2, channels, samples)
        a = assign.shape[0]
        per_mix = self.per_source_loss(remix.flatten(0, 1), refs.repeat_interleave(a, dim=0))  # (batch * A, 2)
        return per_mix.mean(dim=1).view(b, a).min(dim=1).values

    def forward(self, model, sample, reduce=True):
        mixit = sample.get("mixit")
        if mixit is None or not bool(mixit.any()):
            estimates = model(**sample["net_input"])
            loss, parts = self.compute_loss(estimates, sample["target"])
        else:
            loss, parts = self._forward_mixit(model, sample, mixit.to(sample["target"].device))
        batch = sample["target"].shape[0]
        logging_output = {
            "loss": loss.item(), "sample_size": batch, "nsentences": batch,
            "ntokens": sample.get("ntokens", batch),
            **{k: v.item() for k, v in parts.items()},
        }
        if mixit is not None:  # the per-source losses are over the labelled rows, loss_mixit over the others
            logging_output["nmixit"] = int(mixit.sum())
        return loss, batch, logging_output

    def _forward_mixit(self, model, sample, mixit: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        target = sample["target"]
        outputs = model(**sample["net_input"], slots=True)  # (batch, sources * slots, channels, samples)
        sources = target.shape[1]
        if outputs.shape[1] % sources or outputs.shape[1] // sources < 2:
            raise ValueError(f"mixture invariant training (task.mixit_data) needs model.slots_per_source >= 2; the "
                             f"model gives {outputs.shape[1]} outputs for {sources} sources")
        estimates = outputs.unflatten(1, (sources, -1)).sum(2)
        labelled = ~mixit
        if bool(labelled.any()):
            loss, parts = self.compute_loss(estimates[labelled], target[labelled])
        else:
            loss, parts = outputs.new_zeros(()), {}
        mixed = self.mixit_weight * self.mixit_loss(outputs[mixit], sample["mixit_refs"][mixit]).sum()
        parts["loss_mixit"] = mixed.detach()
        return loss + mixed, parts

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        if sample_size == 0:
            return
        loss = sum(log.get("loss", 0.0) for log in logging_outputs)
        metrics.log_scalar("loss", loss / sample_size, sample_size, round=4)
        mixed = sum(log.get("nmixit", 0) for log in logging_outputs)
        keys = sorted({k for log in logging_outputs for k in log if k.startswith("loss_")})
        for k in keys:
            value = sum(log.get(k, 0.0) for log in logging_outputs)
            rows = mixed if k == "loss_mixit" else sample_size - mixed  # each loss over the rows it is of
            if rows > 0:
                metrics.log_scalar(k, value / rows, rows, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True  # every value is a sum over examples (see reduce_metrics)
