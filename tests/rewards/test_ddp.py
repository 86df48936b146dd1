"""Two processes under torchrun (gloo, CPU) end where one process with the same effective batch ends."""

import json
import subprocess
import sys
from pathlib import Path

import safetensors.torch
import torch

from rewards.data import build_mix
from rewards.train import build_model, train_reward_model
from tests.rewards import synthetic
from tests.rewards.test_train import subprocess_env, tiny_config


def test_two_process_ddp_matches_one_process_with_accumulation(tmp_path, rm_policy_dir) -> None:
    rows = synthetic.make_rows(48, seed=21, adversarial_fraction=0.0, imported_fraction=0.0, context_turns=1)
    snapshot = synthetic.write_snapshot(rows, tmp_path / "snap.jsonl.gz")
    # center_coef and the margin take part, so every term of the loss goes through the sharding.
    ddp_config = tiny_config(rm_policy_dir, micro_batch_size=3, grad_accum_steps=1, center_coef=0.01, checkpoint_every=3)
    (tmp_path / "ddp.json").write_text(json.dumps(ddp_config.to_dict()))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rewards.train",
         "--config", str(tmp_path / "ddp.json"), "--data", str(snapshot), "--out", str(tmp_path / "ddp"), "--no-progress"],
        env=subprocess_env(), capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # printed once, by rank 0
    assert summary["train"]["world_size"] == 2 and summary["train"]["effective_batch"] == 6

    mix = build_mix(rows, kind="helpfulness", seed=0)
    single_config = tiny_config(rm_policy_dir, micro_batch_size=3, grad_accum_steps=2, center_coef=0.01)
    single = train_reward_model(single_config, mix.train, {}, tmp_path / "single", manifest=mix.manifest)
    assert single.steps == summary["steps"] >= 5 and single.plan_sha256 == summary["plan_sha256"]

    got = safetensors.torch.load_file(Path(summary["model_dir"]) / "model.safetensors")
    want = safetensors.torch.load_file(Path(single.model_dir) / "model.safetensors")
    initial = build_model(single_config).state_dict()
    assert got.keys() == want.keys() == initial.keys()
    assert not torch.allclose(want["head.weight"], initial["head.weight"], atol=1e-3)  # it did train
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=0)
    assert abs(summary["final_loss"] - single.final_loss) < 1e-5
