"""Step-count-stable noise: ``fastdiff.sample(..., step_noise="brownian")`` (docs/design.md §3).

Each sample's step noise is read off one Brownian path W over flow time t in [0, 1], a pure function of
(seed, element), so that the same seed gives converging samples as the number of steps grows (the
role of k-diffusion's BrownianTreeNoiseSampler, which builds a tree on the host with torchsde). The
path is the Lévy–Ciesielski construction truncated at DEPTH levels, i.e. the Brownian bridge over the
dyadic grid of 2^DEPTH intervals, linear in between:

    W(t) = t z_0 + Σ_{l=1..DEPTH} Σ_j T_{l,j}(t) z_{l,j}

where T_{l,j} is the tent on [j 2^(1-l), (j+1) 2^(1-l)] with peak 2^(-(l+1)/2) at its midpoint (the
bridge's standard deviation there), and z_n is the spec-v1 normal of (seed, stream STREAM_BASE + n,
element), node n = 0 for the root and 2^(l-1) + j for tent (l, j). At every time at most one tent per
level is non-zero, so an increment W(b) - W(a) is a combination of at most 2 DEPTH + 1 normals with
coefficients computed here in float64. A draw of a method over [a, b] is that increment divided by its
exact standard deviation (sqrt(b - a) where a and b are on the grid), so it is a standard normal on any
grid; increments over disjoint intervals are independent up to the shared leaf interval at their
common end (covariance below 2^-DEPTH / (b - a)).

Which interval a draw stands for: stream draw_stream(i) of a method covers its step [t_i, t_{i+1}]; a
stage with other intervals lists its noise as Brownian terms (Stage.brownian_terms; dpmpp_sde: its first
stage's draw over [t_i, t_s], its second's over [t_i, t_{i+1}], k-diffusion's two noise_sampler calls).
Cost: the normals of every node, ~DEPTH + 2 (DEPTH - split level) per draw; in the loop they are summed
into one buffer by sampler_step calls of four draws each, so a step adds ~8-12 passes of four normals
(the numbers per backend: docs/sampling.md, "Step-count-stable noise").
"""

from __future__ import annotations

import math

import torch

from fastdiff.sampling.core.stage import DRAW_STRIDE

DEPTH = 16  # dyadic levels: the path is exact at multiples of 2^-16 in t, linear in between
STREAM_BASE = 1 << 30  # node n's normal is stream STREAM_BASE + n (steps' draws use ids below 2^26)
NODES = 1 << DEPTH  # node ids 0 .. 2^DEPTH - 1


def _basis(t: float) -> dict[int, float]:
    """The non-zero basis functions at t: {node: value} (W(t) = Σ value z_node)."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"Brownian noise is defined on flow times in [0, 1], got t={t!r}")
    out = {0: t} if t != 0.0 else {}
    for level in range(1, DEPTH + 1):
        cells = 1 << (level - 1)  # tents of this level
        u = t * cells
        j = min(int(u), cells - 1)
        u -= j  # position in the tent's support, [0, 1]
        value = 2.0 ** (-(level + 1) / 2.0) * (1.0 - abs(2.0 * u - 1.0))
        if value != 0.0:
            out[cells + j] = value
    return out


def increment(a: float, b: float) -> dict[int, float]:
    """W(b) - W(a) as {node: coefficient} (unnormalized)."""
    out = dict(_basis(b))
    for node, value in _basis(a).items():
        out[node] = out.get(node, 0.0) - value
    return {n: c for n, c in out.items() if c != 0.0}


def normalized(a: float, b: float) -> dict[int, float]:
    """The draw over [a, b] (a < b): (W(b) - W(a)) / its standard deviation, a standard normal."""
    if not a < b:
        raise ValueError(f"a Brownian draw needs an interval a < b, got [{a!r}, {b!r}]")
    inc = increment(a, b)
    norm = math.sqrt(sum(c * c for c in inc.values()))
    return {n: c / norm for n, c in inc.items()}


def stream_interval(stream: int, grid) -> tuple[float, float]:
    """The interval of a method's draw on stream ``stream`` by default: draw 0 of step i covers the step."""
    step, draw = (stream - 1) % DRAW_STRIDE, (stream - 1) // DRAW_STRIDE
    if draw != 0:
        raise ValueError(f"stream {stream} (draw {draw} of step {step}): a stage with several draws lists its "
                         "Brownian terms (Stage.brownian_terms)")
    return grid[step], grid[step + 1]


def stage_nodes(stage, grid) -> dict[int, float]:
    """The nodes of a stage's noise term divided by its scale (Stage.noise_scale()): Σ c ξ over its
    Brownian terms, ξ the normalized increment over [a, b]; by default each draw (stream, c) over its
    stream's step."""
    terms = stage.brownian_terms or [(c, *stream_interval(s, grid)) for s, c in stage.draws()]
    scale = stage.noise_scale()
    out: dict[int, float] = {}
    for c, a, b in terms:
        for node, k in normalized(a, b).items():
            out[node] = out.get(node, 0.0) + c / scale * k
    return {n: c for n, c in out.items() if c != 0.0}


def chunks(nodes: dict[int, float], size: int = 4) -> list[tuple[list[int], list[float]]]:
    """The nodes as (streams, coefficients) groups of ``size``, coarse levels first."""
    items = sorted(nodes.items())
    return [([STREAM_BASE + n for n, _ in items[k:k + size]], [c for _, c in items[k:k + size]])
            for k in range(0, len(items), size)]


def brownian_increment(seeds, shape, a: float, b: float, *, device=None, backend: str = "reference") -> torch.Tensor:
    """The draw over [a, b] for samples ``seeds`` (the specification: a sum of fastdiff.ops.randn draws);
    k-diffusion's ``noise_sampler`` can return it to share fastdiff's Brownian noise."""
    from fastdiff.ops.randn import randn

    out = None
    for node, c in sorted(normalized(a, b).items()):
        z = randn(seeds, STREAM_BASE + node, shape, device=device, backend=backend).double()
        out = c * z if out is None else out + c * z
    return out.float()


def kernel_calls(stages, noisy, grid, buffer, seeds, cache, key, backend: str, native: bool) -> list[list] | None:
    """The prepared sampler_step calls (fastdiff.ops.step_call; run as call([buffer])) that write each noisy
    stage's noise into ``buffer`` (a standard normal: the stage reads it with coefficient noise_scale()): per
    stage, then one more list for the churn draw of step 0 (Stage.start_churn). ``noisy[k]`` is None for a stage without
    draws. Chunks of four draws: out = c_x buffer + Σ c ξ, c_x = 0 in the first (the buffer is finite)."""
    from fastdiff.ops.sampler_step import KERNEL_ARGS, ROW_ARGS, prepare_tensors, with_rows
    from fastdiff.ops.step_call import step_call
    from fastdiff.sampling.core.stage import draw_stream

    if buffer is None:
        return [[] for _ in range(len(stages) + 1)]
    tensors = prepare_tensors(buffer, [buffer], [], seeds, [buffer], None, None)
    rows = cache.get(key)
    if rows is None:
        def chunk_rows(nodes):
            out = []
            for i, (streams, coeffs) in enumerate(chunks(nodes)):
                D = len(streams)
                row = [0.0 if i == 0 else 1.0, 0.0, *coeffs] + [0.0] * (2 + D)
                call = with_rows(tensors, None, row, streams)
                out.append({name: call[name] for name in ROW_ARGS})
            return out

        rows = [chunk_rows(stage_nodes(st, grid)) if noisy[k] is not None else [] for k, st in enumerate(stages)]
        rows.append(chunk_rows(normalized(*stream_interval(draw_stream(0), grid))) if stages[0].start_churn else [])
        cache.put(key, rows)
    return [[step_call(backend, tuple(dict(tensors, **r)[name] for name in KERNEL_ARGS), None, native)
             for r in stage_rows]
            for stage_rows in rows]
