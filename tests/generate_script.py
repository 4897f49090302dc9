"""A generation job for tests/test_generation.py: ``python generate_script.py OUT [--batch B] [--slow S]``, alone
or under torchrun. The model: the exact field of the ring mixture (class-conditional), optionally slowed down so
that a test can kill the job between shards."""

import argparse
import time

import torch

import fastdiff
from fastdiff.mixtures import MixtureModel, class_conditional_mixture

N, SHARD, STEPS, SEED = 12, 3, 6, 100
# the set's settings (generate's keywords besides batch_size), shared with the tests that make it in-process
KW = dict(shape=(2,), seed=SEED, shard_size=SHARD, labels="balanced", steps=STEPS, cfg=2.0, null_y=-1, path="vp",
          prediction="eps", method="dpmpp_2m", progress=False)


class Model(MixtureModel):
    slow = 0.0
    num_classes = 4

    def __call__(self, x, t, y=None):
        time.sleep(self.slow)
        return super().__call__(x, t, y)


def model():
    return Model(class_conditional_mixture(), "vp", "eps")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, default=SHARD)
    parser.add_argument("--slow", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    m = model()
    m.slow = args.slow
    fastdiff.generate(m, N, args.out, batch_size=args.batch, **KW)


if __name__ == "__main__":
    main()
