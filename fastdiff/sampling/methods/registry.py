"""The registry of sampling methods: one record per method, registered where its stage builder is written.

A method is a function ``(path, grid, prediction, **options) -> list[Stage]`` (the fused-kernel calls over
an increasing grid of flow times, fastdiff.sampling.methods.coefficients) plus what the rest of fastdiff needs to
know about it: the sample() options it takes, its cost in model evaluations per step, the prediction
conversions that must be finite at the grid's first point, and a one-line description. Adding a method::

    @register_method("my_method", options=("eta",), evals_per_step=1, conversions=("x0", "eps"),
                     description="what it does, in one line")
    def _my_method(path, grid, prediction, eta=0.0) -> list[Stage]:
        ...

makes it ``fastdiff.sample(method="my_method")``, a ``fastdiff sample --method`` choice and a member of
``METHODS``. Options are sample()'s per-method keyword arguments: ``sigma`` and ``eta`` are named in its
signature, any other is passed through ``sample(**options)``. ``options`` is a tuple of names or a dict
{name: this method's default}; a name new to ``OPTIONS`` is added with that default as its neutral
value. sample() refuses an option given a non-neutral value to a method that does not take it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastdiff import _checks
import fastdiff.sampling.methods.churn as churn

# sample()'s per-method options and the value that means "not used". A builder receives the options it
# takes as keywords: sigma as a function t -> sigma_t (or None for 0), eta as a float.
OPTIONS = {"sigma": 0.0, "eta": 0.0}
# The prediction types a method converts to at the grid's first point: a tuple, or a function of the
# options given non-default values (as keywords) that returns one.
Conversions = tuple | Callable[..., tuple]


def is_default(name: str, value) -> bool:
    """Whether ``value`` of option ``name`` means the option is not used (None, or the default; a callable
    sigma always counts as given)."""
    return value is None or (not callable(value) and value == OPTIONS[name])


@dataclass(frozen=True)
class Method:
    """One registered sampling method."""

    name: str
    build: Callable[..., list]  # (path, grid, prediction, **options) -> list[Stage]
    options: tuple[str, ...]  # sample() options it takes (keys of OPTIONS)
    defaults: dict  # this method's value of an option the caller does not give (else OPTIONS' neutral one)
    evals_per_step: int | str  # model evaluations per step (a 2B CFG call counts as one), or the option giving it
    conversions: Conversions  # prediction types needed finite at the grid start (see needed_conversions)
    description: str  # one line, for docs and the CLI help
    churn_options: bool = False  # takes EDM's churn options (fastdiff.sampling.methods.churn), applied around its builder
    inverts: bool = False  # runs on decreasing grids (inversion, fastdiff.invert), checked by a round trip test
    cfg_pp: bool = False  # its stages carry CFG++'s share through the clean estimate (Stage.cfg_pp)
    # (path, grid, **options) -> the times it steps between, where they are not the call's grid (dpm_fast: its own
    # steps between the grid's ends); the plan's grid for callbacks, step noise and editing. None: the call's grid
    step_grid: Callable[..., list] | None = None
    # (model, steps, cfg, **sample_arguments) -> samples: a method whose steps are chosen while it samples
    # (dpm_adaptive), which sample() hands the whole call to; its builder is not used. None: a stage table
    run: Callable[..., object] | None = None

    def needed_conversions(self, **options) -> tuple[str, ...]:
        """Prediction types this method converts to at the grid's first point, for these option values
        (options at their default, and options the method does not take, are left out)."""
        given = {k: v for k, v in options.items() if k in self.options and not is_default(k, v)}
        return tuple(self.conversions(**given) if callable(self.conversions) else self.conversions)

    def evals(self, **options) -> int:
        """Model evaluations per step for these option values (the method's defaults where not given)."""
        if isinstance(self.evals_per_step, int):
            return self.evals_per_step
        return int(self.option_values(**options)[self.evals_per_step])

    def option_values(self, **given) -> dict:
        """The value of each option this method takes: the caller's (None: not given), else the method's
        default, else the neutral value of OPTIONS."""
        return {o: given[o] if given.get(o) is not None else self.defaults.get(o, OPTIONS[o]) for o in self.options}

    def stages(self, path, grid, prediction, **options) -> list:
        """The stage table over ``grid``; options the method does not take are an error."""
        extra = sorted(set(options) - set(self.options))
        if extra:
            raise TypeError(f"method={self.name!r} takes {_takes(self)}, not {', '.join(extra)}")
        if not self.churn_options:
            return self.build(path, grid, prediction, **options)
        given = {k: options.pop(k) for k in churn.OPTIONS if k in options}
        return churn.churned(self.build, path, grid, prediction, given, **options)


_REGISTRY: dict[str, Method] = {}


def _takes(method: Method) -> str:
    return ", ".join(method.options) if method.options else "no options"


def register_method(name: str, *, options: tuple[str, ...] | dict = (), evals_per_step: int | str,
                    conversions: Conversions, description: str, churn_options: bool = False, inverts: bool = False,
                    cfg_pp: bool = False, step_grid: Callable[..., list] | None = None,
                    run: Callable[..., object] | None = None):
    """Decorator: register the stage builder it decorates as method ``name`` (returns the builder).
    ``churn_options=True``: the method also takes EDM's s_churn, s_tmin, s_tmax and s_noise, applied around the
    builder (fastdiff.sampling.methods.churn: each step built from the raised noise level's time). ``inverts=True``: its
    builder is also right on decreasing grids (data to noise: fastdiff.invert), as a round trip test checks.
    ``step_grid``: where the method steps on times of its own between the call's grid's ends, the function giving
    them (path, grid, **options) -> times; its builder gets the call's grid, its stages' steps index these times.
    ``run``: a method that chooses its steps while it samples (no stage table): sample() and Sampler hand it the
    call, run(model, steps, cfg, **arguments)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a method name must be an identifier, got {name!r}")
    churn_options, inverts = _checks.flag("churn_options", churn_options), _checks.flag("inverts", inverts)
    defaults = dict(options) if isinstance(options, dict) else {}
    options = tuple(options)
    if churn_options:
        options += tuple(o for o in churn.OPTIONS if o not in options)
        defaults = {**churn.OPTIONS, **defaults}
    for o in options:
        if not isinstance(o, str) or not o.isidentifier():
            raise ValueError(f"method {name!r}: an option name must be an identifier, got {o!r}")
        if o not in OPTIONS and o not in defaults:
            raise ValueError(f"method {name!r}: unknown option {o!r} (sample() knows {', '.join(OPTIONS)}); a new "
                             f"option needs its default, options={{{o!r}: value}}, also its neutral value for the "
                             "other methods")
    if isinstance(evals_per_step, str):  # the option that sets it (annealed_langevin's n_steps_each)
        if evals_per_step not in options:
            raise ValueError(f"method {name!r}: evals_per_step={evals_per_step!r} names none of its options")
    elif not isinstance(evals_per_step, int) or isinstance(evals_per_step, bool) or evals_per_step < 1:
        raise ValueError(f"method {name!r}: evals_per_step must be an int >= 1 or an option's name, "
                         f"got {evals_per_step!r}")
    if not callable(conversions):
        conversions = tuple(conversions)
    if "\n" in description:
        raise ValueError(f"method {name!r}: the description must be one line")

    def decorate(build):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        for o in options:
            if o not in OPTIONS:
                OPTIONS[o] = defaults[o]
        _REGISTRY[name] = Method(name, build, options, defaults, evals_per_step, conversions, description,
                                 churn_options, inverts, _checks.flag("cfg_pp", cfg_pp), step_grid, run)
        return build

    return decorate


def unregister_method(name: str) -> Method:
    """Remove a registered method (for tests and plugins); returns its record."""
    return _REGISTRY.pop(get_method(name).name)


def method_names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_REGISTRY)


def methods() -> tuple[Method, ...]:
    """Registered method records, in registration order."""
    return tuple(_REGISTRY.values())


def get_method(name) -> Method:
    """The record of method ``name``; ValueError naming the choices for an unknown name."""
    method = _REGISTRY.get(name) if isinstance(name, str) else None
    if method is None:
        raise ValueError(f"method={name!r} is not a sampler; choose one of {', '.join(_REGISTRY)}")
    return method


def check_options(method: Method, **values) -> None:
    """ValueError for an option given a non-neutral value that ``method`` does not take, naming the
    option, the method and the methods that take it; TypeError for a name no method takes."""
    for option, value in values.items():
        if option not in OPTIONS:
            raise TypeError(f"sample() got an unexpected keyword argument {option!r} (method options: "
                            f"{', '.join(OPTIONS)})")
        if option in method.options or is_default(option, value):
            continue
        takers = [m.name for m in _REGISTRY.values() if option in m.options]
        where = f"method={' or '.join(map(repr, takers))}" if takers else "no registered method"
        raise ValueError(f"{option} applies to {where}; method={method.name!r} does not take it "
                         f"(it takes {_takes(method)})")


def methods_table() -> str:
    """The markdown table of the registered methods that docs/sampling.md carries (a test keeps the two
    equal; regenerate with ``python -c "from fastdiff.sampling.methods import methods_table as t; print(t())"``)."""
    rows = ["| method | options | model evaluations per step | what |", "|---|---|---|---|"]
    for m in _REGISTRY.values():
        options = ", ".join(f"`{o}`" + (f" = {m.defaults[o]}" if o in m.defaults else "") for o in m.options) or "–"
        evals = m.evals_per_step if isinstance(m.evals_per_step, int) else f"`{m.evals_per_step}`"
        rows.append(f"| `{m.name}` | {options} | {evals} | {m.description} |")
    return "\n".join(rows)
