"""Writes tests/noise_vectors.json (the spec-v1 golden vectors) as a C++ header for the ctest tests.

Usage: python json_to_header.py INPUT.json OUTPUT.h

Run by CMakeLists.txt at configure time (the JSON and this script are configure dependencies, so an
edit re-runs it). Needs only the standard library. Floats are written with repr(), the shortest
decimal that round-trips, so the C++ double equals the JSON value exactly.
"""

import json
import math
import os
import sys


def main(src: str, dst: str) -> None:
    with open(src) as f:
        data = json.load(f)
    kat = data["philox4x32_10_known_answers"]
    normals = data["normals"]
    lines = [
        "// Generated from " + os.path.basename(src) + " by cmake/json_to_header.py. Do not edit.",
        "#pragma once",
        "",
        "#include <cstddef>",
        "#include <cstdint>",
        "",
        "namespace fastdiff_test {",
        "",
        "struct PhiloxKnownAnswer {",
        "  uint32_t counter[4];",
        "  uint32_t key[2];",
        "  uint32_t output[4];",
        "};",
        "",
        "struct GoldenNormal {",
        "  uint64_t seed;",
        "  uint32_t stream;",
        "  uint64_t element;",
        "  double normal;",
        "};",
        "",
    ]

    def u32(values, n):
        assert len(values) == n and all(0 <= int(v) < 2**32 for v in values), values
        return "{" + ", ".join(f"{int(v)}u" for v in values) + "}"

    lines.append(f"constexpr std::size_t kNumPhiloxKnownAnswers = {len(kat)};")
    lines.append("constexpr PhiloxKnownAnswer kPhiloxKnownAnswers[] = {")
    for v in kat:
        lines.append(f"    {{{u32(v['counter'], 4)}, {u32(v['key'], 2)}, {u32(v['output'], 4)}}},")
    lines += ["};", ""]

    lines.append(f"constexpr std::size_t kNumGoldenNormals = {len(normals)};")
    lines.append("constexpr GoldenNormal kGoldenNormals[] = {")
    for v in normals:
        seed, stream, element, normal = int(v["seed"]), int(v["stream"]), int(v["element"]), float(v["normal"])
        assert 0 <= seed < 2**64 and 0 <= stream < 2**32 and 0 <= element < 2**64 and math.isfinite(normal), v
        lines.append(f"    {{UINT64_C({seed}), {stream}u, UINT64_C({element}), {normal!r}}},")
    lines += ["};", "", "}  // namespace fastdiff_test", ""]

    text = "\n".join(lines)
    # Rewrite only on change, so a re-configure does not rebuild the tests.
    if os.path.exists(dst):
        with open(dst) as f:
            if f.read() == text:
                return
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    with open(dst, "w") as f:
        f.write(text)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: json_to_header.py INPUT.json OUTPUT.h")
    main(sys.argv[1], sys.argv[2])
