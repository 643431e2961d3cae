"""Conversations (stereo audio + word alignments) to token shards: ``python -m moshi_ttt.data.prepare``.

Inputs are moshi-finetune ``.jsonl`` manifests (``{"path": ..., "duration": ...}`` per line,
relative paths resolved against the manifest's folder) and/or directories of ``.wav``/``.flac``
files; each audio file is described by the ``.json`` beside it. Every sample is int16
``[17, T]``: the main speaker's text (see :mod:`moshi_ttt.data.alignment`), then Mimi's 8
codebooks of channel 0 (Moshi) and 8 of channel 1 (the user).

Resuming is by construction: conversations are sorted by key and cut into shards of
``samples_per_shard``, so shard ``n`` always holds the same inputs. ``index.json`` records,
per finished shard, a fingerprint of its inputs (paths, sizes, mtimes) and its sha256; a
rerun keeps every shard whose fingerprint and checksum still match and redoes the others.
Workers own whole shards and write them in a private staging folder; only the main process
moves finished shards in place and updates the index, so a crash never leaves a partial
shard behind a valid index entry.

A bad input (unreadable or corrupt audio, mono, NaN/Inf, too short, missing or inconsistent
alignments, ...) is skipped, counted by reason, and listed in ``prepare_report.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import logging
import multiprocessing as mp
import os
import queue
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from moshi_ttt.data.alignment import (
    MAIN_SPEAKER,
    AlignmentError,
    alignment_path_for,
    load_alignments,
    locate_text_tokenizer,
    place_words,
    tokenize_word,
)
from moshi_ttt.data.audio import AUDIO_EXTENSIONS, AudioError, read_stereo
from moshi_ttt.data.shards import (
    INDEX_NAME,
    ShardFormatError,
    ShardIndex,
    ShardInfo,
    TokenShardWriter,
    sha256_file,
    write_json_atomic,
)

logger = logging.getLogger("moshi_ttt.data.prepare")

REPORT_NAME = "prepare_report.json"
STAGING = ".staging"
INT16_MAX = np.iinfo(np.int16).max


@dataclasses.dataclass(frozen=True)
class Conversation:
    key: str  # sample key in the shards: stable, unique, no dots (webdataset splits keys at dots)
    audio: str
    alignment: str
    duration: float | None  # the manifest's claim, checked against the audio
    source: str  # the path as the input named it (for the report and the sample's meta)


@dataclasses.dataclass(frozen=True)
class Skip:
    path: str
    reason: str
    detail: str


@dataclasses.dataclass
class PrepareSettings:
    """Everything that decides the bytes of a shard: a resumed run must use the same."""

    tokenizer: str
    mimi: str = "tiny"
    mimi_seed: int = 0
    revision: str | None = None
    prefix: str = "conv"
    samples_per_shard: int = 256
    main_speaker: str = MAIN_SPEAKER
    keep_and_shift: bool = False
    min_seconds: float = 1.0
    duration_tolerance: float | None = 1.0
    alignment_tolerance: float = 0.5


@dataclasses.dataclass
class PrepareResult:
    index: ShardIndex
    report: dict


# ---- inputs -------------------------------------------------------------------------------
def conversation_key(root: str, rel: str) -> str:
    """Readable and unique: the file's stem plus a hash of where it came from."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", str(Path(rel).with_suffix("")))[-80:].strip("_") or "conv"
    digest = hashlib.blake2b(f"{root}\0{rel}".encode(), digest_size=5).hexdigest()
    return f"{stem}-{digest}"


def _from_manifest(manifest: Path, skips: list[Skip]) -> Iterable[Conversation]:
    base = manifest.parent
    # Bytes, decoded per line: one line with a non-UTF-8 byte costs only that line.
    for lineno, raw in enumerate(manifest.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{manifest}:{lineno}"
        try:
            line = raw.decode("utf-8")
            entry = json.loads(line)
            rel = entry["path"]
            duration = entry.get("duration")
            duration = None if duration is None else float(duration)
            if not isinstance(rel, str) or not rel:
                raise TypeError("path is not a non-empty string")
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exn:
            skips.append(Skip(where, "invalid_manifest_entry", f"{type(exn).__name__}: {exn}"))
            continue
        audio = Path(rel) if os.path.isabs(rel) else base / rel
        yield Conversation(
            conversation_key(str(manifest), rel), str(audio), str(alignment_path_for(audio)), duration, rel
        )


def _from_directory(directory: Path) -> Iterable[Conversation]:
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    for audio in files:
        rel = str(audio.relative_to(directory))
        yield Conversation(
            conversation_key(str(directory), rel), str(audio), str(alignment_path_for(audio)), None, rel
        )


def discover(inputs: Sequence[str | Path]) -> tuple[list[Conversation], list[Skip]]:
    """Conversations named by manifests, directories or single audio files, sorted by key.

    A missing input is a configuration error (raised before any compute); bad entries inside
    an input are skipped and returned.
    """
    if not inputs:
        raise ValueError("prepare needs at least one input (a .jsonl manifest or a directory of audio)")
    skips: list[Skip] = []
    found: list[Conversation] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found.extend(_from_directory(path))
        elif path.is_file() and path.suffix == ".jsonl":
            found.extend(_from_manifest(path, skips))
        elif path.is_file() and path.suffix.lower() in AUDIO_EXTENSIONS:
            found.append(
                Conversation(
                    conversation_key(str(path.parent), path.name),
                    str(path),
                    str(alignment_path_for(path)),
                    None,
                    str(item),
                )
            )
        else:
            raise FileNotFoundError(f"input {item}: not a .jsonl manifest, a directory or a .wav/.flac file")
    seen: dict[str, Conversation] = {}
    for conv in found:
        real = os.path.realpath(conv.audio)
        if real in seen:
            skips.append(Skip(conv.source, "duplicate_input", f"same file as {seen[real].source}"))
            continue
        seen[real] = conv
    return sorted(seen.values(), key=lambda c: c.key), skips


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def plan_fingerprint(conversations: Sequence[Conversation], settings_fp: str) -> str:
    """Changes whenever a shard's inputs or the settings change, so that resume redoes it."""
    h = hashlib.sha256(settings_fp.encode())
    for c in conversations:
        h.update(json.dumps([c.key, c.source, c.duration, _stat(c.audio), _stat(c.alignment)]).encode())
    return h.hexdigest()


def settings_record(settings: PrepareSettings) -> dict:
    """The settings as recorded in index.json, with the codec and tokenizer identified by content."""
    from moshi_ttt.data.codec import mimi_fingerprint

    tok_path = locate_text_tokenizer(settings.tokenizer, settings.revision)
    record = dataclasses.asdict(settings)
    record["tokenizer_sha256"] = sha256_file(tok_path)
    record["mimi_fingerprint"] = hashlib.sha256(
        json.dumps(
            mimi_fingerprint(settings.mimi, settings.mimi_seed, settings.revision), sort_keys=True
        ).encode()
    ).hexdigest()
    for volatile in ("tokenizer", "mimi", "revision"):  # identified by content above, not by path
        record.pop(volatile)
    return record


# ---- worker side ----------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(settings: PrepareSettings, device: str, threads: int, progress) -> None:
    """Load Mimi and the tokenizer once per process (each worker owns whole shards)."""
    import torch

    from moshi_ttt.data.alignment import load_text_tokenizer
    from moshi_ttt.data.codec import load_mimi, resolve_device

    torch.set_num_threads(max(1, threads))
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.device_count() > 1:
        ident = mp.current_process()._identity
        dev = torch.device("cuda", (ident[0] - 1 if ident else 0) % torch.cuda.device_count())
    mimi = load_mimi(settings.mimi, device=dev, seed=settings.mimi_seed, revision=settings.revision)
    _WORKER.update(
        settings=settings,
        tokenizer=load_text_tokenizer(settings.tokenizer, settings.revision),
        mimi=mimi,
        progress=progress,
    )


def _load(conv: Conversation, s: PrepareSettings):
    audio = read_stereo(
        conv.audio,
        min_seconds=s.min_seconds,
        expected_seconds=conv.duration,
        duration_tolerance=s.duration_tolerance,
    )
    words, extra_meta = load_alignments(conv.alignment, audio.seconds, s.alignment_tolerance)
    if not words:
        raise AlignmentError("empty_conversation", conv.alignment, "no words in the alignments")
    return audio, words, extra_meta


def _encode_batch(encoder, batch: list, skips: list[Skip]) -> list:
    """Codes per item; when a batch fails, items are retried alone so one bad file costs only itself."""
    try:
        return encoder.encode([b[1].samples for b in batch])
    except Exception as exn:  # noqa: BLE001 - an input Mimi cannot encode is skipped, not fatal
        if len(batch) == 1:
            skips.append(Skip(batch[0][0].source, "encode_error", f"{type(exn).__name__}: {exn}"))
            return [None]
    out = []
    for item in batch:
        out.extend(_encode_batch(encoder, [item], skips))
    return out


def prepare_shard(task: dict) -> dict:
    """Encode one shard's conversations into ``staging/<name>``; returns what the index needs."""
    from moshi_ttt.data.codec import StereoEncoder

    s: PrepareSettings = _WORKER["settings"]
    tokenizer, progress = _WORKER["tokenizer"], _WORKER["progress"]
    encoder = StereoEncoder(_WORKER["mimi"], chunk_seconds=task["chunk_seconds"])
    staging = Path(task["staging"])
    if staging.exists():
        shutil.rmtree(staging)
    convs = [Conversation(**c) for c in task["conversations"]]
    skips: list[Skip] = []
    notes: Counter = Counter()
    seconds = 0.0
    writer = TokenShardWriter(
        staging,
        prefix=s.prefix,
        max_samples_per_shard=len(convs) + 1,
        max_bytes_per_shard=1e15,
        start_shard=task["number"],
    )
    window = max(1, task["batch_size"]) * 4
    for w0 in range(0, len(convs), window):
        loaded = []
        for conv in convs[w0 : w0 + window]:
            try:
                audio, words, extra_meta = _load(conv, s)
            except (AudioError, AlignmentError) as exn:
                skips.append(Skip(conv.source, exn.reason, exn.detail))
                progress.put((1, 0.0))
                continue
            loaded.append((conv, audio, words, extra_meta))
        # Similar lengths share a batch (less padding); samples are still written in sorted order.
        order = sorted(range(len(loaded)), key=lambda i: (loaded[i][1].samples.shape[1], i))
        codes: dict[int, np.ndarray | None] = {}
        batch: list[int] = []
        max_samples = task["max_batch_seconds"] * 24_000
        for i in order + [None]:
            if batch and (
                i is None
                or len(batch) >= task["batch_size"]
                or (len(batch) + 1) * loaded[i][1].samples.shape[1] > max_samples
            ):
                for j, c in zip(batch, _encode_batch(encoder, [loaded[j] for j in batch], skips)):
                    codes[j] = c
                batch = []
            if i is not None:
                batch.append(i)
        for i, (conv, audio, words, extra_meta) in enumerate(loaded):
            progress.put((1, audio.seconds))
            if codes[i] is None:
                continue
            num_frames = codes[i].shape[1]
            text = place_words(
                words,
                num_frames,
                lambda w: tokenize_word(tokenizer, w),
                main_speaker=s.main_speaker,
                keep_and_shift=s.keep_and_shift,
            )
            sample = np.concatenate([text.tokens[None].astype(np.int16), codes[i]], axis=0)
            meta = {
                **extra_meta,
                "source": conv.source,
                "seconds": round(audio.seconds, 4),
                "frames": num_frames,
                "source_sample_rate": audio.source_sample_rate,
                "main_words": text.words,
                "text_tokens": text.tokens_placed,
                "text_tokens_dropped": text.tokens_dropped,
            }
            writer.write(conv.key, sample, meta)
            seconds += audio.seconds
            notes["resampled"] += int(audio.resampled)
            notes["text_tokens_dropped"] += text.tokens_dropped
            notes["no_main_speaker_words"] += int(text.words == 0)
    index = writer.close()
    info = index.shards[0].__dict__ if index.shards else None
    return {
        "number": task["number"],
        "name": task["name"],
        "plan": task["plan"],
        "info": info,
        "inputs": len(convs),
        "seconds": seconds,
        "skipped": [dataclasses.asdict(k) for k in skips],
        "notes": dict(notes),
    }


# ---- main side ------------------------------------------------------------------------------
class _Progress:
    """A rich bar on a terminal, plain log lines otherwise (CI logs, SLURM files)."""

    def __init__(self, total: int, enabled: bool):
        self.total = total
        self.done = 0
        self.seconds = 0.0
        self.start = time.time()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]prepare"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.bar.add_task("prepare", total=total, rate="")
            self.bar.start()

    def advance(self, conversations: int, seconds: float) -> None:
        self.done += conversations
        self.seconds += seconds
        if self.bar is not None:
            rate = self.seconds / max(time.time() - self.start, 1e-6)
            self.bar.update(self.task, advance=conversations, rate=f"{rate:.1f} s audio/s")

    def shard_done(self, result: dict, finished: int, planned: int) -> None:
        if self.bar is None:
            rate = self.seconds / max(time.time() - self.start, 1e-6)
            written = result["info"]["num_samples"] if result["info"] else 0
            logger.info(
                "shard %s done (%d/%d): %d samples, %d skipped, %.1f s audio; %d/%d conversations, "
                "%.1f s audio/s",
                result["name"],
                finished,
                planned,
                written,
                len(result["skipped"]),
                result["seconds"],
                self.done,
                self.total,
                rate,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _open_index(out_dir: Path, record: dict, resume: bool) -> ShardIndex:
    if not (out_dir / INDEX_NAME).exists():
        return ShardIndex(extra={"prepare": {"settings": record, "shards": {}}})
    index = ShardIndex.load(out_dir)
    prep = index.extra.get("prepare")
    if prep is None:
        raise ShardFormatError(
            f"{out_dir / INDEX_NAME}: not written by moshi_ttt.data.prepare; use an empty --out"
        )
    if not resume:
        for info in index.shards:
            (out_dir / info.name).unlink(missing_ok=True)
        return ShardIndex(extra={"prepare": {"settings": record, "shards": {}}})
    old = prep.get("settings", {})
    diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
    if diff:
        k = diff[0]
        raise ValueError(
            f"{out_dir / INDEX_NAME}: prepared with {k}={old.get(k)!r}, this run has {k}={record.get(k)!r} "
            f"(differs: {', '.join(diff)}); use another --out or --overwrite"
        )
    return index


def _vocabularies(settings: PrepareSettings) -> dict:
    """What a model trained on these shards must accept (checked by the trainer, not here)."""
    from moshi_ttt.data.alignment import END_OF_TEXT_PADDING_ID, TEXT_PADDING_ID, load_text_tokenizer
    from moshi_ttt.data.codec import codebook_size

    sp = load_text_tokenizer(settings.tokenizer, settings.revision)
    if sp.get_piece_size() > INT16_MAX + 1:
        raise ValueError(f"tokenizer={settings.tokenizer}: {sp.get_piece_size()} ids do not fit int16 shards")
    return {
        "text_card_at_least": int(sp.get_piece_size()),
        "card": codebook_size(settings.mimi, settings.revision),
        "existing_text_padding_id": TEXT_PADDING_ID,
        "existing_text_end_padding_id": END_OF_TEXT_PADDING_ID,
    }


def _is_finished(out_dir: Path, index: ShardIndex, name: str, plan: str) -> bool:
    entry = index.extra["prepare"]["shards"].get(name)
    if entry is None or entry.get("plan") != plan:
        return False
    info = next((s for s in index.shards if s.name == name), None)
    if info is None:
        return entry.get("written", 0) == 0 and not (out_dir / name).exists()
    path = out_dir / name
    return path.exists() and sha256_file(path) == info.sha256


def _record(out_dir: Path, index: ShardIndex, result: dict) -> None:
    """Move a finished shard in place, then make the index say so (the index is the commit point)."""
    name = result["name"]
    index.shards = [s for s in index.shards if s.name != name]
    if result["info"] is not None:
        staged = Path(result["staging"]) / name
        os.replace(staged, out_dir / name)
        index.shards.append(ShardInfo(**result["info"]))
        index.shards.sort(key=lambda s: s.name)
    else:
        (out_dir / name).unlink(missing_ok=True)
    written = result["info"]["num_samples"] if result["info"] else 0
    index.extra["prepare"]["shards"][name] = {
        "plan": result["plan"],
        "inputs": result["inputs"],
        "written": written,
        "seconds": round(result["seconds"], 3),
        "skipped": result["skipped"],
        "notes": result["notes"],
    }
    index.save(out_dir)
    shutil.rmtree(result["staging"], ignore_errors=True)


def _report(index: ShardIndex, discovery_skips: list[Skip], planned: list[str], stats: dict) -> dict:
    shard_entries = [
        index.extra["prepare"]["shards"][n] for n in planned if n in index.extra["prepare"]["shards"]
    ]
    skipped = [dataclasses.asdict(s) for s in discovery_skips]
    notes: Counter = Counter()
    for e in shard_entries:
        skipped.extend(e["skipped"])
        notes.update(e["notes"])
    reasons = Counter(s["reason"] for s in skipped)
    seconds = sum(e["seconds"] for e in shard_entries)
    return {
        "inputs": stats["inputs"] + len(discovery_skips),
        "samples": index.total_samples,
        "frames": index.total_frames,
        "audio_hours": round(seconds / 3600, 4),
        "shards": {
            "planned": len(planned),
            "reused": stats["reused"],
            "written": stats["written"],
            "non_empty": len(index.shards),
        },
        "skipped_total": len(skipped),
        "skipped_by_reason": dict(sorted(reasons.items())),
        "notes": dict(sorted(notes.items())),
        "this_run": {
            "elapsed_s": round(stats["elapsed"], 2),
            "audio_seconds": round(stats["seconds"], 2),
            "audio_seconds_per_second": round(stats["seconds"] / max(stats["elapsed"], 1e-9), 2),
        },
        "skipped": skipped,
    }


def _print_report(report: dict, out_dir: Path) -> None:
    lines = [
        f"prepared {report['samples']} conversations ({report['audio_hours']:.3f} h, "
        f"{report['frames']} frames) in {report['shards']['non_empty']} shard(s) under {out_dir}",
        f"shards: {report['shards']['written']} written, "
        f"{report['shards']['reused']} reused from a previous run",
        f"skipped {report['skipped_total']} input(s)" + (":" if report["skipped_total"] else ""),
    ]
    lines += [f"  {reason}: {n}" for reason, n in report["skipped_by_reason"].items()]
    if report["notes"]:
        lines.append("notes: " + ", ".join(f"{k}={v}" for k, v in report["notes"].items()))
    lines.append(f"report: {out_dir / REPORT_NAME}")
    print("\n".join(lines), flush=True)


def prepare(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer: str | Path,
    mimi: str | Path = "tiny",
    *,
    mimi_seed: int = 0,
    revision: str | None = None,
    num_workers: int = 1,
    threads: int = 1,
    device: str = "auto",
    samples_per_shard: int = 256,
    batch_size: int = 8,
    max_batch_seconds: float = 3600.0,
    chunk_seconds: float | None = None,
    prefix: str = "conv",
    main_speaker: str = MAIN_SPEAKER,
    keep_and_shift: bool = False,
    min_seconds: float = 1.0,
    duration_tolerance: float | None = 1.0,
    alignment_tolerance: float = 0.5,
    resume: bool = True,
    progress: bool = True,
    verbose: bool = True,
) -> PrepareResult:
    """Prepare ``inputs`` into token shards under ``out_dir``; see the module docstring."""
    if samples_per_shard < 1 or batch_size < 1:
        raise ValueError("samples_per_shard and batch_size must be >= 1")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ValueError(f"prefix={prefix!r}: use letters, digits, '_' or '-'")
    start = time.time()
    settings = PrepareSettings(
        tokenizer=str(tokenizer),
        mimi=str(mimi),
        mimi_seed=mimi_seed,
        revision=revision,
        prefix=prefix,
        samples_per_shard=samples_per_shard,
        main_speaker=main_speaker,
        keep_and_shift=keep_and_shift,
        min_seconds=min_seconds,
        duration_tolerance=duration_tolerance,
        alignment_tolerance=alignment_tolerance,
    )
    conversations, discovery_skips = discover(inputs)
    record = settings_record(settings)
    vocabularies = _vocabularies(settings)
    settings_fp = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = open(out_dir / ".prepare.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exn:
        raise RuntimeError(f"{out_dir}: another prepare is writing here") from exn
    try:
        shutil.rmtree(out_dir / STAGING, ignore_errors=True)
        index = _open_index(out_dir, record, resume)
        groups = [
            conversations[i : i + samples_per_shard] for i in range(0, len(conversations), samples_per_shard)
        ]
        planned = [f"{prefix}-{n:06d}.tar" for n in range(len(groups))]
        for stale in [s for s in index.shards if s.name not in planned]:
            logger.info("removing %s: not part of this run's plan", stale.name)
            (out_dir / stale.name).unlink(missing_ok=True)
        index.shards = [s for s in index.shards if s.name in planned]
        index.extra["prepare"]["shards"] = {
            k: v for k, v in index.extra["prepare"]["shards"].items() if k in planned
        }
        tasks, reused = [], 0
        for n, (name, group) in enumerate(zip(planned, groups)):
            plan = plan_fingerprint(group, settings_fp)
            if _is_finished(out_dir, index, name, plan):
                reused += 1
                continue
            tasks.append(
                {
                    "number": n,
                    "name": name,
                    "plan": plan,
                    "conversations": [dataclasses.asdict(c) for c in group],
                    "staging": str(out_dir / STAGING / name.removesuffix(".tar")),
                    "batch_size": batch_size,
                    "max_batch_seconds": max_batch_seconds,
                    "chunk_seconds": chunk_seconds,
                }
            )
        index.extra["prepare"]["planned_shards"] = len(planned)
        index.extra["prepare"]["model_must_match"] = vocabularies
        index.save(out_dir)
        todo = sum(len(t["conversations"]) for t in tasks)
        if verbose:
            print(
                f"prepare: {len(conversations)} conversation(s) in {len(planned)} shard(s); "
                f"{reused} shard(s) already done, {len(tasks)} to write ({todo} conversations)",
                flush=True,
            )
        bar = _Progress(todo, progress and verbose)
        stats = {"inputs": len(conversations), "reused": reused, "written": 0, "seconds": 0.0}
        try:
            for result in _run(tasks, settings, device, num_workers, threads, bar):
                _record(out_dir, index, result)
                stats["written"] += 1
                stats["seconds"] += result["seconds"]
                bar.shard_done(result, reused + stats["written"], len(planned))
        finally:
            bar.close()
        stats["elapsed"] = time.time() - start
        index.extra["prepare"]["audio_hours"] = round(
            sum(e["seconds"] for e in index.extra["prepare"]["shards"].values()) / 3600, 4
        )
        index.save(out_dir)
        report = _report(index, discovery_skips, planned, stats)
        write_json_atomic(out_dir / REPORT_NAME, report)
        shutil.rmtree(out_dir / STAGING, ignore_errors=True)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    if verbose:
        _print_report(report, out_dir)
    return PrepareResult(index=index, report=report)


def _run(
    tasks: list[dict], settings: PrepareSettings, device: str, num_workers: int, threads: int, bar: _Progress
):
    """Yield shard results as they finish, in-process or from a spawn pool."""
    if not tasks:
        return
    workers = max(1, min(num_workers, len(tasks)))
    if workers == 1:
        import torch

        progress: queue.SimpleQueue = queue.SimpleQueue()
        caller_threads = torch.get_num_threads()
        try:
            _init_worker(settings, device, threads, progress)
            for task in tasks:
                result = prepare_shard(task)
                while not progress.empty():
                    bar.advance(*progress.get())
                yield {**result, "staging": task["staging"]}
        finally:
            _WORKER.clear()
            torch.set_num_threads(caller_threads)
        return
    ctx = mp.get_context("spawn")  # CUDA and torch threads do not survive fork
    staging = {t["number"]: t["staging"] for t in tasks}
    with ctx.Manager() as manager:
        progress = manager.Queue()
        with ctx.Pool(
            workers, initializer=_init_worker, initargs=(settings, device, threads, progress)
        ) as pool:
            pending = [pool.apply_async(prepare_shard, (t,)) for t in tasks]
            while pending:
                try:
                    while True:
                        bar.advance(*progress.get(timeout=0.2))
                except queue.Empty:
                    pass
                for job in [j for j in pending if j.ready()]:
                    pending.remove(job)
                    result = job.get()  # an exception here is a bug, not a bad input: let it surface
                    yield {**result, "staging": staging[result["number"]]}
            while not progress.empty():
                bar.advance(*progress.get())


# ---- command line ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moshi_ttt.data.prepare",
        description="Encode stereo conversations + word alignments into moshi-ttt token shards.",
    )
    p.add_argument(
        "inputs", nargs="+", help=".jsonl manifests (moshi-finetune format) and/or directories of wav/flac"
    )
    p.add_argument("--out", required=True, help="output directory (shards, index.json, prepare_report.json)")
    p.add_argument(
        "--tokenizer", required=True, help="sentencepiece .model, a checkpoint directory or a hub repo id"
    )
    p.add_argument(
        "--mimi", default="tiny", help="'tiny', a .safetensors file or directory, or a hub repo id"
    )
    p.add_argument("--mimi-seed", type=int, default=0, help="seed of the tiny Mimi")
    p.add_argument("--revision", default=None, help="hub revision for --mimi/--tokenizer repo ids")
    p.add_argument("--workers", type=int, default=1, help="processes; each one owns whole shards")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per worker (on CPU, more workers beat more threads for Mimi's small convs)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="conversations encoded together")
    p.add_argument("--max-batch-seconds", type=float, default=3600.0, help="audio seconds per batch at most")
    p.add_argument(
        "--chunk-seconds",
        type=float,
        default=None,
        help="streaming chunk fed to Mimi (default: 60 on GPU, 1 on CPU)",
    )
    p.add_argument("--prefix", default="conv", help="shard names: PREFIX-000000.tar")
    p.add_argument(
        "--main-speaker", default=MAIN_SPEAKER, help="speaker label of channel 0 in the alignments"
    )
    p.add_argument(
        "--keep-and-shift",
        action="store_true",
        help="queue a word's leftover tokens instead of dropping them (moshi-finetune drops)",
    )
    p.add_argument("--min-seconds", type=float, default=1.0, help="shorter conversations are skipped")
    p.add_argument(
        "--duration-tolerance",
        type=float,
        default=1.0,
        help="max |audio - manifest duration| in seconds; negative disables the check",
    )
    p.add_argument(
        "--alignment-tolerance", type=float, default=0.5, help="seconds a word may overhang the audio"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="discard shards of a previous run instead of resuming"
    )
    p.add_argument("--no-progress", action="store_true", help="plain log lines even on a terminal")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("NO_TORCH_COMPILE", "1")
    result = prepare(
        args.inputs,
        args.out,
        args.tokenizer,
        args.mimi,
        mimi_seed=args.mimi_seed,
        revision=args.revision,
        num_workers=args.workers,
        threads=args.threads,
        device=args.device,
        samples_per_shard=args.samples_per_shard,
        batch_size=args.batch_size,
        max_batch_seconds=args.max_batch_seconds,
        chunk_seconds=args.chunk_seconds,
        prefix=args.prefix,
        main_speaker=args.main_speaker,
        keep_and_shift=args.keep_and_shift,
        min_seconds=args.min_seconds,
        duration_tolerance=None if args.duration_tolerance < 0 else args.duration_tolerance,
        alignment_tolerance=args.alignment_tolerance,
        resume=not args.overwrite,
        progress=not args.no_progress,
    )
    if result.report["samples"] == 0:
        print(
            f"error: no conversation survived validation; see {Path(args.out) / REPORT_NAME}", file=sys.stderr
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
