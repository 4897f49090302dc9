"""Whole sampling loops: fastdiff against the peers' loops on the same cheap model, batch and step count,
and fastdiff's loop taken apart (its own work, the model alone, the fused step alone)."""

from __future__ import annotations

import math
from typing import Callable

import torch

from fastdiff.bench.case import CFG, SIGMA, Case, _sde_coefficients

# ---- whole sampling loops: fastdiff vs the peers, same cheap model, batch and step count -------------

LOOP_STEPS, LOOP_SHAPE = 50, (4, 32, 32)  # per-sample latent shape; N = batch x 4096
PEERS = ("diffusers", "k_diffusion", "torchsde", "flow_matching")  # fastdiff_ode is the like-for-like row for flow_matching
# fastdiff's euler_ancestral and dpmpp_2m_sde next to k-diffusion's (and diffusers' DPM-Solver++ SDE) on its grid
# (fastdiff_2m_sde_bt: step-count-stable Brownian noise, like for like with k-diffusion's default tree)
METHOD_ROWS = ("fastdiff_ea", "fastdiff_2m_sde", "fastdiff_2m_sde_bt", "k_diffusion_2m_sde", "diffusers_2m_sde")


class CheapModel(torch.nn.Module):
    """u(x, t, y) = -(1 + t) x / 2 + bias[y]: one fused-able elementwise op, so the loops' own work
    (guidance, update, noise, bookkeeping) is what gets measured."""

    def __init__(self, classes: int = 10, shape=LOOP_SHAPE):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.bias = torch.nn.Parameter(torch.randn(classes + 1, *shape, generator=g) * 0.1, requires_grad=False)
        self.null_label = classes

    def forward(self, x, t, y):
        scale = (-(1.0 + t.float()) / 2).view(-1, *([1] * (x.dim() - 1)))
        return x * scale + self.bias[y]


def condot_denoiser(velocity: Callable) -> Callable:
    """k-diffusion's denoiser D(x, σ) (σ-space: x = z + σ ε) for a CondOT velocity field
    ``velocity(x_t, t)`` (t [B] in flow time): the flow state is x_t = t x with t = 1 / (1 + σ), and
    D = ẑ = x_t + (1 − t) u. k-diffusion's Euler step in σ-space is then DDIM on the CondOT path."""

    def denoiser(x, sigma):
        t = 1.0 / (1.0 + sigma)
        shape = (-1, *([1] * (x.dim() - 1)))
        xt = x * t.view(shape)
        return xt + (1.0 - t).view(shape) * velocity(xt, t)

    return denoiser


def loop_cases(n: int, device="cpu", impls=None, steps: int = LOOP_STEPS, cfg: float = CFG,
               sigma: float = SIGMA) -> list[Case]:
    """A 50-step SDE sampling loop with cfg = 4 (one batched 2B model call per step) through
    fastdiff and each installed peer (skipped when not installed). flow_matching has no SDE solver:
    its loop is the ODE (σ = 0), noted in the case."""
    import fastdiff

    per = math.prod(LOOP_SHAPE)
    B = max(1, n // per)
    model = CheapModel().to(device)
    y = torch.arange(B, device=device) % 10
    null = torch.full_like(y, model.null_label)
    y2 = torch.cat([y, null])
    x0 = torch.randn((B, *LOOP_SHAPE), generator=torch.Generator().manual_seed(2)).to(device)

    def guided(x, t):  # the CFG'd velocity from one batch of 2B, as users write it
        tt = torch.as_tensor(t, dtype=torch.float32, device=device).expand(2 * B)
        cond, uncond = model(torch.cat([x, x]), tt, y2).chunk(2)
        return uncond + cfg * (cond - uncond)

    out: dict[str, tuple[Callable, str]] = {}
    out["fastdiff"] = (lambda: fastdiff.sample(model, steps, cfg, shape=LOOP_SHAPE, y=y, null_y=model.null_label,
                                               seed=0, sigma=sigma, device=device), "Euler–Maruyama")
    out["fastdiff_ode"] = (lambda: fastdiff.sample(model, steps, cfg, shape=LOOP_SHAPE, y=y, null_y=model.null_label,
                                                   seed=0, sigma=0.0, device=device), "Euler, ODE (vs flow_matching)")
    # like for like with k-diffusion's grid (flow times 1/steps ... 1): its euler_ancestral and dpmpp_2m_sde
    t_list = [(i + 1) / (steps + 1) for i in range(steps + 1)]
    t_list[0], t_list[-1] = 1.0 / steps, 1.0
    for name, method in (("fastdiff_ea", "euler_ancestral"), ("fastdiff_2m_sde", "dpmpp_2m_sde")):
        out[name] = ((lambda method=method: fastdiff.sample(model, None, cfg, shape=LOOP_SHAPE, y=y, null_y=model.null_label,
                                                           seed=0, method=method, timesteps=t_list, device=device)),
                     f"method={method!r} (vs k-diffusion's and diffusers' {method})")
    out["fastdiff_2m_sde_bt"] = (lambda: fastdiff.sample(model, None, cfg, shape=LOOP_SHAPE, y=y, null_y=model.null_label,
                                                         seed=0, method="dpmpp_2m_sde", timesteps=t_list, device=device,
                                                         step_noise="brownian"),
                                 "method='dpmpp_2m_sde', step_noise='brownian' (vs k-diffusion's Brownian tree)")
    want = lambda k: impls is None or k in impls  # noqa: E731
    if want("diffusers"):
        try:
            from diffusers import FlowMatchEulerDiscreteScheduler
        except ImportError:
            pass
        else:
            sched = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)

            def diffusers_loop():
                sched.set_timesteps(steps, device=device)
                x = x0.clone()
                for t in sched.timesteps:
                    sig = float(t) / sched.config.num_train_timesteps  # noise level; flow time 1 - sig
                    x = sched.step(-guided(x, 1.0 - sig), t, x).prev_sample  # diffusers' flow = ε − z
                return x

            out["diffusers"] = (diffusers_loop, "FlowMatchEulerDiscreteScheduler(stochastic_sampling)")
            try:
                from diffusers import DPMSolverMultistepScheduler

                dpm = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", use_flow_sigmas=True,
                                                  prediction_type="flow_prediction", flow_shift=1.0)
            except (ImportError, TypeError, ValueError):  # an older diffusers without flow sigmas
                dpm = None
            if dpm is not None:
                def diffusers_2m_sde_loop():
                    dpm.set_timesteps(steps, device=device)
                    x = x0.clone()
                    for i, t in enumerate(dpm.timesteps):
                        x = dpm.step(-guided(x, 1.0 - float(dpm.sigmas[i])), t, x).prev_sample
                    return x

                out["diffusers_2m_sde"] = (diffusers_2m_sde_loop, "DPMSolverMultistepScheduler(sde-dpmsolver++, flow)")
    if want("torchsde"):
        try:
            import torchsde
        except ImportError:
            pass
        else:
            class SDE(torch.nn.Module):
                noise_type, sde_type = "diagonal", "ito"

                def f(self, t, z):  # drift u + σ²/2 s, CondOT score from velocity
                    x = z.view(B, *LOOP_SHAPE)
                    u = guided(x, t)
                    tf = float(t)
                    return (u + 0.5 * sigma**2 * (tf * u - x) / (1.0 - tf)).view(B, -1)

                def g(self, t, z):
                    return torch.full_like(z, sigma)

            sde, ts = SDE(), torch.tensor([0.0, 1.0 - 1.0 / steps], device=device)
            out["torchsde"] = (lambda: torchsde.sdeint(sde, x0.view(B, -1), ts, method="euler", dt=1.0 / steps)[-1],
                               "sdeint(method='euler')")
    if want("k_diffusion"):
        try:
            from fastdiff.bench.peers import k_diffusion_sampling

            kd = k_diffusion_sampling()
        except ImportError:
            pass
        else:
            def velocity(xt, t):  # guided velocity at per-sample flow times t [B]
                cond, uncond = model(torch.cat([xt, xt]), torch.cat([t, t]).float(), y2).chunk(2)
                return uncond + cfg * (cond - uncond)

            denoiser = condot_denoiser(velocity)
            t_grid = torch.linspace(1.0 / steps, 1.0, steps + 1, dtype=torch.float64)
            sigmas = ((1.0 - t_grid) / t_grid).float().to(device)
            out["k_diffusion"] = (lambda: kd.sample_euler_ancestral(denoiser, x0 * sigmas[0], sigmas, disable=True),
                                  "sample_euler_ancestral (eta 1)")
            out["k_diffusion_2m_sde"] = (lambda: kd.sample_dpmpp_2m_sde(denoiser, x0 * sigmas[0], sigmas, disable=True),
                                         "sample_dpmpp_2m_sde (its default Brownian-tree noise)")
    if want("flow_matching"):
        try:
            from flow_matching.solver import ODESolver
            from flow_matching.utils import ModelWrapper
        except ImportError:
            pass
        else:
            class Velocity(ModelWrapper):
                def forward(self, x, t, **extras):
                    return guided(x, t)

            solver = ODESolver(velocity_model=Velocity(model))
            grid = torch.tensor([0.0, 1.0], device=device)
            out["flow_matching"] = (lambda: solver.sample(x0, step_size=1.0 / steps, method="euler", time_grid=grid),
                                    "ODESolver(method='euler'), ODE")
    if want("fastdiff"):
        out.update(_loop_parts(model, B, y, y2, steps, sigma, cfg, device))
    nbytes = steps * B * per * 4 * 3  # read x, write x, one noise draw per step (the loops' own floor)
    return [Case("loop", k, B * per, "fp32", fn, nbytes // (steps if k == "free_model_1" else 1), note)
            for k, (fn, note) in out.items()
            if want(k) or (k in LOOP_PARTS and want("fastdiff"))]


# fastdiff's loop taken apart: the loop with a free model (one that returns a kept prediction: what is
# left is the loop's own work), the model alone and the fused step alone (same calls, same buffers)
LOOP_PARTS = ("free_model", "step_only", "model_only", "free_model_1")  # the first two back to back, in turns first


def _loop_parts(model, B, y, y2, steps, sigma, cfg, device) -> dict:
    """``steps`` calls of the model on the loop's kept 2B input; ``steps`` fused steps exactly as the SDE
    loop makes them (two branches, one draw, the state and its guidance twin written, the finiteness
    flag); and the whole loop with a model that returns a kept prediction, for ``steps`` steps and for
    one. The loop's own time per step is free_model / steps, to set next to step_only / steps; it is a
    per-call setup (arguments, buffers, the initial noise: about free_model_1 less one step) plus the
    per-step work, (free_model − free_model_1) / (steps − 1). (fastdiff − model_only is larger: a model
    runs slower inside a loop than alone, whose inputs and allocations stay warm.)"""
    import fastdiff

    from fastdiff import dispatch
    from fastdiff.ops.sampler_step import prepare, run_kernel

    pair = torch.randn((2, B, *LOOP_SHAPE), device=device)
    t2 = torch.full((2 * B,), 0.5, device=device)
    seeds = torch.arange(B, device=device)
    finite = torch.ones((1, B), dtype=torch.int32, device=device)
    pred = model(pair.view(2 * B, *LOOP_SHAPE), t2, y2).contiguous()
    c_x, c_p, c_n = _sde_coefficients(dt=1.0 / steps, sigma=sigma)
    call = prepare(pair[0], [pred[B:], pred[:B]], [1.0, cfg], [], [c_x, c_p, c_n, 0.0, 0.0, 0.0], seeds, [1],
                      list(pair), None, finite[0])
    backend = dispatch.resolve(torch.device(device))

    def model_only():
        for _ in range(steps):
            out = model(pair.view(2 * B, *LOOP_SHAPE), t2, y2).contiguous()
        return out[:B]  # the conditional half: one prediction per sample, as the other cases

    def step_only():
        for _ in range(steps):
            run_kernel(backend, **call)
        return pair[0]

    def free(x, t, labels):
        return pred

    def free_model(n_steps: int = steps):
        return fastdiff.sample(free, n_steps, cfg, shape=LOOP_SHAPE, y=y, null_y=model.null_label, seed=0,
                               sigma=sigma, device=device)

    return {"free_model": (free_model, "fastdiff's loop with a model that returns a kept prediction"),
            "step_only": (step_only, f"{steps} fused steps as the loop makes them"),
            "model_only": (model_only, f"{steps} model calls on the kept 2B input"),
            "free_model_1": (lambda: free_model(1), "the free-model loop for one step: the per-call setup + 1 step")}


def loop_split_rows(med: dict, per_round: dict, group_row: dict, log) -> list[dict]:
    """fastdiff's loop taken apart (LOOP_PARTS' medians ``med`` and per-round timings ``per_round``): its own
    time per step next to the fused step's, split into a per-call setup and the per-step work; printed, and
    returned as CSV rows with ``group_row``'s date, device, size (a row of the loop's group)."""
    import statistics

    rows = []
    own = med["free_model"] / LOOP_STEPS
    step = med["step_only"] / LOOP_STEPS
    minus = (med["fastdiff"] - med["model_only"]) / LOOP_STEPS
    # the two run back to back in each round: the median of the rounds' ratios cancels the
    # machine's drift, which moves whole rounds by 10-40 % on a shared CPU
    ratio = statistics.median(a / b for a, b in zip(per_round["free_model"], per_round["step_only"]))
    # the per-step work: what a step adds to a call, over the rounds (setup cancels)
    work = statistics.median((a - b) / (LOOP_STEPS - 1)
                             for a, b in zip(per_round["free_model"], per_round["free_model_1"]))
    setup = med["free_model"] - LOOP_STEPS * work
    log(f"{'':9s} per step: the loop's own time (loop with a free model) {own * 1e3:.4g} ms, the fused "
        f"step alone {step * 1e3:.4g} ms: ratio {ratio:.2f} (median of the rounds' ratios; "
        f"{own / step:.2f} of the medians) = per-call setup {setup * 1e3:.3g} ms / {LOOP_STEPS} steps "
        f"+ per-step work {work * 1e3:.4g} ms ({work / step:.2f}x the step); loop minus the model "
        f"timed alone {minus * 1e3:.4g} ms")
    for impl, v, vs_step, note in (
            ("own_per_step", own, ratio, "the loop with a free model, per step (x: paired ratio)"),
            ("step_per_step", step, 1.0, "the fused step as the loop calls it"),
            ("work_per_step", work, work / step,
             "the loop's per-step work: (free_model - free_model_1) / (steps - 1)"),
            ("setup_per_call", setup, setup / step, "the loop's per-call setup: free_model - steps x work"),
            ("minus_model_per_step", minus, minus / step,
             "loop minus the model timed alone, per step")):
        rows.append({**group_row, "backend": impl, "median_ms": float(f"{v * 1e3:.4g}"), "GB/s": None,
                     "pct_copy": None, "x_vs_baseline": None, "x_vs_compile": None,
                     "fastdiff_speedup": round(vs_step, 3), "peak_mib": None, "note": note})
    return rows
