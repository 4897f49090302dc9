"""Workers for tests/test_cfg_parallel.py, under torchrun on the CPU (gloo):

    torchrun --nproc-per-node 2 cfg_parallel_script.py sample OUT     # the sampling cases, all ranks sharing calls
    torchrun --nproc-per-node 4 cfg_parallel_script.py generate OUT   # generate, 2 batch shards x 2 branch ranks

Each rank saves what it got (samples, the batch sizes its model saw, error messages) as OUT/rank<r>.pt; the test
compares them with one process's samples, computed in the test's own process with the bare model."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import fastdiff
from fastdiff.generation import shard_name
from fastdiff.mixtures import MixtureModel, class_conditional_mixture

B = 3  # odd: 2B = 6 rows split 3 | 3, 3B = 9 rows 5 | 4 (padded), an unguided call of 3 rows 2 | 1
Y = torch.tensor([0, 1, 3])
BASE = dict(shape=(2,), null_y=-1, seed=7, progress=False)
# name -> (steps, cfg, sample() settings); the test computes the same calls in one process
CASES = {
    "cfg": (5, 2.5, dict(y=Y, method="euler")),
    "conditions_2": (4, [2.0, -0.5], dict(conditions=[Y, torch.tensor([2, 2, 0])], method="euler")),
    "apg": (5, 4.0, dict(y=Y, guidance="apg", method="euler", path="vp", prediction="eps")),
    "heun_interval": (4, 3.0, dict(y=Y, method="heun", guidance_interval=(0.25, 0.7))),
    "rescale_dpmpp": (5, 3.0, dict(y=Y, method="dpmpp_2m", guidance_rescale=0.7, path="vp", prediction="eps")),
    "two_calls": (3, 2.0, dict(y=Y, method="euler", cfg_batch=False)),
    "batch_1": (3, 2.0, dict(y=Y[:1], method="heun")),
}
GENERATE = dict(shape=(2,), seed=100, shard_size=3, labels="balanced", steps=4, cfg=2.0, null_y=-1, path="vp",
                prediction="eps", method="dpmpp_2m", progress=False)
N_GENERATED, GENERATE_BATCH = 12, 2


class Model(MixtureModel):
    num_classes = 4


def model():
    return Model(class_conditional_mixture(), "vp", "eps")


def model_for(case: str):
    kw = CASES[case][2]
    return Model(class_conditional_mixture(), kw.get("path", "condot"), kw.get("prediction", "velocity"))


def run_case(case: str, wrap) -> tuple[torch.Tensor, list]:
    steps, cfg, kw = CASES[case]
    m = model_for(case)
    x = fastdiff.sample(wrap(m), steps, cfg, **BASE, **kw)
    return x, m.batch_sizes


def error_of(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def sample_job(out: str) -> dict:
    got = {"world": dist.get_world_size()}
    for case in CASES:
        got[case] = run_case(case, fastdiff.cfg_parallel)
    got["group_size_3"] = error_of(lambda: fastdiff.cfg_parallel(model(), group_size=3))
    got["wrapped_twice"] = error_of(lambda: fastdiff.cfg_parallel(fastdiff.cfg_parallel(model())))
    return got


def generate_job(out: str) -> dict:
    rank = dist.get_rank()
    got = {"world": dist.get_world_size()}
    # ranks {0, 2} and {1, 3}: not contiguous blocks, refused on every rank (new_group is collective: all call both)
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    strided = fastdiff.cfg_parallel(model(), group=groups[rank % 2])
    got["strided"] = error_of(lambda: fastdiff.generate(strided, N_GENERATED, f"{out}/strided", **GENERATE))
    pairs = fastdiff.cfg_parallel(model(), group_size=2)
    mixed = pairs if rank < 2 else model()  # ranks 2, 3 without the wrapper: refused on every rank
    got["mixed"] = error_of(lambda: fastdiff.generate(mixed, N_GENERATED, f"{out}/mixed", **GENERATE))
    got["summary"] = fastdiff.generate(pairs, N_GENERATED, f"{out}/set", batch_size=GENERATE_BATCH, **GENERATE)
    got["batch_sizes"] = list(pairs.model.batch_sizes)
    # a resumed job: shard 3 (group 1's) removed; group 1's writer (rank 2) tells rank 3 to make only that one
    dist.barrier()
    if rank == 0:
        (Path(out) / "set" / shard_name(3)).unlink()
    dist.barrier()
    got["resumed"] = fastdiff.generate(pairs, N_GENERATED, f"{out}/set", batch_size=GENERATE_BATCH, **GENERATE)
    return got


def main():
    mode, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        got = sample_job(out) if mode == "sample" else generate_job(out)
        torch.save(got, f"{out}/rank{dist.get_rank()}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
