"""Which fastdiff method reproduces which diffusers scheduler (FastDiffScheduler.from_config), and the affine maps
between a pipeline's sample / model output and fastdiff's state on the VE (or, for flow matching, CondOT) path.

fastdiff's state is k-diffusion's x = z + sigma eps on VE(sigma_max = the grid's first sigma), t = 1 - sigma /
sigma_max (fastdiff.adapters.k_diffusion), whatever the pipeline's scaling ("scaling" below):

- "sigma": k-diffusion-style schedulers (Euler, Heun, LMS, KDPM2, DPMSolverSDE): the sample is that state; the
  model sees sample / sqrt(sigma^2 + 1);
- "vp": DDIM, DDPM, PNDM, DPMSolverMultistep, DEIS, DPMSolverSinglestep, SASolver: the sample is alpha x with
  alpha = 1 / sqrt(sigma^2 + 1); the model sees the sample. The methods used here are invariant under that per-time
  scaling (they step in x / alpha and sigma), so the VE state reproduces them; the scaling is folded into each
  stage's coefficient rows;
- "edm": EDM's preconditioning: the model sees c_in x, and x0 = c_skip x + c_out model_output;
- "flow": flow matching: the sample is (1 - s) z + s eps, fastdiff's CondOT at t = 1 - s, the model predicts
  v = eps - z;
- "cm": consistency models (CMStochasticIterativeScheduler): EDM's state and model input, the output made x0 by the
  boundary-condition scalings c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = (sigma - sigma_min) sd /
  sqrt(sigma^2 + sd^2);
- "discrete": LCM and TCD, whose steps read the training timestep (LCM's boundary condition, TCD's intermediate
  timestep floor((1 - gamma) t')): the state is the sample itself on the training schedule's DiscreteVP path, the
  grid its timesteps' flow times, and the method works on that path.

In each case the model output converts to x0 by x0 = a x + b model_output (:func:`x0_coefficients`), so stages are
built with prediction "x0" and (a, b) folded into their rows.
"""

from __future__ import annotations

import inspect
import math

import diffusers
import torch

SCALINGS = ("sigma", "vp", "edm", "flow", "cm", "discrete")
# the config keys FastDiffScheduler carries at the top level (the rest of the grid scheduler's config in grid_config)
COMMON = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
          "timestep_spacing", "steps_offset", "shift")

# class name -> (method, options, scaling, order: diffusers' scheduler.order, which pipelines slice timesteps by)
SUPPORTED = {
    "EulerDiscreteScheduler": ("euler", {}, "sigma", 1),
    "EulerAncestralDiscreteScheduler": ("euler_ancestral", {"eta": 1.0, "s_noise": 1.0}, "sigma", 1),
    "HeunDiscreteScheduler": ("heun", {}, "sigma", 2),
    "LMSDiscreteScheduler": ("lms", {"order": 4}, "sigma", 1),
    "KDPM2DiscreteScheduler": ("dpm_2", {}, "sigma", 2),
    "KDPM2AncestralDiscreteScheduler": ("dpm_2_ancestral", {"eta": 1.0, "s_noise": 1.0}, "sigma", 2),
    "DPMSolverSDEScheduler": ("dpmpp_sde", {"eta": 1.0, "s_noise": 1.0, "r": 0.5}, "sigma", 2),
    "EDMEulerScheduler": ("euler", {}, "edm", 1),
    "EDMDPMSolverMultistepScheduler": ("dpmpp_2m", {}, "edm", 1),
    "FlowMatchEulerDiscreteScheduler": ("euler", {}, "flow", 1),
    "FlowMatchHeunDiscreteScheduler": ("heun", {}, "flow", 2),
    "DDIMScheduler": ("ddim", {"eta": 0.0}, "vp", 1),
    "DDPMScheduler": ("ddpm", {"variance_type": "fixed_small"}, "vp", 1),
    "PNDMScheduler": ("pndm", {}, "vp", 1),
    "DPMSolverMultistepScheduler": ("dpmpp_2m", {}, "vp", 1),
    "DEISMultistepScheduler": ("deis", {"mode": "logrho", "order": 2, "lower_order_final": True}, "vp", 1),
    "DPMSolverSinglestepScheduler": ("dpm_singlestep", {"order": 2, "algorithm_type": "dpmsolver++",
                                                        "solver_type": "midpoint", "lower_order_final": False},
                                     "vp", 1),
    # issue 33's few-step schedulers (fastdiff.sampling.methods.few_step)
    "LCMScheduler": ("lcm", {"timestep_scaling": 10.0}, "discrete", 1),
    "TCDScheduler": ("tcd", {"eta": 0.3}, "discrete", 1),  # eta: step()'s (default 0.3, pipelines pass theirs)
    "CMStochasticIterativeScheduler": ("cm_multistep", {"sigma_min": 0.002, "s_noise": 1.0}, "cm", 1),
    "FlowMatchLCMScheduler": ("lcm", {}, "flow", 1),  # lcm on CondOT: x' = (1 - s') x0 + s' xi
    # x' = x - (s - s') u(x, t, r): Euler; the pipeline gives its flow map model the second time r = s' T itself
    "FlowMapEulerDiscreteScheduler": ("euler", {}, "flow", 1),
    # SA-Solver (fastdiff.sampling.methods.sa_solver): diffusers' order-2 weights are the paper's simple ones, its
    # lower_order_final its own rule; tau (its default tau_func of the step's timestep) is set per schedule (generic)
    "SASolverScheduler": ("sa_solver", {"predictor_order": 2, "corrector_order": 2, "simple_order_2": True,
                                        "lower_order_final": "diffusers", "eta": 1.0}, "vp", 1),
}
# where the grid of a "discrete" scheduler ends (training timestep): LCM's last step returns its denoised sample,
# TCD's steps to timestep 0
DISCRETE_END = {"LCMScheduler": -1, "TCDScheduler": 0}
# the method options read from the scheduler's config (its order, algorithm, ...): class -> {config key: option}
CONFIG_OPTIONS = {
    "DEISMultistepScheduler": {"solver_order": "order", "lower_order_final": "lower_order_final"},
    "DPMSolverSinglestepScheduler": {"solver_order": "order", "algorithm_type": "algorithm_type",
                                     "solver_type": "solver_type", "lower_order_final": "lower_order_final"},
    "LCMScheduler": {"timestep_scaling": "timestep_scaling"},
    "CMStochasticIterativeScheduler": {"sigma_min": "sigma_min", "s_noise": "s_noise"},
    "SASolverScheduler": {"predictor_order": "predictor_order", "corrector_order": "corrector_order",
                          "lower_order_final": "lower_order_final"},
}
# classes whose sigmas hold one interval per model evaluation whatever their end: a final_sigmas_type="sigma_min"
# grid ends on one more step of the same table (a zero-length one with Karras sigmas, which is taken)
ONE_LEVEL_PER_EVALUATION = ("DEISMultistepScheduler", "DPMSolverSinglestepScheduler",
                            "CMStochasticIterativeScheduler",  # (CM: a last step sigma_min -> sigma_min at T steps)
                            "SASolverScheduler")  # (Karras / exponential / beta sigmas: a zero-length last step)
REFUSED = {
    "UniPCMultistepScheduler": "use FastDiffUniPCMultistepScheduler (fastdiff.adapters.diffusers), which fuses "
                               "diffusers' own UniPC step",
}
# (config key, the value the mapping needs, why another value is refused) per class (None: every class)
REQUIRED = {
    None: [("clip_sample", False, "the fused step does not clamp x0 (FastDiffDDIMScheduler / FastDiffDDPMScheduler "
                                  "do)"),
           ("thresholding", False, "the fused step does not threshold x0 (FastDiffDDIMScheduler / "
                                   "FastDiffDDPMScheduler do)"),
           ("final_sigmas_type", "zero", "a last step to sigma_min ends on a zero-length or lower-order step that "
                                         "the method's table does not reproduce")],
    "FlowMatchEulerDiscreteScheduler": [("stochastic_sampling", False, "use FastDiffFlowMatchEulerScheduler"),
                                        ("invert_sigmas", False, "fastdiff's grid runs from noise to data")],
    "DDPMScheduler": [("variance_type", "fixed_small", "only fixed_small is invariant under the VE rescaling; "
                                                       "use FastDiffDDPMScheduler")],
    "PNDMScheduler": [("skip_prk_steps", True, "the Runge-Kutta warm-up (PRK) has no fastdiff method; SD 1.5's "
                                               "config sets skip_prk_steps=True (PLMS)"),
                      ("prediction_type", "epsilon", "PNDM combines the raw model outputs and converts the "
                                                     "combination to eps with the current sample, which differs from "
                                                     "combining eps predictions except for epsilon models")],
    "DPMSolverMultistepScheduler": [("algorithm_type", "dpmsolver++", "fastdiff's dpmpp_2m is DPM-Solver++; use "
                                                                      "FastDiffDPMSolverMultistepScheduler"),
                                    ("solver_type", "midpoint", "dpmpp_2m is the midpoint form"),
                                    ("euler_at_final", False, "dpmpp_2m is first order on the last step only"),
                                    ("use_lu_lambdas", False, "the grid would not be diffusers' sigmas"),
                                    ("variance_type", None, "a learned variance needs the model's variance output")],
    "DPMSolverSinglestepScheduler": [("variance_type", None, "a learned variance needs the model's variance output")],
    "LCMScheduler": [("rescale_betas_zero_snr", False, "the DiscreteVP path needs alphas_cumprod > 0")],
    "TCDScheduler": [("rescale_betas_zero_snr", False, "the DiscreteVP path needs alphas_cumprod > 0")],
    "CMStochasticIterativeScheduler": [("clip_denoised", False, "the fused step does not clamp the denoised "
                                                                "sample")],
    "SASolverScheduler": [("algorithm_type", "data_prediction", "fastdiff's sa_solver integrates x0 predictions; "
                                                                "noise_prediction's weights are another integrator"),
                          ("tau_func", None, "sa_solver's noise fraction is eta on an interval of the grid; a "
                                             "custom tau_func is not expressible (the default's tau = 1 on timesteps "
                                             "200-800 is)"),
                          ("variance_type", None, "a learned variance needs the model's variance output"),
                          ("use_flow_sigmas", False, "flow sigmas with SA-Solver's VP conversions are not one of "
                                                     "FastDiffScheduler's scalings")],
    "FlowMatchLCMScheduler": [("scale_factors", None, "its upscaling of x0 between steps changes the shape"),
                              ("invert_sigmas", False, "fastdiff's grid runs from noise to data")],
    "EDMDPMSolverMultistepScheduler": [("algorithm_type", "dpmsolver++", "fastdiff's dpmpp_2m is DPM-Solver++"),
                                       ("solver_type", "midpoint", "dpmpp_2m is the midpoint form"),
                                       ("euler_at_final", False, "dpmpp_2m is first order on the last step only"),
                                       ("solver_order", 2, "dpmpp_2m is second order")],
}
# the values of the config keys in CONFIG_OPTIONS that the methods reproduce, and why others are refused
CONFIG_VALUES = {
    ("DEISMultistepScheduler", "solver_order"): ((1, 2, 3), "diffusers' DEIS has orders 1-3"),
    ("DPMSolverSinglestepScheduler", "solver_order"): ((1, 2, 3), "diffusers' singlestep DPM-Solver has orders 1-3"),
    ("DPMSolverSinglestepScheduler", "algorithm_type"): (("dpmsolver++", "dpmsolver"),
                                                         "dpm_singlestep is deterministic: sde-dpmsolver++'s noise "
                                                         "has no fastdiff method"),
    ("DPMSolverSinglestepScheduler", "solver_type"): (("midpoint", "heun"), "dpm_singlestep has midpoint and heun"),
    ("SASolverScheduler", "predictor_order"): ((1, 2, 3, 4), "SA-Solver's orders are 1-4 (fastdiff's kernel reads at "
                                                             "most four earlier x0)"),
    ("SASolverScheduler", "corrector_order"): ((1, 2, 3, 4), "SA-Solver's orders are 1-4 (fastdiff's kernel reads at "
                                                             "most four earlier x0)"),
    ("SASolverScheduler", "lower_order_final"): ((True, False), "lower_order_final is a flag"),
}
PREDICTIONS = {"sigma": ("epsilon", "v_prediction", "sample"), "vp": ("epsilon", "v_prediction", "sample"),
               "edm": ("epsilon", "v_prediction"), "flow": (None, "flow_prediction"), "cm": (None,),
               "discrete": ("epsilon", "v_prediction", "sample")}


def identify(config: dict) -> str:
    """The diffusers scheduler class a config belongs to: its ``_class_name`` (a config loaded from a file, e.g. a
    pretrained pipeline's, carries it), else the one known class whose __init__ takes exactly its keys (a
    scheduler made in Python has no _class_name). ValueError where that is ambiguous or unknown."""
    name = config.get("_class_name")
    if name:
        return name
    keys = {k for k in config if not k.startswith("_")}
    names = [n for n in (*SUPPORTED, *REFUSED) if hasattr(diffusers, n)]
    found = [n for n in names if set(inspect.signature(getattr(diffusers, n).__init__).parameters) - {"self"} == keys]
    if len(found) == 1:
        return found[0]
    which = f"{', '.join(found)} share its keys" if found else "its keys match no scheduler FastDiffScheduler knows"
    raise ValueError(f"the config does not name its scheduler (no _class_name) and {which}: pass the scheduler "
                     "itself, FastDiffScheduler.from_config(pipe.scheduler), or a config with _class_name")


def fastdiff_config(name: str, config: dict) -> dict:
    """FastDiffScheduler's config for diffusers scheduler ``name``'s config; ValueError naming the scheduler or the
    option where no fastdiff method reproduces it."""
    if name in REFUSED:
        raise ValueError(f"FastDiffScheduler cannot replace {name}: {REFUSED[name]}")
    if name not in SUPPORTED:
        raise ValueError(f"FastDiffScheduler has no mapping for {name}; it replaces {', '.join(SUPPORTED)}")
    method, options, scaling, _ = SUPPORTED[name]
    for key, want, why in REQUIRED[None] + REQUIRED.get(name, []):
        if key == "final_sigmas_type" and name in ONE_LEVEL_PER_EVALUATION:
            continue
        if key in config and config[key] != want:
            raise ValueError(f"{name} with {key}={config[key]!r} is not supported by FastDiffScheduler (it needs "
                             f"{key}={want!r}): {why}")
    options = dict(options)
    for key, option in CONFIG_OPTIONS.get(name, {}).items():
        value = config.get(key, options[option])
        allowed, why = CONFIG_VALUES.get((name, key), (None, ""))
        if allowed is not None and value not in allowed:
            raise ValueError(f"{name} with {key}={value!r} is not supported by FastDiffScheduler (it takes "
                             f"{', '.join(map(repr, allowed))}): {why}")
        options[option] = value
    if name == "DPMSolverMultistepScheduler" and config.get("solver_order", 2) not in (1, 2):
        raise ValueError(f"{name} with solver_order={config['solver_order']!r} is not supported by FastDiffScheduler "
                         "(dpmpp_2m is second order; solver_order=1 maps to 'ddim'); use "
                         "FastDiffDPMSolverMultistepScheduler")
    if name == "SASolverScheduler" and options["lower_order_final"] is True:
        options["lower_order_final"] = "diffusers"  # sa_solver's True is ComfyUI's rule
    if name == "DPMSolverMultistepScheduler" and config.get("solver_order", 2) == 1:
        method, options = "ddim", {"eta": 0.0}
    ptype = config.get("prediction_type")
    if ptype not in PREDICTIONS[scaling]:
        raise ValueError(f"{name} with prediction_type={ptype!r} is not supported by FastDiffScheduler (it takes "
                         f"{', '.join(p for p in PREDICTIONS[scaling] if p)})")
    grid_config = {k: v for k, v in config.items() if not k.startswith("_")}
    return {"method": method, "method_options": dict(options), "grid_scheduler": name, "grid_config": grid_config,
            "scaling": scaling, **{k: config[k] for k in COMMON if k in config}}


def x0_coefficients(scaling: str, ptype, sigma: float, sigma_data: float = 0.5,
                    sigma_min: float = 0.0) -> tuple[float, float]:
    """(a, b) with x0 = a x + b model_output at noise level sigma, x fastdiff's state (not "discrete", whose
    conversions are its path's)."""
    if scaling == "cm":  # the consistency models' boundary condition (EDM's with sigma - sigma_min)
        d = sigma - sigma_min
        return sigma_data ** 2 / (d * d + sigma_data ** 2), d * sigma_data / math.sqrt(sigma * sigma + sigma_data ** 2)
    if scaling == "flow":
        return 1.0, -sigma  # v = eps - z, x = (1 - s) z + s eps
    if scaling == "edm":  # EDM's c_skip, c_out
        c_out = sigma * sigma_data / math.sqrt(sigma * sigma + sigma_data * sigma_data)
        return sigma_data ** 2 / (sigma * sigma + sigma_data ** 2), c_out if ptype == "epsilon" else -c_out
    if ptype == "epsilon":
        return 1.0, -sigma
    if ptype == "v_prediction":
        return 1.0 / (sigma * sigma + 1.0), -sigma / math.sqrt(sigma * sigma + 1.0)
    return 0.0, 1.0  # sample


def sample_scale(scaling: str, sigma: float) -> float:
    """q with the pipeline's sample = q x (x fastdiff's state)."""
    return 1.0 / math.sqrt(sigma * sigma + 1.0) if scaling == "vp" else 1.0


def model_input_scale(scaling: str, sigma: float, sigma_data: float = 0.5) -> float:
    """scale_model_input's factor on the pipeline's sample at noise level sigma."""
    if scaling == "sigma":
        return 1.0 / math.sqrt(sigma * sigma + 1.0)
    if scaling in ("edm", "cm"):
        return 1.0 / math.sqrt(sigma * sigma + sigma_data * sigma_data)
    return 1.0


def noise_levels(name: str, orig) -> list[float]:
    """The grid's noise levels (decreasing; float64) after ``orig.set_timesteps``: k-diffusion's sigma (the flow
    sigma s for flow matching); ValueError where diffusers' steps do not form one grid."""
    if name in ("DDIMScheduler", "PNDMScheduler", "DDPMScheduler"):
        levels = _vp_levels(name, orig)
    elif name in ONE_LEVEL_PER_EVALUATION:  # every interval is a step, a zero-length last one too
        levels = orig.sigmas.detach().cpu().double().tolist()
    else:
        levels = torch.unique_consecutive(orig.sigmas.detach().cpu()).double().tolist()  # two-stage: repeated
    # (DDIM / PNDM with set_alpha_to_one=False and steps_offset=0 end on a zero-length step, which they take)
    if not all(math.isfinite(s) and s >= 0 for s in levels) or any(b >= a for a, b in zip(levels, levels[1:-1])) \
            or levels[-1] > levels[-2]:
        raise ValueError(f"{name}'s noise levels {levels} are not finite and decreasing (rescale_betas_zero_snr?): "
                         "FastDiffScheduler steps on a finite VE grid")
    return levels


def _vp_levels(name: str, orig) -> list[float]:
    ac = orig.alphas_cumprod.double()
    ts = torch.unique_consecutive(orig.timesteps.detach().cpu()).tolist()  # PNDM repeats its second timestep
    if name == "DDPMScheduler":  # its previous_timestep: the next entry, -1 after the last
        nxt = [*ts[1:], -1]
    else:  # DDIM and PNDM step from t to t - num_train_timesteps // steps, whatever the spacing
        ratio = orig.config.num_train_timesteps // orig.num_inference_steps
        nxt = [t - ratio for t in ts]
        if nxt[:-1] != ts[1:]:
            raise ValueError(f"{name} with timestep_spacing={orig.config.timestep_spacing!r} steps from each "
                             f"timestep t to t - {ratio}, which is not the next timestep here ({ts}); "
                             "FastDiffScheduler needs a consistent grid: use timestep_spacing='leading'")
    final = float(orig.final_alpha_cumprod) if hasattr(orig, "final_alpha_cumprod") else 1.0
    alphas = [float(ac[int(t)]) for t in ts] + [float(ac[nxt[-1]]) if nxt[-1] >= 0 else final]
    return [math.sqrt(max(0.0, 1.0 - a) / a) for a in alphas]
