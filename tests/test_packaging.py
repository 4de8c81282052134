"""The project installs without shadowing anything transformers imports."""

import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO


def run_python(code: str, cwd, env_path: str | None = None) -> str:
    env = None if env_path is None else {**os.environ, "PYTHONPATH": env_path}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_transformers_models_import_and_run_from_the_repository_root():
    out = run_python(
        """
        import json
        import torch
        from transformers import Gemma2Config, Gemma2ForCausalLM, WhisperConfig
        from transformers.utils import is_kernels_available
        model = Gemma2ForCausalLM(Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                               vocab_size=50))
        import mcat_kernels.cross_attention as ops
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
        print(json.dumps({"shape": list(logits.shape), "hub_kernels": is_kernels_available(), "ops": ops.__file__}))
        """,
        cwd=REPO,
    )
    result = json.loads(out.splitlines()[-1])
    assert result == {"shape": [1, 3, 50], "hub_kernels": False, "ops": str(REPO / "kernels" / "cross_attention.py")}


def test_an_installed_kernels_package_wins_over_the_folder(tmp_path):
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("WHO = 'the PyPI package'\n")
    out = run_python("import kernels; print(kernels.WHO)", cwd=REPO, env_path=str(tmp_path / "site"))
    assert out.strip() == "the PyPI package"
