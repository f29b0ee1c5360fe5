"""Teacher-pass overhead: ``kd-cache build`` samples/s against the same teacher's forward-only samples/s.

Both run in this process, alternated round by round, on the same records and batches:

* forward-only: the batches are tokenised, images loaded and processed *before* the clock starts;
  the clock covers only ``model(**inputs)`` (the HF forward, full logits) per batch. This is the
  cheapest thing that can be called "running the teacher" and the yardstick of the goal.
* build: ``kd_cache.build.build_cache`` end to end (records read, tokenisation, image decoding and
  processing, forward, top-k and tail at the distilled positions, relation matrices, packing,
  compression, checksums, shard and manifest writes). The only thing left out is loading the weights
  from disk: ``build_cache`` is handed the already loaded teacher, the same object the forward-only
  pass uses.

Two teachers, the same measurement: ``teacher_pass_over_forward_only`` is a LLaVA (fixed 64 visual
tokens per image); ``teacher_pass_over_forward_only_qwen2vl`` (``details["qwen2vl"]``) a Qwen2-VL at the
same LM and vision-tower sizes with its real processor, on images of four sizes (dynamic resolution:
36-96 visual tokens per image at the quick profile, ``image_grid_thw`` and ``mm_token_type_ids`` passed
through ``kd_cache.processing``), M-RoPE positions computed by the model in both passes.

Extra rows in ``details``: the base model alone (final hidden states, no head), the in-memory
``TeacherRunner.run`` (forward + distributions + relations, no I/O), and on a GPU the forward's
FLOP count and the fraction of the GPU's bf16 peak it reaches.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.common import Clock, median
from benchmarks.models import (
    Profile,
    build_model,
    build_with_teacher,
    lm_params,
    make_records,
    n_params,
    processor_for,
    save_teacher_stub,
    teacher_object,
)

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device-name fragment; --peak-tflops overrides.
BF16_PEAK_TFLOPS = [
    ("H200", 989.0), ("H100 SXM", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
    ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0),
    ("RTX 4090", 165.0), ("A6000", 155.0),
]


def bf16_peak_tflops(name: str) -> float | None:
    for frag, peak in BF16_PEAK_TFLOPS:
        if frag.lower() in name.lower():
            return peak
    return None


def forward_flops(model, inputs: dict) -> int:
    """FLOPs of one forward (matmuls and attention, as counted by torch's FlopCounterMode).

    Counted with the SDPA attention kernels: FlopCounterMode does not see flash-attn's custom ops, so
    a flash-attention model is switched to SDPA for the count and back afterwards.
    """
    from torch.utils.flop_counter import FlopCounterMode

    impl = getattr(model.config, "_attn_implementation", "sdpa")
    switched = False
    if impl not in ("sdpa", "eager") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")
        switched = True
    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(**inputs, use_cache=False)
        return int(counter.get_total_flops())
    finally:
        if switched:
            model.set_attn_implementation(impl)


def run(profile: Profile, device: torch.device, workdir: Path, peak_tflops: float | None = None,
        log=print) -> dict:
    """The LLaVA row (``teacher_pass_over_forward_only``), then the Qwen2-VL row (dynamic resolution)."""
    dtype = getattr(torch, profile.dtype)
    processor = processor_for(profile.vision, profile.vocab)
    model = build_model(processor, profile.vocab, profile.teacher, profile.vision, device, dtype, seed=0).eval()
    model.requires_grad_(False)
    teacher_dir = save_teacher_stub(workdir / "tp-teacher", model, processor)
    data, img_dir = make_records(workdir / "tp-data", profile.tp_samples, profile.vision.image_size,
                                 profile.question_words, profile.answer_words, seed=1)
    teacher = teacher_object(model, processor, device)
    log("  LLaVA teacher (fixed resolution)")
    ratio, details = measure(profile, device, workdir, model, processor, teacher, teacher_dir, data, img_dir,
                             peak_tflops=peak_tflops, log=log)
    del model, teacher
    common.free_memory()
    log("  Qwen2-VL teacher (dynamic resolution)")
    q_ratio, details["qwen2vl"] = run_qwen2vl(profile, device, workdir, peak_tflops=peak_tflops, log=log)
    return {"teacher_pass_over_forward_only": ratio, "teacher_pass_over_forward_only_qwen2vl": q_ratio,
            "details": details}


def qwen2vl_image_sizes(profile: Profile) -> list[tuple[int, int]]:
    """Four (width, height) image sizes whose visual-token counts average the LLaVA teacher's tokens
    per image: Qwen2-VL makes one token per (patch * 2)^2 pixels (2x2 patches merged), so the LLaVA
    image's token grid side maps to ``side`` pixels here; the sizes are 0.75x-1.5x of it, non-square
    included, multiples of the 2x2-merged patch (no resizing by the processor)."""
    unit = 2 * profile.vision.patch_size
    side = profile.vision.image_size // profile.vision.patch_size * unit
    return [(round(side * fw / unit) * unit, round(side * fh / unit) * unit)
            for fw, fh in ((0.75, 0.75), (1.0, 1.0), (1.25, 0.75), (1.5, 1.0))]


def build_qwen2vl(profile: Profile, device: torch.device, dtype: torch.dtype, seed: int = 0,
                  logit_scale: float = 20.0):
    """A randomly initialised Qwen2-VL at the LLaVA teacher's LM and vision-tower sizes, with its real
    processor (``Qwen2VLProcessor``: ``Qwen2VLImageProcessor`` + the tests' BPE padded to ``vocab``
    tokens), built by ``tests.vlm_families.qwen2_vl_parts``."""
    from transformers import Qwen2VLForConditionalGeneration

    from benchmarks.models import attn_impl
    from tests.vlm_families import Sizes, qwen2_vl_parts

    lm, vis = profile.teacher, profile.vision
    s = Sizes(hidden=lm.hidden, heads=lm.heads, kv_heads=lm.kv_heads, inter=lm.intermediate, layers=lm.layers)
    half = s.head_dim // 2  # M-RoPE: rotary frequencies split (temporal, height, width)
    t = half // 4
    mrope = [t, (half - t) // 2, half - t - (half - t) // 2]
    max_side = max(max(wh) for wh in qwen2vl_image_sizes(profile))
    pixels = dict(size={"shortest_edge": (2 * vis.patch_size) ** 2, "longest_edge": max_side * max_side},
                  patch_size=vis.patch_size, merge_size=2, temporal_patch_size=2)
    vision = dict(depth=vis.layers, embed_dim=vis.hidden, num_heads=vis.heads, mlp_ratio=vis.intermediate // vis.hidden,
                  patch_size=vis.patch_size)
    cfg, processor = qwen2_vl_parts(s, vision=vision, pixels=pixels, vocab=profile.vocab, mrope_section=mrope,
                                    text_kw={"tie_word_embeddings": False})
    cfg.tie_word_embeddings = False
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation=attn_impl(device))
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model.eval().requires_grad_(False), processor


def run_qwen2vl(profile: Profile, device: torch.device, workdir: Path, peak_tflops: float | None = None,
                log=print) -> tuple[float, dict]:
    from kd_cache.processing import config_image_token_id
    from kd_cache.teacher import Teacher

    model, processor = build_qwen2vl(profile, device, getattr(torch, profile.dtype))
    if model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr():
        raise RuntimeError("Qwen2-VL benchmark teacher has a tied head; the LLaVA one does not")
    teacher_dir = save_teacher_stub(workdir / "tp-teacher-qwen2vl", model, processor)
    sizes = qwen2vl_image_sizes(profile)
    data, img_dir = make_records(workdir / "tp-data-qwen2vl", profile.tp_samples, sizes,
                                 profile.question_words, profile.answer_words, seed=1)
    teacher = Teacher(model, processor, processor.tokenizer, config_image_token_id(model.config), True, device)
    ratio, details = measure(profile, device, workdir, model, processor, teacher, teacher_dir, data, img_dir,
                             peak_tflops=peak_tflops, log=log, tag="qwen2vl")
    details["image_sizes_wh"] = sizes
    details["model"] = type(model).__name__
    return ratio, details


def measure(profile: Profile, device: torch.device, workdir: Path, model, processor, teacher, teacher_dir: Path,
            data: Path, img_dir: Path, *, peak_tflops: float | None = None, log=print, tag: str = "") -> tuple[float, dict]:
    """Build-over-forward-only speed of one loaded teacher on the records of ``data`` (see the module doc)."""
    from kd_cache.encoding import Encoder
    from kd_cache.records import load_records
    from kd_cache.teacher import TeacherRunner

    # The same batches the build forms: same encoder, same order, same batch size.
    encoder = Encoder(processor, "chat", 4096, str(img_dir), teacher.image_token_id)
    encoded = [encoder.encode(r) for r in load_records(str(data))]
    image_tokens = sorted({c for e in encoded for c in e.image_token_counts})  # per image, from the processor
    visual = [sum(e.image_token_counts) for e in encoded]
    B = profile.tp_batch
    batches = [encoded[i:i + B] for i in range(0, len(encoded), B)]
    prep = TeacherRunner(teacher, relation="none")
    inputs = [prep._inputs(b) for b in batches]
    n = len(encoded)
    tokens = sum(len(e.input_ids) for e in encoded)
    distilled = sum(int((e.labels[1:] != -100).sum()) + int((e.input_ids == teacher.image_token_id).sum())
                    for e in encoded)
    log(f"  teacher: {n_params(model) / 1e6:.1f}M parameters ({lm_params(model) / 1e6:.1f}M LM), vocab "
        f"{profile.vocab}; {n} samples, {tokens / n:.0f} tokens, {sum(visual) / n:.0f} visual tokens "
        f"(per image: {', '.join(map(str, image_tokens))}) and {distilled / n:.0f} distilled positions each")

    clock = Clock(device)

    def forward_only(tag: str) -> None:
        with torch.no_grad():
            for inp in inputs:
                with clock(tag):
                    model(**inp, use_cache=False)

    runner = TeacherRunner(teacher, sparse="topk", top_k=64, relation="full")
    if runner.vocab != profile.vocab:  # the runner distils over the tokenizer's tokens only
        raise RuntimeError(f"teacher pass would distil over {runner.vocab} tokens, not the {profile.vocab} asked for")

    def first_batch_diagnostics(r: int) -> None:
        with torch.no_grad():
            with clock(f"diag-fwd{r}"):
                model(**inputs[0], use_cache=False)
            with clock(f"diag-base{r}"):
                prep.base(**inputs[0], use_cache=False)
            with clock(f"diag-runner{r}"):
                runner.run(batches[0])

    name = tag

    def build(tag: str) -> None:
        out = workdir / f"tp-cache{'-' + name if name else ''}-{tag}"
        shutil.rmtree(out, ignore_errors=True)
        with clock(tag):
            manifest = build_with_teacher(teacher, teacher_dir, data, img_dir, out, batch_size=B,
                                          shard_size=profile.tp_shard, device=device, sparse="topk", top_k=64,
                                          relation="full")
        if manifest.num_samples != n:
            raise RuntimeError(f"build wrote {manifest.num_samples} samples, expected {n}")
        shutil.rmtree(out, ignore_errors=True)

    # Warm-up: first-call costs (kernel selection, thread pools, lazy imports) hit neither side.
    with torch.no_grad():
        model(**inputs[0], use_cache=False)
    runner.run(batches[0])
    build("warmup")

    def ratio_of(kind: str, r: int, num: str, den: str) -> float:
        """Speed of ``num`` relative to ``den`` in round r = cost(den) / cost(num) (same samples)."""
        src = clock.wall if kind == "wall" else clock.cpu
        return sum(src[f"{den}{r}"]) / sum(src[f"{num}{r}"])

    ratios = {"wall": [], "cpu": []}
    for r in range(profile.tp_rounds):
        # Alternate the order so that a slow drift of the machine does not favour one side.
        steps = [(forward_only, f"fwd{r}"), (build, f"build{r}")]
        for fn, tag in steps if r % 2 == 0 else steps[::-1]:
            fn(tag)
        first_batch_diagnostics(r)
        for kind in ratios:
            ratios[kind].append(ratio_of(kind, r, "build", "fwd"))
        log(f"  round {r}: build/forward-only speed {ratios['cpu'][-1]:.3f} (CPU time), {ratios['wall'][-1]:.3f} "
            f"(wall; forward-only {n / sum(clock.wall[f'fwd{r}']):.2f} samples/s); first batch: TeacherRunner.run "
            f"{ratio_of(clock.basis, r, 'diag-runner', 'diag-fwd'):.3f}, base model only "
            f"{ratio_of(clock.basis, r, 'diag-base', 'diag-fwd'):.3f} of forward-only speed")

    # Each round's ratio compares the two sides measured back to back; the median over rounds drops
    # rounds in which a burst of foreign load hit one side only.
    ratio = median(ratios[clock.basis])
    R = range(profile.tp_rounds)
    details = {
        "teacher_params": n_params(model), "teacher_lm_params": lm_params(model), "vocab": profile.vocab,
        "distilled_vocab": runner.vocab, "tokenizer_size": len(processor.tokenizer),
        "samples": n, "batch_size": B, "shard_size": profile.tp_shard, "tokens_per_sample": tokens / n,
        "distilled_positions_per_sample": distilled / n, "visual_tokens_per_image": image_tokens,
        "visual_tokens_per_sample": sum(visual) / n, "visual_tokens_per_sample_min_max": [min(visual), max(visual)],
        "basis": clock.basis, "round_ratios": ratios,
        "median_ratio_wall": median(ratios["wall"]), "median_ratio_cpu": median(ratios["cpu"]),
        "forward_only_samples_per_s_wall": [n / sum(clock.wall[f"fwd{r}"]) for r in R],
        "build_samples_per_s_wall": [n / sum(clock.wall[f"build{r}"]) for r in R],
        "first_batch_runner_over_forward_only": [ratio_of(clock.basis, r, "diag-runner", "diag-fwd") for r in R],
        "first_batch_base_model_over_forward_only": [ratio_of(clock.basis, r, "diag-base", "diag-fwd") for r in R],
        "clock": clock.report(),
        "dtype": profile.dtype, "attn_implementation": model.config._attn_implementation,
        "definition": "median over rounds of (build samples/s / forward-only samples/s), both measured back to "
                      "back in each round on the same records and batches; forward-only = model(**inputs) "
                      "with full logits, inputs prepared before the clock; build = build_cache end to end, "
                      "handed the loaded teacher. Seconds are wall-clock on a GPU, process CPU seconds "
                      "(all threads) on a CPU host.",
    }
    fwd_sps = median([n / sum(clock.wall[f"fwd{r}"]) for r in R])
    bld_sps = median([n / sum(clock.wall[f"build{r}"]) for r in R])
    details["forward_only_samples_per_s_wall_median"] = fwd_sps
    details["build_samples_per_s_wall_median"] = bld_sps
    src = clock.wall if clock.basis == "wall" else clock.cpu
    details[f"forward_only_samples_per_{clock.basis}_s_median"] = median([n / sum(src[f"fwd{r}"]) for r in R])
    details[f"build_samples_per_{clock.basis}_s_median"] = median([n / sum(src[f"build{r}"]) for r in R])
    flops = forward_flops(model, inputs[0])
    if flops:
        per_sample = flops / len(batches[0])
        details["forward_flops_per_sample"] = per_sample
        details["forward_achieved_tflops"] = per_sample * fwd_sps / 1e12
        details["build_achieved_tflops"] = per_sample * bld_sps / 1e12
        if device.type == "cuda":
            name = torch.cuda.get_device_name(0)
            peak = peak_tflops or bf16_peak_tflops(name)
            details["gpu_name"] = name
            details["bf16_peak_tflops"] = peak
            if peak:
                details["forward_bf16_peak_fraction"] = details["forward_achieved_tflops"] / peak
                details["build_bf16_peak_fraction"] = details["build_achieved_tflops"] / peak
    return ratio, details
