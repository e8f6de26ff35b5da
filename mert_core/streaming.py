"""Training crops streamed from tar shards, in an order a resumed run repeats exactly.

Each rank reads its shards sequentially in ``lanes`` independent streams; batch
``i`` of a rank comes from lane ``i % lanes``. A lane:

1. **shards**: epoch ``e`` is a permutation of all shards seeded by ``(seed, e)``;
   rank ``r`` of ``W`` owns its entries ``r::W``, one after the other across
   epochs, and lane ``l`` of ``L`` takes every ``L``-th of them from the ``l``-th.
   Every shard is read once per epoch by one lane of one rank.
2. **members** are read in shard order (:func:`mert_core.shards.read_members`),
   each decoded whole into memory and cut into crops of ``crop_seconds``: the
   whole crops that fit, from a seeded phase (from 0 on the grid
   ``k * crop`` with ``aligned``, as offline label stores need); a member
   shorter than a crop is one zero-padded crop; shorter than
   ``min_seconds``, none. No crop seeks: it is cut from audio in memory.
3. **blocks**: the lane's crops, in stream order, are dealt into blocks of
   ``buffer_crops``; each block comes out in an order seeded by
   ``(seed, rank, lane, block)``. This bounded in-memory buffer is the shuffle.
   The next block is read one crop per crop handed out, so the reading is
   spread evenly over the batches (two blocks in memory at most).
4. **batches** are the next ``batch_size`` crops of the lane.

**Resume.** The state of a lane after a batch is small: which block it is in,
where that block starts (shard number in the lane, member number and byte
offset of the member's first tar header in the shard, first crop of that
member) and how many crops of the block are out. A resumed lane opens that
shard at that byte (an HTTP Range request, an S3 ranged GET, a seek), refills
the one block and goes on: the crops and their order are those of a run never
stopped, and no shard is read from its start again. The trainer keeps each
lane's state from the batches it *consumed* (workers read ahead) and saves it
in the checkpoint.

``num_workers`` only decides which process reads which lane (it must divide
``lanes``): the batches do not depend on it, so it may change on resume.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mert_core.audio import AudioError, decode_audio
from mert_core.errors import StreamError  # noqa: F401 - re-exported: raised here, imported from here
from mert_core.shards import Member, ReadPolicy, ShardCorpus, Skipped, read_members

STATE_FORMAT = 1


@dataclass(frozen=True)
class Position:
    """Where a lane reads from: the ``crop``-th crop of the ``member``-th member
    (whose first tar header is at byte ``offset``) of the lane's ``shard``-th shard."""

    shard: int
    member: int
    offset: int
    crop: int

    def as_list(self) -> list[int]:
        return [self.shard, self.member, self.offset, self.crop]


@dataclass
class _Crop:
    wave: np.ndarray  # (n,) float32, n <= crop samples
    member: str  # member id, "<shard url>#<key>"
    offset: int  # first sample in the decoded member
    at: Position  # where this crop is
    after: Position  # where the next crop of the stream is


def crop_offsets(num_samples: int, crop_samples: int, min_samples: int, aligned: bool, rng: np.random.Generator) -> list[int]:
    """First samples of the crops cut from a member of ``num_samples`` samples.

    Whole crops from a random phase (from 0 with ``aligned``: the grid
    ``k * crop_samples`` of offline label stores); ``[0]`` for a member
    shorter than a crop (zero-padded later); ``[]`` below ``min_samples``.
    """
    if num_samples < max(min_samples, 1):
        return []
    whole = num_samples // crop_samples
    if whole == 0:
        return [0]
    phase = 0 if aligned else int(rng.integers(0, num_samples - whole * crop_samples + 1))
    return [phase + k * crop_samples for k in range(whole)]


def check_workers(workers: int, lanes: int) -> None:
    """Each worker reads whole lanes: ``workers`` must divide ``lanes``."""
    if lanes % workers:
        fits = ", ".join(str(d) for d in range(1, lanes + 1) if lanes % d == 0)
        raise StreamError(f"data.num_workers={workers} must divide data.stream.lanes={lanes} (each worker reads whole lanes); "
                          f"use {fits} workers, or set data.stream.lanes to a multiple of {workers} in a new run")


class ShardStream(IterableDataset):
    """Endless micro-batches of crops from shards, lane by lane (see the module docstring).

    Args:
        corpus: the shards (:func:`mert_core.shards.open_corpus`).
        batch_size: crops per micro-batch.
        sample_rate, crop_seconds, min_seconds: as :class:`mert_core.data.CropBatches`.
        seed: data-order seed.
        rank, world_size: this process's place among data-parallel ranks.
        lanes: independent streams per rank; batch ``i`` comes from lane ``i % lanes``.
        buffer_crops: crops per shuffled block.
        aligned: crops on the grid ``k * crop`` (offline label stores).
        policy: retries and timeouts of shard reads.
        state: a :meth:`ShardBatches.state_dict` to continue from (None: the start).

    Item (one per call, endless) as :class:`mert_core.data.CropBatches` gives, plus
    ``"stream"``: ``{"lane": l, "state": ...}``, the lane's state after this batch.
    ``paths`` are member ids ``<shard url>#<key>``; ``offsets`` are in the decoded member.
    """

    def __init__(self, corpus: ShardCorpus, batch_size: int, *, sample_rate: int = 24000, crop_seconds: float = 5.0,
                 min_seconds: float = 3.0, seed: int = 0, rank: int = 0, world_size: int = 1, lanes: int = 4,
                 buffer_crops: int = 128, aligned: bool = False, policy: ReadPolicy = ReadPolicy(),
                 state: dict[str, Any] | None = None):
        if len(corpus.urls) < world_size:
            raise StreamError(f"{len(corpus.urls)} shards for {world_size} ranks: every rank needs a shard; "
                              f"pack with a smaller --shard-size or train on fewer ranks")
        if batch_size < 1 or lanes < 1 or buffer_crops < 1:
            raise StreamError(f"batch_size, lanes and buffer_crops must be >= 1, got {batch_size}, {lanes}, {buffer_crops}")
        self.urls = list(corpus.urls)
        self.batch_size, self.sample_rate = batch_size, sample_rate
        self.crop_samples = int(round(crop_seconds * sample_rate))
        self.min_samples = int(round(min_seconds * sample_rate))
        self.seed, self.rank, self.world_size = seed % 2**63, rank, world_size
        self.lanes, self.buffer_crops, self.aligned, self.policy = lanes, buffer_crops, aligned, policy
        self.shards_digest = hashlib.sha256("\n".join(self.urls).encode()).hexdigest()[:16]
        self.lane_states: dict[int, dict[str, Any]] = {}
        self.first_lane = 0
        if state is not None:
            self._restore(state)

    # -- the pure part ----------------------------------------------------------

    def shards_per_epoch(self) -> int:
        """Shards this rank reads per epoch."""
        return len(range(self.rank, len(self.urls), self.world_size))

    def shard_of(self, lane: int, j: int) -> str:
        """The URL of lane ``lane``'s ``j``-th shard."""
        epoch, i = divmod(lane + j * self.lanes, self.shards_per_epoch())
        perm = np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.urls))
        return self.urls[int(perm[self.rank :: self.world_size][i])]

    def _rng(self, *words: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, *words])

    # -- state --------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "rank": self.rank, "world_size": self.world_size, "lanes": self.lanes,
                "buffer_crops": self.buffer_crops, "batch_size": self.batch_size, "shards": self.shards_digest}

    def _restore(self, state: dict[str, Any]) -> None:
        mine = self._settings()
        saved = {k: state.get(k) for k in mine}
        if saved != mine:
            diff = ", ".join(f"{k}: {saved[k]!r} -> {mine[k]!r}" for k in mine if saved[k] != mine[k])
            raise StreamError(f"the saved shard stream cannot continue with these settings ({diff}); "
                              f"resume with the same shards, ranks and data settings, or start a new run")
        self.lane_states = {int(lane): s for lane, s in state["lane_states"].items()}
        self.first_lane = int(state["next_lane"])

    # -- reading --------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        check_workers(workers, self.lanes)
        lanes: dict[int, _Lane] = {}
        for n in itertools.count():
            lane = (self.first_lane + worker + n * workers) % self.lanes
            if lane not in lanes:
                lanes[lane] = _Lane(self, lane, self.lane_states.get(lane))
            yield lanes[lane].next_batch()


class _Lane:
    """One lane's reader: its crop stream, the current block, what was skipped since the last batch."""

    def __init__(self, stream: ShardStream, lane: int, state: dict[str, Any] | None):
        self.s, self.lane = stream, lane
        self.skipped: list[tuple[str, str]] = []
        if state is None:
            self.block_number, start, self.emitted = 0, Position(0, 0, 0, 0), 0
        else:
            self.block_number, start, self.emitted = int(state["block"]), Position(*state["start"]), int(state["emitted"])
        self.block_start = start
        self.crops = self._crops(start)
        self.block: list[_Crop] | None = None  # the current block, in its shuffled order
        self.coming: list[_Crop] = []  # the next block's crops read so far, in stream order

    def state(self) -> dict[str, Any]:
        return {"block": self.block_number, "start": self.block_start.as_list(), "emitted": self.emitted}

    def next_batch(self) -> dict[str, Any]:
        from mert_core.data import crop_batch

        crops = [self._next_crop() for _ in range(self.s.batch_size)]
        skipped, self.skipped = self.skipped, []
        batch = crop_batch([c.wave for c in crops], self.s.crop_samples, [c.member for c in crops], [c.offset for c in crops], skipped)
        batch["stream"] = {"lane": self.lane, "state": self.state()}
        return batch

    def _next_crop(self) -> _Crop:
        B = self.s.buffer_crops
        if self.block is None:  # the block of the current state (a start, a resume), read from its start
            self.block, self.block_after = self._shuffled(list(itertools.islice(self.crops, B)))
            self.coming = list(itertools.islice(self.crops, self.emitted))
        crop = self.block[self.emitted]
        self.emitted += 1
        # read the next block one crop per crop handed out, so that no batch waits for a whole block
        self.coming += itertools.islice(self.crops, 1)
        if self.emitted == B:  # on to the next block, which starts right after this one's last crop
            self.block_number, self.block_start, self.emitted = self.block_number + 1, self.block_after, 0
            self.block, self.block_after = self._shuffled(self.coming)
            self.coming = []
        return crop

    def _shuffled(self, crops: list[_Crop]) -> tuple[list[_Crop], Position]:
        """Block ``block_number`` (its crops in stream order) in its seeded order, and where the next block starts."""
        order = self.s._rng(self.lane, 2, self.block_number).permutation(len(crops))
        return [crops[i] for i in order], crops[-1].after

    def _crops(self, start: Position) -> Iterator[_Crop]:
        """The lane's crops in stream order from ``start``, endless."""
        s, lane = self.s, self.lane
        j, offset, first_member, skip = start.shard, start.offset, start.member, start.crop
        barren = 0  # shards in a row that gave no crop
        while True:
            url = s.shard_of(lane, j)
            gave = False
            for item in read_members(url, offset, first_member, s.policy):
                first_crop, skip = skip, 0  # a resumed lane starts inside its first member only
                if isinstance(item, Skipped):
                    self.skipped.append((item.what, item.reason))
                    continue
                cut = self._member_crops(item, j)
                if cut is None:
                    continue
                audio, starts = cut
                for c in range(first_crop, len(starts)):
                    gave = True
                    at = Position(j, item.index, item.offset, c)
                    after = Position(j, item.index, item.offset, c + 1) if c + 1 < len(starts) else Position(j, item.index + 1, item.end, 0)
                    yield _Crop(audio[starts[c] : starts[c] + s.crop_samples].copy(), item.id, starts[c], at, after)
            barren = 0 if gave else barren + 1
            if barren > s.shards_per_epoch():
                raise StreamError(f"rank {s.rank}, lane {lane}: a whole epoch of shards gave no crop "
                                  f"(all members unreadable or shorter than min_seconds; last skipped: "
                                  f"{self.skipped[-1] if self.skipped else 'none'}); check the shards")
            j, offset, first_member, skip = j + 1, 0, 0, 0

    def _member_crops(self, member: Member, j: int) -> tuple[np.ndarray, list[int]] | None:
        """The decoded member and its crop starts, or None (counted in ``skipped`` if unreadable)."""
        s = self.s
        if not member.is_audio():
            return None
        try:
            ext, data = member.audio()
            audio = decode_audio(data, f"{member.id}.{ext}", s.sample_rate)
        except AudioError as exc:
            self.skipped.append((member.id, str(exc)))
            return None
        starts = crop_offsets(len(audio), s.crop_samples, s.min_samples, s.aligned, s._rng(self.lane, 1, j, member.index))
        return (audio, starts) if starts else None


class ShardBatches:
    """The trainer's iterator over a :class:`ShardStream`: batches in lane order, read
    ahead by DataLoader workers; it keeps each lane's state as of the batches handed
    out (:meth:`state_dict`, saved in checkpoints) and the time spent waiting for them.

    Args:
        stream: the dataset.
        num_workers: worker processes (0: read in this process); must divide ``stream.lanes``.
        prefetch_factor: batches each worker reads ahead.
        pin_memory: None pins only when CUDA is available.
    """

    def __init__(self, stream: ShardStream, num_workers: int = 1, *, prefetch_factor: int = 2, pin_memory: bool | None = None):
        from mert_core.data import _init_worker

        if num_workers:
            check_workers(num_workers, stream.lanes)
        self.stream = stream
        self.lane_states = dict(stream.lane_states)
        self.next_lane = stream.first_lane
        self.wait_seconds = 0.0  # spent in __next__, waiting for the workers (or reading, with none)
        self.first_wait_seconds = 0.0
        self.batches_read = 0
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        extra = {"prefetch_factor": prefetch_factor, "worker_init_fn": _init_worker} if num_workers > 0 else {}
        self._batches = iter(DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **extra))

    def __iter__(self) -> "ShardBatches":
        return self

    def __next__(self) -> dict[str, Any]:
        started = time.perf_counter()
        batch = next(self._batches)
        waited = time.perf_counter() - started
        self.wait_seconds += waited
        if not self.batches_read:
            self.first_wait_seconds = waited  # the lanes' first blocks are read before it
        self.batches_read += 1
        stream = batch.pop("stream")
        lane = int(stream["lane"])
        if lane != self.next_lane:  # DataLoader hands out workers' batches round robin; anything else breaks the resume
            raise RuntimeError(f"shard stream: expected a batch of lane {self.next_lane}, got lane {lane}")
        self.lane_states[lane] = stream["state"]
        self.next_lane = (lane + 1) % self.stream.lanes
        return batch

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint saves to continue this stream exactly (plain Python values)."""
        return {**self.stream._settings(), "lane_states": {str(k): v for k, v in sorted(self.lane_states.items())},
                "next_lane": self.next_lane}
