"""ComfyUI's exponential integrators on x0 predictions: RES multistep (Zhang et al. 2023, "Improved Order
Analysis and Design of Exponential Integrator for Diffusion Models Sampling", arXiv 2308.02157) and SEEDS
(Gonzalez et al. 2023, "SEEDS: Exponential SDE Solvers for Fast High-Quality Sampling from Diffusion Models",
arXiv 2305.14267), with the deterministic and stochastic exponential Heun that ComfyUI builds from SEEDS-2.

Notation: phi_1(z) = expm1(z) / z, phi_2(z) = (phi_1(z) - 1) / z; ComfyUI's ei_h_phi_1(z) = expm1(z) and
ei_h_phi_2(z) = (expm1(z) - z) / z (h phi_k(-h) up to sign). On a path x = alpha z + beta eps, D the x0 prediction.

res_multistep / res_multistep_ancestral (ComfyUI comfy/k_diffusion/sampling.py res_multistep, the body of
sample_res_multistep (eta = 0) and sample_res_multistep_ancestral): in k-diffusion's coordinates (noise level
sigma = beta / alpha, scaled state y = x / alpha, fastdiff.sampling.methods.sigma_space) a step from sigma to
sigma' goes to (sigma_down, sigma_up) = get_ancestral_step(sigma, sigma', eta), h = log(sigma / sigma_down):

    y' = e^{-h} y + h (b1 D + b2 D_prev) + s_noise sigma_up xi,   x' = alpha' y'
    c2 = log(sigma_down_prev / sigma_prev) / h  (< 0: the previous evaluation's node, ComfyUI's (t_prev - t_old) / h)
    b1 = phi_1(-h) - phi_2(-h) / c2,  b2 = phi_2(-h) / c2

with sigma_prev, sigma_down_prev, D_prev those of the previous step. Euler (y' = (sigma_down / sigma) y +
(1 - sigma_down / sigma) D) on the first step, where sigma_down = 0 and after a step from sigma = inf (c2 = -inf
there, ComfyUI's b2 = 0); the noise is added wherever sigma' > 0, as ComfyUI does. On the VE path (alpha = 1) this is
ComfyUI's EPS-model sampler. ComfyUI runs the same formulas on flow (CONST) models with its raw sigma (the noise
fraction beta, state x, no half-log-SNR conversion): there it is not this method (nor a consistent integrator of the
flow ODE); fastdiff's is the VE form on x / alpha on every path, as for k-diffusion's samplers.

seeds_2 / exp_heun_2_x0 / exp_heun_2_x0_sde / seeds_3 (ComfyUI sample_seeds_2, sample_exp_heun_2_x0 = seeds_2
with r = 1, eta = 0; sample_exp_heun_2_x0_sde = seeds_2 with r = 1; sample_seeds_3): in half-log-SNR
lambda = log(alpha / beta) (ComfyUI's sigma_to_half_log_snr, which on CONST models is this lambda of CondOT), step
t -> t' of h = lambda' - lambda, h_eta = (1 + eta) h, nodes lambda_j = lambda + r_j h. The first-order move to a
node and its noise are

    x_j = (beta_j / beta) e^{-r_j eta h} x - alpha_j expm1(-r_j h_eta) D + beta_j s_noise n_j
    n_1 = sqrt(-expm1(-2 r_1 eta h)) xi_1
    n_{j+1} = e^{(r_j - r_{j+1}) eta h} n_j + sqrt(-expm1(2 (r_j - r_{j+1}) eta h)) xi_{j+1}

(xi_j independent: ComfyUI's noise_sampler over [sigma_j, sigma_{j+1}], so the noise of a step is the OU
process's increment driven by one Brownian path). SEEDS-2 (r): x' = the move to t' with D replaced by
(1 - 1/(2r)) D + 1/(2r) D_2 ("phi_1") or by b1 D + b2 D_2 with b2 = ei_h_phi_2(-h_eta) / r,
b1 = ei_h_phi_1(-h_eta) - b2 (the expm1 factor taken inside: "phi_2"), D_2 = D(x_1, t_1). SEEDS-3 (r_1, r_2):
x_2 = the move to node 2 with a3_2 = (r_2 / r_1) ei_h_phi_2(-r_2 h_eta), a3_1 = ei_h_phi_1(-r_2 h_eta) - a3_2
in place of expm1 D: -(a3_1 D + a3_2 D_2); x' = the move to t' with b3 = ei_h_phi_2(-h_eta) / r_2,
b1 = ei_h_phi_1(-h_eta) - b3 on (D, D_3). These formulas are in (alpha, beta, lambda) of the path, so on the VE path
they are ComfyUI's EPS form and on CondOT its CONST form. ComfyUI moves a first sigma = 1 of CONST models to
1 - 1e-4 (offset_first_sigma_for_snr); fastdiff instead takes the step's first-order limit from alpha = 0:
x' = alpha' D + (beta' / beta) x at eta = 0, alpha' D + beta' s_noise xi at eta > 0 (one evaluation).

Noise streams: draw xi_j of step i is draw_stream(i, j - 1); a stage reads the draws its n_j combines (more_draws),
and with step_noise="brownian" xi_j is the path's normalized increment over [t_{j-1}, t_j] (the node times;
Stage.brownian_terms). A caller's step_noise(i, j) replaces a stage's whole noise by one standard normal, so the
correlation of n_j across a step's stages is then the caller's to supply.

Every step that ends at beta' = 0 returns alpha' D (one evaluation), as ComfyUI's x = denoised.

CFG++ (guidance="cfg_pp": ComfyUI's res_multistep_cfg_pp, res_multistep_ancestral_cfg_pp, res_multistep with
cfg_pp=True): with D_g the guided and D_u the unconditional x0, the multistep step is
y' = e^{-h} (y + D_g - D_u) + h (b1 D_u + b2 D_u_prev) and the Euler one y' = D_g + (sigma_down / sigma) (y - D_u), the
noise as above. Both are the out row above on the blend p_null + rho w (p_y - p_null) (Stage.cfg_pp = rho, the share
of D_g: e^{-h} / (h b1), resp. 1 / (1 - sigma_down / sigma)); the history is D_u, the side row on the unconditional
prediction alone (Stage.side_blend = (1, 0)).
"""

from __future__ import annotations

import math

from dataclasses import replace

from fastdiff.sampling.methods.coefficients import Stage, _conv, draw_stream
from fastdiff.sampling.methods.registry import register_method
from fastdiff.sampling.methods.sigma_space import ancestral_step, noise_level, require_finite, time_at

SOLVER_TYPES = ("phi_1", "phi_2")


class _Point:
    """A time with its alpha, beta, sigma = beta / alpha, lambda = log(alpha / beta) and D = a x + b g."""

    def __init__(self, path, t, prediction):
        self.t = t
        self.alpha, self.beta = path.coefficients(t)[:2]
        self.sigma = noise_level(path, t)
        finite = 0.0 < self.sigma < math.inf
        self.lam = -math.log(self.sigma) if finite else (math.inf if self.sigma == 0 else -math.inf)
        self.a, self.b = _conv(path, t, prediction, "x0")


def _number(method, name, value, lo=0.0, hi=math.inf, lo_open=False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < lo or (lo_open and value == lo) or value > hi:
        where = f"in ({lo:g}, {hi:g}]" if lo_open else (f">= {lo:g}" if hi == math.inf else f"in [{lo:g}, {hi:g}]")
        raise ValueError(f"{name} must be a finite number {where} for method={method!r}, got {value!r}")
    return float(value)


def _solver_type(method, solver_type) -> str:
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be 'phi_1' or 'phi_2' for method={method!r}, got {solver_type!r}")
    return solver_type


def _denoise(i, p: _Point, alpha1: float) -> Stage:
    """The step to beta' = 0: x' = alpha' D."""
    return Stage(i, p.t, "x", "x", alpha1 * p.a, alpha1 * p.b, x0=(p.a, p.b), final=True)


# ---- RES multistep ---------------------------------------------------------------------------------------------

def _res_multistep(method, path, grid, prediction, eta, s_noise) -> list[Stage]:
    eta, s_noise = _number(method, "eta", eta), _number(method, "s_noise", s_noise)
    stages, prev = [], None  # prev: (sigma, sigma_down) of the previous step where its D is kept (side buffer)
    for i in range(len(grid) - 1):
        p = _Point(path, grid[i], prediction)
        al1, be1 = path.coefficients(grid[i + 1])[:2]
        sigma1 = be1 / al1 if be1 else 0.0
        if math.isinf(p.sigma):  # from alpha = 0: the Euler step's limit, (sigma_down / sigma) y -> sigma_down x / beta
            up = min(1.0, eta) * sigma1
            down = math.sqrt(max(0.0, sigma1 * sigma1 - up * up))
            stages.append(Stage(i, p.t, "x", "x", al1 * p.a + al1 * down / p.beta, al1 * p.b,
                                c_noise=al1 * up * s_noise, stream=draw_stream(i), x0=(p.a, p.b), final=True,
                                cfg_pp=1.0))  # CFG++: D_g + (sigma_down / sigma) (y - D_u) -> D_g + sigma_down x / beta
            prev = None  # ComfyUI's c2 = -inf after it: Euler next
            continue
        require_finite(method, p.sigma, p.t)
        if be1 == 0.0:
            stages.append(replace(_denoise(i, p, al1), cfg_pp=1.0))  # CFG++: D_g
            prev = None
            continue
        down, up = ancestral_step(p.sigma, sigma1, eta)
        q = down / p.sigma  # e^{-h}
        w1, w2 = 1.0 - q, 0.0  # y' = q y + w1 D + w2 D_prev (+ noise): Euler
        clean = 1.0  # CFG++: D_g's coefficient, 1 in Euler's D_g + q (y - D_u), q in the multistep q (y + D_g - D_u)
        if down > 0.0 and prev is not None and prev[1] > 0.0:
            clean = q
            h = math.log(p.sigma / down)
            c2 = math.log(prev[1] / prev[0]) / h
            phi1 = -math.expm1(-h) / h
            phi2 = (phi1 - 1.0) / -h
            w2 = h * phi2 / c2
            w1 = h * phi1 - w2
        keep = down > 0.0 and i + 2 < len(grid) and path.coefficients(grid[i + 2])[1] > 0.0  # the next step reads D
        history = (f"side{(i - 1) % 2}", al1 * w2) if w2 != 0.0 else (None, 0.0)
        stages.append(Stage(i, p.t, "x", "x", al1 * (q / p.alpha + w1 * p.a), al1 * w1 * p.b,
                            c_extra=history[1], extra=history[0], c_noise=al1 * up * s_noise, stream=draw_stream(i),
                            side=f"side{i % 2}" if keep else None, s_x=p.a if keep else 0.0,
                            s_pred=p.b if keep else 0.0, x0=(p.a, p.b), final=True,
                            cfg_pp=clean / w1 if w1 != 0.0 else 1.0, side_blend=(1.0, 0.0) if keep else None))
        prev = (p.sigma, down) if keep else None
    return stages


@register_method("res_multistep", evals_per_step=1, conversions=("x0",), cfg_pp=True,
                 description="RES second-order multistep exponential integrator on x0 (ComfyUI's res_multistep)")
def _res_multistep_ode(path, grid, prediction) -> list[Stage]:
    return _res_multistep("res_multistep", path, grid, prediction, 0.0, 0.0)


@register_method("res_multistep_ancestral", options={"eta": 1.0, "s_noise": 1.0}, evals_per_step=1,
                 conversions=("x0",), cfg_pp=True,
                 description="RES multistep to sigma_down plus s_noise x sigma_up fresh noise (ComfyUI)")
def _res_multistep_ancestral(path, grid, prediction, eta=1.0, s_noise=1.0) -> list[Stage]:
    return _res_multistep("res_multistep_ancestral", path, grid, prediction, eta, s_noise)


# ---- SEEDS -----------------------------------------------------------------------------------------------------

def _node(path, p: _Point, end: _Point, r: float, prediction) -> _Point:
    """The point at lambda = lambda + r h of the step p -> end."""
    if r == 1.0:
        return end
    lam = p.lam + r * (end.lam - p.lam)
    return _Point(path, time_at(path, math.exp(-lam), p.t, end.t), prediction)


def _from_noise(i, path, p: _Point, t1, eta, s_noise) -> Stage:
    """A step from alpha = 0 (lambda = -inf): the first-order move's limit, e^{-eta h} -> 0 for eta > 0."""
    al1, be1 = path.coefficients(t1)[:2]
    keep = be1 / p.beta if eta == 0.0 else 0.0
    return Stage(i, p.t, "x", "x", al1 * p.a + keep, al1 * p.b, c_noise=be1 * s_noise if eta > 0.0 else 0.0,
                 stream=draw_stream(i), x0=(p.a, p.b), final=True)


def _seeds(method, path, grid, prediction, eta, s_noise, nodes, weights) -> list[Stage]:
    """SEEDS-type steps: evaluations at p and at the nodes r_1 < ... (lambda fractions, the last <= 1) of each step;
    weights(h_eta, j) -> (w_D, w_j): the move to node j + 1 (j = len(nodes): to t') on alpha (w_D D + w_j D_j), D_j the
    prediction at node j (ComfyUI's -alpha (a D + b D_j): w = -a, -b)."""
    stages = []
    for i in range(len(grid) - 1):
        p = _Point(path, grid[i], prediction)
        al1, be1 = path.coefficients(grid[i + 1])[:2]
        if math.isinf(p.sigma):
            stages.append(_from_noise(i, path, p, grid[i + 1], eta, s_noise))
            continue
        require_finite(method, p.sigma, p.t)
        if be1 == 0.0:
            stages.append(_denoise(i, p, al1))
            continue
        end = _Point(path, grid[i + 1], prediction)
        h = end.lam - p.lam
        h_eta, noisy = (1.0 + eta) * h, eta > 0.0 and s_noise > 0.0
        points = [_node(path, p, end, r, prediction) for r in nodes] + [end]
        rs = list(nodes) + [1.0]
        moves = [(-math.expm1(-rs[0] * h_eta), 0.0)] + [weights(h_eta, j) for j in range(1, len(points))]
        keep_d = any(w_d != 0.0 for w_d, _ in moves[1:])  # a later stage reads D (side0)
        n = []  # the current node's noise / (beta_node s_noise): [(draw, coefficient of xi, its interval)]
        prev_r, prev_t = 0.0, p.t
        for j, (q, r, (w_d, w_j)) in enumerate(zip(points, rs, moves)):
            if noisy:  # n_j = e^{(r_prev - r) eta h} n_prev + sqrt(-expm1(2 (r_prev - r) eta h)) xi_j
                f = math.exp((prev_r - r) * eta * h)
                n = [(d, c * f, span) for d, c, span in n]
                c = math.sqrt(-math.expm1(2.0 * (prev_r - r) * eta * h))
                if c > 0.0 and prev_t < q.t:  # (none over an empty interval: r = 1)
                    n.append((j, c, (prev_t, q.t)))
            draws = [(draw_stream(i, d), q.beta * s_noise * c, span) for d, c, span in n if c != 0.0]
            (stream, c_noise, _), *more = draws or [(draw_stream(i), 0.0, None)]
            noise = dict(c_noise=c_noise, stream=stream, more_draws=tuple((s, c) for s, c, _ in more),
                         # step_noise="brownian": xi_j is the path's normalized increment over the nodes' interval
                         brownian_terms=tuple((c, *span) for _, c, span in draws))
            base = q.beta / p.beta * math.exp(-r * eta * h)  # on x
            last = j == len(points) - 1
            out = "x" if last else "stage"
            if j == 0:  # from x: x_1 = base x + alpha_1 w_d D (D kept in side0 for the later moves)
                stages.append(Stage(i, p.t, "x", out, base + q.alpha * w_d * p.a, q.alpha * w_d * p.b,
                                    side="side0" if keep_d else None, s_x=p.a if keep_d else 0.0,
                                    s_pred=p.b if keep_d else 0.0, x0=(p.a, p.b), final=last, **noise))
            else:  # from x_j (the input), D_j = a_j x_j + b_j g: base x (extra) + alpha (w_d D + w_j D_j)
                s = points[j - 1]
                stages.append(Stage(i, s.t, "stage", out, q.alpha * w_j * s.a, q.alpha * w_j * s.b, c_extra=base,
                                    extra="x", history=(("side0", q.alpha * w_d, 0.0),) if w_d != 0.0 else (),
                                    final=last, **noise))
            prev_r, prev_t = r, q.t
    return stages


def _ei1(z):
    return math.expm1(z)


def _ei2(z):
    return (math.expm1(z) - z) / z


def _seeds_2(method, path, grid, prediction, eta, s_noise, r, solver_type) -> list[Stage]:
    eta, s_noise = _number(method, "eta", eta), _number(method, "s_noise", s_noise)
    r, solver_type = _number(method, "r", r, 0.0, 1.0, lo_open=True), _solver_type(method, solver_type)
    fac = 1.0 / (2.0 * r)

    def weights(h_eta, j):  # the move to t' on (D, D_2), ComfyUI's -alpha' (...) as +alpha' (w_D D + w_2 D_2)
        if solver_type == "phi_1":
            e = -_ei1(-h_eta)
            return e * (1.0 - fac), e * fac
        b2 = _ei2(-h_eta) / r
        return -(_ei1(-h_eta) - b2), -b2

    return _seeds(method, path, grid, prediction, eta, s_noise, (r,), weights)


@register_method("seeds_2", options={"eta": 1.0, "s_noise": 1.0, "r": 0.5, "solver_type": "phi_1"}, evals_per_step=2,
                 conversions=("x0",),
                 description="SEEDS-2: two-stage stochastic exponential solver in half-log-SNR on x0 (ComfyUI)")
def _seeds_2_method(path, grid, prediction, eta=1.0, s_noise=1.0, r=0.5, solver_type="phi_1") -> list[Stage]:
    return _seeds_2("seeds_2", path, grid, prediction, eta, s_noise, r, solver_type)


@register_method("exp_heun_2_x0", options={"solver_type": "phi_2"}, evals_per_step=2, conversions=("x0",),
                 description="x0 exponential Heun in half-log-SNR (ComfyUI's exp_heun_2_x0: SEEDS-2, r = 1, eta = 0)")
def _exp_heun_2_x0(path, grid, prediction, solver_type="phi_2") -> list[Stage]:
    return _seeds_2("exp_heun_2_x0", path, grid, prediction, 0.0, 0.0, 1.0, solver_type)


@register_method("exp_heun_2_x0_sde", options={"eta": 1.0, "s_noise": 1.0, "solver_type": "phi_2"}, evals_per_step=2,
                 conversions=("x0",),
                 description="stochastic exponential Heun on x0 (ComfyUI's exp_heun_2_x0_sde: SEEDS-2 with r = 1)")
def _exp_heun_2_x0_sde(path, grid, prediction, eta=1.0, s_noise=1.0, solver_type="phi_2") -> list[Stage]:
    return _seeds_2("exp_heun_2_x0_sde", path, grid, prediction, eta, s_noise, 1.0, solver_type)


@register_method("seeds_3", options={"eta": 1.0, "s_noise": 1.0, "r_1": 1.0 / 3.0, "r_2": 2.0 / 3.0}, evals_per_step=3,
                 conversions=("x0",),
                 description="SEEDS-3: three-stage stochastic exponential solver in half-log-SNR on x0 (ComfyUI)")
def _seeds_3(path, grid, prediction, eta=1.0, s_noise=1.0, r_1=1.0 / 3.0, r_2=2.0 / 3.0) -> list[Stage]:
    method = "seeds_3"
    eta, s_noise = _number(method, "eta", eta), _number(method, "s_noise", s_noise)
    r_1, r_2 = _number(method, "r_1", r_1, 0.0, 1.0, lo_open=True), _number(method, "r_2", r_2, 0.0, 1.0, lo_open=True)
    if not r_1 < r_2:
        raise ValueError(f"r_1 must be below r_2 for method={method!r}, got r_1={r_1!r}, r_2={r_2!r}")

    def weights(h_eta, j):
        if j == 1:  # to node 2 on (D, D_2)
            a2 = r_2 / r_1 * _ei2(-r_2 * h_eta)
            return -(_ei1(-r_2 * h_eta) - a2), -a2
        b3 = _ei2(-h_eta) / r_2  # to t' on (D, D_3)
        return -(_ei1(-h_eta) - b3), -b3

    return _seeds(method, path, grid, prediction, eta, s_noise, (r_1, r_2), weights)
