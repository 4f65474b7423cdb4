"""Two CPU processes (torchrun, gloo) train to the same weights as one process with the same global batch;
a command that started a process group ends it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import text_recipe
from safetensors.torch import load_file

from tuneforge.training.checkpoint import checkpoint_weights, complete_checkpoints


def _train(recipe_file, out, processes: int):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_port", str(29500 + processes)] if processes > 1 else [sys.executable]
    command = [*launcher, "-m", "tuneforge", "train", str(recipe_file), "--output-dir", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.parametrize("freeze", [{"strategy": "full"}, {"strategy": "partial", "trainable_blocks": 1}])
def test_two_processes_match_one(tiny_bert_no_dropout, text_data, tmp_path, freeze):
    recipe = text_recipe(tiny_bert_no_dropout, text_data, tmp_path / "unused", epochs=2)
    recipe["model"]["head_dropout"] = 0.0
    recipe["model"]["freeze"] = freeze
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))

    _train(recipe_file, tmp_path / "one", 1)
    _train(recipe_file, tmp_path / "two", 2)

    one = checkpoint_weights(complete_checkpoints(tmp_path / "one" / "checkpoints")[-1])
    two = checkpoint_weights(complete_checkpoints(tmp_path / "two" / "checkpoints")[-1])
    start = load_file(str(tiny_bert_no_dropout / "model.safetensors"))
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5), key
    if freeze["strategy"] == "partial":  # frozen in both, and training really happened in both
        assert torch.equal(two["bert.encoder.layer.0.output.dense.weight"], start["encoder.layer.0.output.dense.weight"])
        assert not torch.equal(two["bert.encoder.layer.1.output.dense.weight"], start["encoder.layer.1.output.dense.weight"])
    # One run directory, written once: one eval.json, one line per log step.
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["type"] == "train"]
    assert steps == sorted(set(steps))
    evaluation = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert evaluation["hardware"]["processes"] == 2
    assert evaluation["splits"]["test"]["num_examples"] == 32


# In a fresh interpreter: which modules are imported before the group starts is what matters.
ENDS_GROUP = """
import os
import torch
import torch.distributed as dist
from tuneforge import cli
from tuneforge.errors import RecipeError

def command(fail):
    def handler(args):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))  # as a run does: imports torch.distributed.nn
        if fail:
            raise RecipeError(["bad recipe"])
    return handler

def gloo_threads():
    names = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
    return [name for name in names if "gloo" in name]

for fail, code in ((False, 0), (True, 2)):
    cli._inspect = command(fail)
    assert cli.main(["inspect", "unused"]) == code
    assert not dist.is_initialized()
    assert gloo_threads() == [], gloo_threads()
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads through /proc")
def test_cli_ends_the_process_group_and_its_gloo_threads():
    """A group left to interpreter exit keeps gloo's threads running while the process is torn down."""
    done = subprocess.run([sys.executable, "-c", ENDS_GROUP], check=False, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
