"""The algorithms the tests run, read from ``conv2d.ALGORITHMS`` at collection time, and layers drawn
inside each algorithm's domain (by the library's own rule, ``conv2d._conv.applicable``).

No test file lists algorithms: a newly registered one becomes a parameter of every test that uses
:func:`algorithm_params` or :func:`algorithm_cases`, and it gets random layers it computes, found by
drawing from the general distribution below until its rule accepts one (nothing here knows that
``winograd`` wants 3x3 stride-1 layers). Where an algorithm needs something of the backend
(``kernels``: device kernels; ``native``: the library's convolution), ``tests/conftest.py`` deselects
its items on the backends without it; :func:`test_inapplicable_pairs_raise` (test_oracle.py) checks that
those pairs raise ValueError instead.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import conv2d
from conv2d._conv import applicable as _applicable
from conv2d._geometry import Geometry, make_geometry, normalize_padding

# Draws allowed to find one layer an algorithm computes. The narrowest rule today (3x3, stride 1)
# accepts about 1 draw in 50; a rule that accepts none of 2,000 is a clear failure, not a hang.
MAX_TRIES = 2000


def algorithm_names(*extra: str) -> list[str]:
    """`extra` (e.g. "auto") then every registered algorithm, in registration order."""
    return [*extra, *conv2d.ALGORITHMS]


def algorithm_params(*extra: str) -> list:
    """pytest parameters for an ``algorithm`` argument: `extra`, then every name of ``conv2d.ALGORITHMS``."""
    return [pytest.param(name, id=name) for name in algorithm_names(*extra)]


def case_geometry(case: dict) -> Geometry:
    """The layer of `case` (the oracle's dict: n, c, o, h, w, kh, kw, kwargs)."""
    groups = case["kwargs"].get("groups", 1)
    return make_geometry((case["n"], case["c"], case["h"], case["w"]),
                         (case["o"], case["c"] // groups, case["kh"], case["kw"]), (case["o"],), **case["kwargs"])


def applicable(name: str, backend: conv2d.Backend | None, case: dict | Geometry | None = None) -> bool:
    """Whether `name` computes `case` (a case dict or a Geometry; None: any layer) on `backend` (None: any)."""
    geom = case_geometry(case) if isinstance(case, dict) else case
    return _applicable(name, backend, geom)


def random_case(rng: np.random.Generator) -> dict:
    """One legal layer from the general distribution: groups 1-3, kernels 1-4, stride 1-3, dilation
    1-2, padding as an int, a pair, "same" or "valid", inputs from the smallest the kernel allows."""
    groups = int(rng.choice([1, 1, 2, 3]))
    kh, kw = (int(k) for k in rng.integers(1, 5, size=2))
    dilation = tuple(int(d) for d in rng.integers(1, 3, size=2))
    stride = tuple(int(s) for s in rng.integers(1, 4, size=2))
    padding = rng.choice(["int", "pair", "same", "valid"])
    if padding == "same":
        stride = (1, 1)
        pad = "same"
    elif padding == "valid":
        pad = "valid"
    elif padding == "int":
        pad = int(rng.integers(0, 3))
    else:
        pad = tuple(int(p) for p in rng.integers(0, 3, size=2))
    top, bottom, left, right = normalize_padding(pad, (kh, kw), stride, dilation)
    reach_h, reach_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    h = int(rng.integers(max(1, reach_h - top - bottom), reach_h + 8))
    w = int(rng.integers(max(1, reach_w - left - right), reach_w + 8))
    return dict(
        n=int(rng.integers(1, 4)),
        c=groups * int(rng.integers(1, 4)),
        o=groups * int(rng.integers(1, 4)),
        h=h, w=w, kh=kh, kw=kw,
        kwargs=dict(stride=stride, padding=pad, dilation=dilation, groups=groups),
    )


def random_cases(name: str, count: int, seed: int, backend: conv2d.Backend | None = None, accept=None) -> list[dict]:
    """`count` random layers that `name` computes (on `backend`; None: on some backend), and that
    `accept(case)` accepts where given, drawn from :func:`random_case` by rejection; the same ones for
    the same arguments."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    cases: list[dict] = []
    for _ in range(MAX_TRIES * max(count, 1)):
        if len(cases) == count:
            return cases
        case = random_case(rng)
        if applicable(name, backend, case) and (accept is None or accept(case)):
            cases.append(case)
    raise AssertionError(
        f"algorithm {name!r}: only {len(cases)} of {count} layers it applies to in {MAX_TRIES * count} random draws; "
        "widen tests/algorithms.py's random_case or check conv2d._conv.applicable"
    )


def algorithm_cases(count: int, seed: int, fixed: list[dict] = (), extra: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """(algorithm, case) pairs for every algorithm (and `extra`, e.g. "auto"): the cases of `fixed` it
    computes, then random ones it computes, `count` in all (more if `fixed` alone has more)."""
    pairs = []
    for name in algorithm_names(*extra):
        mine = [case for case in fixed if applicable(name, None, case)]
        pairs += [(name, case) for case in mine + random_cases(name, max(0, count - len(mine)), seed)]
    return pairs


def case_id(case: dict) -> str:
    return f"n{case['n']}c{case['c']}o{case['o']}h{case['h']}w{case['w']}k{case['kh']}x{case['kw']}" + "".join(
        f"-{k}={v}" for k, v in case["kwargs"].items()
    )


def pair_params(pairs: list[tuple[str, dict]]) -> list:
    """pytest parameters for ``("algorithm", "case")`` from :func:`algorithm_cases`."""
    return [pytest.param(name, case, id=f"{name}-{case_id(case)}") for name, case in pairs]


def in_domain(name: str, case: dict, seed: int) -> dict:
    """`case` where `name` computes it, else a random layer it computes (the same for the same seed)."""
    return case if applicable(name, None, case) else random_cases(name, 1, seed)[0]


def backend_algorithm_params(spec: str, *extra: str) -> list:
    """:func:`algorithm_params` less the algorithms backend `spec` lacks on every layer (all of them where
    the backend does not load here: its tests skip, or fail where required, on their own)."""
    try:
        backend = conv2d.get_backend(spec)
    except Exception:
        return algorithm_params(*extra)
    return [pytest.param(name, id=name) for name in algorithm_names(*extra) if applicable(name, backend)]


def applicable_to_all(names: list[str], geometries: list[Geometry]) -> list:
    """pytest parameters: those of `names` (e.g. :func:`algorithm_names` ("auto")) that compute every one
    of `geometries` (the layers of a network, say)."""
    return [pytest.param(name, id=name) for name in names if all(applicable(name, None, g) for g in geometries)]
