"""k-means with bounded memory, in torch: k-means++ on a subsample, then exact
Lloyd passes streamed over an on-disk feature cache.

Why not scikit-learn's ``MiniBatchKMeans``: its updates are noisy and it
usually ends a little above the inertia of full-batch k-means, while
full-batch ``KMeans`` needs every frame in RAM. Here

1. features are written once to a float32 file (``FeatureCache``; RAM holds
   one block at a time),
2. ``n_init`` restarts of k-means++ + Lloyd run on a random subsample of
   ``init_frames`` frames held in memory (this is where most of the
   convergence happens, cheaply), the best one is kept,
3. full Lloyd passes stream over the cache block by block, accumulating exact
   per-cluster sums, until the centroids move less than ``tol`` (scikit-learn's
   criterion: squared shift <= ``tol`` x mean feature variance).

Every step is a matmul or a sort on the chosen device; all sums are float64
and order-independent (sort + cumulative sum, no atomics), so a fit is
deterministic for a given seed. ``benchmarks/bench_kmeans.py`` measures it
against full-batch ``KMeans`` and ``MiniBatchKMeans``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

BLOCK_ROWS = 65536
"""Frames per block when streaming over the cache (65536 x 768 float32 = 200 MB at most)."""


class KMeansError(ValueError):
    """Too little data for the requested number of clusters, or similar."""


# -- nearest centroid: the one function both fitting and labelling use ---------


def _chunk_rows(num_clusters: int) -> int:
    # bound the (rows x K) score matrix to 2**24 floats (64 MB)
    return max(1024, (1 << 24) // max(num_clusters, 1))


def nearest(x: torch.Tensor, centroids: torch.Tensor, centroid_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of, and squared distance to, the nearest centroid of each row.

    Args:
        x: ``(N, D)`` float32 features.
        centroids: ``(K, D)`` float32.
        centroid_sq: ``(K,)`` squared norms of the centroids (computed if None).

    Returns:
        ``(N,)`` int64 labels and ``(N,)`` float32 squared distances (>= 0).
    """
    if centroid_sq is None:
        centroid_sq = (centroids * centroids).sum(1)
    labels, dists = [], []
    step = _chunk_rows(centroids.shape[0])
    for start in range(0, x.shape[0], step):
        xb = x[start : start + step]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the ||x||^2 term does not change the argmin
        scores = torch.addmm(centroid_sq, xb, centroids.T, beta=1.0, alpha=-2.0)  # n, K
        best, idx = scores.min(dim=1)
        labels.append(idx)
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

    def __init__(self, centroids: torch.Tensor):
        super().__init__()
        centroids = centroids.float()
        mean = centroids.mean(0)
        shifted = centroids - mean
        self.register_buffer("centroids", centroids)
        self.register_buffer("mean", mean)
        self.register_buffer("shifted", shifted)
        self.register_buffer("shifted_sq", (shifted * shifted).sum(1))

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` float -> ``(...)`` int64 nearest-centroid labels."""
        lead = features.shape[:-1]
        flat = features.reshape(-1, features.shape[-1]).float() - self.mean
        labels, _ = nearest(flat, self.shifted, self.shifted_sq)
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

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Copy of the rows at sorted indices ``rows``."""
        return np.asarray(self._array[rows])

    def blocks(self, device: torch.device, block_rows: int = BLOCK_ROWS) -> Iterator[torch.Tensor]:
        """Yield ``(n, D)`` float32 tensors on ``device``, in order."""
        for start in range(0, self.rows, block_rows):
            yield torch.from_numpy(np.array(self._array[start : start + block_rows])).to(device)

    def close(self, delete: bool = True) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._array = None
        if delete and self.path.exists():
            os.unlink(self.path)


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
    far_dist: torch.Tensor  # R largest squared distances seen
    far_rows: torch.Tensor  # R, D the frames they belong to


def _one_pass(blocks: Iterator[torch.Tensor], centroids: torch.Tensor, keep_far: int) -> _PassStats:
    """Assign every frame to its nearest centroid; accumulate per-cluster sums."""
    K, D = centroids.shape
    device = centroids.device
    c_sq = (centroids * centroids).sum(1)
    sums = torch.zeros(K, D, dtype=torch.float64, device=device)
    counts = torch.zeros(K, dtype=torch.long, device=device)
    inertia = torch.zeros((), dtype=torch.float64, device=device)
    far_dist = torch.zeros(0, device=device)
    far_rows = torch.zeros(0, D, device=device)
    for x in blocks:
        labels, dist = nearest(x, centroids, c_sq)
        inertia += dist.sum(dtype=torch.float64)
        # per-cluster sums by sorting and differencing a cumulative sum:
        # deterministic on every device (index_add_ on CUDA uses atomics)
        n = torch.bincount(labels, minlength=K)
        order = torch.argsort(labels, stable=True)
        csum = torch.cat([torch.zeros(1, D, dtype=torch.float64, device=device), torch.cumsum(x[order].double(), 0)])
        ends = torch.cumsum(n, 0)
        sums += csum[ends] - csum[ends - n]
        counts += n
        # the farthest frames: new homes for clusters that end up empty
        r = min(keep_far, x.shape[0])
        top_d, top_i = torch.topk(dist, r)
        far_dist = torch.cat([far_dist, top_d])
        far_rows = torch.cat([far_rows, x[top_i]])
        if far_dist.shape[0] > keep_far:
            far_dist, keep = torch.topk(far_dist, keep_far)
            far_rows = far_rows[keep]
    return _PassStats(float(inertia), sums, counts, far_dist, far_rows)


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


def lloyd(blocks: Callable[[], Iterator[torch.Tensor]], centroids: torch.Tensor, max_iter: int, tol_abs: float, bar: tqdm | None = None) -> LloydResult:
    """Lloyd iterations over data given as a stream of blocks.

    Args:
        blocks: called once per pass; yields ``(n, D)`` float32 tensors.
        centroids: ``(K, D)`` start.
        max_iter: passes at most.
        tol_abs: stop once the squared centroid shift is at most this.
        bar: progress bar to tick per pass.

    Returns:
        the last *evaluated* centroids with their exact inertia.
    """
    K = centroids.shape[0]
    history, relocated = [], 0
    for it in range(1, max_iter + 1):
        stats = _one_pass(blocks(), centroids, keep_far=K)
        history.append(stats.inertia)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(inertia=f"{stats.inertia / max(int(stats.counts.sum()), 1):.4g}/frame")
        new, n_empty = _new_centroids(centroids, stats)
        relocated += n_empty
        shift = float(((new - centroids).double() ** 2).sum())
        if shift <= tol_abs or it == max_iter:
            return LloydResult(centroids, stats.inertia, it, shift <= tol_abs, history, relocated)
        centroids = new
    raise AssertionError("unreachable")


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

    @property
    def mean_inertia(self) -> float:
        return self.inertia / max(self.num_frames, 1)


def fit_kmeans(
    cache: FeatureCache,
    num_clusters: int,
    *,
    seed: int,
    n_init: int = 1,
    init_frames: int = 100_000,
    max_iter: int = 100,
    max_passes: int = 30,
    tol: float = 1e-4,
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
        init_frames: size of the in-memory subsample (all frames if fewer).
        max_iter: Lloyd iterations per restart on the subsample.
        max_passes: streamed Lloyd passes over all frames afterwards.
        tol: relative tolerance (scikit-learn's): stop when the squared
            centroid shift is at most ``tol`` x the mean feature variance.
        device: where the arithmetic runs.
        progress: show progress bars.
        name: shown in progress bars.
    """
    N, K = cache.rows, num_clusters
    if N < K:
        raise KMeansError(
            f"{name}: the sample holds {N} frames, fewer than the {K} clusters asked for; "
            f"use more audio (sample_fraction / sample_hours) or fewer clusters (n_clusters)"
        )
    device = torch.device(device)
    rng = np.random.default_rng(seed)
    M = min(N, max(init_frames, K))
    rows = np.arange(N) if M == N else np.sort(rng.choice(N, size=M, replace=False))
    sub = torch.from_numpy(cache.take(rows)).to(device)  # M, D
    tol_abs = tol * float(sub.double().var(0, unbiased=False).mean())

    best: LloydResult | None = None
    init_inertia = []
    with tqdm(total=n_init, desc=f"{name}: k-means++ x{n_init} on {M} frames", unit="restart", disable=not progress, leave=False) as bar:
        for r in range(n_init):
            generator = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
            start = kmeans_plusplus(sub, K, generator)
            result = lloyd(lambda: iter(sub.split(BLOCK_ROWS)), start, max_iter, tol_abs)
            init_inertia.append(result.inertia / M)
            if best is None or result.inertia < best.inertia:
                best = result
            bar.update(1)
    del sub
    if M == N:  # the subsample is the whole sample: nothing left to stream
        return KMeansResult(best.centroids.cpu(), best.inertia, N, M, init_inertia, 0, best.converged, [h / N for h in best.history], best.relocated)
    with tqdm(total=max_passes, desc=f"{name}: Lloyd passes over {N} frames", unit="pass", disable=not progress, leave=False) as bar:
        full = lloyd(lambda: cache.blocks(device), best.centroids, max_passes, tol_abs, bar)
    return KMeansResult(full.centroids.cpu(), full.inertia, N, M, init_inertia, full.iterations, full.converged, [h / N for h in full.history], best.relocated + full.relocated)
