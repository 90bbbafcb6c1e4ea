"""Hessian-vector products spent by ``hessian_eigenvalues(k=2)`` on the demo MLP, and its wall
time in units of one product: ``python -m benchmarks.curvature``.

Target: at most 20 products' worth of time per eigenvalue (issue 13).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from landscapes.curvature import _objective, hessian_eigenvalues
from pipelines.demo import DemoMLP, load_digits_tensors


def main(repeats: int = 10) -> dict[str, float]:
    torch.manual_seed(0)
    x, y = load_digits_tensors()
    model = DemoMLP().eval()
    loss = nn.CrossEntropyLoss()
    out: dict[str, float] = {"num_parameters": float(sum(p.numel() for p in model.parameters()))}
    for method in ("func", "double_backward"):
        obj = _objective(model, loss, (x, y), "benchmark", hvp=method)
        with obj.session():
            v = torch.randn(obj.n, dtype=torch.float64)
            obj.hvp(v)  # warm
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                obj.hvp(v)
                times.append(time.perf_counter() - start)
            out[f"hvp_ms_{method}"] = min(times) * 1e3  # the machine may be shared: best of n
    one = min(out["hvp_ms_func"], out["hvp_ms_double_backward"]) / 1e3
    print(f"demo MLP, digits 1797 samples, n={int(out['num_parameters'])} parameters, {torch.get_num_threads()} threads")
    print(f"one HVP: torch.func {out['hvp_ms_func']:.2f} ms, double backward {out['hvp_ms_double_backward']:.2f} ms")
    for tol in (1e-6, 1e-4):
        walls = []
        for _ in range(3):
            start = time.perf_counter()
            res = hessian_eigenvalues(model, loss, (x, y), k=2, tol=tol)
            walls.append(time.perf_counter() - start)
        wall = min(walls)
        out[f"eig_hvps_tol{tol:g}"] = float(res.hvps)
        out[f"per_eigenvalue_tol{tol:g}"] = wall / one / 2
        print(f"hessian_eigenvalues(k=2, tol={tol:g}): {res.hvps} HVPs, {wall * 1e3:.0f} ms = "
              f"{wall / one:.1f} HVPs' time ({wall / one / 2:.1f} per eigenvalue; target ≤ 20), "
              f"method {res.info['hvp_method']}, converged={res.converged}, "
              f"λ = {[round(v, 6) for v in res.eigenvalues.tolist()]}")
    return out


if __name__ == "__main__":
    main()
