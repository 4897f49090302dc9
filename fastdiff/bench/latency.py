"""``latency``: what a sampling loop costs around its model, per call and per step, on a model that costs
~nothing: :func:`free_model` returns its input (a Python call, ~0.1 µs, timed alone and subtracted).

Small batches of a small per-sample shape (an action chunk of 16 steps of 2-D actions, as robotics diffusion
policies sample) make the loops' bookkeeping the whole cost. Each subject runs at two (or more) step counts,
interleaved round by round (harness.time_interleaved); per round a line through (steps, time) gives the
per-step cost (slope) and the per-call fixed cost (intercept); the medians over rounds are reported.

Subjects, each next to the peer it replaces (x peer: the peer's time over the subject's, > 1 = faster):

- ``fastdiff.sample`` (a fresh call each time) and a reused ``fastdiff.Sampler`` (skipped while fastdiff has
  none), both Euler, against ``torch_loop``: the Euler loop written with torch ops;
- fastdiff's k-diffusion adapter (``fk.sample_euler``, ``fk.sample_dpmpp_2m``) against k-diffusion's own, same
  CFG denoiser and Karras sigmas;
- fastdiff's diffusers schedulers against diffusers' in the same loop (``scale_model_input``, model, ``step``);
- lerobot's DiffusionPolicy loop (DDPMScheduler: 100 training timesteps, squaredcos_cap_v2, clip_sample,
  epsilon; 100 steps; and DDIMScheduler with the same settings, 10 steps), with fastdiff's DDPM and DDIM
  schedulers in their place (tests/test_adapter_diffusers_ddpm.py: the same numbers on the same noise), and a
  reused fastdiff.Sampler (method "ddpm" / "ddim", clip_sample=1) in place of the whole loop.

cfg 2 runs the guided batch the way each library's users write it: one model call on the 2B batch (fastdiff:
its own cfg; the others: ``uncond + cfg (cond - uncond)`` in the loop or the denoiser).
"""

from __future__ import annotations

import math
import statistics
import timeit
from collections.abc import Callable
from dataclasses import dataclass

import torch

SHAPE, BATCHES, CFGS, STEPS = (16, 2), (1, 64), (1.0, 2.0), (10, 50)
THREADS = 2
NULL_LABEL = 1
LEROBOT = {"num_train_timesteps": 100, "beta_schedule": "squaredcos_cap_v2", "clip_sample": True,
           "prediction_type": "epsilon"}
# the targets, printed next to the figures (never asserted: speed is no test)
SAMPLER_FIXED_US, SAMPLER_STEP_US, SAMPLE_FIXED_US = 30.0, 10.0, 100.0


def free_model(x, *args, **kwargs):
    """The free model: returns its input (every library's signature: model(x, t, y), D(x, sigma, ...))."""
    return x


@dataclass
class Subject:
    name: str
    build: Callable[[int], Callable[[], object]]  # steps -> one sampling call (built outside the timing)
    peer: str | None
    note: str
    steps: int = 10  # the step count its users run (the "at steps" column)


def _guided(cfg: float, y, null_y):
    """The model call of a loop as users write CFG: one call on the 2B batch, then the guidance arithmetic."""
    y2 = torch.cat([y, null_y])

    def guided(x, t):
        if cfg == 1.0:
            return free_model(x, t, y)
        t2 = torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() else t
        cond, uncond = free_model(torch.cat([x, x]), t2, y2).chunk(2)
        return uncond + cfg * (cond - uncond)

    return guided


def _fastdiff_subjects(batch, cfg, shape, y, device, notes) -> list[Subject]:
    import fastdiff

    labels = {"y": y} if cfg == 1.0 else {"y": y, "null_y": NULL_LABEL}
    guided = _guided(cfg, y, torch.full_like(y, NULL_LABEL))

    def sample(steps):
        return lambda: fastdiff.sample(free_model, steps, cfg, shape=shape, batch_size=batch, method="euler", seed=0,
                                       device=device, **labels)

    def torch_loop(steps):
        def run():
            x = torch.randn((batch, *shape), device=device)
            for i in range(steps):
                x = x + (1.0 / steps) * guided(x, torch.full((batch,), i / steps, device=device))
            return x
        return run

    out = [Subject("fastdiff.sample", sample, "torch_loop", "a fresh sample(..., method='euler') per call")]
    sampler_class = getattr(fastdiff, "Sampler", None)
    if sampler_class is None:
        notes.append("fastdiff.Sampler: skipped, this fastdiff has no Sampler class")
    else:
        def sampler(steps):  # built once here; each timed call reruns it
            built = sampler_class(free_model, steps, cfg, shape=shape, batch_size=batch, method="euler",
                                  device=device, **labels)
            return lambda: built(seed=0)

        out.append(Subject("fastdiff.Sampler", sampler, "torch_loop", "one Sampler built per step count, rerun"))
    out.append(Subject("torch_loop", torch_loop, None, "x = x + dt * model(x, t, y) with torch ops"))
    return out


def _k_diffusion_subjects(batch, cfg, shape, y, device, notes) -> list[Subject]:
    from fastdiff.adapters import k_diffusion as fk
    from fastdiff.bench.peers import k_diffusion_sampling
    from fastdiff.schedules import karras_sigmas

    extra = {"y": y} if cfg == 1.0 else {"y": y, "null_y": torch.full_like(y, NULL_LABEL)}

    def denoiser(x, sigma, y, null_y=None):  # k-diffusion's CFGDenoiser pattern
        if null_y is None:
            return free_model(x, sigma, y)
        cond, uncond = free_model(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([y, null_y])).chunk(2)
        return uncond + cfg * (cond - uncond)

    def runner(sampler):
        def build(steps):
            sigmas = torch.tensor(karras_sigmas(steps), dtype=torch.float32, device=device)
            return lambda: sampler(denoiser, torch.randn((batch, *shape), device=device) * sigmas[0], sigmas,
                                   extra_args=extra, disable=True)
        return build

    try:
        kd = k_diffusion_sampling()
    except ImportError as exc:
        kd = None
        notes.append(f"k_diffusion: skipped, {exc}")
    out = []
    for name in ("sample_euler", "sample_dpmpp_2m"):
        peer = None if kd is None else f"k_diffusion.{name}"
        out.append(Subject(f"fk.{name}", runner(getattr(fk, name)), peer, "fastdiff.adapters.k_diffusion"))
        if kd is not None:
            out.append(Subject(peer, runner(getattr(kd, name)), None, "Karras sigmas, the same CFG denoiser"))
    return out


def _diffusers_subjects(batch, cfg, shape, y, device, notes) -> list[Subject]:
    try:
        import diffusers

        from fastdiff.adapters import diffusers as fd
    except ImportError as exc:
        notes.append(f"diffusers: skipped, {exc}")
        return []
    guided = _guided(cfg, y, torch.full_like(y, NULL_LABEL))

    def pipeline_loop(scheduler_class, config):
        """The loop of diffusers' pipelines: set_timesteps, scaled noise, scale_model_input, model, step."""
        def build(steps):
            scheduler = scheduler_class(**config)

            def run():
                scheduler.set_timesteps(steps, device=device)
                x = torch.randn((batch, *shape), device=device) * scheduler.init_noise_sigma
                for t in scheduler.timesteps:
                    x = scheduler.step(guided(scheduler.scale_model_input(x, t), t), t, x).prev_sample
                return x
            return run
        return build

    def lerobot_loop(scheduler_class, step_options):
        """lerobot's DiffusionPolicy.conditional_sample: a [B] long timestep per call, no scale_model_input."""
        def build(steps):
            scheduler = scheduler_class(**LEROBOT)

            def run():
                scheduler.set_timesteps(steps)
                x = torch.randn((batch, *shape), device=device)
                for t in scheduler.timesteps:
                    out = guided(x, torch.full(x.shape[:1], t, dtype=torch.long, device=device))
                    x = scheduler.step(out, t, x, **step_options).prev_sample
                return x
            return run
        return build

    def lerobot_sampler(method):
        """A reused fastdiff.Sampler in lerobot's loop's place: its schedule as the DiscreteVP path, diffusers'
        timesteps as the grid, clip_sample as x0's clamp."""
        import fastdiff

        labels = {"y": y} if cfg == 1.0 else {"y": y, "null_y": NULL_LABEL}

        def build(steps):
            model = fd.DiffusersModel(free_model, diffusers.DDPMScheduler(**LEROBOT).config)
            built = fastdiff.Sampler(free_model, None, cfg, shape=shape, batch_size=batch, device=device,
                                     path=model.path, prediction="eps", method=method, clip_sample=1.0,
                                     timesteps=model.ddim_timesteps(steps), **labels)
            return lambda: built(seed=0)
        return build

    out = []
    for theirs, ours in (("EulerDiscreteScheduler", "FastDiffEulerScheduler"),
                         ("DDIMScheduler", "FastDiffDDIMScheduler"),
                         ("DPMSolverMultistepScheduler", "FastDiffDPMSolverMultistepScheduler")):
        out.append(Subject(ours, pipeline_loop(getattr(fd, ours), {}), theirs, "diffusers' default config"))
        out.append(Subject(theirs, pipeline_loop(getattr(diffusers, theirs), {}), None, "diffusers' default config"))
    out += [Subject("lerobot:FastDiffDDPMScheduler", lerobot_loop(fd.FastDiffDDPMScheduler, {}),
                    "lerobot:DDPMScheduler", "lerobot's settings and loop, 100 steps", 100),
            Subject("lerobot:fastdiff.Sampler(ddpm)", lerobot_sampler("ddpm"), "lerobot:DDPMScheduler",
                    "a reused Sampler, method='ddpm', clip_sample=1", 100),
            Subject("lerobot:fastdiff.Sampler(ddim)", lerobot_sampler("ddim"), "lerobot:DDIMScheduler",
                    "a reused Sampler, method='ddim', clip_sample=1"),
            Subject("lerobot:DDPMScheduler", lerobot_loop(diffusers.DDPMScheduler, {}), None,
                    "lerobot's DiffusionPolicy loop, 100 steps", 100),
            Subject("lerobot:FastDiffDDIMScheduler", lerobot_loop(fd.FastDiffDDIMScheduler, {}),
                    "lerobot:DDIMScheduler", "lerobot's settings and loop"),
            Subject("lerobot:DDIMScheduler", lerobot_loop(diffusers.DDIMScheduler, {}), None,
                    "lerobot's DiffusionPolicy loop, 10 steps")]
    return out


def subjects(batch: int, cfg: float, shape=SHAPE, device="cpu") -> tuple[list[Subject], list[str]]:
    """Every subject of one (batch, cfg) case, and notes on those skipped (a library or Sampler absent)."""
    y = torch.zeros(batch, dtype=torch.long, device=device)
    notes: list[str] = []
    found = [s for family in (_fastdiff_subjects, _k_diffusion_subjects, _diffusers_subjects)
             for s in family(batch, cfg, tuple(shape), y, torch.device(device), notes)]
    return found, notes


def model_seconds(shape=SHAPE, device="cpu", repeat: int = 15) -> float:
    """The free model's own time per call, as the loops call it. timeit, not time_interleaved: a ~0.1 µs call
    is shorter than time_interleaved's call of a case function around it."""
    x, t, y = torch.zeros((1, *shape), device=device), torch.zeros(1, device=device), torch.zeros(1, device=device)
    timer = timeit.Timer("model(x, t, y)", globals={"model": free_model, "x": x, "t": t, "y": y})
    number = 100_000
    return statistics.median(timer.repeat(repeat, number)) / number


def busy_cores_probe_seconds() -> float:
    """The median time of torch.exp over 1000 floats on the CPU: a few µs while torch's threads have their cores;
    a scheduler slice (~8 ms on the shared 2-core VM) when another process holds one and this process's math
    library splits the op over its threads (it waits for the descheduled one, as does each loop call making such
    an op: diffusers' set_timesteps takes ** 0.5 of 1000 alphas)."""
    x = torch.rand(1000)
    timer = timeit.Timer("x.exp()", globals={"x": x})
    return statistics.median(timer.repeat(5, 3)) / 3


def fit_line(steps, per_round: dict, name: str) -> tuple[float, float]:
    """(fixed seconds per call, seconds per step) of ``name``: per round the least-squares line through its
    (steps, seconds) points, the medians of the rounds' intercepts and slopes (a round's drift cancels in it)."""
    mean_s = sum(steps) / len(steps)
    var = sum((s - mean_s) ** 2 for s in steps)
    slopes, intercepts = [], []
    for times in zip(*(per_round[f"{name}@{s}"] for s in steps)):
        mean_t = sum(times) / len(times)
        slope = sum((s - mean_s) * (t - mean_t) for s, t in zip(steps, times)) / var
        slopes.append(slope)
        intercepts.append(mean_t - slope * mean_s)
    return statistics.median(intercepts), statistics.median(slopes)


def _target(name: str, fixed_us: float, step_us: float, x_step: float | None) -> str:
    """The issue's target for this subject and whether these figures meet it ("" where none is set)."""
    if name == "fastdiff.Sampler":
        met = fixed_us <= SAMPLER_FIXED_US and step_us <= SAMPLER_STEP_US
        return f"fixed <= {SAMPLER_FIXED_US:g}, step <= {SAMPLER_STEP_US:g}: {'met' if met else 'missed'}"
    if name == "fastdiff.sample":
        return f"fixed <= {SAMPLE_FIXED_US:g}: {'met' if fixed_us <= SAMPLE_FIXED_US else 'missed'}"
    if x_step is not None and not name.startswith("fastdiff."):
        return f"step x peer >= 1: {'met' if x_step >= 1.0 else 'missed'}"
    return ""


def _ratio(peer: float | None, ours: float) -> float | None:
    return round(peer / ours, 3) if peer is not None and peer > 0 and ours > 0 else None


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def report(device="cpu", threads: int = THREADS, shape=SHAPE, batches=BATCHES, cfgs=CFGS, steps=STEPS,
           repeat: int = 15, log=print, min_time: float = 0.02) -> list[dict]:
    """Time every subject at each (batch, cfg) and step count, print the table of fixed µs per call and µs per
    step (the free model's time subtracted), the ratios to the peers and the issue's targets; return the rows
    (fastdiff.bench.harness writes them to its CSV). ``threads``: torch's CPU threads for the run (restored)."""
    import datetime

    import fastdiff
    from fastdiff.bench.case import Case
    from fastdiff.bench.timing import device_name, time_interleaved

    steps = sorted(set(steps))
    if len(steps) < 2:
        raise ValueError(f"latency needs two or more distinct step counts to split fixed and per-step costs, "
                         f"got {steps}")
    device = torch.device(device)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        name = device_name(device)
        model_s = model_seconds(shape, device, repeat)
        log(f"latency: sampling loops' own cost on a free model (returns its input), per-sample shape {tuple(shape)}, "
            f"{name}, {threads} threads; steps {', '.join(map(str, steps))}: per round a line through (steps, time), "
            f"medians of {repeat} interleaved rounds")
        log(f"free model: {model_s * 1e6:.3f} µs per call (subtracted from µs/step: one call per step)")
        log(f"busy-cores probe (after each case's timings): torch.exp of 1000 floats takes a few µs while the "
            f"{threads} threads have their cores, milliseconds when other processes hold them; then the rows' "
            f"fixed costs include such stalls (diffusers' set_timesteps makes one such op per call)")
        log(f"targets: fastdiff.Sampler reused <= {SAMPLER_FIXED_US:g} µs fixed and <= {SAMPLER_STEP_US:g} µs per "
            f"step; fastdiff.sample <= {SAMPLE_FIXED_US:g} µs fixed per call; adapters at least as fast per step as "
            f"the peer they replace (x peer: the peer's time / this row's, > 1 = faster)")
        log(f"{'subject':36s} {'B':>3s} {'cfg':>3s} {'fixed µs':>9s} {'µs/step':>8s} {'µs@steps':>13s} "
            f"{'x peer fixed':>12s} {'x peer step':>11s}  target / peer")
        rows = []
        for batch in batches:
            for cfg in cfgs:
                found, notes = subjects(batch, cfg, shape, device)
                group = [Case("latency", f"{s.name}@{n}", batch * math.prod(shape), "fp32", s.build(n), 0, s.note)
                         for s in found for n in steps]
                per_round: dict = {}
                time_interleaved(group, repeat, device=device, min_time=min_time, rounds=per_round)
                probe_s = busy_cores_probe_seconds()
                figures = {}
                for s in found:
                    fixed, per_step = fit_line(steps, per_round, s.name)
                    figures[s.name] = (fixed, per_step - model_s)  # one model call per step in every subject
                for s in found:
                    fixed, per_step = figures[s.name]
                    peer = figures.get(s.peer)
                    x_fixed, x_step = (_ratio(peer[0], fixed), _ratio(peer[1], per_step)) if peer else (None, None)
                    target = _target(s.name, fixed * 1e6, per_step * 1e6, x_step if s.peer else None)
                    at_steps = (fixed + s.steps * per_step) * 1e6
                    rows.append({"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": name,
                                 "threads": threads, "op": "latency", "dtype": "fp32", "N": batch * math.prod(shape),
                                 "backend": s.name, "median_ms": None, "GB/s": None, "pct_copy": None,
                                 "x_vs_baseline": None, "x_vs_compile": None, "fastdiff_speedup": None,
                                 "peak_mib": None, "note": s.note, "torch": torch.__version__,
                                 "fastdiff": fastdiff.__version__, "batch": batch, "cfg": cfg,
                                 "shape": "x".join(map(str, shape)), "steps": ",".join(map(str, steps)),
                                 "fixed_us": round(fixed * 1e6, 2), "per_step_us": round(per_step * 1e6, 3),
                                 "model_us": round(model_s * 1e6, 4), "exp_1000_us": round(probe_s * 1e6, 1),
                                 "at_steps": s.steps,
                                 "at_steps_us": round(at_steps, 1), "peer": s.peer, "x_peer_fixed": x_fixed,
                                 "x_peer_step": x_step, "target": target})
                    log(f"{s.name:36s} {batch:3d} {cfg:3g} {fixed * 1e6:9.1f} {per_step * 1e6:8.2f} "
                        f"{at_steps:8.0f} @{s.steps:<4d} {_times(x_fixed):>12s} {_times(x_step):>11s}  "
                        f"{'; '.join(p for p in (target, s.peer and f'vs {s.peer}') if p)}")
                for note in [f"busy-cores probe: {probe_s * 1e6:.1f} µs", *notes]:
                    log(f"{'':36s} {batch:3d} {cfg:3g}  {note}")
    finally:
        torch.set_num_threads(previous)
    return rows
