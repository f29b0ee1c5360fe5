"""``kd-cache build``: run the teacher once over a dataset and write an immutable, resumable cache.

Work is split into shards of ``shard_size`` consecutive input records; shard ``s`` belongs to rank
``s % world_size`` (under ``accelerate launch``), so every writer owns whole shards. A shard is done
when its completion marker exists; a rerun skips done shards and rebuilds the rest, which makes a
killed build resumable and the result identical to an uninterrupted one. The manifest is written
last, by rank 0, once every shard is complete.

The teacher forward is the only step on the accelerator; tokenisation and image decoding run one
batch ahead in a thread, and compression + writes of a finished shard run in another thread, so
they overlap with the teacher instead of following it.
"""

from __future__ import annotations

import itertools
import math
import posixpath
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from queue import Queue

import torch

from kd_cache import fingerprint, storage
from kd_cache.build_config import CONTENT_KEYS, BuildConfig
from kd_cache.encoding import Encoder
from kd_cache.format import BUILD_NAME
from kd_cache.records import RECORD_ERROR, BadRecord, Columns, DataSource, dataset_fingerprint, iter_records
from kd_cache.runtime import resolve_dtype
from kd_cache.schema import (
    GeneratedInfo,
    HiddenInfo,
    Manifest,
    SkippedRecord,
    SparseInfo,
    SparseMode,
    TeacherInfo,
    parse_positions,
)
from kd_cache.teacher import TeacherRunner, check_template, load_teacher
from kd_cache.writer import CacheWriter


def _check_identity(previous: dict, current: dict, out: str) -> None:
    diffs = [k for k in CONTENT_KEYS if previous.get(k) != current.get(k)]
    if diffs:
        lines = [f"  --{k.replace('_', '-')}: cache has {previous.get(k)!r}, this run asks for {current.get(k)!r}"
                 for k in diffs]
        raise ValueError(
            f"{out} already holds a cache built with different settings:\n" + "\n".join(lines)
            + "\nRerun with the original settings to resume, or choose another --out."
        )


class _Dist:
    """Rank/world/barrier from ``accelerate`` when launched with it, plain single-process otherwise."""

    def __init__(self, device: str):
        from accelerate import PartialState

        # Without CUDA, accelerate only joins the launched process group when told to run on CPU.
        cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        self.state = PartialState(cpu=cpu)
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.main = self.state.is_main_process
        self.device = torch.device(device) if device not in ("auto",) else self.state.device

    def barrier(self):
        self.state.wait_for_everyone()


def _encode_ahead(encoder: Encoder, records, batch_size: int, strict: bool, out_q: Queue, skipped: list,
                  prepare_only: bool = False, prepare_inputs=None):
    """Producer thread: load images and tokenise (or only prepare, when the teacher will write the
    answers first), put batches (None = end) on the queue. With ``prepare_inputs`` (and not
    ``prepare_only``) a batch goes out as ``(batch, prepare_inputs(batch))``: padding and image
    processing then also overlap the teacher's forward."""
    batch = []
    step = encoder.prepare if prepare_only else encoder.encode

    def put(b):
        out_q.put((b, prepare_inputs(b)) if prepare_inputs is not None and not prepare_only else b)

    try:
        for rec in records:
            try:
                batch.append(step(rec))
            except BadRecord as e:
                if strict:
                    raise
                skipped.append({"id": e.record_id, "reason": e.reason, "detail": e.detail})
                continue
            except Exception as e:  # one record's failure never ends the build: listed with its error
                if strict:
                    raise
                skipped.append({"id": rec.id, "reason": RECORD_ERROR, "detail": f"{type(e).__name__}: {e}"})
                continue
            if len(batch) == batch_size:
                put(batch)
                batch = []
        if batch:
            put(batch)
        out_q.put(None)
    except BaseException as e:  # surfaced in the consumer
        out_q.put(e)


def _teacher_answers(runner: TeacherRunner, encoder: Encoder, prepared: list, cfg: BuildConfig,
                     skipped: list) -> list:
    generated = runner.generate(encoder, prepared, max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.generate_temperature)
    encoded = []
    for p in generated:
        try:
            encoded.append(encoder.encode_prepared(p))
        except BadRecord as e:
            if cfg.strict:
                raise
            skipped.append({"id": e.record_id, "reason": e.reason, "detail": e.detail, "stage": "after_generation"})
    return encoded


def build_cache(cfg: BuildConfig) -> Manifest:
    """Build (or finish) the cache described by ``cfg``; returns the manifest."""
    dist = _Dist(cfg.device)
    writer = CacheWriter(cfg.out, storage_options=cfg.storage_options or None)
    fs = writer.fs
    identity = cfg.identity()
    build_json = posixpath.join(writer.root, BUILD_NAME)

    if dist.main:
        previous = storage.read_json(fs, build_json)
        if previous is not None:
            _check_identity(previous, identity, cfg.out)
        else:
            storage.write_json(fs, build_json, identity, sort_keys=True)
    dist.barrier()
    if not dist.main:
        _check_identity(storage.read_json(fs, build_json) or {}, identity, cfg.out)

    manifest = writer.read_manifest()
    if manifest is not None:
        if dist.main:
            print(f"{cfg.out}: cache already complete ({manifest.num_samples} samples)", file=sys.stderr)
        return manifest

    stream = iter_records(DataSource(cfg.data, split=cfg.split, subset=cfg.subset, streaming=cfg.streaming,
                                     columns=Columns(cfg.id_column, cfg.image_column, cfg.conversation_column)))
    records = iter(stream)
    if cfg.limit is not None:
        records = itertools.islice(records, cfg.limit)
    first = next(records, None)
    if first is None:
        raise ValueError(f"--data {cfg.data}: no records")
    records = itertools.chain([first], records)
    n_known = None if stream.length is None else min(stream.length, cfg.limit or stream.length)

    dtype = resolve_dtype(cfg.dtype, dist.device)
    teacher = load_teacher(cfg.teacher, dist.device, dtype)
    check_template(teacher, cfg.template)
    encoder = Encoder(teacher.processor, cfg.template, cfg.max_length, cfg.image_folder, teacher.image_token_id,
                      store_images=cfg.store_images)
    runner = TeacherRunner(teacher, sparse=cfg.sparse, top_k=cfg.top_k, samples=cfg.samples,
                           sample_scheme=cfg.sample_scheme,
                           relation=cfg.relation if teacher.multimodal else "none", seed=cfg.seed,
                           positions=parse_positions(cfg.positions), hidden=cfg.hidden)
    k = min(cfg.top_k, runner.vocab) if cfg.sparse == "topk" else cfg.samples

    def mine(s: int) -> bool:
        return s % dist.world == dist.rank and not writer.is_complete(s)

    todo = None
    if n_known is not None:
        todo = sum(min(cfg.shard_size, n_known - s * cfg.shard_size)
                   for s in range(math.ceil(n_known / cfg.shard_size)) if mine(s))
    from tqdm.auto import tqdm

    bar = tqdm(total=todo, unit="sample", desc=f"teacher pass (rank {dist.rank})" if dist.world > 1 else "teacher pass",
               disable=not cfg.progress, position=dist.rank, dynamic_ncols=True)
    io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kd-cache-write")
    pending: list[Future] = []
    n_skipped = n_records = 0
    try:
        # Shard s holds input records [s * shard_size, (s + 1) * shard_size), read in order (a stream is
        # read once; the records of other ranks' or complete shards are passed over).
        for s in itertools.count():
            shard_records = list(itertools.islice(records, cfg.shard_size))
            if not shard_records:
                break
            n_records += len(shard_records)
            if not mine(s):
                continue
            skipped: list[dict] = []
            q: Queue = Queue(maxsize=4)
            producer = threading.Thread(
                target=_encode_ahead,
                args=(encoder, shard_records, cfg.batch_size, cfg.strict, q, skipped, cfg.generate,
                      runner.prepare_inputs),
                daemon=True,
            )
            producer.start()
            samples: list[dict] = []
            truncated: list[dict] = []
            while True:
                item = q.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                item, prepared = item if isinstance(item, tuple) else (item, None)
                n_in = len(item)
                if cfg.generate:  # LLaVADI: the teacher answers, then is distilled on its own answers
                    item = _teacher_answers(runner, encoder, item, cfg, skipped)
                truncated += [{"id": e.id, "tokens": e.full_length} for e in item if e.full_length is not None]
                if item:
                    samples.extend(runner.run(item, prepared))
                bar.update(n_in)
            producer.join()
            bar.update(sum(1 for x in skipped if x.get("stage") != "after_generation"))
            n_skipped += len(skipped)
            bar.set_postfix(skipped=n_skipped, shard=s)
            # The skip list goes next to the shard before its data: a complete shard always has one.
            storage.write_json(fs, writer.skipped_path(s), {"skipped": skipped, "truncated": truncated}, sort_keys=True)
            while len(pending) >= 2:  # bound memory: at most two finished shards waiting for the disk
                pending.pop(0).result()
            pending.append(io.submit(writer.write_shard, s, samples, sparse_mode=cfg.sparse, k=k,
                                     relation=runner.relation, sample_logprobs=cfg.sample_logprobs))
        for f in pending:
            f.result()
    finally:
        io.shutdown(wait=True)
        bar.close()

    n_shards = math.ceil(n_records / cfg.shard_size)
    dist.barrier()
    listed = _gather(cfg, writer, n_shards)
    check_skips(listed[1], sum(e.samples for e in listed[0]), cfg.max_skip_share)  # on every rank: all stop
    if dist.main:
        manifest = _finish(cfg, writer, listed, teacher, k, runner.relation)
    dist.barrier()
    if not dist.main:
        manifest = writer.read_manifest()
    return manifest


def _gather(cfg: BuildConfig, writer: CacheWriter, n_shards: int) -> tuple[list, list[dict], list[dict]]:
    """Every shard's completion marker, and the records the build skipped and cut, in shard order."""
    entries, skipped, truncated = [], [], []
    for s in range(n_shards):
        entry = writer.read_marker(s)
        if entry is None:
            raise RuntimeError(f"{cfg.out}: shard {writer.shard_name(s)} is not complete after the build")
        entries.append(entry)
        listed = storage.read_json(writer.fs, writer.skipped_path(s)) or {}
        skipped.extend(listed.get("skipped", []))
        truncated.extend(listed.get("truncated", []))
    return entries, skipped, truncated


def _finish(cfg: BuildConfig, writer: CacheWriter, listed: tuple, teacher, k: int, relation: str) -> Manifest:
    """Write the manifest from the gathered shards (``_gather``)."""
    entries, skipped, truncated = listed
    model_cfg = teacher.model.config
    head = teacher.model.get_output_embeddings().weight
    sample_mode = cfg.sparse == SparseMode.sample.value
    manifest = Manifest(
        teacher=TeacherInfo(path=cfg.teacher, model_type=model_cfg.model_type,
                            revision=getattr(model_cfg, "_commit_hash", None),
                            config_hash=fingerprint.config_hash(model_cfg), multimodal=teacher.multimodal),
        tokenizer_hash=fingerprint.tokenizer_hash(teacher.tokenizer),
        vocab_size=len(teacher.tokenizer),  # distributions cover the tokenizer's tokens only
        teacher_head_rows=int(head.shape[0]),
        image_token_id=teacher.image_token_id,
        template=cfg.template,
        max_length=cfg.max_length,
        sparse=SparseInfo(mode=cfg.sparse, k=k, seed=cfg.seed, samples=cfg.samples if sample_mode else None,
                          scheme=cfg.sample_scheme if sample_mode else None,
                          logprobs_stored=cfg.sample_logprobs if sample_mode else None),
        relation=relation,
        positions=parse_positions(cfg.positions),
        hidden=HiddenInfo(stored=True, size=int(head.shape[1]), dtype="float16") if cfg.hidden else HiddenInfo(),
        generated=GeneratedInfo(max_new_tokens=cfg.max_new_tokens, temperature=cfg.generate_temperature)
        if cfg.generate else None,
        dataset_fingerprint=dataset_fingerprint(cfg.data),
        build_config={key: v for key, v in asdict(cfg).items() if key != "storage_options"},
        shards=entries,
        skipped=[SkippedRecord(id=x["id"], reason=x["reason"]) for x in skipped],
        truncated=[x["id"] for x in truncated],
    )
    writer.write_manifest(manifest)
    return manifest


class TooManySkipped(ValueError):
    """The build cached nothing, or skipped more than ``--max-skip-share`` of the records."""


def check_skips(skipped: list[dict], n_samples: int, max_share: float, show: int = 5) -> None:
    """Raise ``TooManySkipped`` (counts by reason, the first ``show`` records of each) when the build
    cached no sample or skipped more than ``max_share`` of its records: a data format the tool does not
    read must never pass as an empty success."""
    total = n_samples + len(skipped)
    share = len(skipped) / total if total else 1.0
    if n_samples and share <= max_share:
        return
    by_reason: dict[str, list[dict]] = {}
    for x in skipped:
        by_reason.setdefault(x["reason"], []).append(x)
    head = (f"every one of the {total} records was skipped" if not n_samples else
            f"{len(skipped)} of {total} records skipped ({share:.0%} > --max-skip-share {max_share:g})")
    lines = [f"{head}; no manifest written. Skipped, by reason:"]
    for reason, xs in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {reason}: {len(xs)}")
        lines += [f"    {x['id']}" + (f": {x['detail']}" if x.get("detail") else "") for x in xs[:show]]
    lines.append("Check the data's format (--conversation-column/--image-column/--id-column), --image-folder and "
                 "--max-length; the shards' *.skipped.json list every record. Raise --max-skip-share to accept.")
    raise TooManySkipped("\n".join(lines))


def summary(manifest: Manifest) -> str:
    total = manifest.total_bytes
    lines = [
        f"cache: {manifest.num_samples} samples in {len(manifest.shards)} shards, "
        f"{total / 2**20:.2f} MiB ({total / max(manifest.num_samples, 1) / 1024:.1f} KiB/sample)",
    ]
    if manifest.skipped:
        lines.append(f"skipped {len(manifest.skipped)} records (listed in manifest.json under 'skipped'):")
        lines += [f"  {reason}: {n}" for reason, n in manifest.skipped_counts.items()]
    else:
        lines.append("skipped 0 records")
    if manifest.truncated:
        lines.append(f"{len(manifest.truncated)} samples cut by --max-length (ids in manifest.json under 'truncated')")
    return "\n".join(lines)
