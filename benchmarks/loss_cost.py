"""Cost of every loss: fwd+bwd time relative to `kl`, peak memory of chunked vs reference, and the fused twin.

    python benchmarks/loss_cost.py                       # V = 128256, N = 2048 (Llama-3 vocab)
    python benchmarks/loss_cost.py --tokens 512 --vocab 49152 --repeats 3

Times are the fastest of the repeats (the work of a repeat is identical; the minimum filters out
interference from page faults and other processes), measured side by side in one process and printed
as ratios to `kl` of the same implementation. Every loss runs the same fused (KL, alpha) kernel
forward and backward; only the few [N]-sized combining operations differ.
Peak memory is what one lk_hybrid fwd+bwd allocates beyond its inputs (the [N, V] gradient it returns
included): on CPU the growth of the resident set in a fresh subprocess, sampled every
millisecond, with glibc told to mmap large blocks so freed memory is not counted; on CUDA the growth of
`max_memory_allocated`.
Targets (issue 2): lk_hybrid <= 1.05x kl time; chunked peak <= 0.25x reference. `fused` (the chunked
arithmetic compiled by torch.compile) is timed beside them after its one-time compile.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

import torch

from lkspec.losses import LOSSES, combine, token_stats


def _inputs(n: int, v: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(n, v, generator=g).to(device).requires_grad_(True)
    zp = (torch.randn(n, v, generator=g) * 2).to(device)
    return z, zp


def _step(name: str, impl: str, z: torch.Tensor, zp: torch.Tensor, lse: torch.Tensor | None = None) -> None:
    kl, alpha = token_stats(z, zp, 1.0, impl, target_lse=lse)
    chain = torch.ones_like(alpha) if LOSSES[name].chain else None  # lk_tau's weights: any will do for timing
    combine(name, kl, alpha, eta=3.0, chain=chain).backward()
    z.grad = None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_all(n: int, v: int, device: str, repeats: int, impls: list[str],
             truncated: bool = False) -> dict[str, dict[str, float]]:
    z, zp = _inputs(n, v, device)
    # a truncated draft vocabulary's step: the V columns are the kept ones, the normaliser is the full vocabulary's
    lse = torch.logsumexp(zp, -1) + 0.5 if truncated else None
    times: dict[str, dict[str, list[float]]] = {i: {name: [] for name in LOSSES} for i in impls}
    for impl in impls:
        _step("kl", impl, z, zp, lse)  # warm-up
    for r in range(repeats):
        names = list(LOSSES)
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: no loss always first
        for impl in impls:
            for name in order:
                _sync(device)
                t0 = time.perf_counter()
                _step(name, impl, z, zp, lse)
                _sync(device)
                times[impl][name].append(time.perf_counter() - t0)
    return {i: {name: min(ts) for name, ts in d.items()} for i, d in times.items()}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_child(n: int, v: int, impl: str) -> None:
    """Run in a fresh process: print the peak resident-set growth (bytes) of one lk_hybrid fwd+bwd,
    sampled every millisecond above the resident inputs (the gradient output counts)."""
    z, zp = _inputs(n, v, "cpu")
    if impl == "fused":  # compile first: the compiler's own memory is not the loss's
        token_stats(torch.randn(4, 32), torch.randn(4, 32), 1.0, impl)
    base = _rss_bytes()
    peak = base
    done = threading.Event()

    def sampler() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.001)

    th = threading.Thread(target=sampler)
    th.start()
    kl, alpha = token_stats(z, zp, 1.0, impl)
    combine("lk_hybrid", kl, alpha, eta=3.0).backward()
    done.set()
    th.join()
    print(max(peak, _rss_bytes()) - base)


def peak_memory(n: int, v: int, device: str, impl: str) -> float:
    if device.startswith("cuda"):
        z, zp = _inputs(n, v, device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step("lk_hybrid", impl, z, zp)
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    # glibc keeps freed heap chunks resident, which would count allocator slack as loss memory; with every
    # allocation >= 1 MiB served by mmap (returned to the OS on free) the resident set tracks live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, __file__, "--child", impl, "--tokens", str(n), "--vocab", str(v)],
                         check=True, capture_output=True, text=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--truncated", action="store_true", help="time the truncated-vocabulary form (p's normaliser "
                    "over a larger vocabulary than the V columns: the demo's 8192-token drafts)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        peak_child(args.tokens, args.vocab, args.child)
        return
    impls = ["chunked", "reference", "fused"]
    print(f"loss cost at N = {args.tokens} tokens, V = {args.vocab}{' (truncated)' if args.truncated else ''}, "
          f"device {args.device}, "
          f"{args.repeats} repeats (fastest), torch {torch.__version__}, {torch.get_num_threads()} threads")
    times = time_all(args.tokens, args.vocab, args.device, args.repeats, impls, args.truncated)
    print(f"\n{'loss':<16}" + "".join(f"{i + ' s':>14}{i + ' /kl':>14}" for i in impls))
    for name in LOSSES:
        row = "".join(f"{times[i][name]:>14.3f}{times[i][name] / times[i]['kl']:>14.3f}" for i in impls)
        print(f"{name:<16}{row}")
    speed = times["reference"]["kl"] / times["chunked"]["kl"]
    print(f"\nchunked kl is {speed:.2f}x the speed of reference kl")
    for name in ("kl", "lk_hybrid"):
        print(f"fused {name} is {times['chunked'][name] / times['fused'][name]:.2f}x the speed of chunked {name}")
    peaks = {i: peak_memory(args.tokens, args.vocab, args.device, i) for i in impls}
    nv = args.tokens * args.vocab * 4
    for i in impls:
        print(f"peak memory {i:<10} {peaks[i] / 2**20:>9.0f} MiB  ({peaks[i] / nv:.2f} x one [N, V] fp32 tensor)")
    ratio = peaks["chunked"] / peaks["reference"]
    hybrid = times["chunked"]["lk_hybrid"] / times["chunked"]["kl"]
    print(f"chunked / reference peak: {ratio:.3f}  (target <= 0.25)")
    print(f"lk_hybrid / kl time (chunked): {hybrid:.3f}  (target <= 1.05)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": args.tokens, "vocab": args.vocab, "device": args.device, "times": times,
                       "peak_bytes": peaks}, f, indent=2)


if __name__ == "__main__":
    main()
