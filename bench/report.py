"""Print the comparison tables (×faster than eager PyTorch and torch.compile, GB/s, % of copy on a
GPU) and write the rows to bench/results/<device>-<date>.csv. Same as ``fastdiff bench``.

    python bench/report.py [--sizes 20,22,24] [--dtypes fp32,bf16] [--ops step_sde,loss] [--no-compile]
"""

import sys

from fastdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
