"""The HuBERT half every pretrainable model shares: front end -> tokens -> masked transformer.

:class:`HubertTokenEncoder` = a *front end* (any :class:`FrontEnd`: the spectral Res-U-Net stem of
Pac-HuBERT, the Demucs V2 waveform encoder, ...) that turns audio into one vector per token ->
HuBERT's gradient scaling and feature penalty -> LayerNorm -> projection to the transformer width
-> fairseq span masking with a learned mask embedding -> fairseq's wav2vec2 ``TransformerEncoder``.
It returns one :class:`EncoderOutput` whatever the front end.

:class:`MaskedPredictionHead` is HuBERT's prediction head on any token sequence and
:class:`HubertPretrainingModel` the one pretraining model body (``forward``,
``extract_features``, ``remove_pretraining_modules`` and the ``get_logits`` / ``get_targets`` /
``get_extra_losses`` interface of HuBERT's criterion): a registered pretraining model only says
how to build its front end.

A new front end is one file: subclass :class:`FrontEnd` (``out_dim``, ``hop``, ``forward``,
``token_padding_mask``) and a pretraining model ``build_front_end``; docs/ARCHITECTURE.md.

The math of masking, target subsampling and logits is fairseq's own (``HubertModel.apply_mask``,
``forward_targets``, ``compute_nce``), called on these modules rather than copied.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from fairseq.data.data_utils import compute_mask_indices
from fairseq.models import BaseFairseqModel
from fairseq.models.hubert.hubert import HubertModel
from fairseq.models.wav2vec.wav2vec2 import TransformerEncoder
from fairseq.modules import GradMultiply, LayerNorm
from torch import nn

# the attributes fairseq's HubertModel.apply_mask reads, copied from the model config
MASK_FIELDS = (
    "mask_prob", "mask_length", "mask_selection", "mask_other", "no_mask_overlap", "mask_min_space",
    "mask_channel_prob", "mask_channel_length", "mask_channel_selection", "mask_channel_other",
    "no_mask_channel_overlap", "mask_channel_min_space",
)


def seeded_apply_mask(module, x, padding_mask, target_list=None):
    """fairseq's ``HubertModel.apply_mask`` with masks that follow torch's seed.

    fairseq's ``compute_mask_indices`` draws every row from ``np.random.default_rng(None)``
    (fresh OS entropy) unless it is given ``seed``, ``epoch`` and ``indices``; HubertModel
    gives none, so no two runs mask alike.  The seed is drawn here from torch's generator,
    which fairseq reseeds every update (``common.seed + num_updates``): masks are then as
    reproducible as dropout.  ``module`` has HubertModel's mask attributes.
    """
    B, T, C = x.shape
    mask_indices = None
    if module.mask_prob > 0:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        mask_indices = compute_mask_indices(
            (B, T), padding_mask, module.mask_prob, module.mask_length, module.mask_selection,
            module.mask_other, min_masks=2, no_overlap=module.no_mask_overlap,
            min_space=module.mask_min_space, seed=seed, epoch=0, indices=torch.arange(B),
        )
        mask_indices = torch.from_numpy(mask_indices).to(x.device)
        x[mask_indices] = module.mask_emb
    if module.mask_channel_prob > 0:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        mask_channel_indices = compute_mask_indices(
            (B, C), None, module.mask_channel_prob, module.mask_channel_length,
            module.mask_channel_selection, module.mask_channel_other,
            no_overlap=module.no_mask_channel_overlap, min_space=module.mask_channel_min_space,
            seed=seed, epoch=0, indices=torch.arange(B),
        )
        x[torch.from_numpy(mask_channel_indices).to(x.device).unsqueeze(1).expand(-1, T, -1)] = 0
    return x, mask_indices


@dataclass
class FrontEndOutput:
    """What a front end makes of ``source`` (batch, channels, samples)."""

    features: torch.Tensor  # (batch, tokens, out_dim): one vector per token, before LayerNorm
    skips: List[torch.Tensor]  # the front end's intermediate maps, shallowest first (for U-Net decoders)
    context: Any = None  # whatever the front end's decoder needs to go back to audio


@dataclass
class EncoderOutput:
    """The one result type of :class:`HubertTokenEncoder`, for every front end."""

    features: torch.Tensor  # (batch, tokens, D): transformer output (of ``output_layer`` if given)
    padding_mask: Optional[torch.Tensor]  # (batch, tokens) bool, True = padding, or None
    mask_indices: Optional[torch.Tensor]  # (batch, tokens) bool, True = masked, or None
    features_pen: torch.Tensor  # scalar: HuBERT's penalty, mean square of the front end's features
    layer_results: list  # fairseq's per-layer tuples, (tokens, batch, D) first
    front: FrontEndOutput


class FrontEnd(nn.Module):
    """Audio -> one feature vector per token.  Subclasses set ``out_dim`` and ``hop`` and implement
    :meth:`forward` and :meth:`token_padding_mask`.

    ``legacy_prefixes`` maps state-dict prefixes that older checkpoints used for this front end's
    parameters (relative to the encoder, e.g. ``"stem."``) to their place under the encoder
    (``"front_end.stem."``), so those checkpoints keep loading.
    """

    out_dim: int  # width of FrontEndOutput.features
    legacy_prefixes: Dict[str, str] = {}

    @property
    def hop(self) -> float:
        """Input samples per token."""
        raise NotImplementedError

    def forward(self, source: torch.Tensor) -> FrontEndOutput:
        raise NotImplementedError

    def token_padding_mask(self, padding_mask: Optional[torch.Tensor], num_tokens: int) -> Optional[torch.Tensor]:
        """Sample-level ``(batch, samples)`` padding mask (True = pad) -> ``(batch, tokens)`` or None."""
        raise NotImplementedError


class HubertTokenEncoder(nn.Module):
    """``front_end`` + HuBERT's transformer half; see the module docstring.

    ``cfg`` holds fairseq ``HubertConfig``'s transformer, masking, ``dropout_input`` and
    ``feature_grad_mult`` fields.  Attribute names follow fairseq's ``HubertModel``
    (``layer_norm``, ``post_extract_proj``, ``mask_emb``, plus ``transformer``) so speech
    checkpoints map onto it by name (``port_hubert``).  As in HubertModel, ``post_extract_proj``
    exists only when the front end's width differs from the transformer's.
    """

    def __init__(self, front_end: FrontEnd, cfg):
        super().__init__()
        self.cfg = cfg
        self.front_end = front_end
        self.embed_dim = int(cfg.encoder_embed_dim)
        self.feature_grad_mult = cfg.feature_grad_mult
        self.layer_norm = LayerNorm(front_end.out_dim)
        self.post_extract_proj = (nn.Linear(front_end.out_dim, self.embed_dim)
                                  if front_end.out_dim != self.embed_dim else None)
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        for name in MASK_FIELDS:
            setattr(self, name, getattr(cfg, name))
        self.mask_emb = nn.Parameter(torch.empty(self.embed_dim).uniform_())
        self.transformer = TransformerEncoder(cfg)
        self._register_load_state_dict_pre_hook(self._rename_legacy_keys)

    apply_mask = seeded_apply_mask

    def _rename_legacy_keys(self, state_dict, prefix, *args):
        for old, new in self.front_end.legacy_prefixes.items():
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)

    @property
    def hop(self) -> float:
        """Input samples per token."""
        return self.front_end.hop

    def forward(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, mask: bool = False,
                output_layer: Optional[int] = None) -> EncoderOutput:
        """``source`` (batch, channels, samples); ``padding_mask`` (batch, samples), True = pad;
        ``mask``: HuBERT span masking of the transformer input; ``output_layer`` counts from 1."""
        if self.feature_grad_mult > 0:
            front = self.front_end(source)
            if self.feature_grad_mult != 1.0:
                front.features = GradMultiply.apply(front.features, self.feature_grad_mult)
        else:
            with torch.no_grad():
                front = self.front_end(source)
        features_pen = front.features.float().pow(2).mean()
        x = self.layer_norm(front.features)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        x = self.dropout_input(x)  # (batch, tokens, D)
        token_mask = self.front_end.token_padding_mask(padding_mask, x.shape[1])
        mask_indices = None
        if mask:
            # fairseq writes mask_emb into x in place: match dtypes (x is fp16 under autocast)
            x, mask_indices = self.apply_mask(x.to(self.mask_emb.dtype), token_mask, None)
        x, layer_results = self.transformer(
            x, padding_mask=token_mask, layer=None if output_layer is None else output_layer - 1)
        return EncoderOutput(x, token_mask, mask_indices, features_pen, layer_results, front)


class MaskedPredictionHead(nn.Module):
    """HuBERT's masked-prediction head on any token sequence.

    ``feat2tar_ratio`` = label frames per token (1 for 100 Hz tokens and 100 Hz labels,
    ``time_stride`` for a strided stem, ~4.65 for a 21.5 Hz Demucs bottleneck).
    """

    def __init__(self, embed_dim: int, num_classes: List[int], feat2tar_ratio: float,
                 final_dim: int = 0, logit_temp: float = 0.1, untie_final_proj: bool = False,
                 target_glu: bool = False, skip_masked: bool = False, skip_nomask: bool = False):
        super().__init__()
        final_dim = final_dim if final_dim > 0 else embed_dim
        self.num_classes = list(num_classes)
        self.feat2tar_ratio = feat2tar_ratio
        self.logit_temp = logit_temp
        self.untie_final_proj = untie_final_proj
        self.skip_masked, self.skip_nomask = skip_masked, skip_nomask
        self.target_glu = (
            nn.Sequential(nn.Linear(final_dim, final_dim * 2), nn.GLU()) if target_glu else None
        )
        out = final_dim * len(self.num_classes) if untie_final_proj else final_dim
        self.final_proj = nn.Linear(embed_dim, out)
        self.label_embs_concat = nn.Parameter(torch.FloatTensor(sum(self.num_classes), final_dim))
        nn.init.uniform_(self.label_embs_concat)

    @classmethod
    def from_config(cls, cfg, num_classes: List[int], feat2tar_ratio: float) -> "MaskedPredictionHead":
        """The head a ``HubertConfig``-style model config describes."""
        return cls(cfg.encoder_embed_dim, num_classes, feat2tar_ratio, final_dim=cfg.final_dim,
                   logit_temp=cfg.logit_temp, untie_final_proj=cfg.untie_final_proj, target_glu=cfg.target_glu,
                   skip_masked=cfg.skip_masked, skip_nomask=cfg.skip_nomask)

    compute_nce = HubertModel.compute_nce
    _forward_targets = HubertModel.forward_targets  # expects features (B, D, T)

    def forward_targets(self, features: torch.Tensor, target_list: List[torch.Tensor]):
        """Trim ``features`` (B, T', D) to the labels and pick each token's label (fairseq's rule)."""
        features, target_list = self._forward_targets(features.transpose(1, 2), target_list)
        return features.transpose(1, 2), target_list

    def _predict(self, x, target, label_embs):
        """(S, classes + 1) logits, column 0 = the target: fairseq's ``compute_nce`` of ``x`` against
        its label's embedding and every label embedding, those equal to the target's at -inf."""
        if self.target_glu is not None:  # the GLU acts on each (class, token) pair: fairseq's own path
            return self.expanded_logits(x, target, label_embs)
        return self.cosine_logits(x, target, label_embs)

    def expanded_logits(self, x, target, label_embs):
        """fairseq's path: ``compute_nce`` on the (classes, S, D) expansion of the label embeddings."""
        y = torch.index_select(label_embs, 0, target.long())  # (S, D)
        negs = label_embs.unsqueeze(1).expand(-1, x.size(0), -1)  # (classes, S, D)
        if self.target_glu is not None:
            y, negs = self.target_glu(y), self.target_glu(negs)
        return self.compute_nce(x, y, negs)

    def cosine_logits(self, x, target, label_embs):
        """``compute_nce`` without its (classes, S, D) expansion: the negatives are the label embeddings
        themselves, so every cosine is one (S, D) x (D, classes) product. Same values and -inf pattern
        (tests/test_pretraining.py compares the two); 1/3 of a CPU pretraining step at 100 clusters
        went into the expanded elementwise ops (benchmarks/bench_pretrain.py --logits-peer)."""
        xf, ef = x.float(), label_embs.float()
        cos = (xf @ ef.t()) / (xf.norm(dim=-1, keepdim=True) * ef.norm(dim=-1)[None]).clamp_min(1e-8)
        logits = (cos.type_as(x) / self.logit_temp)
        target = target.long()
        pos = logits.gather(1, target[:, None])
        same = (ef[:, None, :] == ef[None, :, :]).all(-1)  # (classes, classes): exact duplicates
        negs = logits.masked_fill(same[target], float("-inf"))  # fairseq's neg_is_pos
        return torch.cat([pos, negs], dim=1)

    def _logits(self, x, selected, target_list):
        proj = self.final_proj(x[selected])
        projs = proj.chunk(len(target_list), dim=-1) if self.untie_final_proj else [proj] * len(target_list)
        embs = self.label_embs_concat.split(self.num_classes, 0)
        return [self._predict(p, t[selected], e) for p, t, e in zip(projs, target_list, embs)]

    def forward(
        self,
        features: torch.Tensor,
        target_list: List[torch.Tensor],
        mask_indices: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
        features_pen: Optional[torch.Tensor] = None,
    ) -> Dict[str, object]:
        """``features`` (B, T', D); ``target_list`` [(B, T_labels)] at the label rate;
        ``mask_indices`` / ``padding_mask`` (B, T') bool or None.

        Returns HuBERT's net_output: ``logit_m_list`` / ``logit_u_list`` (one (S, classes+1)
        tensor per label set, or None when skipped), ``padding_mask`` (B, T'') after trimming
        to the labels, ``features_pen``.
        """
        if not target_list:
            raise ValueError("masked prediction needs target_list (one (batch, frames) tensor per label set)")
        features, target_list = self.forward_targets(features, target_list)
        b, t = features.shape[:2]
        no = features.new_zeros((b, t), dtype=torch.bool)
        padding_mask = no if padding_mask is None else padding_mask[:, :t]
        masked = no if mask_indices is None else mask_indices[:, :t]
        n = len(target_list)
        logit_m = [None] * n if self.skip_masked else self._logits(features, ~padding_mask & masked, target_list)
        logit_u = [None] * n if self.skip_nomask else self._logits(features, ~padding_mask & ~masked, target_list)
        out = {"logit_m_list": logit_m, "logit_u_list": logit_u, "padding_mask": padding_mask}
        if features_pen is not None:
            out["features_pen"] = features_pen
        return out


class HubertPretrainingModel(BaseFairseqModel):
    """The body of every masked-prediction pretraining model: ``self.encoder``
    (:class:`HubertTokenEncoder`) and ``self.head`` (:class:`MaskedPredictionHead`, None once
    :meth:`remove_pretraining_modules` ran or when the model was built to separate)."""

    get_logits = HubertModel.get_logits
    get_targets = HubertModel.get_targets
    get_extra_losses = HubertModel.get_extra_losses

    encoder: HubertTokenEncoder
    head: Optional[MaskedPredictionHead]

    @classmethod
    def build_encoder(cls, model_cfg: dict, task_cfg: dict):
        """``(encoder, resolved model config dict)`` from a checkpoint-style model section and
        pretraining task section: what ``port_hubert`` fills with a speech model's transformer, so a
        new pretraining model is a port target without touching ``port_hubert``."""
        raise NotImplementedError(f"{cls.__name__} does not say how to build its encoder alone")

    def forward(self, source, target_list=None, padding_mask=None, mask=True, features_only=False, output_layer=None):
        """``source`` (batch, channels, samples); ``target_list`` [(batch, frames)] at the label rate.

        Returns HuBERT's net_output (see :class:`MaskedPredictionHead`) or, with ``features_only``,
        ``{"x": features (batch, tokens, D), "padding_mask": ..., "encoder": EncoderOutput}``.
        """
        out = self.encoder(source, padding_mask=padding_mask, mask=mask, output_layer=output_layer)
        if features_only:
            return {"x": out.features, "padding_mask": out.padding_mask, "encoder": out}
        if self.head is None:
            raise ValueError(f"{type(self).__name__} has no prediction head (built to separate, or "
                             f"remove_pretraining_modules was called)")
        return self.head(out.features, target_list, out.mask_indices, out.padding_mask, out.features_pen)

    def extract_features(self, source, padding_mask=None, mask=False, output_layer=None):
        """HuBERT's signature: -> (features (batch, tokens, D), padding_mask (batch, tokens) or None)."""
        out = self.encoder(source, padding_mask=padding_mask, mask=mask, output_layer=output_layer)
        return out.features, out.padding_mask

    def remove_pretraining_modules(self):
        self.head = None
