"""Forward+backward time of the batched soft-DTW (docs/algorithms.md#soft-dtw), against the
reference's CPU loops (docs/reference-bugs.md#lav-regulariser-constant-pull,
docs/reference-bugs.md#cpu-bound-reference-loops).

    PYTHONPATH=. python benchmarks/bench_softdtw.py --device cpu
    PYTHONPATH=. python benchmarks/bench_softdtw.py --device cuda --json

For P = 2 and 8 pairs of N x N random costs (gamma 0.1): the torch wavefront (``backend="torch"``)
and, on CUDA, the Triton kernel (``backend="triton"``), against a straightforward per-cell Python
loop (forward recursion + backward E recursion, float64, one pair at a time, on the CPU: the
reference's numba code without numba), run only for N = 64 and 128. Nothing is extrapolated.
``--lav`` adds the whole LAV loss (``lav_loss_batch``, forward+backward, D = 128, T = 128) for
B = 2 and 8 videos (P = B(B-1) ordered pairs; the kernel on CUDA). Prints a table, or JSON with
``--json``.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from bench_models import timed

from alignprog.losses.lav import lav_loss_batch
from alignprog.losses.softdtw import soft_dtw


def loop_soft_dtw_grad(c: list[list[float]], gamma: float) -> tuple[float, list[list[float]]]:
    """Value and dR/dC of one pair, cell by cell in plain Python floats."""
    n, m = len(c), len(c[0])
    inf = math.inf
    r = [[inf] * (m + 2) for _ in range(n + 2)]
    r[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            a, b, d = r[i - 1][j - 1], r[i - 1][j], r[i][j - 1]
            lo = min(a, b, d)
            s = math.exp((lo - a) / gamma) + math.exp((lo - b) / gamma) \
                + math.exp((lo - d) / gamma)
            r[i][j] = c[i - 1][j - 1] + lo - gamma * math.log(s)
    # Backward (Cuturi & Blondel, Algorithm 2) with R borders -inf past the end.
    cc = [[0.0] * (m + 2) for _ in range(n + 2)]
    for i in range(n):
        cc[i + 1][1:m + 1] = c[i]
    for i in range(1, n + 1):
        r[i][m + 1] = -inf
    for j in range(1, m + 1):
        r[n + 1][j] = -inf
    r[n + 1][m + 1] = r[n][m]
    e = [[0.0] * (m + 2) for _ in range(n + 2)]
    e[n + 1][m + 1] = 1.0
    for i in range(n, 0, -1):
        for j in range(m, 0, -1):
            wa = math.exp((r[i + 1][j] - r[i][j] - cc[i + 1][j]) / gamma)
            wb = math.exp((r[i][j + 1] - r[i][j] - cc[i][j + 1]) / gamma)
            wc = math.exp((r[i + 1][j + 1] - r[i][j] - cc[i + 1][j + 1]) / gamma)
            e[i][j] = e[i + 1][j] * wa + e[i][j + 1] * wb + e[i + 1][j + 1] * wc
    return r[n][m], [row[1:m + 1] for row in e[1:n + 1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="*", default=None,
                        help="N = M values (default 128 512 2048 on CUDA, 128 512 on CPU)")
    parser.add_argument("--pairs", type=int, nargs="*", default=[2, 8])
    parser.add_argument("--loop-sizes", type=int, nargs="*", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gamma", type=float, default=0.1)
    parser.add_argument("--lav", action="store_true", help="also time the whole LAV loss")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = args.sizes or ([128, 512, 2048] if device.type == "cuda" else [128, 512])
    sizes = sorted(set(sizes) | set(args.loop_sizes))
    backends = ["torch"] + (["triton"] if device.type == "cuda" else [])

    rows = []
    for p in args.pairs:
        for n in sizes:
            gen = torch.Generator().manual_seed(0)
            cost = (torch.rand(p, n, n, generator=gen) * 2).to(device)
            for backend in backends:
                c = cost.clone().requires_grad_(True)

                def fwd_bwd():
                    soft_dtw(c, None, None, args.gamma, backend=backend).sum().backward()

                def fwd():
                    with torch.no_grad():
                        soft_dtw(c, None, None, args.gamma, backend=backend)

                rows.append({"device": str(device), "method": f"{backend}", "pairs": p, "n": n,
                             "fwd_bwd_ms": 1e3 * timed(fwd_bwd, device, args.repeats),
                             "fwd_ms": 1e3 * timed(fwd, device, args.repeats)})
            if n in args.loop_sizes:
                lists = cost.double().cpu().tolist()
                seconds = timed(lambda: [loop_soft_dtw_grad(c, args.gamma) for c in lists],
                                torch.device("cpu"), 1, warmup=0)
                rows.append({"device": "cpu", "method": "python loop (float64)", "pairs": p,
                             "n": n, "fwd_bwd_ms": 1e3 * seconds, "fwd_ms": None})

    if args.lav:
        for b in (2, 8):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(b, 128, 128, generator=gen).to(device).requires_grad_(True)
            mask = torch.ones(b, 128, dtype=torch.bool, device=device)

            def lav_step():
                lav_loss_batch(x, mask).backward()

            # soft_dtw's automatic choice: the kernel on CUDA, the torch path on the CPU.
            rows.append({"device": str(device), "method": f"lav_loss_batch B={b}",
                         "pairs": b * (b - 1), "n": 128,
                         "fwd_bwd_ms": 1e3 * timed(lav_step, device, args.repeats),
                         "fwd_ms": None})

    if args.json:
        print(json.dumps({"gamma": args.gamma, "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name(device)
                          if device.type == "cuda" else None, "rows": rows}, indent=1))
        return
    print(f"soft-DTW, gamma {args.gamma}, N = M, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    print(f"{'method':<24}{'device':<8}{'P':>4}{'N':>7}{'fwd+bwd ms':>14}{'fwd ms':>12}")
    for row in rows:
        fwd = "-" if row["fwd_ms"] is None else f"{row['fwd_ms']:.2f}"
        print(f"{row['method']:<24}{row['device']:<8}{row['pairs']:>4}{row['n']:>7}"
              f"{row['fwd_bwd_ms']:>14.2f}{fwd:>12}")


if __name__ == "__main__":
    main()
