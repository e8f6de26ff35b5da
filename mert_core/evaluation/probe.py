"""The MARBLE constrained probe: a small MLP on frozen features.

One probe is an MLP with one hidden layer of 512 units, ReLU, dropout 0.2,
trained with Adam on batches of 64 clips, reading either one layer of the
upstream or a learned softmax-weighted sum of all its layers. The protocol
searches the learning rate in {5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2} and the
layer, early-stops each probe on the validation split, selects the best by
the task's primary validation metric and reports its test score.

Every (layer, lr) member of that grid is an independent MLP, but they are all
trained side by side in one batched pass (:class:`ProbeGrid`, parameters with
a leading member axis, and an Adam whose learning rate is a vector): the same
arithmetic as training them one by one, with the same batches, in a fraction
of the Python overhead. A member whose validation score stopped improving
for ``patience`` epochs is frozen at its best weights.

Frame-level tasks (beat tracking) train on batches of random frames: a
per-frame MLP sees no context, so whole-clip batches would only cost memory.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from mert_core.errors import BadInputError
from mert_core.evaluation.extract import FeatureSet
from mert_core.tasks import PROBLEMS, Task

log = logging.getLogger("mert.evaluation")
MARBLE_LRS = (5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2)
WEIGHTED = "weighted-sum"


class ProbeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden_units: int = Field(512, ge=1, description="Hidden layer width (MARBLE: 512).")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout after the hidden layer (MARBLE: 0.2).")
    batch_size: int = Field(64, ge=1, description="Clips per training batch (MARBLE: 64).")
    frame_batch_frames: int = Field(4096, ge=1, description="Frame-level tasks: random frames per training batch.")
    lrs: list[float] = Field(list(MARBLE_LRS), min_length=1, description="Learning-rate grid (MARBLE: 5e-5 .. 1e-2).")
    layers: Literal["all"] | list[int] = Field("all", description="Single layers to try: 'all' or a list of indices (0 = transformer input).")
    weighted_sum: bool = Field(True, description="Also try a learned softmax-weighted sum of all layers.")
    max_epochs: int = Field(50, ge=1, description="Epochs at most per probe.")
    patience: int = Field(5, ge=1, description="Early stopping: epochs without a better validation score before a probe stops.")
    monitor: Literal["auto", "metric", "loss"] = Field(
        "auto", description="What early stopping watches on validation: the primary metric, the loss, or auto (loss for frame-level tasks, whose metric needs beat tracking).")
    weight_decay: float = Field(0.0, ge=0, description="Adam L2 weight decay.")
    seed: int = Field(0, description="Seed of initialisation, batch order and dropout.")
    device: str = Field("cpu", description="Where probes train: cpu, cuda, cuda:N.")
    max_memory_gb: float = Field(4.0, gt=0, description="Features up to this size are loaded into memory; larger ones are read from the memory map per batch.")


# -- the batched grid of MLPs ----------------------------------------------------------

class ProbeGrid(torch.nn.Module):
    """``G`` independent one-hidden-layer MLP probes evaluated in one pass.

    Member ``g`` reads either layer ``member_layers[g]`` of its input or, when
    that is None, a softmax-weighted sum of all layers with learned weights.

    Args:
        member_layers: ``(G,)`` layer index or None (weighted sum).
        layer_dims: true size of each layer (inputs are zero-padded to the max).
        hidden_units, num_outputs, dropout: the MLP.
        generator: seeds the initialisation.
    """

    def __init__(self, member_layers: list[int | None], layer_dims: list[int], hidden_units: int, num_outputs: int,
                 dropout: float, generator: torch.Generator):
        super().__init__()
        g, num_layers, dim = len(member_layers), len(layer_dims), max(layer_dims)
        fixed = torch.zeros(g, num_layers)
        for i, layer in enumerate(member_layers):
            if layer is not None:
                fixed[i, layer] = 1.0
        self.register_buffer("fixed", fixed)
        self.register_buffer("weighted", torch.tensor([layer is None for layer in member_layers]))
        self.layer_logits = torch.nn.Parameter(torch.zeros(g, num_layers))

        def uniform(shape, fan_in):  # torch.nn.Linear's default initialisation, per member
            bound = 1.0 / fan_in.sqrt()
            return (torch.rand(shape, generator=generator) * 2 - 1) * bound.unsqueeze(-1).unsqueeze(-1)

        fan_in = torch.tensor([float(dim if layer is None else layer_dims[layer]) for layer in member_layers])
        self.w1 = torch.nn.Parameter(uniform((g, dim, hidden_units), fan_in))
        self.b1 = torch.nn.Parameter(uniform((g, 1, hidden_units), fan_in))
        fan_hidden = torch.full((g,), float(hidden_units))
        self.w2 = torch.nn.Parameter(uniform((g, hidden_units, num_outputs), fan_hidden))
        self.b2 = torch.nn.Parameter(uniform((g, 1, num_outputs), fan_hidden))
        self.dropout = dropout

    @property
    def num_members(self) -> int:
        return self.fixed.shape[0]

    def layer_weights(self) -> torch.Tensor:
        """``(G, L)``: one-hot rows for single-layer members, softmax for the others."""
        return torch.where(self.weighted[:, None], torch.softmax(self.layer_logits, dim=1), self.fixed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``(B, L, D)`` standardised features of every layer.

        Returns:
            ``(G, B, C)`` outputs of every member.
        """
        h = torch.einsum("gl,bld->gbd", self.layer_weights(), x)  # G, B, D
        h = torch.relu(torch.baddbmm(self.b1, h, self.w1))  # G, B, H
        h = F.dropout(h, self.dropout, self.training)
        return torch.baddbmm(self.b2, h, self.w2)  # G, B, C


class GridAdam:
    """Adam (coupled L2 weight decay, as torch.optim.Adam) with one learning
    rate per grid member: the first axis of every parameter is the member.

    Args:
        params: parameters shaped ``(G, ...)``.
        lrs: ``(G,)`` learning rates.
    """

    def __init__(self, params, lrs: torch.Tensor, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.params = list(params)
        self.lrs, self.betas, self.eps, self.weight_decay = lrs, betas, eps, weight_decay
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.steps = 0

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        """Update the members where ``active`` (``(G,)`` bool) is True."""
        self.steps += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.steps, 1 - b2 ** self.steps
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            grad = p.grad + self.weight_decay * p if self.weight_decay else p.grad
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            step_size = (self.lrs * active / c1).view((-1,) + (1,) * (p.dim() - 1))
            update = (v / c2).sqrt_().add_(self.eps)  # the denominator, reused in place as the update
            torch.div(m, update, out=update).mul_(step_size)
            p.sub_(update)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


# -- data ----------------------------------------------------------------------------------

class _Rows:
    """Standardised feature rows of one split, in memory or read from the memmap.

    Rows are clips (clip level) or frames (frame level).
    """

    def __init__(self, fs: FeatureSet, mean: np.ndarray, std: np.ndarray, max_bytes: float, device: torch.device):
        self.fs, self.device = fs, device
        self.mean, self.std = torch.from_numpy(mean), torch.from_numpy(std)
        self.num_rows = fs.features.shape[0]
        self.in_memory = fs.features.size * 4 <= max_bytes
        self.x = self._standardise(np.asarray(fs.features)).to(device) if self.in_memory else None

    def _standardise(self, block: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(np.array(block, dtype=np.float32)) - self.mean) / self.std

    def get(self, idx: np.ndarray) -> torch.Tensor:
        """``(len(idx), L, D)`` float32 on the device."""
        if self.in_memory:
            return self.x[torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(self.device)]
        order = np.argsort(idx)  # sorted reads are much faster on a memmap
        block = np.empty((len(idx),) + self.fs.features.shape[1:], dtype=np.float32)
        block[order] = self.fs.features[np.asarray(idx)[order]]
        return self._standardise(block).to(self.device)


def _standardisation(fs: FeatureSet, chunk_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per layer and dimension mean and std of the training rows ``(L, D)``;
    std 1 where a dimension is constant (zero padding, silent bins)."""
    total = np.zeros(fs.features.shape[1:])
    total_sq = np.zeros(fs.features.shape[1:])
    n = fs.features.shape[0]
    for s in range(0, n, chunk_rows):
        block = np.asarray(fs.features[s:s + chunk_rows], dtype=np.float64)
        total += block.sum(axis=0)
        total_sq += (block ** 2).sum(axis=0)
    mean = total / max(n, 1)
    var = np.maximum(total_sq / max(n, 1) - mean ** 2, 0.0)
    std = np.sqrt(var)
    std = np.where(std > 1e-8 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


# -- results --------------------------------------------------------------------------

@dataclass
class ProbeResult:
    """What one probe search found.

    Attributes:
        task, upstream: names; ``upstream_id`` the cache key.
        metric: the primary metric that selected.
        members: every grid member: layer, lr, epochs, valid and test metrics.
        per_layer: for each layer (and the weighted sum), the member with the
            best validation score: what the layer plot shows.
        best: the selected member; ``best["test"][metric]`` is the score.
    """

    task: str
    upstream: str
    upstream_id: str
    metric: str
    members: list[dict[str, Any]]
    per_layer: list[dict[str, Any]]
    best: dict[str, Any]
    layer_weights: list[float] | None = None
    seconds: float = 0.0
    features_reused: dict[str, bool] = field(default_factory=dict)

    @property
    def test_score(self) -> float:
        return float(self.best["test"][self.metric])

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("task", "upstream", "upstream_id", "metric", "best", "per_layer", "members",
                                               "layer_weights", "seconds", "features_reused")}


# -- the search -----------------------------------------------------------------------

def _resolve_layers(options: ProbeOptions, fs: FeatureSet) -> list[int]:
    num_layers = len(fs.layer_names)
    if options.layers == "all":
        return list(range(num_layers))
    bad = [i for i in options.layers if not 0 <= i < num_layers]
    if bad:
        raise BadInputError(f"probe option 'layers': {bad} out of range; this upstream has layers 0..{num_layers - 1}")
    return list(options.layers)


def _score(task: Task, outputs, examples, frame_rate_hz) -> dict[str, float]:
    scores = task.score(outputs, examples, frame_rate_hz=frame_rate_hz)
    return {k: float(v) for k, v in scores.items()}


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    g, b, c = out.shape
    return F.cross_entropy(out.reshape(g * b, c), y.repeat(g), reduction="none").view(g, b).mean(1)


def _binary_cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out, y.expand(out.shape[0], -1, -1), reduction="none").mean((1, 2))


def _squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean((1, 2))


_LOSSES = {"cross_entropy": _cross_entropy, "binary_cross_entropy": _binary_cross_entropy, "squared_error": _squared_error}
"""The probe's loss of each :attr:`ProblemType.loss <mert_core.tasks.ProblemType.loss>`: ``(G,)`` mean
loss of each grid member from outputs ``(G, B, C)`` and targets ``(B,)`` or ``(B, C)``."""


class _ProbeData:
    """A task's feature rows and targets for the three splits, on the probe's
    device, and how to score a grid's outputs on them."""

    def __init__(self, task: Task, train: FeatureSet, valid: FeatureSet, test: FeatureSet, options: ProbeOptions, device: torch.device):
        self.task, self.device = task, device
        self.frame_level = task.level == "frame"
        self.fsets = {"train": train, "valid": valid, "test": test}
        self.rate = train.frame_rate_hz
        ex_train, ex_valid, ex_test = (task.examples(s) for s in ("train", "valid", "test"))
        self.items = {"train": [ex_train[i] for i in train.index], "valid": [ex_valid[i] for i in valid.index], "test": [ex_test[i] for i in test.index]}
        mean, std = _standardisation(train)
        max_bytes = options.max_memory_gb * 2**30
        self.rows = {s: _Rows(fs, mean, std, max_bytes, device) for s, fs in self.fsets.items()}
        self.y_mean = self.y_std = None
        if self.frame_level:
            self.y_train = torch.from_numpy(self._frame_y("train", True)).to(device)
            self.y_valid_loss = torch.from_numpy(self._frame_y("valid", False)).to(device)
        else:
            y_train_np = task.targets(self.items["train"])
            if task.problem_type.standardise_targets:  # so that every lr sees the same scale
                self.y_mean, self.y_std = y_train_np.mean(axis=0), y_train_np.std(axis=0) + 1e-8
                y_train_np = (y_train_np - self.y_mean) / self.y_std
            self.y_train = torch.from_numpy(y_train_np).to(device)
            y_valid_np = task.targets(self.items["valid"])
            if self.y_mean is not None:
                y_valid_np = (y_valid_np - self.y_mean) / self.y_std
            self.y_valid_loss = torch.from_numpy(y_valid_np).to(device)

    def _frame_y(self, split: str, is_train: bool) -> np.ndarray:
        """``(frames, 1)`` frame targets of every clip of ``split``, concatenated."""
        fs = self.fsets[split]
        return np.concatenate([self.task.frame_targets(ex, int(fs.offsets[i + 1] - fs.offsets[i]), self.rate, train=is_train)
                               for i, ex in enumerate(self.items[split])])[:, None]

    def loss_per_member(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(G,)`` mean loss of each member; out ``(G, B, C)``."""
        return _LOSSES[self.task.problem_type.loss](out, y)

    @torch.no_grad()
    def predict(self, grid: ProbeGrid, split: str) -> np.ndarray:
        """``(G, rows, C)`` outputs (sigmoid for beats, de-standardised for regression)."""
        rows = self.rows[split]
        grid.eval()
        outs = []
        for s in range(0, rows.num_rows, 8192):
            idx = np.arange(s, min(s + 8192, rows.num_rows))
            outs.append(grid(rows.get(idx)).float().cpu())
        grid.train()
        out = torch.cat(outs, dim=1) if outs else torch.zeros(grid.num_members, 0, self.task.num_outputs)
        if self.task.problem_type.sigmoid_outputs:
            out = torch.sigmoid(out)
        out = out.numpy()
        if self.y_mean is not None:
            out = out * self.y_std + self.y_mean
        return out

    def valid_loss(self, out: np.ndarray) -> torch.Tensor:
        """``(G,)`` validation loss of :meth:`predict`'s ``out``."""
        with torch.no_grad():
            logits = torch.from_numpy(out).to(self.device)
            if self.task.problem_type.sigmoid_outputs:  # predict() applied the sigmoid; undo it for the loss
                logits = torch.logit(logits.clamp(1e-6, 1 - 1e-6))
            if self.y_mean is not None:
                logits = (logits - torch.from_numpy(self.y_mean).to(self.device)) / torch.from_numpy(self.y_std).to(self.device)
            return self.loss_per_member(logits, self.y_valid_loss).cpu()

    def scores(self, split: str, out: np.ndarray, member: int) -> dict[str, float]:
        """The task's metrics of one grid ``member``'s outputs on ``split``."""
        if self.frame_level:
            off = self.fsets[split].offsets
            return _score(self.task, [out[member, off[i]:off[i + 1], 0] for i in range(len(off) - 1)], self.items[split], self.rate)
        return _score(self.task, out[member], self.items[split], self.rate)

    def all_scores(self, split: str, out: np.ndarray) -> list[dict[str, float]]:
        return [self.scores(split, out, g) for g in range(out.shape[0])]


def _grid_members(options: ProbeOptions, train: FeatureSet) -> tuple[list[int | None], list[float], bool]:
    """Every (layer, lr) member of the grid: layer index (None: the weighted
    sum), learning rate, and whether the weighted sum is in the grid."""
    layers = _resolve_layers(options, train)
    dims = train.layer_dims
    member_layers: list[int | None] = [l for l in layers for _ in options.lrs]
    member_lrs = [lr for _ in layers for lr in options.lrs]
    use_weighted = options.weighted_sum and len(set(dims)) == 1 and len(dims) > 1
    if use_weighted:
        member_layers += [None] * len(options.lrs)
        member_lrs += list(options.lrs)
    return member_layers, member_lrs, use_weighted


def _train_grid(grid: ProbeGrid, adam: GridAdam, data: _ProbeData, options: ProbeOptions, monitor: str,
                gen: torch.Generator, desc: str, progress: bool) -> tuple[torch.Tensor, int]:
    """Train every member with early stopping on the validation split and
    leave ``grid`` at each member's best weights.

    Returns:
        ``(G,)`` each member's best epoch, and the number of epochs run.
    """
    num_members, device = grid.num_members, data.device
    best_state = {k: v.detach().clone() for k, v in grid.state_dict().items()}
    best_valid = torch.full((num_members,), -math.inf)
    best_epoch = torch.zeros(num_members, dtype=torch.long)
    active = torch.ones(num_members, dtype=torch.bool)
    stale = torch.zeros(num_members, dtype=torch.long)
    batch = options.frame_batch_frames if data.frame_level else options.batch_size
    n_train = data.rows["train"].num_rows

    bar = tqdm(total=options.max_epochs, desc=desc, unit="epoch", disable=not progress, leave=False)
    epoch = 0
    for epoch in range(1, options.max_epochs + 1):
        grid.train()
        perm = torch.randperm(n_train, generator=gen).numpy()
        for s in range(0, n_train, batch):
            idx = perm[s:s + batch]
            loss = data.loss_per_member(grid(data.rows["train"].get(idx)), data.y_train[torch.from_numpy(idx).to(device)]).sum()
            adam.zero_grad()
            loss.backward()
            adam.step(active.to(device))
        # Validation: a higher value is better (the loss enters negated).
        out = data.predict(grid, "valid")
        if monitor == "metric":
            current = torch.tensor([_finite(s[data.task.primary_metric]) for s in data.all_scores("valid", out)])
        else:
            current = -data.valid_loss(out)
        improved = active & (current > best_valid)
        best_valid = torch.where(improved, current, best_valid)
        best_epoch[improved] = epoch
        stale = torch.where(improved, torch.zeros_like(stale), stale + active.long())
        if improved.any():
            sel = improved.to(device)
            for k, v in grid.state_dict().items():
                if v.dim() and v.shape[0] == num_members:
                    best_state[k][sel] = v[sel].detach()
        active &= stale < options.patience
        bar.update(1)
        bar.set_postfix(active=int(active.sum()), best=f"{best_valid.max().item():.4g}")
        if not active.any():
            break
    bar.close()
    grid.load_state_dict(best_state)
    return best_epoch, epoch


def probe(task: Task, train: FeatureSet, valid: FeatureSet, test: FeatureSet, options: ProbeOptions | None = None,
          progress: bool = True, upstream_name: str = "", upstream_id: str = "") -> ProbeResult:
    """Run the MARBLE probe search on extracted features.

    Args:
        task: the task the features were extracted for.
        train, valid, test: :func:`mert_core.evaluation.extract.extract` outputs.
        options: grid, epochs, early stopping, device.

    Returns:
        a :class:`ProbeResult`; ``result.test_score`` is the number to report.
    """
    options = options or ProbeOptions()
    started = time.time()
    device = torch.device(options.device)
    frame_level = task.level == "frame"
    if frame_level and (task.problem not in PROBLEMS or PROBLEMS[task.problem].level != "frame"):
        raise ValueError(f"task {task.name!r}: frame-level probing supports problem 'beat' only, got {task.problem!r}")
    member_layers, member_lrs, use_weighted = _grid_members(options, train)
    names = [WEIGHTED if l is None else train.layer_names[l] for l in member_layers]
    num_members = len(member_layers)
    monitor = options.monitor if options.monitor != "auto" else ("loss" if frame_level else "metric")

    gen = torch.Generator().manual_seed(options.seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(options.seed)  # dropout masks; restored at the end
    data = _ProbeData(task, train, valid, test, options, device)
    grid = ProbeGrid(member_layers, train.layer_dims, options.hidden_units, task.num_outputs, options.dropout, gen).to(device)
    adam = GridAdam(grid.parameters(), torch.tensor(member_lrs, dtype=torch.float32, device=device), weight_decay=options.weight_decay)
    best_epoch, epochs = _train_grid(grid, adam, data, options, monitor, gen,
                                     f"probe {upstream_name or '?'} {task.name} ({num_members} probes)", progress)

    # Select on validation; the test split is scored only for the members a
    # result reports (the best lr of each layer), never used to choose.
    valid_scores = data.all_scores("valid", data.predict(grid, "valid"))
    primary = task.primary_metric
    members = [{"layer": names[g], "layer_index": member_layers[g], "lr": member_lrs[g], "best_epoch": int(best_epoch[g]),
                "valid": valid_scores[g], "test": None} for g in range(num_members)]
    chosen = []
    for name in dict.fromkeys(names):
        group = [g for g in range(num_members) if names[g] == name]
        chosen.append(max(group, key=lambda g: _finite(valid_scores[g][primary])))
    test_out = data.predict(grid, "test")
    for g in chosen:
        members[g]["test"] = data.scores("test", test_out, g)
    per_layer = [members[g] for g in chosen]
    best = max(per_layer, key=lambda m: _finite(m["valid"][primary]))
    weights = None
    if use_weighted:
        g_weighted = next(g for g in chosen if names[g] == WEIGHTED)  # the weighted sum with the best lr
        weights = [float(w) for w in grid.layer_weights()[g_weighted].detach().cpu()]
    torch.random.set_rng_state(torch_state)
    result = ProbeResult(task=task.name, upstream=upstream_name, upstream_id=upstream_id, metric=primary, members=members,
                         per_layer=per_layer, best=best, layer_weights=weights, seconds=round(time.time() - started, 2),
                         features_reused={s: fs.reused for s, fs in data.fsets.items()})
    log.info("%s on %s: best %s lr=%g valid %s=%.4f test %s=%.4f (%d probes, %d epochs, %.1fs)", upstream_name, task.name,
             best["layer"], best["lr"], primary, best["valid"][primary], primary, best["test"][primary], num_members, epochs, result.seconds)
    return result
