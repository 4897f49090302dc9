"""What serves the benchmarks, apart from the library: :mod:`~fastdiff.bench.harness` (the cases and the
interleaved report of ``fastdiff bench``, ``bench/report.py`` and the pytest-benchmark suites in
``bench/``) and :mod:`~fastdiff.bench.peers` (importing the peer libraries that tests and benchmarks
compare fastdiff with).

Nothing here is imported by the library.
"""
