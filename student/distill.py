"""The student's forward pass for distillation: hidden states in, loss *sums* out.

``DistillStudent`` wraps a ``LlavaForConditionalGeneration`` so that everything that touches a
parameter (vision tower, projector, language model, LM head, and the LLaVADI hidden-state projector
when one is used) runs inside one ``forward``: that is what DDP and FSDP need (FSDP only un-shards a
module's weights inside its forward). It runs the LLaVA *base* model for the final hidden states and
applies the LM head only at the positions that carry a loss, chunk by chunk (``chunked_distill``), so
fp32 ``[batch, seq, vocab]`` logits never exist.

Terms (each a *sum* over its valid items; ``accumulate_gradients`` divides by the step's global
count of them, see ``SUM_KEYS``/``COUNT_KEYS``):

* ``ce``: cross-entropy on the response tokens;
* ``kd_response``/``kd_visual``/``kd_prompt``: MDist at the position kinds listed in
  ``LossSettings.kinds`` (LLaVA-KD: response + visual; LLaVADI: all three);
* ``rdist``: relation distillation per image;
* ``hidden``: LLaVADI hidden-state alignment, ``HiddenProjector(h_s)`` vs the teacher's stored
  final-layer states at the same positions (the ``kinds`` positions), one item per position;
* ``affinity``: LLaVADI affinity, one item per sample with both visual and response positions.

The loss math lives in ``student.losses``; this module only gathers positions and calls it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from kd_cache.schema import DEFAULT_KINDS, IGNORE_INDEX, KINDS
from student.losses import (
    affinity_loss,
    chunked_distill,
    head_gram,
    hidden_alignment,
    rdist,
    relation_from_hidden,
)

TERMS = ("ce", "kd_response", "kd_visual", "kd_prompt", "rdist", "hidden", "affinity")
SUM_KEYS = tuple(f"{t}_sum" for t in TERMS)
COUNT_KEYS = tuple(f"{t}_count" for t in TERMS)

PROJECTOR_DIR = "hidden_projector"
PROJECTOR_WEIGHTS = "model.safetensors"
PROJECTOR_CONFIG = "config.json"


@dataclass(frozen=True)
class LossSettings:
    distill: bool = True  # teacher terms on (False: CE only, the teacher arrays are ignored)
    divergence: str = "fkl"
    mode: str = "tail"  # tail | renorm (sample-mode caches are detected from their counts)
    jsd_beta: float = 0.5
    chunk_size: int = 1024
    # Logits of the LM-head chunks are kept for backward when all of a micro-batch's fit in this many
    # MiB (estimated as LOGIT_BYTES_HELD per logit); above it each chunk is recomputed in backward
    # (one more head matmul and softmax per chunk, memory bounded by one chunk). 0: always recompute.
    head_memory_mb: int = 1024
    kinds: tuple[str, ...] = DEFAULT_KINDS  # positions that get MDist (and hidden alignment)
    zscore: bool = False  # logit standardisation over the stored ids (student.losses)
    hidden_loss: str | None = None  # "mse" | "cosine": hidden-state alignment on (needs a projector)
    affinity: bool = False  # LLaVADI affinity between visual and response positions


@dataclass(frozen=True)
class LossWeights:
    """Weights of the terms after CE (field order kept so ``(alpha, beta, gamma)`` tuples still work)."""

    alpha: float = 1.0  # MDist, response positions
    beta: float = 1.0  # MDist, visual positions
    gamma: float = 1.0  # RDist
    delta: float = 1.0  # MDist, prompt positions
    hidden: float = 0.0  # hidden-state alignment
    affinity: float = 0.0  # affinity

    def vector(self) -> list[float]:
        """Weights in ``SUM_KEYS`` order (CE weighs 1)."""
        return [1.0, self.alpha, self.beta, self.delta, self.gamma, self.hidden, self.affinity]


class HiddenProjector(nn.Module):
    """LLaVADI's token-alignment head: ``Linear(d_s, d_t) -> GELU -> Linear(d_t, d_t)``.

    Maps the student's final hidden states to the teacher's width. It trains with the student but is
    not part of it: ``kd-train`` saves it beside the model as ``OUT/hidden_projector/`` (``config.json``
    + ``model.safetensors`` with ``fc1.*``/``fc2.*``), and ``HiddenProjector.from_pretrained`` reads it.
    """

    def __init__(self, student_size: int, teacher_size: int):
        super().__init__()
        self.student_size, self.teacher_size = int(student_size), int(teacher_size)
        self.fc1 = nn.Linear(self.student_size, self.teacher_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(self.teacher_size, self.teacher_size)

    def forward(self, hidden: Tensor) -> Tensor:
        """[P, d_s] -> [P, d_t] (in the projector's dtype; the caller upcasts for the loss)."""
        return self.fc2(self.act(self.fc1(hidden.to(self.fc1.weight.dtype))))

    def config(self) -> dict:
        return {"architecture": "Linear(student_hidden_size, teacher_hidden_size) -> GELU -> "
                                "Linear(teacher_hidden_size, teacher_hidden_size)",
                "student_hidden_size": self.student_size, "teacher_hidden_size": self.teacher_size,
                "activation": "gelu"}

    def save_pretrained(self, path: str | Path, state_dict: dict[str, Tensor] | None = None,
                        extra: dict | None = None) -> Path:
        """Write ``path/config.json`` (sizes + ``extra``, e.g. the training settings) and
        ``path/model.safetensors``; ``state_dict`` overrides this module's own (e.g. gathered from FSDP)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = self.state_dict() if state_dict is None else state_dict
        save_file({k: v.detach().to("cpu").contiguous() for k, v in sd.items()}, str(path / PROJECTOR_WEIGHTS))
        (path / PROJECTOR_CONFIG).write_text(json.dumps({**self.config(), **(extra or {})}, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> HiddenProjector:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / PROJECTOR_CONFIG).is_file():
            raise FileNotFoundError(f"{path}: no {PROJECTOR_CONFIG}; expected a hidden projector saved by kd-train "
                                    f"(OUT/{PROJECTOR_DIR}/)")
        cfg = json.loads((path / PROJECTOR_CONFIG).read_text())
        module = cls(cfg["student_hidden_size"], cfg["teacher_hidden_size"])
        module.load_state_dict(load_file(str(path / PROJECTOR_WEIGHTS)))
        return module


def teacher_arrays(batch: dict[str, Tensor], kind: str) -> dict[str, Tensor] | None:
    """The cached teacher arrays of one position kind of a collated batch, keyed as ``chunked_distill``'s
    ``teacher`` dict (``ids``, ``tail``, and ``logprobs`` / ``counts`` / ``logp_mean`` when present);
    None when the batch has none for that kind."""
    if f"{kind}_ids" not in batch:
        return None
    t = {"ids": batch[f"{kind}_ids"], "tail": batch[f"{kind}_tail"]}
    for name in ("logprobs", "counts", "logp_mean"):  # sample-mode caches: counts + logp_mean, logprobs optional
        if f"{kind}_{name}" in batch:
            t[name] = batch[f"{kind}_{name}"]
    return t


def _settings(settings: LossSettings | bool) -> LossSettings:
    return LossSettings(distill=settings) if isinstance(settings, bool) else settings


def _hidden_kinds(batch: dict, s: LossSettings) -> list[str]:
    missing = [k for k in s.kinds if f"{k}_hidden" not in batch]
    if missing:
        raise ValueError(f"hidden-state alignment: the batch has no teacher hidden states for {', '.join(missing)} "
                         "positions (rebuild the cache with kd-cache build --hidden)")
    return list(s.kinds)


def batch_counts(batch: dict, settings: LossSettings | bool) -> Tensor:
    """Valid items of a collated micro-batch, float64 [7] in ``COUNT_KEYS`` order.

    Known from the data alone (no forward pass), so the global counts of an optimizer step can be
    all-reduced before its first backward. ``settings`` may be a bool (``distill``) for the defaults.
    """
    s = _settings(settings)
    counts = dict.fromkeys(TERMS, 0.0)
    counts["ce"] = float((batch["response_targets"] != IGNORE_INDEX).sum())
    if s.distill:
        for kind in KINDS:
            ids = batch.get(f"{kind}_ids")
            if kind in s.kinds and ids is not None:
                counts[f"kd_{kind}"] = float((ids >= 0).any(-1).sum())
        if "relation_index" in batch:
            counts["rdist"] = float(batch["relation_index"].shape[0])
        if s.hidden_loss is not None:
            counts["hidden"] = float(sum(batch[f"{k}_hidden"].shape[0] for k in _hidden_kinds(batch, s)))
        if s.affinity:
            counts["affinity"] = float(batch["affinity_visual_rows"].shape[0])
    return torch.tensor([counts[t] for t in TERMS], dtype=torch.float64)


# Bytes per logit held for backward when chunks are not recomputed, measured with saved-tensor hooks
# on chunked_distill: 4.0 (CE) and 4.1 (CE + forward KL, tail mode) with the closed-form gradient the
# trainer uses (the fp32 logits); autograd through every op would hold 9.1.
LOGIT_BYTES_HELD = 4


def keep_head_logits(n_positions: int, vocab: int, budget_mb: int) -> bool:
    """Whether ``n_positions`` rows of [vocab] logits may stay in memory for backward (no recompute)."""
    return n_positions * vocab * LOGIT_BYTES_HELD <= budget_mb * 2**20


def _fuse_relation(batch: dict, relation_index: Tensor, visual_kd: bool, d: int) -> bool:
    """Whether the student relations ``Z Z^T`` should come from the visual MDist pass's own logits.

    Both ways are exact: ``Z Z^T`` from the [N, V] logits that the visual MDist computes anyway costs
    ``4 N^2 V`` FLOPs per image (forward + backward), ``H (W^T W) H^T`` costs ``4 V d^2`` per
    micro-batch for the Gram matrix and its gradient. The fused way is taken when it is cheaper
    (``I N^2 < d^2``: small images or few of them per micro-batch) and the relations cover the visual
    positions in order, image after image (as ``StreamingKDDataset.collate`` lays them out).
    """
    if not visual_kd or "visual_ids" not in batch:
        return False
    n_img, n = relation_index.shape
    if n_img * n * n >= d * d or n_img * n != batch["visual_index"].shape[0]:
        return False
    return bool(torch.equal(relation_index.reshape(-1), batch["visual_index"]))


class DistillStudent(nn.Module):
    """``forward(batch) -> {ce_sum, kd_response_sum, ..., affinity_sum}`` (fp32 scalars, ``SUM_KEYS``).

    ``teacher_hidden_size`` is needed when ``settings.hidden_loss`` is set: a fresh ``HiddenProjector``
    from the student's width to it is created (``self.hidden_projector``) and trains with the student.
    """

    def __init__(self, student: nn.Module, settings: LossSettings, teacher_hidden_size: int | None = None):
        super().__init__()
        self.student = student
        self.settings = settings
        self.hidden_projector: HiddenProjector | None = None
        if settings.distill and settings.hidden_loss is not None:
            if teacher_hidden_size is None:
                raise ValueError("hidden-state alignment needs the teacher's hidden size (the cache's "
                                 "manifest['hidden']['size'])")
            d_s = student.config.get_text_config().hidden_size
            self.hidden_projector = HiddenProjector(d_s, teacher_hidden_size).to(student.device)

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
        kinds = s.kinds if s.distill else ()
        # Every position that goes through the head in this micro-batch: if their logits fit the budget,
        # backward reuses them instead of recomputing each chunk (a quarter of the head's matmuls).
        n_head = batch["response_index"].shape[0] + sum(
            batch[f"{k}_index"].shape[0] for k in ("visual", "prompt") if k in kinds and f"{k}_ids" in batch)
        common = {"divergence": s.divergence, "mode": s.mode, "jsd_beta": s.jsd_beta, "chunk_size": s.chunk_size,
                  "zscore": s.zscore, "checkpoint": not keep_head_logits(n_head, head.shape[0], s.head_memory_mb)}

        res = chunked_distill(flat[batch["response_index"]], head, targets=batch["response_targets"],
                              teacher=teacher_arrays(batch, "response") if "response" in kinds else None, **common)
        sums = {"ce_sum": res["ce_sum"], "kd_response_sum": res["kd_sum"]}
        zero = res["ce_sum"] * 0.0
        relation = batch.get("relation_index") if s.distill else None
        fused = relation is not None and _fuse_relation(batch, relation, "visual" in kinds, head.shape[1])
        r_s = None
        for kind in ("visual", "prompt"):
            teacher = teacher_arrays(batch, kind) if kind in kinds else None
            if teacher is not None:
                got = chunked_distill(flat[batch[f"{kind}_index"]], head, teacher=teacher,
                                      relation_size=relation.shape[1] if fused and kind == "visual" else 0, **common)
                sums[f"kd_{kind}_sum"] = got["kd_sum"]
                r_s = got.get("relation", r_s)
            else:
                sums[f"kd_{kind}_sum"] = zero
        if relation is not None:
            with torch.autocast(device_type=flat.device.type, enabled=False):
                if r_s is None:
                    # R_s = H (W^T W) H^T per image, in fp32 (outside autocast): never the N x V logits.
                    r_s = relation_from_hidden(flat[relation].float(), None, gram=head_gram(head))  # [I, N, N]
                sums["rdist_sum"] = rdist(r_s, batch["relation_target"]).sum()
        else:
            sums["rdist_sum"] = zero
        if self.hidden_projector is not None:
            hk = _hidden_kinds(batch, s)
            h_s = torch.cat([flat[batch[f"{k}_index"]] for k in hk])
            h_t = torch.cat([batch[f"{k}_hidden"] for k in hk])
            # The projector runs even on zero positions, so it gets a (zero) gradient in every micro-batch.
            projected = self.hidden_projector(h_s)
            with torch.autocast(device_type=flat.device.type, enabled=False):
                sums["hidden_sum"] = hidden_alignment(projected.float(), h_t, s.hidden_loss).sum()
        else:
            sums["hidden_sum"] = zero
        if s.distill and s.affinity:
            vr, rr = batch["affinity_visual_rows"], batch["affinity_response_rows"]  # [A, Nv], [A, Nr]; -1 pad
            vi, ri = vr.clamp_min(0), rr.clamp_min(0)
            with torch.autocast(device_type=flat.device.type, enabled=False):
                sums["affinity_sum"] = affinity_loss(
                    flat[batch["visual_index"]].float()[vi], flat[batch["response_index"]].float()[ri],
                    batch["visual_hidden"][vi], batch["response_hidden"][ri], vr >= 0, rr >= 0).sum()
        else:
            sums["affinity_sum"] = zero
        if pixel_values is None and self._needs_vision_dummy():
            sums["ce_sum"] = sums["ce_sum"] + self._dummy_image_term(flat)
        return sums
