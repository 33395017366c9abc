"""The unbiased pass@k estimator of Chen et al. (2021), "Evaluating Large Language Models
Trained on Code": pass@k = 1 - C(n-c, k) / C(n, k), computed as a numerically stable product.

    from nanochat_trainer.eval.passk import pass_at_k, mean_pass_at_k
    pass_at_k(n=10, c=3, k=1)   # 0.3
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn (without replacement) from n, of which
    c are correct, is correct. 1 - prod_{i=n-c+1}^{n} (1 - k/i), which avoids huge binomials."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(counts: Iterable[tuple[int, int]], ks: Sequence[int]) -> dict[int, float]:
    """Mean pass@k over problems, each given as (n samples, c correct), for every k <= min n."""
    counts = list(counts)
    if not counts:
        raise ValueError("no problems to score")
    min_n = min(n for n, _ in counts)
    out: dict[int, float] = {}
    for k in ks:
        if k > min_n:
            raise ValueError(f"pass@{k} needs at least {k} samples per problem, have {min_n}")
        out[k] = sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
    return out
