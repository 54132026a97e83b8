"""`workbench apply` killed with SIGKILL at random moments never leaves a half-written output directory."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig

from surgery.export import load_surgery_checkpoint

ENTRY = "from workbench.cli import main; main()"


def _model_dir(tmp_path):
    from transformers import AutoModelForCausalLM

    # big enough (~40 MB) that writing takes a noticeable part of the run
    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=32)
    torch.manual_seed(0)
    path = tmp_path / "src"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def test_sigkill_during_apply_leaves_nothing_or_a_complete_output(tmp_path):
    src = _model_dir(tmp_path)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "steps": [
        {"op": "prune_neurons", "layer": i, "neurons": list(range(0, 1024, 4))} for i in range(8)
    ] + [{"op": "drop_attention", "layer": 3}]}))
    argv = [sys.executable, "-c", ENTRY, "apply", str(plan), "--model", str(src), "--json"]

    start = time.perf_counter()
    done = subprocess.run([*argv, "--out", str(tmp_path / "reference")], capture_output=True, text=True)
    full = time.perf_counter() - start
    assert done.returncode == 0, done.stderr

    rng = random.Random(1234)
    outcomes = []
    for i in range(4):
        out = tmp_path / f"out{i}"
        proc = subprocess.Popen([*argv, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, full))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            # it finished before the kill: then it must be complete and loadable
            assert (out / "surgery.json").is_file()
            load_surgery_checkpoint(out)
            outcomes.append("complete")
        else:
            outcomes.append("absent")
        # whatever was left behind is a hidden temp sibling, never the output itself
        assert all(p.name.startswith(".") or p.name in {"src", "reference", "plan.json"} or p.name.startswith("out")
                   for p in tmp_path.iterdir())
    assert "absent" in outcomes  # at least one kill landed mid-run, or the test proved nothing

    # the next apply into the same place cleans up stale temp siblings of killed runs
    again = subprocess.run([*argv, "--out", str(tmp_path / "out0"), "--overwrite"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert not list(tmp_path.glob(".out0.tmp-*"))
