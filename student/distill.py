"""The student's forward pass for distillation: hidden states in, loss *sums* out.

``DistillStudent`` wraps a ``LlavaForConditionalGeneration`` so that everything that touches a
parameter (vision tower, projector, language model, LM head) runs inside one ``forward``: that is
what DDP and FSDP need (FSDP only un-shards a module's weights inside its forward). It runs the LLaVA
*base* model for the final hidden states and applies the LM head only at the positions that carry a
loss, chunk by chunk (``chunked_distill``), so fp32 ``[batch, seq, vocab]`` logits never exist.

The loss math lives in ``student.losses``; this module only gathers positions and calls it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from student.losses import chunked_distill, head_gram, rdist, relation_from_hidden

SUM_KEYS = ("ce_sum", "kd_response_sum", "kd_visual_sum", "rdist_sum")
COUNT_KEYS = ("ce_count", "kd_response_count", "kd_visual_count", "rdist_count")
KINDS = ("response", "visual")


@dataclass(frozen=True)
class LossSettings:
    distill: bool = True  # MDist + RDist (False: CE only, the teacher arrays are ignored)
    divergence: str = "fkl"
    mode: str = "tail"  # tail | renorm (sample-mode caches are detected from their counts)
    jsd_beta: float = 0.5
    chunk_size: int = 1024


def _teacher(batch: dict[str, Tensor], kind: str) -> dict[str, Tensor] | None:
    if f"{kind}_ids" not in batch:
        return None
    t = {"ids": batch[f"{kind}_ids"], "logprobs": batch[f"{kind}_logprobs"], "tail": batch[f"{kind}_tail"]}
    if f"{kind}_counts" in batch:
        t["counts"] = batch[f"{kind}_counts"]
    return t


def batch_counts(batch: dict, distill: bool) -> Tensor:
    """Valid positions of a collated micro-batch, float64 [4] in ``COUNT_KEYS`` order.

    Known from the data alone (no forward pass), so the global counts of an optimizer step can be
    all-reduced before its first backward.
    """
    ce = float((batch["response_targets"] != -100).sum())
    kd = []
    for kind in KINDS:
        ids = batch.get(f"{kind}_ids")
        kd.append(float((ids >= 0).any(-1).sum()) if (distill and ids is not None) else 0.0)
    rel = float(batch["relation_index"].shape[0]) if (distill and "relation_index" in batch) else 0.0
    return torch.tensor([ce, kd[0], kd[1], rel], dtype=torch.float64)


class DistillStudent(nn.Module):
    """``forward(batch) -> {ce_sum, kd_response_sum, kd_visual_sum, rdist_sum}`` (fp32 scalars)."""

    def __init__(self, student: nn.Module, settings: LossSettings):
        super().__init__()
        self.student = student
        self.settings = settings

    def _needs_vision_dummy(self) -> bool:
        base = self.student.model
        return any(p.requires_grad for m in (base.vision_tower, base.multi_modal_projector) for p in m.parameters())

    def _dummy_image_term(self, like: Tensor) -> Tensor:
        """0 * (projector(vision(zeros))).sum() for a micro-batch without images.

        Every rank then uses every trainable parameter in every micro-batch (DDP without
        find_unused_parameters) and runs the same modules (FSDP's all-gathers stay in step).
        """
        vcfg = self.student.config.vision_config
        size = vcfg.image_size if isinstance(vcfg.image_size, int) else vcfg.image_size[0]
        px = torch.zeros(1, vcfg.num_channels, size, size, device=like.device, dtype=self.student.dtype)
        feats = self.student.model.get_image_features(pixel_values=px).pooler_output
        return 0.0 * sum(f.float().sum() for f in feats)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        s = self.settings
        pixel_values = batch.get("pixel_values")
        out = self.student.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=None if pixel_values is None else pixel_values.to(self.student.dtype),
            use_cache=False,
        )
        hidden = out.last_hidden_state  # [B, T, d]
        flat = hidden.reshape(-1, hidden.shape[-1])
        head = self.student.get_output_embeddings().weight  # [V, d]
        common = {"divergence": s.divergence, "mode": s.mode, "jsd_beta": s.jsd_beta, "chunk_size": s.chunk_size}

        res = chunked_distill(flat[batch["response_index"]], head, targets=batch["response_targets"],
                              teacher=_teacher(batch, "response") if s.distill else None, **common)
        sums = {"ce_sum": res["ce_sum"], "kd_response_sum": res["kd_sum"]}
        zero = res["ce_sum"] * 0.0
        if s.distill and _teacher(batch, "visual") is not None:
            vis = chunked_distill(flat[batch["visual_index"]], head, teacher=_teacher(batch, "visual"), **common)
            sums["kd_visual_sum"] = vis["kd_sum"]
        else:
            sums["kd_visual_sum"] = zero
        if s.distill and "relation_index" in batch:
            # R_s = H (W^T W) H^T per image, in fp32 (outside autocast): never the N x V logits.
            with torch.autocast(device_type=flat.device.type, enabled=False):
                gram = head_gram(head)
                r_s = relation_from_hidden(flat[batch["relation_index"]].float(), None, gram=gram)  # [I, N, N]
                sums["rdist_sum"] = rdist(r_s, batch["relation_target"]).sum()
        else:
            sums["rdist_sum"] = zero
        if pixel_values is None and self._needs_vision_dummy():
            sums["ce_sum"] = sums["ce_sum"] + self._dummy_image_term(flat)
        return sums
