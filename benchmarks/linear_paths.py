"""What one linear of a SmolLM2 pass costs on each CPU path, per shape and row count (lkspec.cpu_paths).

    python benchmarks/linear_paths.py

The weights are not in any cache in a real pass (540 MB stream through per token), so each shape is timed
over as many distinct copies as the model has (60 q/o, 60 k/v, 60 gate/up, 30 down projections, one
lm_head), cycled. Prints ms per product for `F.linear` (MKL), `W @ x.T` over an even row count
(`small_rows_linear`) and oneDNN over the reordered weight (`onednn_linear`), side by side in one process:
the data behind `ONEDNN_MIN_ROWS`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lkspec.cpu_paths import mark_for_onednn, onednn_linear, small_rows_linear

SHAPES = {"q/o 576x576": (576, 576, 60), "k/v 192x576": (192, 576, 60), "gate/up 1536x576": (1536, 576, 60),
          "down 576x1536": (576, 1536, 30), "lm_head 49152x576": (49152, 576, 1)}


def per_product_ms(fn: Callable[..., torch.Tensor | None], x: torch.Tensor, weights: list[torch.Tensor],
                   reps: int) -> float:
    for w in weights:  # warm-up (and the oneDNN copies)
        fn(x, w)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for w in weights:
            fn(x, w)
        times.append((time.perf_counter() - t0) / len(weights))
    return 1e3 * statistics.median(times)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,3,4,7")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    paths = {"F.linear": torch.nn.functional.linear, "W @ x.T": small_rows_linear, "oneDNN": onednn_linear}
    gen = torch.Generator().manual_seed(0)
    print(f"{'shape':20s} {'rows':>4s} " + " ".join(f"{p:>9s}" for p in paths) + "   (ms per product)")
    for name, (out_dim, in_dim, copies) in SHAPES.items():
        weights = [torch.randn(out_dim, in_dim, generator=gen) for _ in range(copies)]
        for w in weights:
            mark_for_onednn(w)
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, in_dim, generator=gen)
            ms = [per_product_ms(fn, x, weights, args.reps) for fn in paths.values()]
            print(f"{name:20s} {m:4d} " + " ".join(f"{v:9.3f}" for v in ms), flush=True)


if __name__ == "__main__":
    main()
