"""The student's forward pass for distillation: hidden states in, loss *sums* out.

``DistillStudent`` wraps a student of any supported family (``student.families``) so that everything
that touches a parameter (vision tower, projector, language model, LM head, and the LLaVADI
hidden-state projector when one is used) runs inside one ``forward``: that is what DDP and FSDP need
(FSDP only un-shards a module's weights inside its forward). It runs the *base* model
(``student.model``) on every input the student's processor made (``batch["model_inputs"]``: pixels,
image sizes/grids, pixel masks, token types, ...) for the final hidden states, and
applies the LM head only at the positions that carry a loss, chunk by chunk (``chunked_distill``), so
fp32 ``[batch, seq, vocab]`` logits never exist.

The terms are those of ``student.terms.TERMS`` (each a *sum* over its valid items; the trainer
divides by the step's global count of them):

* ``ce``: cross-entropy on the response tokens;
* ``mdist_response``/``mdist_visual``/``mdist_prompt``: MDist at the position kinds listed in
  ``LossSettings.kinds`` (LLaVA-KD: response + visual; LLaVADI: all three);
* ``rdist``: relation distillation per image, each at its own size (``relation_index`` [R, N_max],
  -1 padded; ``relation_target`` [R, N_max, N_max]: padded rows/columns count on neither side);
* ``hidden``: LLaVADI hidden-state alignment, ``HiddenProjector(h_s)`` vs the teacher's stored
  final-layer states at the same positions (the ``kinds`` positions), one item per position;
* ``affinity``: LLaVADI affinity, one item per sample with both visual and response positions.

The loss math lives in ``student.losses``; this module only gathers positions and calls it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from kd_cache.schema import DEFAULT_KINDS, IGNORE_INDEX, KINDS, TEACHER_ARRAYS
from student.cross_tokenizer import VocabProjection, chunked_cross_divergence
from student.families import blank_image_inputs, image_feature_tensors, parameter_parts
from student.losses import (
    Divergence,
    DivergenceOptions,
    HiddenLoss,
    SparseTeacher,
    TailMode,
    affinity_loss,
    chunked_distill,
    head_gram,
    hidden_alignment,
    keep_head_logits,
    rdist,
    relation_from_hidden,
)
from student.terms import SUM_KEYS, TERMS, mdist_term

PROJECTOR_DIR = "hidden_projector"
PROJECTOR_WEIGHTS = "model.safetensors"
PROJECTOR_CONFIG = "config.json"


@dataclass(frozen=True)
class LossSettings:
    """What a training step computes (validated on construction)."""

    distill: bool = True  # teacher terms on (False: CE only, the teacher arrays are ignored)
    divergence: Divergence = Divergence.fkl
    mode: TailMode = TailMode.tail  # top-k caches only (sample-mode caches are detected from their counts)
    jsd_beta: float = 0.5
    skew: float = 0.1  # skl / srkl mixing weight
    temperature: float = 1.0  # divides the student's logits in MDist
    chunk_size: int = 1024
    # Logits of the LM-head chunks are kept for backward when all of a micro-batch's fit in this many
    # MiB (``keep_head_logits``); above it each chunk is recomputed in backward (one more head matmul
    # per chunk, memory bounded by one chunk). 0: always recompute.
    head_memory_mb: int = 1024
    kinds: tuple[str, ...] = DEFAULT_KINDS  # positions that get MDist (and hidden alignment)
    zscore: bool = False  # logit standardisation over the stored ids (student.losses)
    hidden_loss: HiddenLoss | None = None  # hidden-state alignment on (needs a projector)
    affinity: bool = False  # LLaVADI affinity between visual and response positions

    def __post_init__(self):
        options = self.options  # validates divergence, mode, jsd_beta, skew, temperature
        object.__setattr__(self, "divergence", options.divergence)
        object.__setattr__(self, "mode", options.mode)
        if self.hidden_loss is not None:
            object.__setattr__(self, "hidden_loss", HiddenLoss(self.hidden_loss))
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"position kinds {unknown} not understood: expected a subset of {', '.join(KINDS)}")

    @property
    def options(self) -> DivergenceOptions:
        return DivergenceOptions(divergence=self.divergence, mode=self.mode, jsd_beta=self.jsd_beta, skew=self.skew,
                                 temperature=self.temperature, zscore=self.zscore)


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


_SPARSE_FIELDS = {f.name for f in fields(SparseTeacher)}


def teacher_arrays(batch: dict[str, Tensor], kind: str) -> SparseTeacher | None:
    """The cached teacher arrays of one position kind of a collated batch (``<kind>_<name>`` for each of
    ``kd_cache.schema.TEACHER_ARRAYS`` that the cache holds and ``SparseTeacher`` uses); None when the
    batch has none for that kind."""
    if f"{kind}_ids" not in batch:
        return None
    return SparseTeacher(**{a.name: batch.get(f"{kind}_{a.name}") for a in TEACHER_ARRAYS if a.name in _SPARSE_FIELDS})


def _hidden_kinds(batch: dict, s: LossSettings) -> list[str]:
    missing = [k for k in s.kinds if f"{k}_hidden" not in batch]
    if missing:
        raise ValueError(f"hidden-state alignment: the batch has no teacher hidden states for {', '.join(missing)} "
                         "positions (rebuild the cache with kd-cache build --hidden)")
    return list(s.kinds)


def batch_counts(batch: dict, settings: LossSettings) -> Tensor:
    """Valid items of a collated micro-batch per term, float64 [len(TERMS)] in ``TERMS`` order.

    Known from the data alone (no forward pass), so the global counts of an optimizer step can be
    all-reduced before its first backward.
    """
    s = settings
    counts = dict.fromkeys((t.name for t in TERMS), 0.0)
    counts["ce"] = float((batch["response_targets"] != IGNORE_INDEX).sum())
    if s.distill:
        for kind in s.kinds:
            ids = batch.get(f"{kind}_ids")
            if ids is not None:
                counts[mdist_term(kind).name] = float((ids >= 0).any(-1).sum())
        if "response" in s.kinds and "cross_groups" in batch:  # one item per aligned group
            counts[mdist_term("response").name] = float(batch["cross_groups"].shape[0])
        if "relation_index" in batch:
            counts["rdist"] = float(batch["relation_index"].shape[0])
        if s.hidden_loss is not None:
            counts["hidden"] = float(sum(batch[f"{k}_hidden"].shape[0] for k in _hidden_kinds(batch, s)))
        if s.affinity:
            counts["affinity"] = float(batch["affinity_visual_rows"].shape[0])
    return torch.tensor(list(counts.values()), dtype=torch.float64)


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
    if n_img * n * n >= d * d or n_img * n != batch["visual_index"].shape[0] or bool((relation_index < 0).any()):
        return False
    return bool(torch.equal(relation_index.reshape(-1), batch["visual_index"]))


def model_inputs(batch: dict, dtype: torch.dtype) -> dict[str, Tensor]:
    """``batch["model_inputs"]`` (every tensor the student's processor returned, collated by
    ``kd_cache.processing.collate``) with the floating ones (pixels) in the student's dtype."""
    if "model_inputs" not in batch:
        raise KeyError("the batch has no 'model_inputs' (the student processor's outputs, collated by "
                       "kd_cache.processing.collate): build batches with StreamingKDDataset.collate")
    return {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in batch["model_inputs"].items()}


class DistillStudent(nn.Module):
    """``forward(batch) -> {term.sum_key: sum}`` for every term of ``TERMS``, in that order (fp32 scalars).

    ``teacher_hidden_size`` is needed when ``settings.hidden_loss`` is set: a fresh ``HiddenProjector``
    from the student's width to it is created (``self.hidden_projector``) and trains with the student.
    """

    def __init__(self, student: nn.Module, settings: LossSettings, teacher_hidden_size: int | None = None,
                 projection: VocabProjection | None = None):
        super().__init__()
        self.student = student
        self.settings = settings
        # teacher id -> student id, for a batch of another tokenizer or image layout (``cross`` batches)
        self.projection = projection
        self.hidden_projector: HiddenProjector | None = None
        self._parts = parameter_parts(student)  # parameter name -> vision / projector / llm
        if settings.distill and settings.hidden_loss is not None:
            if teacher_hidden_size is None:
                raise ValueError("hidden-state alignment needs the teacher's hidden size (the cache's "
                                 "manifest['hidden']['size'])")
            d_s = student.config.get_text_config().hidden_size
            self.hidden_projector = HiddenProjector(d_s, teacher_hidden_size).to(student.device)

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The student's layer classes present in it: what FSDP's transformer-based wrap policy shards one
        by one (accelerate reads this attribute of the prepared model when the config names no classes)."""
        names = getattr(self.student, "_no_split_modules", None)
        if names is None:
            return None
        present = {type(m).__name__ for m in self.student.modules()}
        return sorted(n for n in names if n in present)

    def _needs_vision_dummy(self) -> bool:
        from torch.distributed.fsdp import FSDPModule

        if isinstance(self, FSDPModule):
            return True  # frozen or not, a sharded vision tower's all-gathers must run on every rank
        return any(p.requires_grad for name, p in self.student.named_parameters()
                   if self._parts[name] in ("vision", "projector"))

    def _dummy_image_term(self) -> Tensor:
        """0 * (projector(vision(blank image))).sum() for a micro-batch without images.

        Every rank then uses every trainable parameter in every micro-batch (DDP without
        find_unused_parameters) and runs the same modules in the same order (FSDP2's all-gathers are
        collectives issued in module order: it runs before the language model, where the images would).
        """
        feats = image_feature_tensors(self.student.model.get_image_features(**blank_image_inputs(self.student)))
        return 0.0 * sum(f.float().sum() for f in feats)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        s = self.settings
        inputs = model_inputs(batch, self.student.dtype)
        dummy = self._dummy_image_term() if "pixel_values" not in inputs and self._needs_vision_dummy() else None
        out = self.student.model(**inputs, use_cache=False)
        hidden = out.last_hidden_state  # [B, T, d]
        flat = hidden.reshape(-1, hidden.shape[-1])
        head = self.student.get_output_embeddings().weight  # [V, d]
        # A zero that reaches the hidden states and the head, for the terms that are off.
        zero = (flat[:0].float().sum() + head[:0].float().sum()) * 0.0
        sums = dict.fromkeys(SUM_KEYS, zero)
        relation = batch.get("relation_index") if s.distill else None
        r_s = self._head_terms(batch, flat, head, relation, sums)
        if relation is not None:
            with torch.autocast(device_type=flat.device.type, enabled=False):
                if r_s is None:
                    # R_s = H (W^T W) H^T per image, in fp32 (outside autocast): never the N x V logits.
                    r_s = relation_from_hidden(flat[relation.clamp_min(0)].float(), None, gram=head_gram(head))
                # An image smaller than the batch's largest: its padded rows and columns are zero on both
                # sides, so they add nothing to either norm or to the dot product of RDist's cosine.
                real = relation >= 0  # [I, N]
                pair = real[:, :, None] & real[:, None, :]
                target = batch["relation_target"]
                sums["rdist_sum"] = rdist(r_s * pair, torch.where(pair, target, target.new_zeros(()))).sum()
        if self.hidden_projector is not None:
            sums["hidden_sum"] = self._hidden_term(batch, flat)
        if s.distill and s.affinity:
            vr, rr = batch["affinity_visual_rows"], batch["affinity_response_rows"]  # [A, Nv], [A, Nr]; -1 pad
            vi, ri = vr.clamp_min(0), rr.clamp_min(0)
            with torch.autocast(device_type=flat.device.type, enabled=False):
                sums["affinity_sum"] = affinity_loss(
                    flat[batch["visual_index"]].float()[vi], flat[batch["response_index"]].float()[ri],
                    batch["visual_hidden"][vi], batch["response_hidden"][ri], vr >= 0, rr >= 0).sum()
        if dummy is not None:
            sums["ce_sum"] = sums["ce_sum"] + dummy
        return sums

    def _head_terms(self, batch: dict[str, Tensor], flat: Tensor, head: Tensor, relation: Tensor | None,
                    sums: dict[str, Tensor]) -> Tensor | None:
        """CE and the MDist terms into ``sums``; returns the student relations when the visual MDist
        pass computed them (``_fuse_relation``), else None."""
        s = self.settings
        kinds = s.kinds if s.distill else ()
        teachers = {k: teacher_arrays(batch, k) if k in kinds else None for k in KINDS}
        # Every position that goes through the head in this micro-batch: if their logits fit the budget,
        # backward reuses them instead of recomputing each chunk (a quarter of the head's matmuls).
        n_head = sum(batch[f"{k}_index"].shape[0] for k in KINDS if k == "response" or teachers[k] is not None)
        checkpoint = not keep_head_logits(n_head, head.shape[0], s.head_memory_mb)
        if "cross" in batch:
            self._cross_terms(batch, flat, head, kinds, checkpoint, sums)
            return None
        fused = relation is not None and _fuse_relation(batch, relation, "visual" in kinds, head.shape[1])
        r_s = None
        for kind, teacher in teachers.items():
            targets = batch["response_targets"] if kind == "response" else None  # CE on response positions
            if teacher is None and targets is None:
                continue
            got = chunked_distill(flat[batch[f"{kind}_index"]], head, targets=targets, teacher=teacher,
                                  options=s.options, chunk_size=s.chunk_size, checkpoint=checkpoint,
                                  relation_size=relation.shape[1] if fused and kind == "visual" else 0)
            if targets is not None:
                sums["ce_sum"] = got.ce_sum
            sums[mdist_term(kind).sum_key] = got.mdist_sum
            r_s = got.relation if got.relation is not None else r_s
        return r_s

    def _cross_terms(self, batch: dict[str, Tensor], flat: Tensor, head: Tensor, kinds: tuple[str, ...],
                     checkpoint: bool, sums: dict[str, Tensor]) -> None:
        """CE and MDist of a batch aligned to a teacher of another tokenizer or image layout
        (``student.alignment``): GOLD's loss per aligned response group, and at the visual positions per
        student token against the teacher rows mixed onto it (one-to-one groups)."""
        s = self.settings
        if self.projection is None:
            raise ValueError("a batch aligned across tokenizers needs the teacher -> student vocabulary projection "
                             "(DistillStudent(projection=...))")
        opts = s.options
        resp = flat[batch["response_index"]]
        targets = batch["response_targets"]
        if "response" in kinds and "cross_groups" in batch:  # CE from the same head pass as the divergence
            teacher = SparseTeacher(**{n: batch[f"cross_response_{n}"] for n in ("ids", "logprobs", "tail")})
            sums["ce_sum"], sums[mdist_term("response").sum_key] = chunked_cross_divergence(
                resp, head, targets, teacher, batch["cross_response_realised"], batch["cross_groups"],
                self.projection, options=opts, chunk_size=s.chunk_size, checkpoint=checkpoint)
        else:
            sums["ce_sum"] = chunked_distill(resp, head, targets=targets, chunk_size=s.chunk_size,
                                             checkpoint=checkpoint).ce_sum
        visual = teacher_arrays(batch, "visual") if "visual" in kinds else None
        if visual is not None:
            rows = torch.nonzero((visual.ids >= 0).any(-1)).reshape(-1)
            ones = torch.ones_like(rows)
            groups = torch.stack([rows, ones, rows, ones], dim=1)
            vis = flat[batch["visual_index"]]
            sums[mdist_term("visual").sum_key] = chunked_cross_divergence(
                vis, head, torch.zeros(vis.shape[0], dtype=torch.long, device=vis.device), visual,
                torch.zeros(visual.ids.shape[0], device=vis.device), groups, self.projection, options=opts,
                chunk_size=s.chunk_size, checkpoint=checkpoint, ce=False)[1]

    def _hidden_term(self, batch: dict[str, Tensor], flat: Tensor) -> Tensor:
        hk = _hidden_kinds(batch, self.settings)
        h_s = torch.cat([flat[batch[f"{k}_index"]] for k in hk])
        h_t = torch.cat([batch[f"{k}_hidden"] for k in hk])
        # The projector runs even on zero positions, so it gets a (zero) gradient in every micro-batch.
        projected = self.hidden_projector(h_s)
        with torch.autocast(device_type=flat.device.type, enabled=False):
            return hidden_alignment(projected.float(), h_t, self.settings.hidden_loss).sum()
