"""Our HF configs read right in transformers 4.x, judged by a real 4.47 in a subprocess (tests/tf4_env.py).

transformers 5 writes only `rope_parameters`; 4.x ignores it and silently falls back to rope_theta = 10000.
`save_model_dir` writes the legacy keys beside it; the control case (keys removed) shows the test can fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from surgery.apply import apply_plan
from surgery.export import save_model_dir
from surgery.plan import parse_plan
from tf4_env import ensure_tf4
from tiny_models import make_model, tiny_tokenizer, tokens

ROPES = {
    "theta": {"rope_type": "default", "rope_theta": 1e5},
    "llama3": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}
UNIFORM = [step for i in range(3) for step in ({"op": "prune_heads", "layer": i, "heads": [0, 2]},
                                                {"op": "prune_neurons", "layer": i, "neurons": list(range(16))})]

# Runs under transformers 4.x: logits of each plain directory, block_configs of each nemotron-nas one.
TF4_SCRIPT = """
import json, sys
import numpy as np, torch, transformers
assert transformers.__version__.startswith("4."), transformers.__version__
from transformers import AutoConfig, AutoModelForCausalLM
ids = torch.tensor(json.loads(sys.argv[1]))
for d in sys.argv[2:]:
    if json.load(open(d + "/config.json"))["model_type"] == "nemotron-nas":
        c = AutoConfig.from_pretrained(d, trust_remote_code=True)
        blocks = [[b.attention.no_op, b.attention.n_heads_in_group, b.ffn.no_op, b.ffn.ffn_mult] for b in c.block_configs]
        json.dump({"rope_theta": c.rope_theta, "blocks": blocks}, open(d + "/tf4.json", "w"))
        continue
    m = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        np.save(d + "/tf4_logits.npy", m(ids).logits.numpy())
"""


@pytest.fixture(scope="session")
def tf4_dir():
    try:
        return ensure_tf4()
    except (subprocess.SubprocessError, OSError) as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"transformers 4.x could not be installed here ({exc})")


@pytest.fixture(scope="module")
def read_by_tf4(tmp_path_factory, tf4_dir):
    """{case: (dir, transformers-5 logits)}, every directory read once by transformers 4.x."""
    from surgery.export.vllm import export_vllm

    root = tmp_path_factory.mktemp("tf4")
    ids = tokens(2, 24)
    cases = {}
    for name, rope in ROPES.items():
        pruned, _ = apply_plan(make_model("llama", rope_parameters=rope), parse_plan({"version": 1, "steps": UNIFORM}))
        save_model_dir(pruned, root / name, tokenizer=tiny_tokenizer(), manifest={"version": 1})
        tf5 = AutoModelForCausalLM.from_pretrained(root / name, attn_implementation="eager").eval()
        with torch.no_grad():
            cases[name] = (root / name, tf5(ids).logits.numpy())
    # control: the same output without the legacy keys is what transformers 5 alone writes
    shutil.copytree(root / "theta", root / "no-legacy")
    cfg = json.loads((root / "no-legacy" / "config.json").read_text())
    del cfg["rope_theta"]
    (root / "no-legacy" / "config.json").write_text(json.dumps(cfg))
    cases["no-legacy"] = (root / "no-legacy", cases["theta"][1])
    export_vllm(str(root / "llama3"), root / "llama3-vllm", dtype="float32")
    cases["vllm"] = (root / "llama3-vllm", None)
    env = {**os.environ, "PYTHONPATH": str(tf4_dir)}
    subprocess.run([sys.executable, "-c", TF4_SCRIPT, json.dumps(ids.tolist()), *(str(d) for d, _ in cases.values())],
                   check=True, env=env, cwd=root, timeout=600)
    return cases


@pytest.mark.parametrize("case", list(ROPES))
def test_transformers_4_reads_our_rope_like_transformers_5(read_by_tf4, case):
    path, want = read_by_tf4[case]
    assert json.loads((path / "config.json").read_text())["rope_parameters"]  # the new key stays beside them
    np.testing.assert_allclose(np.load(path / "tf4_logits.npy"), want, atol=1e-4, rtol=0)


def test_without_legacy_keys_transformers_4_misreads(read_by_tf4):
    path, want = read_by_tf4["no-legacy"]
    assert np.abs(np.load(path / "tf4_logits.npy") - want).max() > 1e-2


def test_transformers_4_reads_the_vllm_config_class(read_by_tf4):
    """vLLM still runs on transformers 4.x: the shipped configuration_decilm.py must load there too."""
    from transformers import AutoConfig

    path, _ = read_by_tf4["vllm"]
    got = json.loads((path / "tf4.json").read_text())
    tf5 = AutoConfig.from_pretrained(path, trust_remote_code=True)
    assert got["blocks"] == [[b.attention.no_op, b.attention.n_heads_in_group, b.ffn.no_op, b.ffn.ffn_mult]
                             for b in tf5.block_configs]
    assert got["rope_theta"] == 5e5
