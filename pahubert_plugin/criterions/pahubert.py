"""HuBERT masked-prediction criterion with per-label-set weights (fairseq criterion ``pahubert``).

fairseq's ``HubertCriterion`` sums the cross entropies of all label sets with one weight;
here each label set (e.g. ``km`` MFCC clusters and ``prim`` primitive-cue clusters) has its
own weight.  Logging keys and their reduction are HuBERT's (``reduce_metrics`` is
inherited): ``loss_m_i`` / ``loss_u_i`` per label set, ``correct_m_i`` / ``correct_u_i``
= accuracy on masked / unmasked frames, ``count_*`` = frames scored.  Logging outputs are
plain sums, so fairseq may sum them across workers (needed for CPU data-parallel).
"""
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from fairseq.criterions import register_criterion
from fairseq.criterions.hubert_criterion import HubertCriterion, HubertCriterionConfig


@dataclass
class PahubertCriterionConfig(HubertCriterionConfig):
    label_weights: Optional[List[float]] = field(
        default=None,
        metadata={"help": "weight of each label set's prediction loss, in task.labels order "
                          "(default 1 each); multiplies pred_masked_weight / pred_nomask_weight"},
    )


def count_correct(logits: torch.Tensor):
    """(correct, count) for HuBERT logits (S, classes + 1) whose column 0 is the target."""
    if logits.numel() == 0:
        return 0, 0
    best = logits.argmax(-1) == 0
    # all-equal rows (argmax == argmin == 0) carry no prediction: not counted correct
    tie = best & (logits.argmin(-1) == 0)
    return int(best.sum().item() - tie.sum().item()), int(best.numel())


@register_criterion("pahubert", dataclass=PahubertCriterionConfig)
class PahubertCriterion(HubertCriterion):
    def __init__(self, task, pred_masked_weight, pred_nomask_weight, loss_weights=None,
                 log_keys=None, label_weights=None):
        super().__init__(task, pred_masked_weight, pred_nomask_weight, loss_weights, log_keys)
        self.label_weights = None if label_weights is None else list(label_weights)
        num_sets = len(getattr(task.cfg, "labels", []) or [])
        if self.label_weights is not None and num_sets and len(self.label_weights) != num_sets:
            raise ValueError(
                f"criterion.label_weights has {len(self.label_weights)} entries but task.labels "
                f"has {num_sets} label sets ({list(task.cfg.labels)}); give one weight per set"
            )

    def _weighted(self, losses):
        weights = self.label_weights or [1.0] * len(losses)
        return sum(w * l for w, l in zip(weights, losses))

    def _prediction_losses(self, model, net_output, is_masked, reduction, log):
        tag = "m" if is_masked else "u"
        losses = []
        logits_list = model.get_logits(net_output, is_masked)
        targets_list = model.get_targets(net_output, is_masked)
        for i, (logits, targets) in enumerate(zip(logits_list, targets_list)):
            loss = F.cross_entropy(logits, targets, reduction=reduction)
            losses.append(loss)
            log[f"loss_{tag}_{i}"] = loss.detach().item()
            with torch.no_grad():
                log[f"correct_{tag}_{i}"], log[f"count_{tag}_{i}"] = count_correct(logits)
        frames = targets_list[0].numel() if targets_list else 0
        return losses, frames

    def forward(self, model, sample, reduce=True, log_pred=False):
        """HuBERT's loss: weighted masked + unmasked cross entropy + weighted extra losses.

        Returns (loss, sample_size = scored frames, logging_output).
        """
        net_output = model(target_list=sample["target_list"], **sample["net_input"])
        reduction = "sum" if reduce else "none"
        log = {}
        loss, sample_size = 0.0, 0

        losses_m, frames_m = self._prediction_losses(model, net_output, True, reduction, log)
        if self.pred_masked_weight > 0:
            if not losses_m:
                raise ValueError("pred_masked_weight > 0 but the model skipped masked frames")
            loss = loss + self.pred_masked_weight * self._weighted(losses_m)
            sample_size += frames_m
        losses_u, frames_u = self._prediction_losses(model, net_output, False, reduction, log)
        if self.pred_nomask_weight > 0:
            if not losses_u:
                raise ValueError("pred_nomask_weight > 0 but the model skipped unmasked frames")
            loss = loss + self.pred_nomask_weight * self._weighted(losses_u)
            sample_size += frames_u

        if self.loss_weights is not None:
            extra, names = model.get_extra_losses(net_output)
            if torch.is_tensor(extra):
                extra, names = [extra], [names]
            weights = self.loss_weights
            if len(weights) == 1 and len(extra) != 1:
                weights = weights * len(extra)  # a copy: the config is not changed
            if len(weights) != len(extra):
                raise ValueError(f"criterion.loss_weights has {len(weights)} entries for "
                                 f"{len(extra)} extra losses {names}")
            for p, name, coef in zip(extra, names, weights):
                if coef != 0 and p is not None:
                    p = coef * p.float() * sample_size
                    loss = loss + p
                    log[f"loss_{name}"] = p.item()

        if not torch.is_tensor(loss):  # nothing scored (e.g. an all-padding batch)
            loss = net_output["padding_mask"].new_zeros((), dtype=torch.float).requires_grad_()
        log = {
            "loss": loss.item() if reduce else loss.detach(),
            "ntokens": sample_size,
            "nsentences": sample["id"].numel(),
            "sample_size": sample_size,
            **log,
        }
        for key in self.log_keys:
            if key in net_output:
                log[key] = float(net_output[key])
        return loss, sample_size, log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        """HuBERT's reduction, guarded against steps that scored no frames."""
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        if sample_size == 0:
            return
        logging_outputs = list(logging_outputs)
        keys = logging_outputs[0].keys()
        # HuBERT divides correct_* by count_*: drop pairs whose count is zero everywhere
        empty = {k for k in keys if k.startswith("count_")
                 and sum(log.get(k, 0) for log in logging_outputs) == 0}
        drop = empty | {k.replace("count_", "correct_") for k in empty}
        if drop:
            logging_outputs = [{k: v for k, v in log.items() if k not in drop} for log in logging_outputs]
        HubertCriterion.reduce_metrics(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
