"""The batched probe grid against the reference: one torch MLP + torch.optim.Adam
per (layer, lr), trained one after the other on the same batches.

Prints seconds for both and their ratio (measured in the same run).

    python benchmarks/bench_probe_grid.py [--layers 13] [--dim 768] [--epochs 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from mert_core.evaluation.probe import MARBLE_LRS, GridAdam, ProbeGrid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--items", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    dev = torch.device(a.device)
    x = torch.randn(a.items, a.layers, a.dim, device=dev)
    y = torch.randint(0, a.classes, (a.items,), device=dev)
    members = [(layer, lr) for layer in range(a.layers) for lr in MARBLE_LRS]
    batches = [torch.randperm(a.items, device=dev)[s:s + 64] for _ in range(a.epochs) for s in range(0, a.items, 64)]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # Reference: one MLP at a time.
    sync()
    t0 = time.perf_counter()
    for layer, lr in members:
        mlp = torch.nn.Sequential(torch.nn.Linear(a.dim, 512), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(512, a.classes)).to(dev)
        opt = torch.optim.Adam(mlp.parameters(), lr=lr)
        for idx in batches:
            loss = F.cross_entropy(mlp(x[idx, layer]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    sync()
    reference = time.perf_counter() - t0

    # The grid: every member in one pass per batch.
    sync()
    t0 = time.perf_counter()
    grid = ProbeGrid([m[0] for m in members], [a.dim] * a.layers, 512, a.classes, 0.2, torch.Generator().manual_seed(0)).to(dev)
    adam = GridAdam(grid.parameters(), torch.tensor([m[1] for m in members], device=dev))
    active = torch.ones(len(members), dtype=torch.bool, device=dev)
    for idx in batches:
        out = grid(x[idx])  # G, B, C
        g, b, c = out.shape
        loss = F.cross_entropy(out.reshape(g * b, c), y[idx].repeat(g))  # mean over members: same gradients up to 1/G
        adam.zero_grad()
        (loss * g).backward()
        adam.step(active)
    sync()
    batched = time.perf_counter() - t0
    print(f"{len(members)} probes ({a.layers} layers x {len(MARBLE_LRS)} lrs), {len(batches)} steps, dim {a.dim}, device {dev}")
    print(f"one by one (reference): {reference:.2f} s")
    print(f"batched grid:           {batched:.2f} s")
    print(f"speed-up: {reference / batched:.2f}x")


if __name__ == "__main__":
    main()
