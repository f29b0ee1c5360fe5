"""``kd-cache build``: run the teacher once over a dataset and write an immutable, resumable cache.

Work is split into shards of ``shard_size`` consecutive input records; shard ``s`` belongs to rank
``s % world_size`` (under ``accelerate launch``), so every writer owns whole shards. A shard is done
when its completion marker exists; a rerun skips done shards and rebuilds the rest, which makes a
killed build resumable and the result identical to an uninterrupted one. The manifest is written
last, by rank 0, once every shard is complete.

A cache is identified by its content, not its paths: ``build.json`` records the content settings,
the data's fingerprint and the teacher's file hashes, and a rerun whose data or teacher weights
changed at the same path is refused (``--overwrite`` starts over). One build at a time writes a cache
(``kd_cache.lock``); the next build deletes the temporary files of killed atomic writes.
``--repair`` re-checks every shard and rebuilds exactly the failing ones.

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
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from queue import Queue

import torch

from kd_cache import fingerprint, storage
from kd_cache.batching import Padding, plan_batches
from kd_cache.build_config import CONTENT_KEYS, BuildConfig
from kd_cache.encoding import Encoder
from kd_cache.errors import USER_ERRORS, UserError
from kd_cache.format import BUILD_NAME, COMPLETE_SUFFIX, LOCK_NAME, SHARDS_DIR
from kd_cache.lock import HEARTBEAT_S, STALE_S, FolderLock
from kd_cache.reader import CacheCheck, KDCache, ShardCheck, check_shards, open_cache
from kd_cache.records import RECORD_ERROR, BadRecord, Columns, DataSource, dataset_identity, iter_records
from kd_cache.runtime import resolve_dtype, teacher_placement
from kd_cache.schema import (
    FORMAT_VERSION,
    CacheSample,
    GeneratedInfo,
    HiddenInfo,
    Manifest,
    SkippedRecord,
    SparseInfo,
    SparseMode,
    TeacherInfo,
    parse_positions,
)
from kd_cache.teacher import Teacher, TeacherRunner, check_template, load_teacher
from kd_cache.writer import CacheWriter


def _stored_config(cfg: BuildConfig) -> dict:
    """The settings a repair reruns the build with (``build.json``'s ``config``)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("out", "storage_options", "repair", "overwrite")}


def _read_build_json(fs, path: str, out: str) -> dict | None:
    """``build.json`` of the cache at ``out``, None when absent; unreadable or foreign: a ValueError that says
    how to rebuild."""
    redo = "Rebuild it with --overwrite (deletes the cache there), or choose another --out."
    try:
        d = storage.read_json(fs, path)
    except ValueError as e:
        raise ValueError(f"{e}: the settings the cache at {out} was built with are unknown. {redo}") from e
    if d is None:
        return None
    if not isinstance(d, dict) or not {"settings", "data", "teacher", "config"} <= set(d):
        raise ValueError(f"{storage.display(fs, path)} is not a build.json of this tool. {redo}")
    if d.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{out} holds a cache of format {d.get('format_version')}; this version writes "
                         f"format {FORMAT_VERSION}. {redo}")
    return d


def _identity(cfg: BuildConfig, teacher_dir: str, previous: dict | None) -> dict:
    """What makes the cache what it is: the content settings, the data's files, the teacher's files. Both
    sets of files are identified by ``fingerprint.files_identity``: the hashes ``previous`` recorded are
    kept for every file whose (size, mtime) is unchanged, so a rerun reads neither again."""
    previous = previous or {}
    return {
        "format_version": FORMAT_VERSION,
        "settings": cfg.identity(),
        "data": dataset_identity(cfg.data, previous.get("data")),
        "teacher": fingerprint.teacher_identity(teacher_dir, previous.get("teacher")),
        "config": _stored_config(cfg),
    }


def _check_identity(previous: dict, current: dict, out: str) -> None:
    """Refuse to add to (or to call complete) a cache built with other settings, data or teacher weights."""
    before, now = previous["settings"], current["settings"]
    diffs = [k for k in CONTENT_KEYS if before.get(k) != now.get(k)]
    if diffs:
        lines = [f"  --{k.replace('_', '-')}: cache has {before.get(k)!r}, this run asks for {now.get(k)!r}"
                 for k in diffs]
        raise ValueError(
            f"{out} already holds a cache built with different settings:\n" + "\n".join(lines)
            + "\nRerun with the original settings to resume, or choose another --out."
        )
    redo = (f"Its shards would mix two versions. Restore the original, or rebuild from scratch with --overwrite "
            f"(deletes the cache at {out}), or choose another --out.")
    for key in ("data", "teacher"):
        if previous[key].get("digest") != current[key].get("digest"):
            changed = (fingerprint.changed_files(previous[key], current[key])
                       or [f"content {previous[key].get('digest')} -> {current[key].get('digest')}"])
            raise ValueError(
                f"--{key} {now[key]} changed since the cache at {out} was built from it: "
                + ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
                + f". {redo}"
            )


def _clear(writer: CacheWriter) -> None:
    """``--overwrite``: delete the cache's own files (manifest, build.json, shards), nothing else."""
    fs = writer.fs
    # build.json goes last: a kill half-way leaves shards only next to the build.json that describes them.
    if fs.exists(writer.manifest_path):
        fs.rm(writer.manifest_path)
    storage.remove_tree(fs, posixpath.join(writer.root, SHARDS_DIR))
    if not storage.is_object_store(fs):
        fs.makedirs(posixpath.join(writer.root, SHARDS_DIR), exist_ok=True)
    if fs.exists(posixpath.join(writer.root, BUILD_NAME)):
        fs.rm(posixpath.join(writer.root, BUILD_NAME))
    print(f"{writer.url}: deleted the cache there (--overwrite)", file=sys.stderr)


def _repair_check(cfg: BuildConfig, writer: CacheWriter, manifest: Manifest | None) -> CacheCheck:
    """``--repair`` without an earlier check: re-hash every shard once (``kd_cache.reader.check_shards``)
    against the manifest, or, with no manifest (a build or repair stopped before writing it), every
    shard that has a completion marker against that marker; a shard with neither is rebuilt by the
    build pass anyway."""
    if manifest is not None:
        return KDCache(cfg.out, cfg.storage_options or None).verify_shards()
    entries, unreadable = [], []
    for marker_name in writer.complete_shards():
        name = marker_name[:-len(COMPLETE_SUFFIX)]
        entry = writer.read_marker(int(name))
        if entry is None:
            unreadable.append(ShardCheck(name, int(name), ["incomplete (unreadable completion marker)"]))
        else:
            entries.append(entry)
    checks = check_shards(writer.fs, writer.root, entries, rehash=True, indices=[int(e.name) for e in entries])
    return CacheCheck(cfg.out, checks + unreadable)


def _repair(writer: CacheWriter, check: CacheCheck) -> list[int]:
    """Remove the markers of the shards ``check`` found failing (and the manifest, when any shard or the
    manifest itself failed) so the build rewrites exactly them; return their indices."""
    bad = []
    for c in check.shards:
        if not c.ok:
            print(f"{writer.url}: shard {c.name}: {'; '.join(c.problems)}: rebuilding it", file=sys.stderr)
            bad.append(int(c.name))
    if bad or check.problems:
        # The manifest goes first: a repair killed half-way leaves an incomplete cache, never a stale manifest.
        if writer.fs.exists(writer.manifest_path):
            writer.fs.rm(writer.manifest_path)
        for s in bad:
            writer.forget(s)
    return bad


class _Dist:
    """Rank/world/barrier from ``accelerate`` when launched with it, plain single-process otherwise."""

    def __init__(self, device: str):
        from accelerate import PartialState

        # Without CUDA, accelerate only joins the launched process group when told to run on CPU.
        cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        self.state = PartialState(cpu=cpu)
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.local_rank = self.state.local_process_index
        self.main = self.state.is_main_process
        self.device = torch.device(device) if device not in ("auto",) else self.state.device

    def barrier(self):
        self.state.wait_for_everyone()


def _encode_ahead(encoder: Encoder, records, cfg: BuildConfig, out_q: Queue, skipped: list, pad: Padding,
                  prepare_inputs=None):
    """Producer thread: load images and tokenise (or only prepare, when the teacher will write the
    answers first), group the samples into forwards (``kd_cache.batching.plan_batches``: ``--batch-size``
    in order, or ``--max-batch-tokens`` sorted by length within ``--sort-window`` samples) and put each
    as ``(indices, batch, inputs)`` on the queue (None = end); ``indices`` are the samples' places in
    data order, ``inputs`` = ``prepare_inputs(batch)`` (None with ``--generate``), so padding and image
    processing also overlap the teacher's forward. ``pad`` counts the forwards' real and padded tokens."""
    budget = None if cfg.generate else cfg.max_batch_tokens  # --generate: lengths are known after the answers
    window_size = cfg.sort_window if budget is not None else cfg.batch_size
    step = encoder.prepare if cfg.generate else encoder.encode
    window: list = []
    n_done = 0

    def flush():
        nonlocal n_done
        lengths = [len(e.input_ids) for e in window] if not cfg.generate else [0] * len(window)
        for part in plan_batches(lengths, batch_size=cfg.batch_size, max_batch_tokens=budget, window=window_size):
            batch = [window[i] for i in part]
            if not cfg.generate:
                pad.add([lengths[i] for i in part])
            inputs = prepare_inputs(batch) if prepare_inputs is not None and not cfg.generate else None
            out_q.put(([n_done + i for i in part], batch, inputs))
        n_done += len(window)
        window.clear()

    try:
        for rec in records:
            try:
                window.append(step(rec))
            except BadRecord as e:
                if cfg.strict:
                    raise
                skipped.append({"id": e.record_id, "reason": e.reason, "detail": e.detail})
                continue
            except Exception as e:  # one record's failure never ends the build: listed with its error
                if cfg.strict:
                    raise
                skipped.append({"id": rec.id, "reason": RECORD_ERROR, "detail": f"{type(e).__name__}: {e}"})
                continue
            if len(window) == window_size:
                flush()
        if window:
            flush()
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


def build_lock(fs, root: str, *, world: int = 1, heartbeat_s: float = HEARTBEAT_S,
               stale_s: float = STALE_S) -> FolderLock:
    """The cache's ``build.lock``: one build at a time per cache."""
    return FolderLock(fs, root, name=LOCK_NAME, holder="build", guarded="this cache", world=world,
                      heartbeat_s=heartbeat_s, stale_s=stale_s)


def build_cache(cfg: BuildConfig, check: CacheCheck | None = None) -> Manifest:
    """Build (or finish, or ``--repair``) the cache described by ``cfg``; returns the manifest.

    Rank 0 holds the cache's lock (``build.lock``) for the whole build (the ranks of one launch share it); a
    second build into the same ``--out`` is refused while it runs. ``check``: with ``--repair``, a
    ``KDCache.verify_shards`` result of this cache (``kd-cache verify --repair``'s), so the shards are
    not hashed again; it is used only while the manifest it checked is still the cache's.
    """
    dist = _Dist(cfg.device)
    writer = CacheWriter(cfg.out, storage_options=cfg.storage_options or None)
    with storage.reaching(writer.fs, writer.root):  # an unreachable store, refused credentials: one line
        lock = build_lock(writer.fs, writer.root, world=dist.world).acquire() if dist.main else None
        try:
            return _build(cfg, dist, writer, lock, check)
        finally:
            if lock is not None:
                lock.release()


def _build(cfg: BuildConfig, dist: _Dist, writer: CacheWriter, lock: FolderLock | None,
           check: CacheCheck | None) -> Manifest:
    teacher_dir = fingerprint.resolve_teacher(cfg.teacher)
    identity = _claim_out(cfg, dist, writer, teacher_dir)
    manifest = _repair_or_reuse(cfg, dist, writer, check)
    if manifest is not None:
        return manifest
    records, n_known = _open_records(cfg)
    teacher, encoder, runner = _setup_teacher(cfg, dist, teacher_dir)
    k = min(cfg.top_k, runner.vocab) if cfg.sparse == "topk" else cfg.samples
    n_records = _write_shards(cfg, dist, writer, lock, records, n_known, encoder, runner, k)
    return _write_manifest(cfg, dist, writer, lock, math.ceil(n_records / cfg.shard_size), teacher, k, runner,
                           identity)


def _claim_out(cfg: BuildConfig, dist: _Dist, writer: CacheWriter, teacher_dir: str) -> dict | None:
    """Make ``--out`` this build's: remove the temporary files of killed writes, clear it with
    ``--overwrite``, then write ``build.json`` (a new cache) or check that the cache there was built
    from the same settings, data and teacher content. Returns the identity (rank 0; None elsewhere)."""
    fs = writer.fs
    build_json = posixpath.join(writer.root, BUILD_NAME)
    identity = None
    if dist.main:
        removed = writer.remove_temp_files()  # leftovers of killed atomic writes; we hold the lock
        if removed:
            print(f"{cfg.out}: removed {len(removed)} temporary files of an interrupted build", file=sys.stderr)
        if cfg.overwrite:
            _clear(writer)
        previous = _read_build_json(fs, build_json, cfg.out)
        identity = _identity(cfg, teacher_dir, previous)
        if previous is None:
            if writer.read_manifest() is not None or writer.complete_shards():
                raise ValueError(f"{cfg.out} holds a cache but no build.json, so what it was built from is unknown. "
                                 "Rebuild it with --overwrite, or choose another --out.")
            storage.write_json(fs, build_json, identity, sort_keys=True)
        else:
            _check_identity(previous, identity, cfg.out)
            if (previous["data"], previous["teacher"]) != (identity["data"], identity["teacher"]):
                # same content, new (size, mtime): remember them
                storage.write_json(fs, build_json, {**previous, "data": identity["data"],
                                                    "teacher": identity["teacher"]}, sort_keys=True)
    dist.barrier()
    if not dist.main:  # rank 0 checked the content; the other ranks check that they were given the same settings
        previous = _read_build_json(fs, build_json, cfg.out)
        _check_identity(previous, {**previous, "settings": cfg.identity()}, cfg.out)
    return identity


def _repair_or_reuse(cfg: BuildConfig, dist: _Dist, writer: CacheWriter, check: CacheCheck | None) -> Manifest | None:
    """With ``--repair``, forget the failing shards (and the manifest); then the cache's manifest when it
    is complete (nothing to build), else None."""
    manifest = writer.read_manifest()
    repaired = None
    if cfg.repair and dist.main:
        # Records are read lazily, so the shards to check are the manifest's, or else those with a marker.
        if check is None or manifest is None or check.manifest != manifest:
            check = _repair_check(cfg, writer, manifest)
        repaired = _repair(writer, check)
        if not repaired and check.ok and manifest is not None:
            print(f"{cfg.out}: all {len(check.shards)} shards intact, nothing to repair", file=sys.stderr)
    dist.barrier()
    manifest = writer.read_manifest()
    if manifest is not None and dist.main and repaired is None:
        print(f"{cfg.out}: cache already complete ({manifest.num_samples} samples)", file=sys.stderr)
    return manifest


def _open_records(cfg: BuildConfig) -> tuple[Iterator, int | None]:
    """The data's records (``--limit`` applied; at least one, else a ValueError) and their number when
    the source knows it."""
    stream = iter_records(DataSource(cfg.data, split=cfg.split, subset=cfg.subset, streaming=cfg.streaming,
                                     columns=Columns(cfg.id_column, cfg.image_column, cfg.conversation_column)))
    records = iter(stream)
    if cfg.limit is not None:
        records = itertools.islice(records, cfg.limit)
    first = next(records, None)
    if first is None:
        raise ValueError(f"--data {cfg.data}: no records")
    n_known = None if stream.length is None else min(stream.length, cfg.limit or stream.length)
    return itertools.chain([first], records), n_known


def _setup_teacher(cfg: BuildConfig, dist: _Dist, teacher_dir: str) -> tuple[Teacher, Encoder, TeacherRunner]:
    """The teacher on this rank's device (or spread over this replica's devices: ``--gpus-per-teacher``,
    ``--max-memory``), the encoder of its processor and the runner of the pass."""
    placement = teacher_placement(dist.device, cfg.gpus_per_teacher, cfg.max_memory, dist.local_rank)
    teacher = load_teacher(teacher_dir, dist.device, resolve_dtype(cfg.dtype, dist.device), placement, cfg.quantize)
    check_template(teacher, cfg.template)
    encoder = Encoder(teacher.processor, cfg.template, cfg.max_length, cfg.image_folder, teacher.image_token_id,
                      store_images=cfg.store_images)
    runner = TeacherRunner(teacher, sparse=cfg.sparse, top_k=cfg.top_k, samples=cfg.samples,
                           sample_scheme=cfg.sample_scheme,
                           relation=cfg.relation if teacher.multimodal else "none", seed=cfg.seed,
                           positions=parse_positions(cfg.positions), hidden=cfg.hidden)
    return teacher, encoder, runner


def _write_shards(cfg: BuildConfig, dist: _Dist, writer: CacheWriter, lock: FolderLock | None, records: Iterator,
                  n_known: int | None, encoder: Encoder, runner: TeacherRunner, k: int) -> int:
    """The teacher pass over this rank's incomplete shards, each written (on a writer thread) once its
    samples are done; returns the number of records read (all ranks read every record)."""

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
    pad = Padding()
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
            samples, skipped, truncated = _teacher_pass(cfg, encoder, runner, shard_records, bar, pad)
            n_skipped += len(skipped)
            bar.set_postfix(skipped=n_skipped, shard=s, padding=f"{pad.fraction:.1%}")
            # The skip list goes next to the shard before its data: a complete shard always has one.
            storage.write_json(writer.fs, writer.skipped_path(s), {"skipped": skipped, "truncated": truncated},
                               sort_keys=True)
            if lock is not None:
                lock.check()  # a build whose lock was taken over must not write another shard
            while len(pending) >= 2:  # bound memory: at most two finished shards waiting for the disk
                pending.pop(0).result()
            pending.append(io.submit(writer.write_shard, s, samples, sparse_mode=cfg.sparse, k=k,
                                     relation=runner.relation, sample_logprobs=cfg.sample_logprobs))
        for f in pending:
            f.result()
    finally:
        io.shutdown(wait=True)
        bar.close()
    if pad.forwards and cfg.progress:
        print(f"teacher pass{f' (rank {dist.rank})' if dist.world > 1 else ''}: {pad.forwards} forwards, "
              f"{pad.fraction:.1%} of their tokens padding, largest {pad.largest} tokens", file=sys.stderr)
    return n_records


def _teacher_pass(cfg: BuildConfig, encoder: Encoder, runner: TeacherRunner, shard_records: list,
                  bar, pad: Padding) -> tuple[list[CacheSample], list[dict], list[dict]]:
    """One shard's samples: a producer thread encodes and groups batches ahead (``_encode_ahead``) while
    this thread runs the teacher on them. Returns the samples in data order (whatever the grouping), the
    records skipped and those ``--max-length`` cut."""
    skipped: list[dict] = []
    q: Queue = Queue(maxsize=4)
    producer = threading.Thread(target=_encode_ahead, args=(encoder, shard_records, cfg, q, skipped, pad,
                                                            runner.prepare_inputs), daemon=True)
    producer.start()
    done: list[tuple[int, CacheSample]] = []
    truncated: list[tuple[int, dict]] = []
    while True:
        item = q.get()
        if item is None:
            break
        if isinstance(item, BaseException):
            raise item
        where, batch, prepared = item
        n_in = len(batch)
        if cfg.generate:  # LLaVADI: the teacher answers, then is distilled on its own answers
            batch = _teacher_answers(runner, encoder, batch, cfg, skipped)
            where = [where[0] + i for i in range(len(batch))]  # fixed batches in data order; some may be skipped
        truncated += [(i, {"id": e.id, "tokens": e.full_length}) for i, e in zip(where, batch)
                      if e.full_length is not None]
        if batch:
            done.extend(zip(where, runner.run(batch, prepared)))
        bar.update(n_in)
    producer.join()
    bar.update(sum(1 for x in skipped if x.get("stage") != "after_generation"))
    done.sort(key=lambda x: x[0])
    truncated.sort(key=lambda x: x[0])
    return [x for _, x in done], skipped, [x for _, x in truncated]


def _write_manifest(cfg: BuildConfig, dist: _Dist, writer: CacheWriter, lock: FolderLock | None, n_shards: int,
                    teacher: Teacher, k: int, runner: TeacherRunner, identity: dict | None) -> Manifest:
    """Once every rank's shards are complete: check the skip share on every rank (all stop together) and
    write the manifest on rank 0; every rank returns it."""
    dist.barrier()
    listed = _gather(cfg, writer, n_shards)
    check_skips(listed[1], sum(e.samples for e in listed[0]), cfg.max_skip_share)  # on every rank: all stop
    if dist.main:
        lock.check()
        manifest = _finish(cfg, writer, listed, teacher, k, runner.relation, identity)
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


def _finish(cfg: BuildConfig, writer: CacheWriter, listed: tuple, teacher, k: int, relation: str,
            identity: dict) -> Manifest:
    """Write the manifest from the gathered shards (``_gather``)."""
    entries, skipped, truncated = listed
    model_cfg = teacher.model.config
    head = teacher.model.get_output_embeddings().weight
    sample_mode = cfg.sparse == SparseMode.sample.value
    manifest = Manifest(
        teacher=TeacherInfo(path=cfg.teacher, model_type=model_cfg.model_type,
                            revision=identity["teacher"]["revision"] or getattr(model_cfg, "_commit_hash", None),
                            config_hash=fingerprint.config_hash(model_cfg), multimodal=teacher.multimodal,
                            weights=identity["teacher"]["digest"], tokenizer_files=writer.write_tokenizer(teacher.tokenizer)),
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
        dataset_fingerprint=identity["data"]["digest"],
        build_config={key: v for key, v in asdict(cfg).items() if key not in ("storage_options", "repair", "overwrite")},
        shards=entries,
        skipped=[SkippedRecord(id=x["id"], reason=x["reason"]) for x in skipped],
        truncated=[x["id"] for x in truncated],
    )
    writer.write_manifest(manifest)
    return manifest


class TooManySkipped(UserError, ValueError):
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


def repair_cache(url: str, storage_options: dict | None = None, check: CacheCheck | None = None,
                 **overrides) -> Manifest:
    """Rebuild the shards of the cache at ``url`` that fail their checks, with the settings, data and teacher
    recorded in its ``build.json`` (``check``: a ``verify_shards`` result to act on instead of checking
    again; ``overrides``: e.g. ``device``, ``batch_size``, ``progress``)."""
    fs, root = storage.open_fs(url, storage_options)
    with storage.reaching(fs, root):
        previous = _read_build_json(fs, posixpath.join(root, BUILD_NAME), url)
    if previous is None:
        raise FileNotFoundError(f"{url}: no build.json, so no record of how the cache was built: run kd-cache "
                                "build with its settings (add --overwrite to start over)")
    cfg = BuildConfig(**{**previous["config"], **overrides, "out": url, "repair": True,
                         "storage_options": dict(storage_options or {})})
    return build_cache(cfg, check)


@dataclass
class Verified:
    """What ``verify_cache`` found: the final check of every shard, or why the cache could not be opened."""

    check: CacheCheck | None  # None when the cache could not be opened
    error: str | None = None  # why it could not be opened
    repaired: bool = False  # a repair ran and the cache verifies now

    @property
    def ok(self) -> bool:
        return self.error is None and self.check.ok

    def lines(self) -> list[str]:
        """One readable line per problem (empty: the cache is intact)."""
        return [self.error] if self.error is not None else self.check.lines()


def verify_cache(url: str, *, repair: bool = False, device: str = "auto", storage_options: dict | None = None,
                 on_problem: Callable[[str], None] | None = None) -> Verified:
    """Re-check every shard of the cache at ``url`` against its manifest (``KDCache.verify_shards``: files,
    sizes, checksums, sample counts, shards the manifest misses).

    With ``repair`` and a problem: report each problem to ``on_problem``, rebuild the failing shards with
    the settings, data and teacher recorded in the cache's ``build.json`` (``repair_cache``, the teacher on
    ``device``), and verify again. A failed repair raises a ``UserError`` saying so.
    """

    def check(trusted: CacheCheck | None = None) -> Verified:
        try:
            return Verified(open_cache(url, storage_options).verify_shards(trusted))
        except (ValueError, FileNotFoundError, TypeError) as e:
            return Verified(None, str(e))

    found = check()
    if not repair or found.ok:
        return found
    for line in found.lines():
        (on_problem or (lambda _: None))(line)
    try:
        repair_cache(url, storage_options, check=found.check, device=device, progress=False)
    except USER_ERRORS as e:
        raise UserError(f"repair failed: {e}") from e
    # The final verify re-hashes only the shards the first check did not pass. A shard it passed was
    # re-hashed moments ago against the entry the new manifest still lists for it (else it is re-hashed
    # again), and the repair writes only the failing shards' folders and the manifest. Its cheap checks
    # still run (marker, file list and sizes, metadata hash, sample counts), so only a same-size rewrite
    # of one of its chunks in those seconds would pass here, and its CRC32C refuses that chunk when read.
    final = check(trusted=found.check)
    final.repaired = final.ok
    return final
