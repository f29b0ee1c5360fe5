"""``kd-demo --cross-tokenizer``'s measure of how close a student is to a teacher of another tokenizer,
chat template and image grid.

``student.evaluate.cache_agreement`` compares a model with a cache position by position, so it needs the
cache's own tokens (it refuses another tokenizer). Here the student meets the teacher's cache the way
``kd-train`` does (``student.alignment.detect_pairing``: the cached conversation re-encoded by the
student's own processor, answer tokens aligned by text offsets, the teacher's top-k projected onto the
student's vocabulary, visual tokens mixed by image-region overlap), and the KL is the matched part of
``student.cross_tokenizer.cross_vocab_divergence``: forward KL(teacher || student) over the student ids
the teacher's stored ids map to plus one "everything else" bin, per aligned group (a one-to-one
position, or a chunk scored along its realised tokens). On a pair that shares the tokens this is
``cache_agreement``'s KL (the projection is the identity and every group is one position); the
``positions`` of a sample are its aligned groups.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kd_cache.schema import DEFAULT_KINDS, IGNORE_INDEX


@torch.no_grad()
def agreement(model, processor, cache: str | Path, *, batch_size: int = 8, alignment: str = "auto"):
    """``student.evaluate.CacheAgreement`` of ``model`` on ``cache``: ``cache_agreement`` itself when the
    model's processor gives the cached tokens (``alignment`` auto), else the aligned measure of the module
    docstring. Adds ``one_to_one`` / ``answer_positions`` (int64 [n]: the student's answer positions in
    one-to-one groups / in all) as attributes."""
    from kd_cache.reader import open_cache
    from student.alignment import detect_pairing
    from student.cross_tokenizer import cross_vocab_divergence
    from student.distill import teacher_arrays
    from student.evaluate import CacheAgreement, _on, cache_agreement, teacher_top1
    from student.losses import SparseTeacher
    from student.stream import StreamingKDDataset, load_sample_images

    kd = open_cache(str(cache))
    folder = kd.manifest.image_folder
    pairing = detect_pairing(kd, processor, model.config, mode=alignment,
                             load_images=lambda s: load_sample_images(s, folder))
    if not pairing.cross:
        got = cache_agreement(model, processor, cache, batch_size=batch_size)
        got.one_to_one = got.answer_positions = got.positions["response"]
        return got
    projection = pairing.projection
    ds = StreamingKDDataset(kd, processor, image_folder=None, batch_size=batch_size, shuffle=False,
                            with_teacher=True, pairing=pairing)
    head = model.get_output_embeddings().weight
    dev = model.device
    ids: list[str] = []
    names = [f"{m}/{k}" for m in ("kl", "positions", "agree") for k in DEFAULT_KINDS]
    names += ["ce", "ce_tokens", "one_to_one", "answer_positions"]
    cols: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for batch in ds:
        n = len(batch["ids"])
        ids += list(batch["ids"])
        sums = {name: torch.zeros(n, dtype=torch.float64) for name in cols}
        out = model.model(**_on(model, batch["model_inputs"]), use_cache=False)
        flat = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])

        logits = (flat[batch["response_index"].to(dev)] @ head.T).float()
        targets = batch["response_targets"].to(dev).long()
        owner = batch["response_batch"].long()
        ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
        sums["ce"].index_add_(0, owner, ce.double().cpu())
        sums["ce_tokens"].index_add_(0, owner, (targets != IGNORE_INDEX).double().cpu())
        sums["answer_positions"].index_add_(0, owner, torch.ones(len(owner), dtype=torch.float64))
        if "cross_groups" in batch:
            teacher = SparseTeacher(**{k: batch[f"cross_response_{k}"].to(dev) for k in ("ids", "logprobs", "tail")})
            g = batch["cross_groups"].to(dev).long()
            groups = {"t_first": g[:, 0], "t_len": g[:, 1], "s_first": g[:, 2], "s_len": g[:, 3]}
            loss = cross_vocab_divergence(logits, targets, teacher, batch["cross_response_realised"].to(dev),
                                          groups, projection)
            first = groups["s_first"].cpu()
            g_owner = owner[first]
            t_top = teacher_top1(teacher[groups["t_first"]])
            mapped = torch.where(t_top >= 0, projection.to_student.to(dev)[t_top.clamp_min(0)], -1)
            agree = logits[groups["s_first"]].argmax(-1) == mapped
            one = (groups["s_len"] == 1) & (groups["t_len"] == 1)
            for name, values in (("kl/response", loss.matched), ("positions/response", torch.ones_like(loss.matched)),
                                 ("agree/response", agree), ("one_to_one", one)):
                sums[name].index_add_(0, g_owner, values.double().cpu())
        visual = teacher_arrays(batch, "visual")
        if visual is not None and len(batch["visual_index"]):
            visual = visual.to(dev)
            rows = torch.nonzero((visual.ids >= 0).any(-1)).reshape(-1)
            ones = torch.ones_like(rows)
            v_logits = (flat[batch["visual_index"].to(dev)] @ head.T).float()
            loss = cross_vocab_divergence(v_logits, torch.zeros(len(v_logits), dtype=torch.long, device=dev), visual,
                                          torch.zeros(visual.ids.shape[0], device=dev),
                                          {"t_first": rows, "t_len": ones, "s_first": rows, "s_len": ones}, projection)
            t_top = teacher_top1(visual[rows])
            mapped = torch.where(t_top >= 0, projection.to_student.to(dev)[t_top.clamp_min(0)], -1)
            v_owner = batch["visual_batch"].long()[rows.cpu()]
            for name, values in (("kl/visual", loss.matched), ("positions/visual", torch.ones_like(loss.matched)),
                                 ("agree/visual", v_logits[rows].argmax(-1) == mapped)):
                sums[name].index_add_(0, v_owner, values.double().cpu())
        for name, values in sums.items():
            cols[name].append(values)
    total = {name: torch.cat(v).numpy() for name, v in cols.items()}

    def per_kind(name: str, dtype) -> dict[str, np.ndarray]:
        return {k: total[f"{name}/{k}"].astype(dtype) for k in DEFAULT_KINDS}

    got = CacheAgreement(ids=ids, kl=per_kind("kl", np.float64), positions=per_kind("positions", np.int64),
                         agree=per_kind("agree", np.int64), ce=total["ce"], ce_tokens=total["ce_tokens"].astype(np.int64),
                         sparse=kd.manifest.sparse)
    got.one_to_one = total["one_to_one"].astype(np.int64)
    got.answer_positions = total["answer_positions"].astype(np.int64)
    return got
