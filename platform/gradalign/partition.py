"""Split a training set over clients.

Every scheme returns one sorted int64 index array per client; the arrays are disjoint. `iid`, `sorted` and
the two Dirichlet schemes cover every example; `one_class` with fewer clients than classes leaves the other classes
out (each client must hold exactly one class); `natural` returns the given split. All schemes are deterministic given
`seed`, and impossible requests (a client that would end up empty, more clients than examples, ...) raise a
ValueError that names the problem instead of silently producing an empty client, which would only surface later
as a division by zero or a NaN loss.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradalign.config import PARTITIONS

DIRICHLET_MAX_TRIES = 100
"""How often `dirichlet` redraws the class proportions before it gives up on giving every client an example."""


def partition(
    labels: Any,
    num_clients: int,
    scheme: str,
    alpha: float = 0.5,
    iid_fraction: float = 0.0,
    seed: int = 0,
    natural: Sequence[Any] | None = None,
) -> list[np.ndarray]:
    """Split the examples with the given `labels` (array-like of ints, numpy or torch) over `num_clients` clients.

    Schemes (`gradalign.config.PARTITIONS`):

    - ``iid``: shuffle, then cut into near-equal pieces (sizes differ by at most one).
    - ``dirichlet``: the label-skew split of Hsu et al. (2019) that the FL literature means: every client gets
      the same number of examples (sizes differ by at most one) and its label mix q_i ~ Dir(alpha * p), p the
      global label distribution; smaller alpha means more label skew (alpha -> inf: iid). Clients are filled in
      turn, drawing without replacement; a class that runs out is dropped from the later clients' mixes (their
      q_i renormalised over the classes left), so the split covers every example.
    - ``dirichlet_by_class``: for every class, the shares of the clients are drawn from Dir(alpha): label skew AND
      strong quantity skew (client sizes can differ a hundredfold). Redrawn (up to DIRICHLET_MAX_TRIES times)
      until every client holds at least one example.
    - ``sorted``: the split of the GradAlign paper: a fraction `iid_fraction` of the data is spread iid, the rest is
      sorted by label and cut into equal contiguous pieces, one per client (iid_fraction=0: each client sees only
      one or two classes; 1: iid).
    - ``one_class``: every client holds examples of exactly one class. With num_clients <= C (classes present in
      `labels`, in increasing order) client k holds all examples of the k-th class and the remaining classes are
      left out; with more clients than classes, client k holds class k mod C and the examples of each class are
      split near-equally (after shuffling) over the clients that share it.
    - ``natural``: the split the data came with (`natural`, e.g. `Dataset.natural_partition` of `synthetic`).
    """
    y = _as_labels(labels)
    n = len(y)
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients={num_clients!r}: must be an integer >= 1")
    num_clients = int(num_clients)
    if scheme not in PARTITIONS:
        raise ValueError(f"unknown partition scheme {scheme!r}; valid schemes: {', '.join(PARTITIONS)}")
    if scheme == "natural":
        return _natural(natural, num_clients, n)
    if num_clients > n:
        raise ValueError(
            f"num_clients={num_clients} exceeds the number of examples ({n}): some client would hold no data"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif scheme == "dirichlet":
        parts = _dirichlet_label_mix(y, num_clients, alpha, rng)
    elif scheme == "dirichlet_by_class":
        parts = _dirichlet_by_class(y, num_clients, alpha, rng)
    elif scheme == "sorted":
        parts = _sorted(y, num_clients, iid_fraction, rng)
    else:
        parts = _one_class(y, num_clients, rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_labels(labels: Any) -> np.ndarray:
    if hasattr(labels, "detach"):  # a torch tensor, without importing torch here
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {y.shape}")
    if len(y) == 0:
        raise ValueError("labels is empty: there is nothing to partition")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError(f"labels must be integers, got dtype {y.dtype}")
        y = y.astype(np.int64)
    return y


def _check_alpha(alpha: Any) -> None:
    if not (_is_real(alpha) and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha={alpha!r}: the Dirichlet concentration must be a finite number > 0")


def _dirichlet_label_mix(y: np.ndarray, m: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    _check_alpha(alpha)
    classes, counts = np.unique(y, return_counts=True)
    pools = [list(rng.permutation(np.flatnonzero(y == c))) for c in classes]
    left = counts.astype(np.int64)
    prior = counts / counts.sum()
    sizes = [len(p) for p in np.array_split(np.arange(len(y)), m)]
    parts = []
    for size in sizes:
        mix = rng.dirichlet(np.maximum(alpha * prior, 1e-300))
        take = np.zeros(len(classes), dtype=np.int64)
        need = size
        while need > 0:  # draw the client's labels; classes that ran out leave the mix
            weights = np.where(left - take > 0, mix, 0.0)
            if weights.sum() <= 0:  # the mix has no mass left on the classes left: fill in proportion to supply
                weights = (left - take).astype(float)
            draw = rng.multinomial(need, weights / weights.sum())
            draw = np.minimum(draw, left - take)
            take += draw
            need -= int(draw.sum())
        parts.append(
            np.concatenate(
                [[pools[j].pop() for _ in range(int(take[j]))] for j in range(len(classes))]
                + [np.empty(0, dtype=np.int64)]
            )
        )
        left -= take
    return parts


def _dirichlet_by_class(y: np.ndarray, m: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    _check_alpha(alpha)
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]
    for _ in range(DIRICHLET_MAX_TRIES):
        pieces: list[list[np.ndarray]] = [[] for _ in range(m)]
        for idx in by_class:
            proportions = rng.dirichlet(np.full(m, float(alpha)))
            cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
            for k, piece in enumerate(np.split(idx, cuts)):
                pieces[k].append(piece)
        parts = [np.concatenate(p) for p in pieces]
        if min(len(p) for p in parts) > 0:
            return parts
    raise ValueError(
        f"dirichlet_by_class partition with alpha={alpha} left some of the {m} clients without examples in all "
        f"{DIRICHLET_MAX_TRIES} draws ({len(y)} examples, {len(by_class)} classes); use a larger alpha or fewer clients"
    )


def _sorted(y: np.ndarray, m: int, iid_fraction: float, rng: np.random.Generator) -> list[np.ndarray]:
    if not (_is_real(iid_fraction) and 0 <= iid_fraction <= 1):
        raise ValueError(f"iid_fraction={iid_fraction!r}: must lie in [0, 1]")
    perm = rng.permutation(len(y))
    n_iid = int(round(iid_fraction * len(y)))
    iid, rest = perm[:n_iid], perm[n_iid:]
    # Stable sort of a shuffled array: grouped by label, random order within a label.
    rest = rest[np.argsort(y[rest], kind="stable")]
    return [np.concatenate([a, b]) for a, b in zip(np.array_split(iid, m), np.array_split(rest, m))]


def _one_class(y: np.ndarray, m: int, rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(y)
    parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * m
    for j, c in enumerate(classes[:m]):
        sharing = list(range(j, m, len(classes)))  # clients k with k mod C == j
        idx = rng.permutation(np.flatnonzero(y == c))
        if len(idx) < len(sharing):
            raise ValueError(
                f"one_class partition: class {c} has {len(idx)} examples but {len(sharing)} of the {m} clients "
                "would share it; some client would hold no data (use fewer clients)"
            )
        for k, piece in zip(sharing, np.array_split(idx, len(sharing))):
            parts[k] = piece
    return parts


def _natural(natural: Sequence[Any] | None, m: int, n: int) -> list[np.ndarray]:
    if natural is None:
        raise ValueError(
            "partition scheme 'natural' needs the dataset's own split (natural=...), but the dataset has none; "
            "only dataset 'synthetic' comes with one"
        )
    if len(natural) != m:
        raise ValueError(
            f"partition scheme 'natural': the dataset comes split over {len(natural)} clients but "
            f"num_clients={m}; load the dataset with num_clients={m}"
        )
    parts = [np.sort(np.asarray(p, dtype=np.int64).reshape(-1)) for p in natural]
    seen = np.zeros(n, dtype=bool)
    for k, p in enumerate(parts):
        if len(p) == 0:
            raise ValueError(f"partition scheme 'natural': client {k} holds no examples")
        if p[0] < 0 or p[-1] >= n:
            raise ValueError(f"partition scheme 'natural': client {k} has indices outside [0, {n})")
        if np.any(p[1:] == p[:-1]) or seen[p].any():
            raise ValueError(f"partition scheme 'natural': client {k} repeats indices (clients must be disjoint)")
        seen[p] = True
    return parts


def describe_partition(labels: Any, parts: Sequence[np.ndarray], num_classes: int) -> dict[str, Any]:
    """Summary of a split for reports: client sizes, classes per client, and how non-iid the labels are.

    `label_tv` is the mean over clients of the total-variation distance between the client's label distribution
    and the label distribution of all examples held by any client: 0 for a perfectly stratified split, close to
    1 - 1/C for one class per client with C balanced classes. All values are plain Python (JSON-ready).
    """
    y = _as_labels(labels)
    hist = np.stack([np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=num_classes) for p in parts])
    if hist.shape[1] != num_classes:
        raise ValueError(f"labels go up to {hist.shape[1] - 1}, beyond num_classes={num_classes}")
    sizes = hist.sum(axis=1)
    overall = hist.sum(axis=0) / max(int(sizes.sum()), 1)
    local = hist / np.maximum(sizes, 1)[:, None]
    tv = 0.5 * np.abs(local - overall).sum(axis=1)
    return {
        "num_clients": len(parts),
        "num_examples": int(sizes.sum()),
        "sizes": [int(s) for s in sizes],
        "min_size": int(sizes.min()),
        "max_size": int(sizes.max()),
        "mean_size": float(sizes.mean()),
        "classes_per_client": [int(c) for c in (hist > 0).sum(axis=1)],
        "label_histograms": hist.tolist(),
        "label_tv": float(tv.mean()),
        "label_tv_max": float(tv.max()),
    }
