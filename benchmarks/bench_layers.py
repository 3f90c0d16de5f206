"""Forward+backward time of each lightning_norm layer relative to ``nn.BatchNorm2d``.

Runs every layer side by side on one input (default ``(64, 64, 32, 32)``, float32, training
mode), interleaving the layers round by round so load changes on a shared machine hit them all
alike, and prints, for each, the fastest wall-clock round and the median CPU time of the process
(``time.process_time``, all threads; on a shared machine it counts the work done rather than the
waiting) with their ratios to BatchNorm2d, in eager mode and (where it works on this machine)
under ``torch.compile``.

Usage::

    python benchmarks/bench_layers.py [--shape 64 64 32 32] [--rounds 15] [--threads N]
        [--no-compile] [--noise-draws]

``--noise-draws`` adds NoisyBatchNorm's noise alone, drawn several exact ways side by side
(Algorithm 1: ``m ~ U(mu_c - r_mu, mu_c + r_mu)``, ``s ~ N(sigma_c, r_sigma)`` per element).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch
from torch import nn

from lightning_norm.layers import available_norms, create_norm

#: Every registered layer but "none" and "lp" (which is "lp2" with a free ``p``).
LAYERS = [name for name in available_norms() if name not in ("none", "lp")]


def build(shape: tuple[int, ...]) -> dict[str, nn.Module]:
    c = shape[1]
    out = {"BatchNorm2d": nn.BatchNorm2d(c)}
    src = nn.BatchNorm2d(c)
    for name in LAYERS:
        out[name] = create_norm(name, c, source=src).train()
    return out


def step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    x.grad = None
    y = module(x)
    if y.requires_grad:
        y.backward(grad)


def run(
    modules: dict[str, nn.Module], shape, rounds: int, warmup: int = 3
) -> dict[str, list[tuple[float, float]]]:
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    for m in modules.values():
        for _ in range(warmup):
            step(m, x, grad)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in modules}
    for _ in range(rounds):
        for name, m in modules.items():
            w0, c0 = time.perf_counter(), time.process_time()
            step(m, x, grad)
            times[name].append((time.perf_counter() - w0, time.process_time() - c0))
    return times


def noise_draws(shape: tuple[int, ...], r_mu: float = 0.1, r_sigma: float = 0.1) -> dict:
    """Ways to draw Algorithm 1's full-size ``m`` and ``s`` with the exact distribution."""
    g = torch.Generator().manual_seed(0)
    c = shape[1]
    mu = torch.rand(c, generator=g).view(1, c, *([1] * (len(shape) - 2)))
    sigma = mu + 1

    def in_place_now():  # what NoisyBatchNorm does
        m = torch.empty(shape).uniform_(-r_mu, r_mu, generator=g).add_(mu)
        s = torch.empty(shape).normal_(0.0, r_sigma, generator=g).add_(sigma)
        return m, s

    def rand_2n_floor():  # the floor of any 2N-uniform scheme: the draws alone
        return torch.empty((2, *shape)).uniform_(generator=g)

    def rand_erfinv():  # one call, the normal half by the inverse CDF
        u = torch.empty((2, *shape)).uniform_(-1.0, 1.0, generator=g)
        return u[0].mul_(r_mu).add_(mu), u[1].erfinv_().mul_(r_sigma * math.sqrt(2)).add_(sigma)

    def rand_box_muller():  # one call, the normal half by Box-Muller (two normals per pair)
        u = torch.empty((2, *shape)).uniform_(generator=g)
        m = u[0].mul_(2 * r_mu).sub_(r_mu).add_(mu)
        half = u[1].view(2, -1)
        radius = torch.log1p(-half[0]).mul_(-2.0).sqrt_().mul_(r_sigma)
        angle = half[1].mul_(2 * math.pi)
        half[0] = radius * torch.cos(angle)
        half[1] = radius.mul_(torch.sin(angle))
        return m, u[1].add_(sigma)

    def uniform_alone():
        return torch.empty(shape).uniform_(generator=g)

    def normal_alone():
        return torch.empty(shape).normal_(generator=g)

    ways = (in_place_now, rand_2n_floor, rand_erfinv, rand_box_muller)
    return {f.__name__: f for f in (*ways, uniform_alone, normal_alone)}


def run_draws(draws: dict, rounds: int) -> dict[str, list[tuple[float, float]]]:
    for f in draws.values():
        f()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in draws}
    for _ in range(rounds):
        for name, f in draws.items():
            w0, c0 = time.perf_counter(), time.process_time()
            f()
            times[name].append((time.perf_counter() - w0, time.process_time() - c0))
    return times


def report(title: str, times: dict[str, list[tuple[float, float]]]) -> None:
    wall = {k: min(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    print(f"\n{title}")
    print(f"{'layer':<16}{'wall min ms':>12}{'x BN2d':>9}{'CPU median ms':>15}{'x BN2d':>9}")
    for name in times:
        print(
            f"{name:<16}{wall[name] * 1e3:>12.2f}{wall[name] / wall['BatchNorm2d']:>9.2f}"
            f"{cpu[name] * 1e3:>15.2f}{cpu[name] / cpu['BatchNorm2d']:>9.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[64, 64, 32, 32])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--noise-draws", action="store_true", help="time the noise draws alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, input {shape} float32, train mode, fwd+bwd"
    )
    modules = build(shape)
    eager = run(modules, shape, args.rounds)
    report("eager", eager)
    if args.noise_draws:
        draws = run_draws(noise_draws(shape), args.rounds)
        report(
            "noise draws alone (x BN2d fwd+bwd above)",
            {"BatchNorm2d": eager["BatchNorm2d"]} | draws,
        )
    if args.no_compile:
        return
    compiled = {}
    for name, m in modules.items():
        try:
            cm = torch.compile(m)
            step(cm, torch.randn(shape, requires_grad=True), torch.randn(shape))
            compiled[name] = cm
        except Exception as exc:
            print(
                f"torch.compile unavailable for {name}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:120]}"
            )
            if name == "BatchNorm2d":
                return
    report("torch.compile", run(compiled, shape, args.rounds))


if __name__ == "__main__":
    main()
