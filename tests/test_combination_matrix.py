"""The sampler combination matrix (tests/combination_matrix.py) held to today's refusals: no cell crashes or
goes non-finite, no pair is refused as "not supported yet" (KNOWN_STRUCTURAL, emptied by the plan redesign), and
the refusals are exactly the pairs without a meaning (KNOWN_REFUSED)."""

import combination_matrix as matrix
import pytest
import torch


def _pairs(methods, first: str, *others: str) -> set:
    """The cells of ``first`` with each of ``others`` on each method, the pair in the matrix's (sorted) order."""
    return {(m, *sorted((first, other))) for m in methods for other in others}


# Cells refused as not supported yet (STRUCTURAL_PATTERNS). Before the plan redesign: 23 (the list, and the 11
# limits worded as definitions, in bench/results/amd-epyc-20261206-combinations-before.md); now none (issue 34's
# PAG / SLG / SEG with several conditions combine: the perturbed forward of each condition).
KNOWN_STRUCTURAL: set = set()

# Cells refused because the pair has no meaning, exactly these (a refusal that goes or comes fails the test):
# CFG++ on methods whose step no peer splits into a clean estimate and its re-noising (dpmpp_2m's is ComfyUI's
# dpmpp_2m_cfg_pp, with the unconditional history: tests/test_cfg_pp_multistep.py); RePaint on a multistep method (a
# repeat would mix its history); churn together with an SDE's sigma (two noises for one step); FDG with a cfg schedule
# or guidance_rescale (its own options).
KNOWN_REFUSED = {
    *((m, "cfg_pp") for m in ("heun", "dpmpp_2m_sde", "unipc", "lms", "dpmpp_sde", "dpm_2")),
    *((m, "repaint") for m in ("dpmpp_2m", "dpmpp_2m_sde", "unipc", "lms")),
    ("euler", "per_sample_churn", "sde_sigma"),
    # FDG carries its scales (one per frequency level) and diffusers' guidance_rescale as its own options
    *_pairs(matrix.PAIR_METHODS, "fdg", "cfg_schedule", "guidance_rescale"),
}

# Cells that crash or go non-finite today, {cell: message}; fastdiff's sampling owners fix them. None today.
KNOWN_CRASHES: dict[tuple, str] = {}


@pytest.fixture(scope="module")
def cells():
    return {matrix.cell_key(c): c for c in matrix.run_matrix(backend="cpu")}


def _listing(cells, keys) -> str:
    return "\n".join(f"  {key}: {cells[key]['class']}: {cells[key]['message']}" for key in sorted(keys))


def test_the_matrix_samples(cells):
    """The matrix is whole and mostly samples (an empty or all-n/a matrix would pass every other test)."""
    n = len(matrix.FEATURES)
    assert len(cells) == len(matrix.METHODS) * n + len(matrix.PAIR_METHODS) * n * (n - 1) // 2
    ok = [key for key, c in cells.items() if c["class"] == "ok"]
    assert len(ok) >= 400, f"only {len(ok)} cells sample"


def test_known_cells_are_cells_of_the_matrix(cells):
    unknown = (KNOWN_STRUCTURAL | KNOWN_REFUSED | set(KNOWN_CRASHES)) - set(cells)
    assert not unknown, f"not cells of the matrix (a pair's features are in sorted order): {sorted(unknown)}"


def test_no_cell_crashes_or_goes_nonfinite(cells):
    bad = {key for key, c in cells.items() if c["class"] in ("crash", "nonfinite")} - set(KNOWN_CRASHES)
    assert not bad, f"{len(bad)} cells crash or give inf/NaN:\n{_listing(cells, bad)}"


def test_structural_refusals_are_known(cells):
    structural = {key for key, c in cells.items() if c["class"] == "structural"}
    new = structural - KNOWN_STRUCTURAL
    assert not new, f"refused as not supported (yet), not in KNOWN_STRUCTURAL:\n{_listing(cells, new)}"


def test_known_structural_cells_are_still_refused(cells):
    """Strict, like xfail(strict=True): a cell that combines now must leave KNOWN_STRUCTURAL."""
    changed = {key for key in KNOWN_STRUCTURAL & set(cells) if cells[key]["class"] != "structural"}
    assert not changed, f"now combines: remove from KNOWN_STRUCTURAL (or see its new refusal):\n" \
                        f"{_listing(cells, changed)}"


def test_refusals_are_exactly_the_meaningless_pairs(cells):
    refused = {key for key, c in cells.items() if c["class"] == "meaningful"}
    new, gone = refused - KNOWN_REFUSED, KNOWN_REFUSED - refused
    assert not new, f"refused, not in KNOWN_REFUSED:\n{_listing(cells, new)}"
    assert not gone, f"no longer refused: remove from KNOWN_REFUSED:\n{_listing(cells, gone)}"


def test_known_crashes_are_current(cells):
    fixed = {key for key in set(KNOWN_CRASHES) & set(cells) if cells[key]["class"] not in ("crash", "nonfinite")}
    assert not fixed, f"no longer crash: remove from KNOWN_CRASHES:\n{_listing(cells, fixed)}"


def _raises(error):
    def model(x, t, y=None):
        raise error
    return model


@pytest.mark.parametrize("model, klass", [
    (_raises(RuntimeError("boom")), "crash"),
    (_raises(ValueError("shape mismatch")), "crash"),  # a ValueError, but not one of fastdiff's checks
    (lambda x, t, y=None: torch.full_like(x, float("nan")), "nonfinite"),
    (matrix.gaussian_velocity_model, "ok"),
], ids=["runtime-error", "model-value-error", "nan-model", "ok"])
def test_cells_are_classified(model, klass):
    """The harness tells a crash and a non-finite run from a sample (else the tests above could not fail)."""
    assert matrix.run_cell("heun", ("cfg",), model=model)["class"] == klass


def test_refusals_and_not_applicable_are_classified():
    assert matrix.run_cell("heun", ("cfg_pp",))["class"] == "meaningful"
    assert matrix.run_cell("heun", ("sde_sigma",))["class"] == "n/a"  # heun takes no sigma: not called
    assert matrix.run_cell("euler", ("apg", "cfg_pp"))["class"] == "n/a"  # two guidance rules
    assert matrix.STRUCTURAL_PATTERNS.search("dynamic_thresholding does not combine with x (yet)")
