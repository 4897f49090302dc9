"""The method registry (fastdiff.sampling.methods): the built-in methods' records, their stage tables
unchanged by the registry (hashes recorded from the pre-registry dispatch), a method added by one
decorated function, and the refusal of options a method does not take."""

import dataclasses
import hashlib
import math

import pytest
import torch

import fastdiff
import fastdiff.sampling
from fastdiff import cli
from fastdiff.paths import get_path
from fastdiff.sampling.methods import coefficients
from fastdiff.sampling.methods.coefficients import Stage, build_stages, needed_conversions
from fastdiff.sampling.methods import Method, get_method, method_names, methods, register_method, unregister_method


BUILTIN = ("euler", "heun", "ddim", "ddpm", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde",
           "ipndm", "ipndm_v", "lms", "pndm", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "unipc",
           "deis", "dpm_singlestep", "res_multistep", "res_multistep_ancestral", "seeds_2", "exp_heun_2_x0",
           "exp_heun_2_x0_sde", "seeds_3", "er_sde", "euler_ancestral_RF", "dpm_2_ancestral_RF",
           "dpmpp_2s_ancestral_RF", "heunpp2", "gradient_estimation", "lcm", "tcd", "cm_multistep", "sa_solver",
           "sa_solver_pece", "dpm_fast", "dpm_adaptive", "annealed_langevin", "reverse_diffusion")  # registration order
CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")
# one evaluation on the step to sigma = 0 (k-diffusion's and ComfyUI's two-stage methods)
LAST_STEP_EULER = ("dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "seeds_2", "exp_heun_2_x0",
                   "exp_heun_2_x0_sde", "dpm_2_ancestral_RF", "dpmpp_2s_ancestral_RF")


SA_SOLVER = ("eta", "sde_start_percent", "sde_end_percent", "s_noise", "predictor_order", "corrector_order",
             "simple_order_2", "lower_order_final")
# issue 33's methods: their sample() options (ComfyUI's / diffusers' names)
NEW_OPTIONS = {"res_multistep": (), "res_multistep_ancestral": ("eta", "s_noise"),
               "seeds_2": ("eta", "s_noise", "r", "solver_type"), "exp_heun_2_x0": ("solver_type",),
               "exp_heun_2_x0_sde": ("eta", "s_noise", "solver_type"), "seeds_3": ("eta", "s_noise", "r_1", "r_2"),
               "er_sde": ("solver_type", "max_stage", "eta", "s_noise"), "euler_ancestral_RF": ("eta", "s_noise"),
               "dpm_2_ancestral_RF": ("eta", "s_noise"), "dpmpp_2s_ancestral_RF": ("eta", "s_noise"), "heunpp2": CHURN,
               "gradient_estimation": ("ge_gamma",), "lcm": ("s_noise", "s_noise_end", "timestep_scaling"),
               "tcd": ("eta",), "cm_multistep": ("sigma_min", "s_noise", "sigma_data"),
               "dpm_fast": ("eta", "s_noise"),
               "sa_solver": SA_SOLVER, "sa_solver_pece": SA_SOLVER,
               "dpm_adaptive": ("order", "rtol", "atol", "h_init", "pcoeff", "icoeff", "dcoeff", "accept_safety",
                                "h_max", "eta", "s_noise")}


def _takers(option: str) -> str:
    """How the option errors name the methods taking ``option``: method='a' or 'b' ..."""
    return "method=" + " or ".join(repr(m.name) for m in methods() if option in m.options)


def test_registry_lists_the_builtin_methods_in_order():
    assert fastdiff.sampling.METHODS == coefficients.METHODS == method_names() == BUILTIN
    records = {m.name: m for m in methods()}
    assert all(isinstance(m, Method) for m in records.values())
    evals = {"euler": 1, "heun": 2, "ddim": 1, "ddpm": 1, "dpmpp_2m": 1, "euler_ancestral": 1, "dpmpp_2m_sde": 1,
             "dpmpp_3m_sde": 1, "lms": 1, "dpm_2": 2, "dpm_2_ancestral": 2, "dpmpp_2s_ancestral": 2, "dpmpp_sde": 2,
             "ipndm": 1, "ipndm_v": 1, "unipc": 1, "deis": 1, "annealed_langevin": "n_steps_each",
             "reverse_diffusion": 1, "pndm": 1, "dpm_singlestep": 1, "res_multistep": 1, "res_multistep_ancestral": 1,
             "seeds_2": 2, "exp_heun_2_x0": 2, "exp_heun_2_x0_sde": 2, "seeds_3": 3, "er_sde": 1,
             "euler_ancestral_RF": 1, "dpm_2_ancestral_RF": 2, "dpmpp_2s_ancestral_RF": 2, "heunpp2": 3,
             "gradient_estimation": 1, "lcm": 1, "tcd": 1, "cm_multistep": 1, "sa_solver": 1, "sa_solver_pece": 2,
             "dpm_fast": 3, "dpm_adaptive": 3}
    assert {n: m.evals_per_step for n, m in records.items()} == evals
    assert coefficients.EVALS_PER_STEP == evals
    assert {n: m.options for n, m in records.items()} == {"euler": ("sigma", *CHURN), "heun": CHURN, "ddim": ("eta",),
                                                         "ddpm": ("variance_type",), "dpmpp_2m": (), "euler_ancestral": ("eta", "s_noise"),
                                                         "dpmpp_2m_sde": ("eta", "s_noise", "solver_type"),
                                                         "dpmpp_3m_sde": ("eta", "s_noise"), "lms": ("order",),
                                                         "dpm_2": CHURN, "dpm_2_ancestral": ("eta", "s_noise"),
                                                         "dpmpp_2s_ancestral": ("eta", "s_noise"),
                                                         "dpmpp_sde": ("eta", "s_noise", "r"),
                                                         "ipndm": ("order",), "ipndm_v": ("order",),
                                                         "deis": ("order", "mode", "lower_order_final"),
                                                         "pndm": (),
                                                         "dpm_singlestep": ("order", "algorithm_type", "solver_type",
                                                                            "lower_order_final"),
                                                         "unipc": ("order", "solver_type", "lower_order_final"),
                                                         "annealed_langevin": ("n_steps_each", "step_lr", "denoise"),
                                                         "reverse_diffusion": (), **NEW_OPTIONS}
    assert records["euler_ancestral"].defaults == {"eta": 1.0, "s_noise": 1.0}
    assert records["ddpm"].defaults == {"variance_type": "fixed_small"}
    assert records["dpmpp_2m_sde"].defaults == {"eta": 1.0, "s_noise": 1.0, "solver_type": "midpoint"}
    for m in records.values():
        assert m.description and "\n" not in m.description
        assert get_method(m.name) is m
    with pytest.raises(dataclasses.FrozenInstanceError):
        records["euler"].evals_per_step = 3


def test_get_method_names_the_choices():
    with pytest.raises(ValueError, match=r"method='rk4' is not a sampler; choose one of euler, heun, ddim, ddpm, dpmpp_2m, euler_ancestral"):
        get_method("rk4")
    with pytest.raises(ValueError, match="not a sampler"):
        build_stages("rk4", get_path("condot"), [0.0, 1.0], "velocity")


def test_needed_conversions_are_the_pre_registry_table():
    want = {("euler", False): ("velocity", "x0"), ("euler", True): ("velocity", "score", "x0"),
            ("heun", False): ("velocity", "x0"), ("heun", True): ("velocity", "x0"),
            ("ddim", False): ("x0", "eps"), ("ddim", True): ("x0", "eps"),
            ("dpmpp_2m", False): ("x0",), ("dpmpp_2m", True): ("x0",)}
    assert {k: needed_conversions(*k) for k in want} == want
    euler = get_method("euler")
    assert euler.needed_conversions(sigma=0.0) == euler.needed_conversions(sigma=None) == ("velocity", "x0")
    assert euler.needed_conversions(sigma=0.3) == euler.needed_conversions(sigma=lambda t: 0.0) == \
        ("velocity", "score", "x0")


# ---- stage tables: bit-identical to the pre-registry builders ------------------------------------------
GRIDS = {"uniform5": [1e-3 + (1 - 1e-3) * i / 5 for i in range(6)], "uneven4": [0.01, 0.2, 0.45, 0.8, 1.0]}
VARIANTS = {"euler": ("euler", {}), "euler+sigma": ("euler", {"sigma": lambda t: 0.3 + t}), "heun": ("heun", {}),
            "ddim": ("ddim", {}), "ddim+eta": ("ddim", {"eta": 0.7}), "dpmpp_2m": ("dpmpp_2m", {})}
# sha256 (first 16 hex digits) of repr([dataclasses.astuple(s) for s in stages]) over path in (condot, vp)
# x prediction in (velocity, eps) x GRIDS, in that order; the per-table hashes were recorded from the
# if-chain dispatch before the registry and are unchanged.
TABLE_HASHES = {
    "euler": "14dbc3939fbfb8d3",
    "euler+sigma": "e3006b06945d5cf7",
    "heun": "b84dfaf9d1431ff3",
    "ddim": "62795e72840a9133",
    "ddim+eta": "a4310246600136a1",
    "dpmpp_2m": "b3c69410cb616a24",
}


def _tables(method, kw):
    for path in ("condot", "vp"):
        for prediction in ("velocity", "eps"):
            for grid in GRIDS.values():
                yield build_stages(method, get_path(path), grid, prediction, **kw)


def _hash(tables):
    # the fields of the original Stage; a later field (history, more_draws, start_churn, brownian_terms, corrector) enters
    # only where a stage uses it
    later = {"history": (), "more_draws": (), "start_churn": None, "brownian_terms": (), "corrector": None}
    # CFG++'s share of c_pred, side blend and form: computed from the same conversions (test_guidance.py,
    # test_cfg_pp_multistep.py)
    derived = {"cfg_pp", "side_blend", "cfg_pp_form"}

    def fields(s):
        return tuple(dataclasses.astuple(s)[i] for i, f in enumerate(dataclasses.fields(s))
                     if f.name not in derived and (f.name not in later or getattr(s, f.name) != later[f.name]))

    text = repr([[fields(s) for s in stages] for stages in tables])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stage_tables_are_unchanged(variant):
    method, kw = VARIANTS[variant]
    assert _hash(_tables(method, kw)) == TABLE_HASHES[variant]


def test_build_stages_is_the_registered_builder():
    path, grid = get_path("vp"), GRIDS["uneven4"]
    assert build_stages("ddim", path, grid, "eps", eta=0.5, sigma=lambda t: 1.0) == \
        get_method("ddim").stages(path, grid, "eps", eta=0.5)
    assert build_stages("heun", path, grid, "eps", eta=0.5) == get_method("heun").stages(path, grid, "eps")
    with pytest.raises(TypeError, match="takes no options, not eta"):
        get_method("dpmpp_2m").stages(path, grid, "eps", eta=0.5)
    with pytest.raises(TypeError, match="takes s_churn, s_tmin, s_tmax, s_noise, not eta"):
        get_method("heun").stages(path, grid, "eps", eta=0.5)


def test_coefficients_match_closed_forms():
    grid = GRIDS["uneven4"]
    # Euler on CondOT with a velocity model: x' = x + h u
    for st, t, t1 in zip(build_stages("euler", get_path("condot"), grid, "velocity"), grid, grid[1:]):
        assert (st.c_x, st.c_pred, st.c_noise) == (1.0, pytest.approx(t1 - t, rel=1e-15), 0.0)
    # deterministic DDIM with an eps model: x' = alpha'/alpha x + (beta' - alpha' beta / alpha) eps
    vp = get_path("vp")
    for st, t, t1 in zip(build_stages("ddim", vp, grid, "eps"), grid, grid[1:]):
        (al, be), (al1, be1) = vp.coefficients(t)[:2], vp.coefficients(t1)[:2]
        assert st.c_x == pytest.approx(al1 / al, rel=1e-12)
        assert st.c_pred == pytest.approx(be1 - al1 * be / al, rel=1e-12, abs=1e-15)
    # evaluations per step: the stage count on a path without a singular end point (k-diffusion's
    # two-stage methods take one Euler evaluation on the step to sigma = 0)
    # evaluations fewer than evals() x steps: seeds_3 takes one on the step to sigma = 0, heunpp2 two on it and one on
    # the step before; annealed Langevin's Tweedie step and PLMS's Heun first step take one more
    fewer = {**dict.fromkeys(LAST_STEP_EULER, 1), "seeds_3": 2, "heunpp2": 3, "annealed_langevin": -1, "pndm": -1,
             "sa_solver_pece": 1}  # (PECE: no correction, so one evaluation, on the first step)
    for m in methods():
        if m.run is not None:  # dpm_adaptive: steps chosen while sampling, no table
            continue
        stages = build_stages(m.name, get_path("condot"), grid, "velocity")
        if m.step_grid is not None:  # dpm_fast: the grid's steps are its budget of evaluations
            assert len(stages) == len(grid) - 1
            continue
        assert len(stages) == m.evals() * (len(grid) - 1) - fewer.get(m.name, 0), m.name


# ---- adding a method is one decorated function -----------------------------------------------------------
@pytest.fixture
def toy_method():
    """A toy method (Euler with an optional eta that scales nothing), unregistered afterwards."""

    @register_method("toy_euler", options=("eta",), evals_per_step=1, conversions=("velocity",),
                     description="a test method: Euler's ODE step")
    def _toy(path, grid, prediction, eta=0.0):
        stages = []
        for i, (t, t1) in enumerate(zip(grid, grid[1:])):
            a, b = coefficients.affine_coefficients(path, t, prediction, "velocity")
            stages.append(Stage(i, t, "x", "x", 1.0 + (t1 - t) * a, (t1 - t) * b, stream=1 + i,
                                x0=coefficients.affine_coefficients(path, t, prediction, "x0"), final=True))
        return stages

    try:
        yield "toy_euler"
    finally:
        unregister_method("toy_euler")


def _model(x, t, y):
    return -x + 0.5 * t[:, None]


def test_a_registered_method_is_usable_everywhere(toy_method):
    assert fastdiff.sampling.METHODS == (*BUILTIN, toy_method)
    assert coefficients.METHODS[-1] == toy_method and coefficients.EVALS_PER_STEP[toy_method] == 1
    kw = dict(shape=(3,), batch_size=4, seed=7, backend="reference")
    got = fastdiff.sample(_model, 6, method=toy_method, **kw)
    torch.testing.assert_close(got, fastdiff.sample(_model, 6, method="euler", **kw), rtol=0, atol=0)
    assert fastdiff.sample(_model, 6, method=toy_method, eta=0.5, **kw).shape == (4, 3)
    # the CLI's choices and help come from the registry
    args = cli._parser().parse_args(["sample", "--checkpoint", "c", "--method", toy_method])
    assert args.method == toy_method
    action = next(a for a in cli._parser()._subparsers._group_actions[0].choices["sample"]._actions
                  if "--method" in a.option_strings)
    assert toy_method in action.choices and "a test method" in action.help
    # the options' errors name it among the methods taking eta
    with pytest.raises(ValueError, match=f"eta applies to {_takers('eta')}") as err:
        fastdiff.sample(_model, 6, method="heun", eta=0.5, **kw)
    assert str(err.value).startswith("eta applies to method='ddim'") and "or 'toy_euler';" in str(err.value)


def test_an_unregistered_method_is_gone():
    builder = register_method("toy_gone", evals_per_step=1, conversions=(), description="gone")(lambda *a: [])
    assert unregister_method("toy_gone").build is builder
    assert "toy_gone" not in fastdiff.sampling.METHODS
    with pytest.raises(ValueError, match="not a sampler"):
        fastdiff.sample(_model, 2, method="toy_gone", shape=(3,), batch_size=1)
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["sample", "--checkpoint", "c", "--method", "toy_gone"])
    with pytest.raises(ValueError, match="not a sampler"):
        unregister_method("toy_gone")


def test_register_method_checks_its_record():
    with pytest.raises(ValueError, match="already registered"):
        register_method("euler", evals_per_step=1, conversions=(), description="")(lambda *a: [])
    with pytest.raises(ValueError, match="unknown option"):
        register_method("toy_unknown", options=("no_such_option",), evals_per_step=1, conversions=(), description="")
    with pytest.raises(ValueError, match="evals_per_step"):
        register_method("toy_zero", evals_per_step=0, conversions=(), description="")
    assert method_names() == BUILTIN


# ---- options a method does not take ----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(method="dpmpp_2m", sigma=0.5), (r"sigma applies to method='euler'; method='dpmpp_2m' does not take it "
                                          r"\(it takes no options\)")),
    (dict(method="heun", sigma=0.5), (r"sigma applies to method='euler'; method='heun' does not take it "
                                      r"\(it takes s_churn, s_tmin, s_tmax, s_noise\)")),
    (dict(method="dpmpp_2m", sigma=lambda t: 0.0), r"sigma applies to method='euler'; method='dpmpp_2m'"),
    (dict(method="ddim", sigma=1.0, eta=0.5), (r"sigma applies to method='euler'; method='ddim' does not take "
                                               r"it \(it takes eta\)")),
    (dict(method="euler", eta=0.5), (rf"eta applies to {_takers('eta')}; method='euler' does not take it "
                                     r"\(it takes sigma, s_churn, s_tmin, s_tmax, s_noise\)")),
    (dict(method="heun", eta=1.0), rf"eta applies to {_takers('eta')}; method='heun'"),
])
def test_options_a_method_does_not_take_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastdiff.sample(_model, 2, shape=(3,), batch_size=1, **kwargs)


@pytest.mark.parametrize("method", ["euler", "heun", "ddim", "dpmpp_2m"])
def test_default_options_are_accepted_by_every_method(method):
    x = fastdiff.sample(_model, 3, shape=(3,), batch_size=2, method=method, sigma=0.0, eta=0.0, backend="reference")
    assert x.shape == (2, 3) and bool(torch.isfinite(x).all())
    assert math.isfinite(float(x.sum()))


def test_docs_method_table_is_the_registry():
    """docs/sampling.md carries methods_table(): a method added to the registry must be added to the docs."""
    from pathlib import Path

    from fastdiff.sampling.methods import methods_table

    docs = (Path(__file__).resolve().parents[1] / "docs" / "sampling.md").read_text()
    assert methods_table() in docs, "regenerate the table in docs/sampling.md from methods_table()"
