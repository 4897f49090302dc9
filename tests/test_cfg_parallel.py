"""fastdiff.cfg_parallel: under torchrun (gloo, CPU) each rank evaluates its rows of every model call and the
outputs are all-gathered; the samples equal one process's bit for bit for a row-wise model (the exact mixture
fields), guided (K = 1, K = 2 conditions, APG, rescale), multi-stage (heun, dpmpp_2m), partly unguided, with
cfg_batch=False and a batch of 1; composed with generate's batch sharding at world 4 (2 shards x 2 branch
ranks), resumable; bad layouts refused on every rank. The workers: tests/cfg_parallel_script.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastdiff
from fastdiff.sampling.cfg_parallel import CFGParallel, _rows

SCRIPT = Path(__file__).with_name("cfg_parallel_script.py")
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
sys.path.insert(0, str(SCRIPT.parent))
import cfg_parallel_script as job  # noqa: E402


def _launch(tmp_path_factory, mode: str, world: int) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp(f"cfg_parallel_{mode}")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                    str(SCRIPT), mode, str(out)], check=True, env=ENV, timeout=300, stdout=subprocess.DEVNULL)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    return _launch(tmp_path_factory, "sample", 2)[1]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return _launch(tmp_path_factory, "generate", 4)


def _shares(n: int, world: int) -> list[int]:
    """Rows of a call of n rows per rank: as even as can be, the first ranks one more; fewer rows than ranks:
    every rank computes the whole call."""
    return [n] * world if n < world else [n // world + (r < n % world) for r in range(world)]


@pytest.mark.parametrize("case", list(job.CASES))
def test_two_ranks_give_one_process_samples_bit_for_bit(sampled, case):
    want, sizes = job.run_case(case, lambda m: m)  # one process, the bare model
    assert all(r["world"] == 2 for r in sampled)
    for rank, got in enumerate(sampled):
        x, seen = got[case]
        assert torch.equal(x, want), (case, rank, (x - want).abs().max())
        # this rank evaluated only its share of each of one process's calls (2B rows: B each; 3B: 5 | 4 rows)
        assert seen == [_shares(n, 2)[rank] for n in sizes], (case, rank, seen, sizes)


def test_the_cases_are_guided_calls_split_across_the_ranks(sampled):
    """The cases cover what they claim: one call of 2B and of 3B rows, unguided calls of B rows (heun outside
    its interval), per-branch calls (cfg_batch=False) and a call of fewer rows than ranks (computed by both)."""
    sizes = {case: set(job.run_case(case, lambda m: m)[1]) for case in job.CASES}
    B = job.B
    assert sizes["cfg"] == sizes["apg"] == sizes["rescale_dpmpp"] == {2 * B}
    assert sizes["conditions_2"] == {3 * B} and sizes["heun_interval"] == {B, 2 * B}
    assert sizes["two_calls"] == {B} and sizes["batch_1"] == {2}
    assert sampled[0]["batch_1"][1] == sampled[1]["batch_1"][1] == [1] * len(sampled[0]["batch_1"][1])


def test_bad_layouts_are_refused_by_name(sampled):
    for got in sampled:
        assert got["group_size_3"].startswith("ValueError") and "group_size=3 must divide the world size 2" in \
            got["group_size_3"]
        assert got["wrapped_twice"].startswith("TypeError") and "already a cfg_parallel model" in got["wrapped_twice"]


def test_without_a_process_group_or_with_bad_arguments():
    import torch.distributed as dist

    assert not dist.is_initialized()
    model = job.model()
    with pytest.raises(RuntimeError, match="initialized torch.distributed process group.*torchrun"):
        fastdiff.cfg_parallel(model)
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        fastdiff.cfg_parallel(model, group=2)
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        fastdiff.cfg_parallel(model, group_size=0)
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        fastdiff.cfg_parallel(model, group_size=True)
    with pytest.raises(ValueError, match="not both"):
        fastdiff.cfg_parallel(model, group=object(), group_size=2)
    with pytest.raises(TypeError, match="model must be callable"):
        fastdiff.cfg_parallel("unet")


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_the_shares_cover_each_row_once(world):
    model = job.model()
    for n in range(0, 11):
        shares = [CFGParallel(model, None, r, world).share(n) for r in range(world)]
        assert shares[0][0] == 0 and shares[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))  # contiguous, in rank order
        if n >= world:
            assert [hi - lo for lo, hi in shares] == _shares(n, world)


def test_each_argument_gives_its_rows():
    """t, labels (a tensor, a tree's leaves, a list of prompts) and keyword arguments lose the rows of other
    ranks; constants (a float t, None, a tree's strings and unbatched leaves) pass as they are."""
    n, lo, hi = 6, 2, 5
    t = torch.arange(n, dtype=torch.float32)
    assert torch.equal(_rows(t, lo, hi, n), t[2:5]) and _rows(0.5, lo, hi, n) == 0.5 and _rows(None, lo, hi, n) is None
    tree = {"emb": torch.randn(n, 4, 3), "ids": (torch.arange(n), "sdxl"), "shared": torch.ones(1, 3)}
    got = _rows(tree, lo, hi, n)
    assert torch.equal(got["emb"], tree["emb"][2:5]) and torch.equal(got["ids"][0], tree["ids"][0][2:5])
    assert got["ids"][1] == "sdxl" and got["shared"] is tree["shared"]
    prompts = [f"p{i}" for i in range(n)]
    assert _rows(prompts, lo, hi, n) == ["p2", "p3", "p4"]
    assert _rows(torch.tensor(3.0), lo, hi, n).item() == 3.0


def test_a_call_that_needs_gradients_is_refused():
    x = torch.randn(4, 2, requires_grad=True)
    with pytest.raises(RuntimeError, match="carries no gradient"):
        CFGParallel(job.model(), None, 0, 2)(x, torch.full((4,), 0.5), torch.tensor([0, 1, -1, 2]))


def test_a_wrapper_passes_the_models_attributes():
    model = job.model()
    wrapped = CFGParallel(model, None, 0, 1)
    assert wrapped.num_classes == 4 and wrapped.mixture is model.mixture and "rank 0 of 1" in repr(wrapped)
    x = torch.randn(3, 2)
    assert torch.equal(wrapped(x, torch.full((3,), 0.5), torch.tensor([0, 1, -1])),
                       model(x, torch.full((3,), 0.5), torch.tensor([0, 1, -1])))


def test_generate_with_two_batch_shards_of_two_branch_ranks(generated, tmp_path):
    """World 4, cfg_parallel(model, group_size=2): ranks {0, 1} make shards 0 and 2, ranks {2, 3} shards 1 and 3,
    each pair's first rank writing; the set is one process's bit for bit, also after a resume."""
    out, ranks = generated
    fastdiff.generate(job.model(), job.N_GENERATED, tmp_path, batch_size=job.GENERATE_BATCH, **job.GENERATE)
    want = fastdiff.load_generated(tmp_path)
    got = fastdiff.load_generated(out / "set")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    shard = job.GENERATE["shard_size"]
    assert [r["summary"]["made"] for r in ranks] == [2 * shard, 0, 2 * shard, 0]  # writers 0 and 2
    assert all(r["summary"]["job_made"] == job.N_GENERATED and r["summary"]["present"] == 0 for r in ranks)
    # each pair shared each call: batches of 2 and 1 samples (shards of 3), guided calls of 4 and 2 rows
    steps = job.GENERATE["steps"]
    assert all(r["batch_sizes"] == ([2] * steps + [1] * steps) * 2 for r in ranks)
    # resumed with shard 3 removed: rank 2 (its group's writer) makes it again, with rank 3; ranks 0, 1 make none
    assert [r["resumed"]["made"] for r in ranks] == [0, 0, shard, 0]
    assert all(r["resumed"]["present"] == job.N_GENERATED - shard for r in ranks)
    assert not list((out / "set").glob(".*"))


def test_generate_refuses_groups_that_are_not_contiguous_or_differ(generated):
    for r in generated[1]:
        assert r["strided"].startswith("ValueError") and "contiguous blocks" in r["strided"]
        assert r["mixed"].startswith("ValueError") and "groups of different sizes (from 1 to 2 ranks" in r["mixed"]
    assert not (generated[0] / "strided" / "manifest.json").exists()  # refused before the folder was touched
