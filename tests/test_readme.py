"""The README's Python examples run as written."""

import re
from pathlib import Path


def test_readme_python_examples_run():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - our own documentation
    assert tuple(scope["out"].latents.shape) == (8, 9, 16, 8, 8)
