"""The sampler combination matrix (tests/combination_matrix.py) held to today's refusals: no cell crashes or
goes non-finite, the "not supported yet" refusals are exactly KNOWN_STRUCTURAL, and no cell that samples today
is refused. The loop's redesign empties KNOWN_STRUCTURAL; each cell it makes combine fails
test_known_structural_cells_are_still_refused until it is removed from the set (the list only shrinks)."""

import combination_matrix as matrix
import pytest
import torch


def _pairs(methods, first: str, *others: str) -> set:
    """The cells of ``first`` with each of ``others`` on each method, the pair in the matrix's (sorted) order."""
    return {(m, *sorted((first, other))) for m in methods for other in others}


# Cells refused today as not supported yet (STRUCTURAL_PATTERNS), (method, feature, feature) as the matrix names
# them (bench/results/amd-epyc-20261206-combinations-before.md). The redesign empties this set.
KNOWN_STRUCTURAL = {
    # several conditions take plain CFG weights for now: no guidance_rescale, other rule or guidance_interval
    ("euler", "apg", "two_conditions"),
    ("euler", "cfg_pp", "two_conditions"),
    ("euler", "cfg_zero_star", "two_conditions"),
    ("euler", "guidance_interval", "two_conditions"),
    ("euler", "guidance_rescale", "two_conditions"),
    ("euler_ancestral", "apg", "two_conditions"),
    ("euler_ancestral", "cfg_pp", "two_conditions"),
    ("euler_ancestral", "cfg_zero_star", "two_conditions"),
    ("euler_ancestral", "guidance_interval", "two_conditions"),
    ("euler_ancestral", "guidance_rescale", "two_conditions"),
    # classifier guidance does not combine with conditions=, dynamic_thresholding (yet)
    ("euler", "classifier", "two_conditions"),
    ("euler", "classifier", "dynamic_thresholding"),
    ("euler_ancestral", "classifier", "two_conditions"),
    ("euler_ancestral", "classifier", "dynamic_thresholding"),
    # dynamic_thresholding does not combine with guidance='cfg_pp' (yet)
    ("euler", "cfg_pp", "dynamic_thresholding"),
    ("euler_ancestral", "cfg_pp", "dynamic_thresholding"),
    # corrector_steps does not combine with step_noise, classifier guidance, per-sample churn
    ("euler", "brownian", "corrector"),
    ("euler", "classifier", "corrector"),
    ("euler_ancestral", "brownian", "corrector"),
    ("euler_ancestral", "classifier", "corrector"),
    # per-sample churn (only euler of the two takes churn) with classifier guidance, corrector, dynamic_thresholding
    ("euler", "classifier", "per_sample_churn"),
    ("euler", "corrector", "per_sample_churn"),
    ("euler", "dynamic_thresholding", "per_sample_churn"),
}

# Cells refused today for other reasons (the message does not say "yet"): a cell may leave this set (it samples
# now) but no cell may join it, so the redesign refuses nothing that samples today. Some are refusals by
# definition (CFG++ on a method without a clean-estimate step, churn with an SDE's sigma); others are limits
# of today's loop worded as definitions (RePaint on heun, dpm_2, dpmpp_sde or with classifier guidance: their
# stages read a buffer within the step; a cfg schedule with conditions; CFG++ with the corrector's stages).
KNOWN_REFUSED = {
    *((m, "cfg_pp") for m in matrix.METHODS if m not in ("ddim", "euler_ancestral")),
    *((m, "repaint") for m in ("heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "lms", "dpmpp_sde", "dpm_2")),
    *_pairs(["euler"], "cfg_pp", "brownian", "callback", "cfg", "cfg_batch_false", "cfg_schedule", "classifier",
            "corrector", "guidance_interval", "guidance_rescale", "img2img", "inpainting", "per_sample_churn",
            "repaint", "sde_sigma"),
    *_pairs(matrix.PAIR_METHODS, "two_conditions", "cfg_schedule"),
    *_pairs(matrix.PAIR_METHODS, "repaint", "brownian", "classifier"),
    *_pairs(["euler"], "per_sample_churn", "repaint", "sde_sigma"),
    *_pairs(["euler_ancestral"], "cfg_pp", "corrector", "guidance_rescale"),
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


def test_no_new_refusals(cells):
    refused = {key for key, c in cells.items() if c["class"] == "meaningful"}
    new = refused - KNOWN_REFUSED
    assert not new, f"refused, not in KNOWN_REFUSED (it sampled, or was structural, before):\n{_listing(cells, new)}"


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
    assert matrix.run_cell("euler", ("cfg_pp",))["class"] == "meaningful"
    assert matrix.run_cell("heun", ("sde_sigma",))["class"] == "n/a"  # heun takes no sigma: not called
    assert matrix.run_cell("euler", ("apg", "cfg_pp"))["class"] == "n/a"  # two guidance rules
    assert matrix.STRUCTURAL_PATTERNS.search("dynamic_thresholding does not combine with x (yet)")
