"""The teacher side: loading a teacher, running it on padded batches, and turning its final hidden
states into what the losses need (sparse distributions at distilled positions, relation matrices).

The batch holds every input the teacher's processor returned (``processing.collate``), and the base
model (``model.<base_model_prefix>``) gets all of them, so its final hidden states are those of
``model(**inputs)``. Logits are produced for the distilled positions alone, chunk by chunk, as the
model's head does (``lm_head``, then the text config's ``final_logit_softcapping`` when set), so the
[batch, seq, vocab] tensor never exists. Relation matrices are per image, at each image's own visual
positions; without softcapping they use ``R = Z Z^T = H (W^T W) H^T`` with the constant ``W^T W`` of
the frozen head.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kd_cache import processing, regions
from kd_cache.encoding import Encoded, Encoder, Prepared
from kd_cache.errors import UserError
from kd_cache.families import FAMILIES
from kd_cache.runtime import Placement, Quantize, attn_implementation
from kd_cache.schema import (
    DEFAULT_KINDS,
    CacheSample,
    KindArrays,
    SampleScheme,
    SparseMode,
    choice,
    derive_positions,
    predicted_tokens,
)


@dataclass
class Teacher:
    model: Any
    processor: Any  # a processor, or a tokenizer for a causal-LM teacher
    tokenizer: Any
    image_token_id: int | None  # the model config's (the positions it fills with image features)
    multimodal: bool
    device: torch.device  # where the inputs go: the device of the first layers when the teacher is dispatched
    offload: Any = None  # the temporary folder of disk-offloaded weights, kept while the teacher lives


def _main_device(device_map: dict) -> torch.device:
    """Where a dispatched model takes its inputs: as ``accelerate.dispatch_model``, the first GPU of the map
    (offloaded layers also execute there), else the CPU."""
    gpus = [d for d in device_map.values() if str(d) not in ("cpu", "disk")]
    if not gpus:
        return torch.device("cpu")
    return torch.device(f"cuda:{gpus[0]}" if isinstance(gpus[0], int) else gpus[0])


def _load_kwargs(device: torch.device, dtype: torch.dtype, placement: Placement | None,
                 quantize: str) -> tuple[dict, Any]:
    """``from_pretrained`` arguments of a placement and a quantization, and the offload folder to keep."""
    if choice(Quantize, quantize, "--quantize") is not Quantize.none:
        if device.type != "cuda":
            raise UserError(f"--quantize {quantize} loads the teacher through bitsandbytes, which needs a CUDA GPU; "
                            f"this build runs on {device.type}. Drop --quantize (the teacher is then loaded in "
                            "--dtype), or build on a GPU")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise UserError(f"--quantize {quantize} needs bitsandbytes: pip install 'mllm-kd[quant]'") from e
    if placement is None and quantize == Quantize.none.value:
        return {}, None
    from transformers import BitsAndBytesConfig

    kw: dict = {}
    offload = None
    if placement is not None:
        import tempfile

        offload = tempfile.TemporaryDirectory(prefix="kd-cache-offload-")
        kw.update(device_map="auto", max_memory=placement.max_memory, offload_folder=offload.name)
    else:
        kw["device_map"] = {"": device}  # a quantized model is placed when loaded, never moved after
    if quantize == Quantize.bits8.value:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif quantize == Quantize.bits4.value:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=dtype)
    return kw, offload


def load_teacher(path: str, device: str | torch.device, dtype: torch.dtype, placement: Placement | None = None,
                 quantize: str = "none") -> Teacher:
    """Load any image-text-to-text model, or any causal LM (text-only data), with its processor.

    ``placement`` (``kd_cache.runtime.teacher_placement``): spread the layers over GPUs, the CPU and disk by
    ``accelerate``'s big-model dispatch (``from_pretrained(device_map="auto", max_memory=...)``); the
    model's hooks move activations between devices, so the forward and the head are called as for a
    model on one device. ``quantize``: 8 or 4-bit linear layers (bitsandbytes, CUDA only).
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    device = torch.device(device)
    config = AutoConfig.from_pretrained(path)
    multimodal = getattr(config, "vision_config", None) is not None
    kw, offload = _load_kwargs(device, dtype, placement, quantize)
    cls = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    if kw:
        main = torch.device(f"cuda:{placement.gpus[0]}") if placement is not None and placement.gpus else device
        model = cls.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation(main), **kw).eval()
        device = _main_device(getattr(model, "hf_device_map", None) or {"": device})
    else:
        model = cls.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation(device))
        model = model.to(device).eval()
    model.requires_grad_(False)
    if multimodal:
        processor = AutoProcessor.from_pretrained(path)
        tokenizer = processor.tokenizer
        # The config's id, not the processor's: Gemma3's processor names <start_of_image>, the model fills
        # <image_soft_token>.
        image_token_id = processing.config_image_token_id(config)
        if image_token_id >= len(tokenizer):
            raise ValueError(f"teacher config image token id {image_token_id} is outside its tokenizer "
                             f"({len(tokenizer)} tokens): the processor saved in {path} does not belong to this model")
    else:
        processor = tokenizer = AutoTokenizer.from_pretrained(path)
        image_token_id = None
    vocab = model.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ValueError(
            f"teacher tokenizer has {len(tokenizer)} tokens but the teacher's output layer only {vocab}: "
            f"the tokenizer in {path} does not belong to this model"
        )
    return Teacher(model, processor, tokenizer, image_token_id, multimodal, device, offload)


def check_template(teacher: Teacher, template: str) -> None:
    """Refuse ``--template chat`` for a processor without a chat template (PaliGemma's prompt/suffix
    processor is the documented exception), naming the families that have a chat path."""
    proc = teacher.processor
    if template != "chat" or getattr(proc, "chat_template", None) is not None:
        return
    if teacher.multimodal and processing.is_prefix_lm(proc):
        return
    kind = type(teacher.model.config).model_type
    raise ValueError(
        f"teacher {kind!r} ({type(proc).__name__}) has no chat template, so --template chat cannot render its "
        f"conversations. Supported image-text families: {', '.join(f.name for f in FAMILIES.values())}; "
        "add a chat template to the processor (processor.chat_template = ...; save_pretrained) or use "
        "--template pretrain"
    )


def _sample_seed(seed: int, sample_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


class _PerSampleSampler:
    """A ``generate`` logits processor that samples each row from ``softmax(scores / temperature)`` with
    that row's own generator (Gumbel-max: the argmax of ``scores / T + Gumbel noise`` is such a draw), so
    greedy decoding picks the sampled token. Row ``r``'s ``t``-th token uses its generator's ``t``-th
    draw whatever else is in the batch."""

    def __init__(self, seeds: list[int], temperature: float, device: torch.device):
        self.temperature = temperature
        self.generators = []
        for seed in seeds:
            g = torch.Generator(device=device)
            g.manual_seed(seed)
            self.generators.append(g)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        out = torch.empty_like(logp)
        for r, g in enumerate(self.generators):
            u = torch.rand(logp.shape[-1], generator=g, device=logp.device).clamp_(1e-20, 1.0)
            out[r] = logp[r] - torch.log(-torch.log(u))
        return out


def draw_ids(logp: torch.Tensor, n: int, scheme: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` token draws per row of ``logp`` [P, V] (log-probabilities), sorted ascending: [P, n].

    Both schemes are unbiased, ``E[count_i] = n p_i`` for every token, so the counts give an
    unbiased estimate of the forward-KL gradient. ``multinomial``: ``n`` independent draws with
    replacement. ``systematic``: one uniform offset ``u`` per row and the points ``(j + u) / n``,
    ``j = 0..n-1``, mapped through the row's CDF. A token of probability ``p`` is then drawn
    ``floor(n p)`` or ``ceil(n p)`` times, never more or less, so the likely tokens get their counts
    almost exactly and only the mass between draws is random: the estimate's variance drops from
    ``p (1 - p) / n`` per token to at most ``1 / (4 n^2)`` (and to about ``p / n`` for ``p < 1/n``),
    and fewer distinct ids are stored. The CDF is accumulated in float64 so that rare tokens keep
    their exact share.
    """
    if choice(SampleScheme, scheme, "sample scheme") is SampleScheme.multinomial:
        return torch.multinomial(logp.exp(), n, replacement=True, generator=generator).sort(dim=-1).values
    cdf = logp.double().exp().cumsum(dim=-1)
    cdf /= cdf[:, -1:].clone()
    u = torch.rand((logp.shape[0], 1), generator=generator, device=logp.device, dtype=torch.float64)
    points = (torch.arange(n, device=logp.device, dtype=torch.float64) + u) / n  # ascending in (0, 1)
    # First token whose CDF exceeds the point (right=True: a zero-probability token is never drawn).
    return torch.searchsorted(cdf, points, right=True).clamp_max_(logp.shape[1] - 1)


class TeacherRunner:
    """Runs the teacher on batches of ``Encoded`` samples and returns one cache sample dict each."""

    def __init__(self, teacher: Teacher, *, sparse: str = "topk", top_k: int = 64, samples: int = 64,
                 sample_scheme: str = "systematic", relation: str = "auto", seed: int = 0, chunk_size: int = 1024,
                 positions: tuple[str, ...] = DEFAULT_KINDS, hidden: bool = False):
        choice(SparseMode, sparse, "--sparse")
        choice(SampleScheme, sample_scheme, "--sample-scheme")
        self.t = teacher
        self.sparse, self.top_k, self.samples, self.seed = sparse, top_k, samples, seed
        self.sample_scheme = sample_scheme
        self.relation = relation
        self.chunk_size = chunk_size
        self.positions, self.hidden = tuple(positions), hidden
        self._regions_error: str | None = None  # set when the teacher's image layout has no boxes here
        head = teacher.model.get_output_embeddings()
        self.head = head
        # Output rows past the tokenizer are padding (embeddings padded to a multiple of 64/128) and
        # never a real token: they are masked, so the cache is over the tokenizer's vocabulary only
        # and a student with a differently padded head stays compatible.
        self.vocab = min(head.weight.shape[0], len(teacher.tokenizer))
        self.head_rows = head.weight.shape[0]
        self.base = getattr(teacher.model, teacher.model.base_model_prefix)
        # Gemma-2-based PaliGemma caps its logits as c * tanh(z / c) after the head.
        self.softcap = getattr(teacher.model.config.get_text_config(), "final_logit_softcapping", None)
        # W^T W, fp32, once: relation matrices then cost O(N d^2) instead of O(N V d).
        self.gram = None
        if relation != "none" and teacher.multimodal and getattr(head, "bias", None) is None and self.softcap is None:
            w = self._head_weight()[: self.vocab].float()
            self.gram = w.T @ w

    @torch.no_grad()
    def _head_weight(self) -> torch.Tensor:
        """The head's weight [V, d], as the head computes with it: ``head(I) = I W^T`` (exact, one product per
        entry), so a head whose weights a dispatch offloaded to the CPU or disk gives them too."""
        w = self.head.weight
        if w.device.type != "meta":
            return w
        eye = torch.eye(w.shape[1], device=self.t.device, dtype=w.dtype)
        return self.head(eye).T

    def prepare_inputs(self, batch: list[Encoded]) -> dict:
        """Every model input of a batch (``processing.collate`` of the processor's outputs) as CPU tensors.

        The build calls this in its producer thread, so collation overlaps the teacher's forward
        instead of idling the device; on CUDA the tensors are pinned for an async copy.
        """
        pad = self.t.tokenizer.pad_token_id or 0
        inputs = processing.collate([e.processed for e in batch], pad)
        if self.t.device.type == "cuda":
            inputs = {k: v.pin_memory() for k, v in inputs.items()}
        return inputs

    def _inputs(self, batch: list[Encoded], prepared: dict | None = None) -> dict:
        inputs = prepared if prepared is not None else self.prepare_inputs(batch)
        return self._on_device(inputs)

    def _on_device(self, inputs: dict) -> dict:
        dev, dtype = self.t.device, self.t.model.dtype
        return {k: v.to(dev, dtype=dtype, non_blocking=True) if v.is_floating_point() else v.to(dev, non_blocking=True)
                for k, v in inputs.items()}

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The model's logits (fp32, tokenizer vocabulary) at hidden states ``h`` [P, d]."""
        z = self.head(h).float()[:, : self.vocab]
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    @torch.no_grad()
    def hidden_states(self, batch: list[Encoded], prepared: dict | None = None) -> torch.Tensor:
        """Final hidden states [B, L, d] (padding on the right)."""
        out = self.base(**self._inputs(batch, prepared), use_cache=False)
        return out.last_hidden_state

    @torch.no_grad()
    def run(self, batch: list[Encoded], prepared: dict | None = None) -> list[CacheSample]:
        """The cache samples of a batch; ``prepared`` = ``prepare_inputs(batch)`` if already made."""
        h = self.hidden_states(batch, prepared)
        pre = self._batched_topk(batch, h) if self.sparse == "topk" else [None] * len(batch)
        return [self._sample(e, h[i, : len(e.input_ids)], pre[i]) for i, e in enumerate(batch)]

    def _positions(self, e: Encoded) -> dict[str, np.ndarray]:
        """Positions of the distilled kinds, and the visual ones (relation matrices) in any case."""
        return {kind: derive_positions(kind, e.input_ids, e.labels, self.t.image_token_id)
                for kind in dict.fromkeys((*self.positions, "visual"))}

    def _batched_topk(self, batch: list[Encoded], h: torch.Tensor) -> list[dict]:
        """Top-k distributions of a whole batch: per kind, one pass of the head over the distilled rows
        of every sample (fewer, larger matmuls; one device-to-host copy per array, not per sample).
        Top-k does not depend on the sample; sampled draws are seeded per sample and stay per sample."""
        pos = [self._positions(e) for e in batch]
        flat = h.reshape(-1, h.shape[-1])
        out: list[dict] = [{"_positions": p} for p in pos]
        for kind in self.positions:
            rows = np.concatenate([i * h.shape[1] + p[kind].astype(np.int64) for i, p in enumerate(pos)])
            targets = (np.concatenate([predicted_tokens(e.labels, p[kind]) for e, p in zip(batch, pos)])
                       if kind == "response" else None)
            dist = self.distribution(flat[torch.from_numpy(rows).to(h.device)], "", kind, targets)
            bounds = np.cumsum([0] + [len(p[kind]) for p in pos])
            for i in range(len(batch)):
                out[i][kind] = {name: v[bounds[i] : bounds[i + 1]] for name, v in dist.items()}
        return out

    def distribution(self, h: torch.Tensor, sample_id: str, kind: str,
                     targets: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Sparse teacher distribution at the rows of ``h`` [P, d]: its ``TEACHER_ARRAYS`` by name (ids
        [P, K], fp32 log-probs [P, K], tail [P]; counts [P, K] in sample mode, where ``kd_cache.format``
        derives ``logp_mean``). ``sample_id`` and ``kind`` seed sample mode's draws. With ``targets`` [P]
        (the realised next tokens) also ``realised`` [P]: their log-probs, inside the stored ids or not."""
        P = h.shape[0]
        gen = None  # sample mode: made on the head's device (a dispatched head may sit on another than h)
        k = min(self.top_k, self.vocab) if self.sparse == "topk" else self.samples
        parts: dict[str, list[torch.Tensor]] = {"ids": [], "lp": [], "tail": [], "counts": [], "realised": []}
        for a in range(0, P, self.chunk_size):
            z = self.logits(h[a : a + self.chunk_size])
            if targets is not None:
                t = torch.from_numpy(np.asarray(targets[a : a + self.chunk_size], dtype=np.int64)).to(z.device)
                parts["realised"].append(z.gather(1, t[:, None])[:, 0] - torch.logsumexp(z, dim=-1))
            if self.sparse == "topk":
                # One exp pass serves the normaliser and the exact tail: e = exp(z - max); the tail is
                # the sum of e *off* the top-k ids (taken directly, never as 1 - sum of the top-k,
                # so a tiny tail keeps its precision) over the sum of all of e. 40% less time than
                # log_softmax + a masked copy + logsumexp, which matters on a CPU teacher.
                # The logits are this chunk's own (a fresh head output): after top-k they become e in
                # place, which spares a [chunk, V] allocation (its page faults cost ~20% of this step
                # on a CPU host; same values).
                mx = z.max(dim=-1, keepdim=True).values
                top, ids = z.topk(k, dim=-1)
                e = z.sub_(mx).exp_()
                log_total = e.sum(dim=-1).log()
                lp = top - (mx + log_total[:, None])
                tail = e.scatter_(1, ids, 0.0).sum(dim=-1).log() - log_total
                parts["tail"].append(tail)
                parts["ids"].append(ids)
                parts["lp"].append(lp)
                continue
            # Sampled ids (random-sampling KD).
            if gen is None:
                gen = torch.Generator(device=z.device)
                gen.manual_seed(_sample_seed(self.seed, f"{sample_id}/{kind}"))
            logp = torch.log_softmax(z, dim=-1)
            srt = draw_ids(logp, self.samples, self.sample_scheme, gen)
            new = torch.ones_like(srt, dtype=torch.bool)
            new[:, 1:] = srt[:, 1:] != srt[:, :-1]
            group = new.long().cumsum(-1) - 1
            ids = torch.full_like(srt, -1).scatter_(1, group, srt)
            counts = torch.zeros_like(srt).scatter_add_(1, group, torch.ones_like(srt))
            lp = torch.where(ids >= 0, logp.gather(1, ids.clamp_min(0)), torch.zeros((), device=z.device))
            # Exact tail: log of the mass outside the stored ids, from the fp32 logits themselves.
            # Padding (-1) is pointed at the row's first id, which is always a real one.
            fill = torch.where(ids >= 0, ids, ids[:, :1])
            masked = logp.scatter(1, fill, float("-inf"))
            parts["tail"].append(torch.logsumexp(masked, dim=-1))
            parts["ids"].append(ids)
            parts["lp"].append(lp)
            parts["counts"].append(counts)

        def host(name: str, empty: torch.Tensor) -> np.ndarray:  # one device->host copy per array
            return (torch.cat(parts[name]) if parts[name] else empty).cpu().numpy()

        out = {"ids": host("ids", torch.full((0, k), -1, dtype=torch.long)).astype(np.int32),
               "logprobs": host("lp", torch.zeros((0, k))).astype(np.float32, copy=False),
               "tail": host("tail", torch.zeros(0)).astype(np.float32, copy=False)}
        if self.sparse == "sample":
            out["counts"] = host("counts", torch.zeros((0, k), dtype=torch.long)).astype(np.int32)
        if targets is not None:
            out["realised"] = host("realised", torch.zeros(0)).astype(np.float32, copy=False)
        return out

    def _relations(self, h_vis: torch.Tensor, counts: list[int]) -> list[np.ndarray]:
        """Per image, ``R / ||R||_F`` with ``R = Z Z^T`` of the logits at its own ``counts[i]`` visual
        positions (``h_vis`` holds the visual positions of all images, in order)."""
        if self.relation == "none" or not counts:
            return []
        if sum(counts) != h_vis.shape[0]:
            raise ValueError(f"{h_vis.shape[0]} visual positions for images of {counts} visual tokens")
        rels = []
        for hi in torch.split(h_vis, list(counts)):
            if self.gram is not None:
                hi = hi.to(self.gram.device).float()
                r = hi @ self.gram @ hi.T
            else:
                z = self.logits(hi)
                r = z @ z.T
            r = 0.5 * (r + r.T)
            r = r / r.norm().clamp_min(1e-30)
            rels.append(r.cpu().numpy().astype(np.float32))
        return rels

    def _sample(self, e: Encoded, h: torch.Tensor, pre: dict | None = None) -> CacheSample:
        """One cache sample; ``pre`` holds its distributions when they were computed batch-wide."""
        where = pre.pop("_positions") if pre is not None else self._positions(e)
        kinds = {}
        for kind in self.positions:
            pos = where[kind]
            hk = h[torch.from_numpy(pos.astype(np.int64)).to(h.device)]
            extras = self._alignment_extras(e, kind, pos)
            if self.hidden:  # LLaVADI hidden-state alignment: final-layer states, fp16 on disk
                extras["hidden"] = hk.float().clamp(-65000, 65000).cpu().numpy().astype(np.float16)
            teacher = dict(pre[kind]) if pre is not None else self.distribution(
                hk, e.id, kind, predicted_tokens(e.labels, pos) if kind == "response" else None)
            if "realised" in teacher:
                extras["realised"] = teacher.pop("realised").astype(np.float16)
            kinds[kind] = KindArrays(positions=pos, teacher=teacher, extras=extras)
        hv = h[torch.from_numpy(where["visual"].astype(np.int64)).to(h.device)]
        return CacheSample(id=e.id, images=[im.path for im in e.images], image_bytes=[im.data for im in e.images],
                           input_ids=e.input_ids.astype(np.int32), labels=e.labels.astype(np.int32),
                           image_token_counts=np.asarray(e.image_token_counts, np.int32),
                           processor_call=e.processed.call, conversation=e.messages, meta=e.meta or {}, kinds=kinds,
                           relation=self._relations(hv, e.image_token_counts))

    def _alignment_extras(self, e: Encoded, kind: str, pos: np.ndarray) -> dict[str, np.ndarray]:
        """What a student of another tokenizer or image layout needs at a kind's positions
        (``kd_cache.schema.ALIGNMENT_EXTRAS``): each response position's predicted token's characters in
        the answer text (``spans`` int32 [P, 2]), each visual position's box of its original image
        (``boxes`` float16 [P, 4], NaN: none; ``kd_cache.regions``)."""
        if kind == "response":
            spans = e.processed.answer_spans
            nxt = pos.astype(np.int64) + 1
            return {"spans": (spans[nxt] if spans is not None and len(nxt) else
                              np.full((len(pos), 2), -1)).astype(np.int32)}
        if kind == "visual" and self.t.multimodal:
            if self._regions_error is None:
                try:
                    boxes = regions.image_regions(self.t.processor, self.t.model.config, e.processed,
                                                  [im.size for im in e.pil_images])
                    return {"boxes": (np.concatenate(boxes) if boxes else np.zeros((0, 4))).astype(np.float16)}
                except (NotImplementedError, regions.RegionLayoutError) as err:
                    # a processor setting without a layout here: no boxes (a student of another image
                    # layout is refused on this cache; one of the same layout needs none)
                    self._regions_error = str(err)
                    warnings.warn(f"no visual-token boxes in this cache: {err}", stacklevel=2)
        return {}

    @torch.no_grad()
    def generate(self, encoder: Encoder, batch: list[Prepared], *, max_new_tokens: int = 128,
                 temperature: float = 0.0) -> list[Prepared]:
        """Replace every answer (assistant turn) with the teacher's own, turn by turn, batched over
        samples with left padding; the reference answers go to ``meta["reference_answers"]``."""
        from transformers import LogitsProcessorList

        tok = self.t.tokenizer
        convs = [[dict(t) for t in p.record.conversations] for p in batch]
        turns = [encoder.assistant_turns(p) for p in batch]
        refs = [[convs[i][j]["value"] for j in turns[i]] for i in range(len(batch))]
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        for step in range(max(len(t) for t in turns)):
            todo = [i for i in range(len(batch)) if step < len(turns[i])]
            prompts = []
            for i in todo:
                cur = Prepared(type(batch[i].record)(batch[i].record.id, convs[i], batch[i].record.images),
                               batch[i].pil_images)
                prompts.append(encoder.prompt(cur, turns[i][step]))
            inputs = self._on_device(processing.collate(prompts, pad, padding_side="left"))
            L = inputs["input_ids"].shape[1]
            # Sampling draws from one generator per sample (seeded by the sample's id and turn), never from
            # the global RNG: an answer does not depend on the other samples of its batch.
            sampler = (_PerSampleSampler([_sample_seed(self.seed, f"generate/{batch[i].record.id}/{step}") for i in todo],
                                         temperature, inputs["input_ids"].device) if temperature > 0 else None)
            gen = self.t.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                        top_p=None, top_k=None, pad_token_id=pad, eos_token_id=tok.eos_token_id,
                                        logits_processor=LogitsProcessorList([sampler] if sampler is not None else []))
            for r, i in enumerate(todo):
                text = tok.decode(gen[r, L:], skip_special_tokens=True).strip()
                if encoder.template == "pretrain":
                    text = text.split("\n")[0].strip()
                convs[i][turns[i][step]]["value"] = text
        out = []
        for i, p in enumerate(batch):
            rec = type(p.record)(p.record.id, convs[i], p.record.images)
            out.append(Prepared(rec, p.pil_images, meta={**p.meta, "reference_answers": refs[i]}))
        return out
