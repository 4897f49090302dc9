"""The runnable examples in docs/ run as written."""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


NEEDS = {"adapters/diffusers.md": "diffusers"}


@pytest.mark.parametrize("page", ["adapters/k_diffusion.md", "adapters/diffusers.md"])
def test_doc_examples_run(page):
    """Every ```python block of the page, in order, in one namespace."""
    if page in NEEDS:
        pytest.importorskip(NEEDS[page])
    text = (DOCS / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"no python examples in {page}"
    namespace = {}
    for block in blocks:
        exec(compile(block, f"{page}", "exec"), namespace)  # noqa: S102
