"""Unbiased pass@k (Chen et al. 2021): the chance that at least one of k samples,
drawn without replacement from n generated samples of which c are correct, passes."""

from __future__ import annotations

import math


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: list[tuple[int, int]], ks=(1, 10, 100)) -> dict[str, float]:
    """Benchmark pass@k over tasks, for every k that every task has enough samples for.

    `counts` holds one (n samples, c correct) pair per task."""
    if not counts:
        return {}
    smallest = min(n for n, _ in counts)
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
            for k in ks if k <= smallest}
