"""k-means with bounded memory, in torch: k-means++ and Lloyd on a subsample,
then exact Lloyd passes streamed over an on-disk feature cache.

Why not scikit-learn: full-batch ``KMeans`` needs every frame in RAM (the
original recipe's stumbling block), and ``MiniBatchKMeans`` ends well above
full-batch inertia (3 % on the benchmark). Here

1. features are written once to a float32 file (:class:`FeatureCache`; RAM
   holds one block at a time),
2. ``n_init`` restarts of k-means++ (on at most 20 frames per cluster) and
   Lloyd run on a random in-memory subsample (default 100 frames per
   cluster, at most 256 MB); the lowest inertia wins,
3. exact Lloyd passes stream over the cache block by block until the
   centroids move less than ``tol`` (scikit-learn's rule: squared shift <=
   ``tol`` x mean feature variance).

Lloyd passes skip the frames whose nearest centroid provably has not changed
(Hamerly / Yinyang k-means bounds, one bound per group of centroids, kept in
a memory-mapped file next to the cache), so late passes cost little more
than reading the data; the labels are still exactly Lloyd's. Sums are float64
and order-independent (no atomics), so a fit is deterministic for a seed.
``benchmarks/bench_kmeans.py`` measures it against ``KMeans`` and
``MiniBatchKMeans``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mert_core.errors import FitError

BLOCK_ROWS = 65536
"""Frames per block when streaming over the cache (65536 x 768 float32 = 200 MB at most)."""


SUBSAMPLE_BYTES = 256 << 20
"""Default bound on the in-memory subsample."""

TYPICAL_PASSES = 25
"""Streamed passes the early stop on inertia usually allows (14-24 measured on
0.5-4 h samples of real music, K = 500): the passes bar's first total and the
fit estimate's pass count."""

SEED_FRAMES_PER_CLUSTER = 20
"""k-means++ reads at most this many frames per cluster (at least 10000) of the subsample."""


class KMeansError(FitError):
    """Too little data for the requested number of clusters, or similar."""


# -- score blocks -------------------------------------------------------------


def _chunk_rows(num_slots: int, device: torch.device) -> int:
    """Rows per (rows x K) score matrix. On a CPU, 2**20 floats (4 MB): the
    matrix stays in cache while the argmin reads it back, and the nearest-
    centroid search (GEMM + grouped argmin, D = 39, K = 500, one thread) runs
    1.7x faster in 2048-row blocks than in 32768-row ones
    (``benchmarks/bench_kmeans.py --kernels``); the whole default fit, 1.3x.
    On a GPU, 2**24 floats (64 MB): fewer, larger kernels."""
    budget = 1 << (20 if device.type == "cpu" else 24)
    return max(256, budget // max(num_slots, 1))


# -- nearest centroid: the one function both fitting and labelling use ---------
#
# Centroids are laid out in G groups of S slots, member-major (slot s * G + g
# holds member s of group g; padding slots never win). The nearest centroid of
# a row is then found with one strided min over the S members of every group
# (fast: it runs along contiguous memory) and two small argmins, instead of an
# argmin along each K-long row, which is several times slower on CPU.


@dataclass
class _Groups:
    """A layout of ``K`` centroids in ``G`` groups of ``S`` slots."""

    order: torch.Tensor  # (S * G,) centroid in each slot, -1 for padding
    group_of: torch.Tensor  # (K,) group of each centroid
    num_groups: int
    size: int

    @property
    def slots(self) -> torch.Tensor:
        return self.order.clamp_min(0)

    def laid_out(self, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S*G, D)`` centroids in slot order and their squared norms (inf on padding)."""
        laid = centroids[self.slots]
        sq = (laid * laid).sum(1).masked_fill_(self.order < 0, float("inf"))
        return laid, sq


def _groups_from_ranking(ranked: torch.Tensor, num_groups: int) -> _Groups:
    """Cut a ranking of the centroids into ``num_groups`` runs of equal length."""
    K = ranked.shape[0]
    G = max(1, min(num_groups, K))
    S = -(-K // G)
    padded = torch.full((G * S,), -1, dtype=torch.long, device=ranked.device)
    padded[:K] = ranked  # group g = padded[g * S : (g + 1) * S]
    group_of = torch.empty(K, dtype=torch.long, device=ranked.device)
    group_of[ranked] = torch.arange(K, device=ranked.device) // S
    return _Groups(padded.view(G, S).T.reshape(-1), group_of, G, S)


def _make_groups(centroids: torch.Tensor, num_groups: int) -> _Groups:
    """Neighbouring centroids share a group (tighter bounds while fitting):
    order them along their first principal direction, then cut."""
    K = centroids.shape[0]
    centred = (centroids - centroids.mean(0)).double()
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[0] if K > 1 else centred.new_ones(centroids.shape[1])
    return _groups_from_ranking(torch.argsort(centred @ direction, stable=True), num_groups)


def _grouped_nearest(scores: torch.Tensor, groups: _Groups) -> tuple[torch.Tensor, ...]:
    """Argmin of each row of ``(n, S*G)`` scores.

    Returns:
        label ``(n,)``, best score ``(n,)``, per-group minimum ``(n, G)``, the
        winning group's member scores ``(n, S)`` and the winner's member index ``(n,)``.
    """
    n, G, S = scores.shape[0], groups.num_groups, groups.size
    by_member = scores.view(n, S, G)
    group_min = by_member.amin(1)  # n, G
    best_group = group_min.argmin(1)
    members = by_member.gather(2, best_group.view(n, 1, 1).expand(n, S, 1)).squeeze(2)  # n, S
    best, best_member = members.min(1)
    return groups.slots[best_member * G + best_group], best, group_min, members, best_member


def nearest(x: torch.Tensor, centroids: torch.Tensor, num_groups: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of, and squared distance to, the nearest centroid of each row.

    Args:
        x: ``(N, D)`` float32 features.
        centroids: ``(K, D)`` float32.
        num_groups: slot layout (any value gives the same labels).

    Returns:
        ``(N,)`` int64 labels and ``(N,)`` float32 squared distances (>= 0).
    """
    groups = _groups_from_ranking(torch.arange(centroids.shape[0], device=centroids.device), num_groups)
    laid, laid_sq = groups.laid_out(centroids)
    return _nearest_laid(x, laid, laid_sq, groups)


def _nearest_laid(x: torch.Tensor, laid: torch.Tensor, laid_sq: torch.Tensor, groups: _Groups) -> tuple[torch.Tensor, torch.Tensor]:
    labels, dists = [], []
    step = _chunk_rows(laid.shape[0], laid.device)
    for start in range(0, x.shape[0], step):
        xb = x[start : start + step]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the ||x||^2 term does not change the argmin
        scores = torch.addmm(laid_sq, xb, laid.T, beta=1.0, alpha=-2.0)  # n, S*G
        label, best, *_ = _grouped_nearest(scores, groups)
        labels.append(label)
        dists.append((best + (xb * xb).sum(1)).clamp_min_(0.0))
    if not labels:
        return x.new_zeros(0, dtype=torch.long), x.new_zeros(0)
    return torch.cat(labels), torch.cat(dists)


class Codebook(nn.Module):
    """Fitted centroids as a module: ``forward((..., D)) -> (...,)`` int64 labels.

    Features and centroids are shifted by the centroids' mean before the
    distances are taken: k-means labels do not change under a shift, and the
    ``||x||^2 - 2 x.c + ||c||^2`` expansion loses less float32 precision near
    the origin.

    Args:
        centroids: ``(K, D)``.
    """

    def __init__(self, centroids: torch.Tensor, num_groups: int = 32):
        super().__init__()
        centroids = centroids.float()
        mean = centroids.mean(0)
        groups = _groups_from_ranking(torch.arange(centroids.shape[0]), num_groups)
        self.num_groups, self.group_size = groups.num_groups, groups.size
        laid, laid_sq = groups.laid_out(centroids - mean)
        self.register_buffer("centroids", centroids)
        self.register_buffer("mean", mean)
        self.register_buffer("laid", laid)  # S*G, D: shifted centroids in slot order
        self.register_buffer("laid_sq", laid_sq)
        self.register_buffer("order", groups.order)
        self.register_buffer("group_of", groups.group_of)

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` float -> ``(...)`` int64 nearest-centroid labels."""
        lead = features.shape[:-1]
        flat = features.reshape(-1, features.shape[-1]).float() - self.mean
        groups = _Groups(self.order, self.group_of, self.num_groups, self.group_size)
        labels, _ = _nearest_laid(flat, self.laid, self.laid_sq, groups)
        return labels.reshape(lead)


# -- the on-disk feature cache ----------------------------------------------------


class FeatureCache:
    """An append-only ``(N, D)`` float32 matrix in a file, read back in blocks.

    Args:
        path: the file to write (removed by :meth:`close` with ``delete=True``).
        dim: feature size ``D``.
    """

    def __init__(self, path: Path, dim: int):
        self.path = Path(path)
        self.dim = dim
        self.rows = 0
        self._file = open(self.path, "wb")
        self._array: np.ndarray | None = None

    def append(self, features: torch.Tensor) -> None:
        """Add ``(n, D)`` rows."""
        if features.shape[-1] != self.dim:
            raise ValueError(f"feature cache {self.path.name}: expected rows of {self.dim} values, got shape {tuple(features.shape)}")
        rows = features.detach().reshape(-1, self.dim).float().cpu().numpy()
        self._file.write(np.ascontiguousarray(rows).tobytes())
        self.rows += rows.shape[0]

    def finish(self) -> None:
        """Stop writing; the rows become readable."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.rows:
            self._array = np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.rows, self.dim))

    @property
    def nbytes(self) -> int:
        return self.rows * self.dim * 4

    @property
    def array(self) -> np.ndarray:
        """The ``(N, D)`` rows, memory-mapped (after :meth:`finish`)."""
        return self._array

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Copy of the rows at sorted indices ``rows``."""
        return np.asarray(self._array[rows])

    def state_arrays(self, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-row label (int32) and distance bounds (``num_groups`` float32), memory-mapped next to the cache."""
        labels = np.memmap(self._state_path("labels"), dtype=np.int32, mode="w+", shape=(self.rows,))
        lower = np.memmap(self._state_path("lower"), dtype=np.float32, mode="w+", shape=(self.rows, num_groups))
        return labels, lower

    def _state_path(self, what: str) -> Path:
        return self.path.with_name(f"{self.path.name}.{what}")

    def close(self, delete: bool = True) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._array = None
        if delete:
            for p in (self.path, self._state_path("labels"), self._state_path("lower")):
                if p.exists():
                    os.unlink(p)


# -- k-means++ and Lloyd ----------------------------------------------------------


def kmeans_plusplus(x: torch.Tensor, num_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii; scikit-learn's variant
    with ``2 + ln K`` local trials per centre).

    Args:
        x: ``(M, D)`` float32 features.
        num_clusters: ``K <= M``.
        generator: CPU generator; every draw comes from it.

    Returns:
        ``(K, D)`` initial centroids (rows of ``x``).
    """
    M = x.shape[0]
    trials = 2 + int(math.log(num_clusters))
    x_sq = (x * x).sum(1)

    def sq_dist(rows: torch.Tensor) -> torch.Tensor:  # (r, M) squared distances of x[rows] to all of x
        return (x_sq[rows, None] - 2.0 * (x[rows] @ x.T) + x_sq[None]).clamp_min_(0.0)

    first = int(torch.randint(M, (1,), generator=generator))
    chosen = [first]
    closest = sq_dist(torch.tensor([first], device=x.device))[0]  # M
    potential = closest.sum(dtype=torch.float64)
    for _ in range(1, num_clusters):
        draws = torch.rand(trials, generator=generator, dtype=torch.float64).to(x.device) * potential
        candidates = torch.searchsorted(torch.cumsum(closest, 0, dtype=torch.float64), draws).clamp_(max=M - 1)
        d = torch.minimum(closest[None], sq_dist(candidates))  # trials, M
        potentials = d.sum(1, dtype=torch.float64)
        best = int(torch.argmin(potentials))
        closest, potential = d[best], potentials[best]
        chosen.append(int(candidates[best]))
    return x[torch.tensor(chosen, device=x.device)].clone()


@dataclass
class _PassStats:
    inertia: float  # sum of squared distances, float64
    sums: torch.Tensor  # K, D float64
    counts: torch.Tensor  # K int64
    far_dist: torch.Tensor  # R largest distances seen
    far_rows: torch.Tensor  # R, D the frames they belong to
    recomputed: int  # frames whose distances to every centroid were computed


class _Rows:
    """Frames to cluster, read in blocks and centred on ``mean``, with each
    frame's label and lower bound kept alongside (in RAM or memory-mapped)."""

    def __init__(self, read: Callable[[int, int], torch.Tensor], num_rows: int, mean: torch.Tensor, labels: np.ndarray, lower: np.ndarray):
        self.read, self.num_rows, self.mean = read, num_rows, mean
        self.labels, self.lower = labels, lower  # (N,) int32, (N, G) float32

    def ranges(self) -> Iterator[tuple[int, int]]:
        for start in range(0, self.num_rows, BLOCK_ROWS):
            yield start, min(start + BLOCK_ROWS, self.num_rows)

    def block(self, start: int, stop: int) -> torch.Tensor:
        return self.read(start, stop) - self.mean


def _all_distances(x: torch.Tensor, centroids: torch.Tensor, groups: _Groups) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row and, per group of centroids, a lower bound
    on the distance to its nearest member other than that centroid.

    Returns:
        ``(n,)`` labels and ``(n, G)`` lower bounds.
    """
    laid, laid_sq = groups.laid_out(centroids)
    c_max = float((centroids * centroids).sum(1).max())
    labels, lower = [], []
    step = _chunk_rows(laid.shape[0], laid.device)
    for start in range(0, x.shape[0], step):
        xb = x[start : start + step]
        scores = torch.addmm(laid_sq, xb, laid.T, beta=1.0, alpha=-2.0)  # n, S*G: ||c||^2 - 2 x.c
        label, best, group_min, members, best_member = _grouped_nearest(scores, groups)
        labels.append(label)
        # the bounds are about the *other* centroids: in the winner's group, its runner-up
        members.scatter_(1, best_member[:, None], float("inf"))
        best_group = groups.group_of[label]
        group_min.scatter_(1, best_group[:, None], members.amin(1, keepdim=True))
        x_sq = (xb * xb).sum(1, keepdim=True)
        # float32 rounding of the expansion is ~1e-7 (|x|^2 + |c|^2): keep the bounds safely below
        lower.append((group_min + x_sq - 1e-6 * (x_sq + c_max)).clamp_min_(0.0).sqrt_())
    return torch.cat(labels), torch.cat(lower)


def _cluster_sums(x: torch.Tensor, labels: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums (float64) and counts of one block, deterministic on every device."""
    counts = torch.bincount(labels, minlength=K)
    if x.device.type == "cpu":  # index_add_ on CPU adds in order; a block's sums are short enough for float32
        return torch.zeros(K, x.shape[1]).index_add_(0, labels, x).double(), counts
    # on CUDA index_add_ uses atomics (order varies): sort, then difference a cumulative sum
    order = torch.argsort(labels, stable=True)
    csum = torch.cat([x.new_zeros(1, x.shape[1], dtype=torch.float64), torch.cumsum(x[order].double(), 0)])
    ends = torch.cumsum(counts, 0)
    return csum[ends] - csum[ends - counts], counts


def _bounded_pass(rows: _Rows, centroids: torch.Tensor, groups: _Groups, drift: torch.Tensor | None) -> _PassStats:
    """One exact Lloyd assignment pass that skips the frames whose nearest
    centroid provably has not changed (Hamerly's and Yinyang k-means' bounds).

    Each frame keeps, per group of centroids, a lower bound on its distance
    to every *other* centroid of the group. When centroids move, a group's
    bounds drop by the largest move within the group. A frame keeps its label
    when its exact distance to its own centroid is at most the smallest of its
    bounds, or at most half the gap from its centroid to the nearest other
    one (triangle inequality). Only the remaining frames are compared with all
    K centroids, so late passes, where few frames sit near a boundary, cost
    little more than reading the data. The labels are exactly Lloyd's.

    Bounds are stored as ``bound + drift[g]`` at the time they were computed,
    where ``drift`` sums each group's largest moves over the passes; the
    current bound is the stored value minus the current drift, so only the
    frames that were compared again need their state rewritten.

    Args:
        rows: the frames and their state.
        centroids: ``(K, D)`` float32 (centred coordinates).
        groups: the groups of centroids.
        drift: ``(G,)`` cumulative largest move per group; None on the first
            pass (every frame is compared with every centroid).
    """
    K, D = centroids.shape
    G = groups.num_groups
    device = centroids.device
    gaps = torch.cdist(centroids.double(), centroids.double())
    gaps.fill_diagonal_(float("inf"))
    half_gap = (gaps.min(1).values / 2).float() if K > 1 else torch.full((K,), float("inf"), device=device)
    sums = torch.zeros(K, D, dtype=torch.float64, device=device)
    counts = torch.zeros(K, dtype=torch.long, device=device)
    inertia = torch.zeros((), dtype=torch.float64, device=device)
    far_dist, far_rows = torch.zeros(0, device=device), torch.zeros(0, D, device=device)
    recomputed = 0
    for start, stop in rows.ranges():
        x = rows.block(start, stop)
        if drift is None:
            labels, lower = _all_distances(x, centroids, groups)
            rows.labels[start:stop] = labels.int().cpu().numpy()
            rows.lower[start:stop] = lower.cpu().numpy()
            dist = (x - centroids[labels]).norm(dim=1)
            recomputed += x.shape[0]
        else:
            labels = torch.from_numpy(np.asarray(rows.labels[start:stop])).to(device).long()
            bound = (torch.from_numpy(np.asarray(rows.lower[start:stop])).to(device) - drift).amin(1)  # n
            dist = (x - centroids[labels]).norm(dim=1)  # exact
            need = dist * (1 + 1e-6) > torch.maximum(half_gap[labels], bound)
            idx = torch.nonzero(need).flatten()
            if len(idx):
                new_labels, new_lower = _all_distances(x[idx], centroids, groups)
                labels[idx] = new_labels
                dist[idx] = (x[idx] - centroids[new_labels]).norm(dim=1)
                where = start + idx.cpu().numpy()
                rows.labels[where] = new_labels.int().cpu().numpy()
                rows.lower[where] = (new_lower + drift).cpu().numpy()
                recomputed += len(idx)
        inertia += dist.double().pow(2).sum()
        block_sums, block_counts = _cluster_sums(x, labels, K)
        sums += block_sums.to(device)
        counts += block_counts
        # the farthest frames: new homes for clusters that end up empty
        top_d, top_i = torch.topk(dist, min(K, x.shape[0]))
        far_dist, far_rows = torch.cat([far_dist, top_d]), torch.cat([far_rows, x[top_i]])
        if far_dist.shape[0] > K:
            far_dist, keep = torch.topk(far_dist, K)
            far_rows = far_rows[keep]
    return _PassStats(float(inertia), sums, counts, far_dist, far_rows, recomputed)


def _new_centroids(centroids: torch.Tensor, stats: _PassStats) -> tuple[torch.Tensor, int]:
    """Means of the clusters; an empty cluster moves to one of the farthest frames."""
    new = centroids.clone()
    filled = stats.counts > 0
    new[filled] = (stats.sums[filled] / stats.counts[filled, None]).float()
    empty = torch.nonzero(~filled).flatten()
    if len(empty):
        order = torch.argsort(stats.far_dist, descending=True, stable=True)[: len(empty)]
        new[empty[: len(order)]] = stats.far_rows[order]
    return new, int(len(empty))


@dataclass
class LloydResult:
    centroids: torch.Tensor  # K, D: the last centroids whose inertia was measured
    inertia: float  # their inertia (sum over frames)
    iterations: int
    converged: bool
    history: list[float] = field(default_factory=list)  # inertia per pass
    relocated: int = 0  # empty clusters moved to far frames, in total
    recomputed: float = 0.0  # frames compared with every centroid, in passes' worth of all frames


def lloyd(rows: _Rows, centroids: torch.Tensor, max_iter: int, tol_abs: float, bar: tqdm | None = None, inertia_tol: float = 0.0) -> LloydResult:
    """Exact Lloyd iterations over ``rows``, with distance bounds (see :func:`_bounded_pass`).

    Args:
        rows: the frames, streamed in blocks.
        centroids: ``(K, D)`` start (centred coordinates).
        max_iter: passes at most.
        tol_abs: stop once the squared centroid shift is at most this.
        bar: progress bar to tick per pass.
        inertia_tol: also stop once a pass lowers the inertia by at most this
            fraction (0: never). Lloyd's tail is long and its gains shrink
            pass by pass; what stopping leaves is measured by a test and
            ``benchmarks/bench_kmeans.py --audio`` against Lloyd's fixed point.

    Returns:
        the last *evaluated* centroids with their exact inertia.
    """
    history, relocated, recomputed = [], 0, 0
    groups = _make_groups(centroids, rows.lower.shape[1])
    drift = None
    for it in range(1, max_iter + 1):
        stats = _bounded_pass(rows, centroids, groups, drift)
        history.append(stats.inertia)
        recomputed += stats.recomputed
        if bar is not None:
            bar.update(1)
            if bar.n >= bar.total and it < max_iter:  # more passes than usual: extend the bar, a few at a time
                bar.total = min(max_iter, bar.total + 5)
            bar.set_postfix(inertia=f"{stats.inertia / max(rows.num_rows, 1):.4g}/frame", recomputed=f"{stats.recomputed / max(rows.num_rows, 1):.0%}")
        new, n_empty = _new_centroids(centroids, stats)
        relocated += n_empty
        shift = float(((new - centroids).double() ** 2).sum())
        settled = shift <= tol_abs or (inertia_tol > 0 and it > 1 and history[-2] - history[-1] <= inertia_tol * history[-1])
        if settled or it == max_iter:
            if bar is not None:  # stopped early: the bar ends full
                bar.total = it
                bar.refresh()
            return LloydResult(centroids, stats.inertia, it, settled, history, relocated, recomputed / max(rows.num_rows, 1))
        # a little slack against float32 rounding keeps the bounds valid
        moved = (new - centroids).double().norm(dim=1).float() * (1 + 1e-6) + 1e-6
        group_move = torch.zeros(groups.num_groups, device=moved.device).scatter_reduce_(0, groups.group_of, moved, reduce="amax")
        drift = group_move if drift is None else drift + group_move
        centroids = new
    raise AssertionError("unreachable")


def estimate_seconds(num_frames: int, dim: int, num_clusters: int, *, n_init: int = 1, init_frames: int | None = None,
                     max_iter: int = 100, max_passes: int = 300, device: torch.device | str = "cpu") -> float:
    """Rough wall seconds :func:`fit_kmeans` takes, from one timed nearest-centroid block on ``device``.

    The model, in full nearest-centroid searches of one frame: each restart
    seeds on ``20 K`` frames (k-means++ costs ``2 + ln K`` searches per centre
    over what it reads) and up to ``max_iter`` Lloyd iterations on the
    subsample; then ``max_passes`` streamed passes. The first iteration or
    pass searches every frame; afterwards the bounds skip most frames, which
    the model assumes leaves 20 % of the work per later subsample iteration;
    a later streamed pass costs 0.65 of a full search per frame (measured on
    4 h of MFCC-39 at K = 500: 30-45 % of the frames searched again, plus
    reading the cache and the bounds). Load on a shared machine is not modelled.
    """
    K, M = num_clusters, min(num_frames, init_frames or max(10_000, min(100 * num_clusters, SUBSAMPLE_BYTES // (4 * dim))))
    x = torch.randn(min(BLOCK_ROWS, 16384), dim, device=torch.device(device))
    c = torch.randn(K, dim, device=x.device)
    nearest(x[:1024], c)  # warm-up
    timings = []
    for _ in range(3):  # the best of three: one short timing can catch a busy moment
        t0 = time.perf_counter()
        nearest(x, c)
        timings.append(time.perf_counter() - t0)
    per_frame = min(timings) / x.shape[0]
    seed_frames = max(SEED_FRAMES_PER_CLUSTER * K, 10_000)
    seeding = (2 + math.log(K)) * min(seed_frames, M)  # per restart, in searches of one frame
    subsample = M * (1 + 0.2 * max(max_iter - 1, 0))
    streamed = 0 if M >= num_frames else num_frames * (1 + 0.65 * max(max_passes - 1, 0))
    return per_frame * (n_init * (seeding + subsample) + streamed)


@dataclass
class KMeansResult:
    """What :func:`fit_kmeans` found."""

    centroids: torch.Tensor  # K, D float32 (CPU)
    inertia: float  # sum of squared distances over all frames of the sample
    num_frames: int
    init_frames: int  # frames in the in-memory subsample
    init_inertia: list[float]  # per restart: inertia per frame on the subsample
    passes: int  # streamed passes over all frames
    converged: bool
    history: list[float]  # per streamed pass: inertia per frame
    relocated: int
    recomputed: float = 0.0  # frames compared with all K centroids, in passes' worth (the rest were skipped by the bounds)
    subsample_iterations: int = 0  # Lloyd iterations of the winning restart on the subsample
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of seeding, subsample and streamed Lloyd

    @property
    def mean_inertia(self) -> float:
        return self.inertia / max(self.num_frames, 1)


def _check_enough_frames(num_frames: int, num_clusters: int, name: str) -> None:
    if num_frames < num_clusters:
        raise KMeansError(
            f"{name}: the sample holds {num_frames} frames, fewer than the {num_clusters} clusters asked for; "
            f"use more audio (sample_fraction / sample_hours) or fewer clusters (n_clusters)"
        )


def fit_minibatch_kmeans(
    cache: FeatureCache,
    num_clusters: int,
    *,
    seed: int,
    n_init: int = 1,
    max_iter: int = 100,
    tol: float = 1e-4,
    batch_frames: int = 4096,
    name: str = "k-means",
) -> KMeansResult:
    """Cluster every row of ``cache`` with scikit-learn's ``MiniBatchKMeans``
    (the k-means teachers' ``backend='sklearn'``).

    The rows are read into memory (4 bytes x dims per frame); k-means++ seeds
    ``n_init`` runs, the best is kept, and the inertia reported is the exact one
    over all rows (scikit-learn's ``compute_labels``).

    Args:
        cache: finished feature cache (N rows).
        num_clusters: K.
        seed: scikit-learn's ``random_state``.
        n_init: k-means++ restarts.
        max_iter: passes over the rows, at most.
        tol: scikit-learn's early-stopping tolerance on the centroid change.
        batch_frames: rows per mini-batch.
        name: named in errors.
    """
    from sklearn.cluster import MiniBatchKMeans

    N, K = cache.rows, num_clusters
    _check_enough_frames(N, K, name)
    started = time.perf_counter()
    model = MiniBatchKMeans(n_clusters=K, n_init=n_init, max_iter=max_iter, tol=tol, batch_size=batch_frames,
                            random_state=seed % 2**32, compute_labels=True)
    model.fit(np.asarray(cache.array))
    return KMeansResult(
        centroids=torch.from_numpy(model.cluster_centers_.astype(np.float32)),
        inertia=float(model.inertia_),
        num_frames=N,
        init_frames=N,
        init_inertia=[],
        passes=int(model.n_iter_),
        converged=int(model.n_iter_) < max_iter,
        history=[],
        relocated=0,
        subsample_iterations=int(model.n_steps_),
        seconds={"sklearn": round(time.perf_counter() - started, 3)},
    )


def fit_kmeans(
    cache: FeatureCache,
    num_clusters: int,
    *,
    seed: int,
    n_init: int = 1,
    init_frames: int | None = None,
    max_iter: int = 100,
    max_passes: int = 300,
    tol: float = 1e-4,
    inertia_tol: float = 0.0,
    num_groups: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    name: str = "k-means",
) -> KMeansResult:
    """Cluster every row of ``cache`` into ``num_clusters`` groups.

    Args:
        cache: finished feature cache (N rows).
        num_clusters: K.
        seed: seeds the subsample and every k-means++ restart.
        n_init: restarts on the subsample; the lowest inertia wins.
        init_frames: size of the in-memory subsample (all frames if fewer);
            None: 100 frames per cluster, at least 10000, at most 256 MB.
        max_iter: Lloyd iterations per restart on the subsample (0: none).
        max_passes: Lloyd passes streamed over all frames afterwards.
        tol: relative tolerance (scikit-learn's): stop when the squared
            centroid shift is at most ``tol`` x the mean feature variance.
        inertia_tol: streamed passes also stop once a pass lowers the
            inertia by at most this fraction (0: only ``tol``).
        num_groups: groups of centroids with their own distance bound per
            frame (Yinyang k-means); None: K / 10, at most 32. More groups
            skip more distance computations and keep 4 more bytes per frame.
        device: where the arithmetic runs.
        progress: show progress bars.
        name: shown in progress bars.
    """
    N, K = cache.rows, num_clusters
    _check_enough_frames(N, K, name)
    device = torch.device(device)
    rng = np.random.default_rng(seed)
    if init_frames is None:
        init_frames = max(10_000, min(100 * K, SUBSAMPLE_BYTES // (4 * cache.dim)))
    M = min(N, max(init_frames, K))
    picked = np.arange(N) if M == N else np.sort(rng.choice(N, size=M, replace=False))
    sub = torch.from_numpy(cache.take(picked)).to(device)  # M, D
    # centre everything on the subsample's mean: distances are unchanged and
    # float32 keeps more precision near the origin
    mean = sub.double().mean(0).float()
    tol_abs = tol * float(sub.double().var(0, unbiased=False).mean())
    G = num_groups if num_groups is not None else max(1, min(K // 10, 32))
    sub_rows = _Rows(lambda a, b: sub[a:b], M, mean, np.zeros(M, np.int32), np.zeros((M, G), np.float32))

    best: LloydResult | None = None
    init_inertia = []
    seconds = {"seeding": 0.0, "subsample_lloyd": 0.0, "streamed_lloyd": 0.0}
    with tqdm(total=n_init, desc=f"{name}: k-means++ x{n_init} on {M} frames", unit="restart", disable=not progress, leave=False) as bar:
        for _ in range(n_init):
            generator = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
            # seeding needs far fewer frames than Lloyd: k-means++ costs K passes over what it reads
            seeds = torch.randperm(M, generator=generator)[: max(SEED_FRAMES_PER_CLUSTER * K, 10_000)].sort().values.to(device)
            t0 = time.perf_counter()
            start = kmeans_plusplus(sub[seeds] - mean, K, generator)
            t1 = time.perf_counter()
            result = lloyd(sub_rows, start, max(max_iter, 1), tol_abs, inertia_tol=inertia_tol)
            seconds["seeding"] += t1 - t0
            seconds["subsample_lloyd"] += time.perf_counter() - t1
            init_inertia.append(result.inertia / M)
            if best is None or result.inertia < best.inertia:
                best = result
            bar.update(1)
    del sub, sub_rows
    if M == N:  # the subsample is the whole sample: nothing left to stream
        full, passes = best, 0
    else:
        labels, lower = cache.state_arrays(G)
        rows = _Rows(lambda a, b: torch.from_numpy(np.array(cache.array[a:b])).to(device), N, mean, labels, lower)
        t0 = time.perf_counter()
        # the bar starts at the usual pass count rather than the limit, grows if more are needed and
        # ends full when the inertia rule stops the fit (the first pass, which compares every frame
        # with every centroid, is the slowest: the ETA starts high and settles)
        desc = f"{name}: Lloyd passes over {N} frames (usually {TYPICAL_PASSES // 2}-{TYPICAL_PASSES}, at most {max_passes}; stops at < {inertia_tol:.2%} gain per pass)"
        total = min(max_passes, TYPICAL_PASSES) if inertia_tol > 0 else max_passes
        with tqdm(total=total, desc=desc, unit="pass", disable=not progress, leave=False) as bar:
            full = lloyd(rows, best.centroids, max_passes, tol_abs, bar, inertia_tol)
        seconds["streamed_lloyd"] = time.perf_counter() - t0
        passes = full.iterations
    return KMeansResult(
        centroids=(full.centroids + mean).cpu(),
        inertia=full.inertia,
        num_frames=N,
        init_frames=M,
        init_inertia=init_inertia,
        passes=passes,
        converged=full.converged,
        history=[h / N for h in full.history],
        relocated=best.relocated + (full.relocated if passes else 0),
        recomputed=full.recomputed if passes else 0.0,
        subsample_iterations=best.iterations,
        seconds={k: round(v, 3) for k, v in seconds.items()},
    )
