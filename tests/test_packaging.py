"""One installed namespace: jpeft, jpeft.models, jpeft.train (and the bundled jpeft.assets).

The wheel itself (its file list, and ``jpeft train`` from an unrelated directory after a
non-editable install) is checked by ``.ci/wheel_check``.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def test_every_package_folder_is_listed_and_mapped_into_jpeft():
    tool = _setuptools()
    package_dir = tool["package-dir"]
    found = set()
    for name, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *relative.parts]))
    assert sorted(tool["packages"]) == sorted(found)
    assert all(p == "jpeft" or p.startswith("jpeft.") for p in tool["packages"])


def test_readme_example_runs_as_train_py_beside_a_models_package_of_the_users(tmp_path):
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"## Using it from Python\n\n```python\n(.*?)```", readme, re.S)
    assert example, "README.md lost its Python example"
    (tmp_path / "train.py").write_text(example.group(1))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("raise ImportError('the user models')\n")
    (tmp_path / "train").mkdir()  # a data folder named like ours: must not matter either
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "train.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "merged" / "config.json").is_file()


def test_nf4_and_bitsandbytes_checkpoints_load_after_importing_hf_alone(tmp_path):
    script = """
import sys
from jpeft.models import hf
cfg, params = hf.load_pretrained(sys.argv[1], quantize="nf4")
print(type(params["layers"]["mlp"]["up_proj"]["kernel"]).__name__)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script, str(ROOT / "assets" / "tiny-llama")],
        cwd=tmp_path,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == "QuantizedWeight"
