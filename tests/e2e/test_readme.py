"""The README's runnable core example runs as written, and the README documents every AGLConfig field."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from agl_core.config import config_fields

README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("A runnable example")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_readme_documents_every_config_field():
    text = README.read_text(encoding="utf-8")
    missing = [f.name for f in config_fields() if f"`{f.name}`" not in text]
    assert not missing, f"README does not document AGLConfig fields {missing}"


@pytest.mark.slow
def test_readme_core_example_runs(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", _example()], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if re.match(r"^\d \{", ln)]
    assert [ln[0] for ln in lines] == ["0", "1", "2"]
    last = ast.literal_eval(lines[-1][2:])  # the printed metrics dict of the last step
    assert last["agl/L_A"] > 0 and last["agl/penalty"] > 0 and 0 < last["agl/protected_share"] < 1
    with safe_open(str(tmp_path / "my-mask" / "mask.safetensors"), framework="pt") as fh:
        names = {k.split("::")[0] for k in fh.keys()}
    assert names and all(n.endswith(("q_proj", "v_proj")) for n in names)
