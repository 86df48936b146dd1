"""rewards.train: the schedule, learning a synthetic preference, exact gradient accumulation, divergence,
kill-and-resume ending bit-identical, and the command line."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import rewards.train as train_module
from rewards.cli import train_main
from rewards.config import RewardTrainConfig
from rewards.data import build_mix
from rewards.model import load_reward_model
from rewards.train import ResumeMismatch, TrainingDiverged, lr_multiplier, train_reward_model, warmup_steps_for
from tests.rewards import synthetic

REPO = Path(__file__).resolve().parents[2]


def tiny_config(policy_dir: Path, **overrides) -> RewardTrainConfig:
    kw = dict(base_checkpoint=str(policy_dir), max_seq_len=96, micro_batch_size=4, grad_accum_steps=1, lr=3e-3,
              checkpoint_every=0, margin="small", seed=0, mix={"min_train_pairs": 4})
    return RewardTrainConfig(**{**kw, **overrides})


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_lr_schedule_by_hand() -> None:
    total, warmup = 100, 5
    values = [lr_multiplier(s, total, warmup, 0.1) for s in range(total)]
    assert values[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # linear warm-up, peak at its last step
    assert values[5] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)  # cosine from peak to 10%
    mid = 5 + 47  # halfway through the 94 decay steps: cos(pi/2) = 0 -> 0.1 + 0.9 / 2
    assert values[mid] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(values[5:], values[6:]))
    config = RewardTrainConfig(model_args={"dim": 8}, min_warmup_steps=5, warmup_ratio=0.03)
    assert warmup_steps_for(config, 100) == 5 and warmup_steps_for(config, 1000) == 30 and warmup_steps_for(config, 3) == 3


def test_learns_a_synthetic_preference(tmp_path, rm_policy_dir) -> None:
    rows = synthetic.make_rows(420, seed=11, test_fraction=0.25, adversarial_fraction=0.0, imported_fraction=0.0)
    mix = build_mix(rows, kind="helpfulness", seed=0)
    seen = []
    config = tiny_config(rm_policy_dir, micro_batch_size=16, margin="none")
    result = train_reward_model(config, mix.train, mix.test_sets, tmp_path / "run",
                                progress=lambda step, total, m: seen.append((step, total, m["loss"])),
                                manifest=mix.manifest)
    held_out = result.eval["all"]
    assert held_out["n"] >= 50 and held_out["accuracy"] > 0.9
    assert held_out["length_baseline"]["accuracy"] < 0.75  # the marker, not length, decides
    assert [s for s, _, _ in seen] == list(range(1, result.steps + 1)) and seen[0][1] == result.steps
    assert result.train["curve"][-1]["loss"] < result.train["curve"][0]["loss"]
    model_dir = Path(result.model_dir)
    assert json.loads((model_dir / "data_manifest.json").read_text())["sha256"] == mix.manifest["sha256"]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["weights_sha256"] == result.weights_sha256
    assert load_reward_model(model_dir).head.weight.shape == (1, 64)
    assert 0 <= result.train["pad_fraction"] < 0.5 and result.pairs_trained + result.pairs_dropped == len(mix.train)


def test_accumulation_gives_the_same_step_as_a_big_batch(tmp_path, rm_policy_dir) -> None:
    # The loss is averaged over the step's pairs, not per micro-batch: 2 x 4 pairs == 1 x 8 pairs.
    rows = synthetic.make_rows(40, seed=1, adversarial_fraction=0.0, imported_fraction=0.0)
    mix = build_mix(rows, kind="helpfulness", seed=0)
    # (center_coef: see test_packed_and_unpacked_pairs_train_the_same_model)
    a = train_reward_model(tiny_config(rm_policy_dir, micro_batch_size=4, grad_accum_steps=2, center_coef=0.01),
                           mix.train, {}, tmp_path / "a")
    b = train_reward_model(tiny_config(rm_policy_dir, micro_batch_size=8, center_coef=0.01), mix.train, {}, tmp_path / "b")
    wa = safetensors.torch.load_file(Path(a.model_dir) / "model.safetensors")
    wb = safetensors.torch.load_file(Path(b.model_dir) / "model.safetensors")
    assert a.steps == b.steps > 2 and a.plan_sha256 != b.plan_sha256  # same pairs per step, cut differently
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=0)


def test_packed_and_unpacked_pairs_train_the_same_model(tmp_path, rm_policy_dir) -> None:
    # Packing (shared prefix once) is exact: the same steps give the same weights as chosen and rejected
    # run as separate rows, up to float rounding.
    rows = synthetic.make_rows(40, seed=2, adversarial_fraction=0.0, imported_fraction=0.0, context_turns=1)
    mix = build_mix(rows, kind="helpfulness", seed=0)
    # center_coef > 0 gives the head's bias a real gradient: in the plain ranking loss it cancels (r_c - r_r)
    # and its gradient is rounding noise, which Adam's normalisation would blow up to lr-sized steps.
    packed = train_reward_model(tiny_config(rm_policy_dir, center_coef=0.01), mix.train, {}, tmp_path / "packed")
    plain = train_reward_model(tiny_config(rm_policy_dir, center_coef=0.01, pack_pairs=False), mix.train, {},
                               tmp_path / "plain")
    wa = safetensors.torch.load_file(Path(packed.model_dir) / "model.safetensors")
    wb = safetensors.torch.load_file(Path(plain.model_dir) / "model.safetensors")
    assert packed.steps == plain.steps >= 5
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=0)
    assert packed.train["tokens_per_pair"]["shared_prefix_once"] < 0.8 * packed.train["tokens_per_pair"]["two_full_sequences"]


def test_divergence_stops_with_step_and_keeps_the_last_good_checkpoint(tmp_path, rm_policy_dir, monkeypatch) -> None:
    rows = synthetic.make_rows(40, seed=1, adversarial_fraction=0.0, imported_fraction=0.0)
    mix = build_mix(rows, kind="helpfulness", seed=0)
    calls = {"n": 0}
    real_loss = train_module.pairwise_loss

    def loss_that_blows_up(*args, **kwargs):
        calls["n"] += 1
        losses = real_loss(*args, **kwargs)
        return losses * float("nan") if calls["n"] == 3 else losses  # step 3's micro-batch (1 per step)

    monkeypatch.setattr(train_module, "pairwise_loss", loss_that_blows_up)
    config = tiny_config(rm_policy_dir, checkpoint_every=2)
    with pytest.raises(TrainingDiverged) as info:
        train_reward_model(config, mix.train, {}, tmp_path / "run")
    assert info.value.step == 3 and "nan" in info.value.reason
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000002"] and info.value.last_checkpoint.endswith("step-00000002")
    assert not (tmp_path / "run" / "model").exists()


def test_resume_refuses_other_config_and_a_finished_run_is_not_redone(tmp_path, rm_policy_dir, monkeypatch) -> None:
    rows = synthetic.make_rows(48, seed=1, adversarial_fraction=0.0, imported_fraction=0.0)
    mix = build_mix(rows, kind="helpfulness", seed=0)
    config = tiny_config(rm_policy_dir, checkpoint_every=2)
    steps = []

    def stop_after_3(step, total, metrics):
        steps.append(step)
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_reward_model(config, mix.train, {}, tmp_path / "run", progress=stop_after_3)
    with pytest.raises(ResumeMismatch, match="config"):
        train_reward_model(tiny_config(rm_policy_dir, checkpoint_every=2, lr=1e-3), mix.train, {}, tmp_path / "run")
    with pytest.raises(ResumeMismatch, match="plan"):
        train_reward_model(config, mix.train[:-4], {}, tmp_path / "run")
    first = train_reward_model(config, mix.train, {}, tmp_path / "run", progress=lambda s, t, m: steps.append(s))
    assert first.resumed_from_step == 2 and first.steps == len(mix.train) // 4 > 3
    assert steps == [1, 2, 3] + list(range(3, first.steps + 1))  # step 3 is done again, from the step-2 checkpoint

    def must_not_train(*args):
        raise AssertionError("a finished run was trained again")

    again = train_reward_model(config, mix.train, {}, tmp_path / "run", progress=must_not_train)
    assert again == first


KILL_RUNNER = """
import json, os, signal, sys
from rewards.cli import train_main
from rewards.config import RewardTrainConfig
from rewards.data import build_mix, read_rows
from rewards.train import train_reward_model

config = RewardTrainConfig.from_json(sys.argv[1])
mix = build_mix(read_rows(sys.argv[2]), kind=config.kind, seed=config.seed, mix=config.mix)
kill_at = int(os.environ.get("KILL_AT_STEP", "0"))

def progress(step, total, metrics):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as a preempted machine

result = train_reward_model(config, mix.train, {}, sys.argv[3], progress=progress, manifest=mix.manifest)
print(json.dumps({"resumed_from_step": result.resumed_from_step, "steps": result.steps}))
"""


def test_killed_run_resumes_bit_identical(tmp_path, rm_policy_dir) -> None:
    rows = synthetic.make_rows(40, seed=9, adversarial_fraction=0.0, imported_fraction=0.0, context_turns=1)
    snapshot = synthetic.write_snapshot(rows, tmp_path / "snap.jsonl.gz")
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(tiny_config(rm_policy_dir, checkpoint_every=2, center_coef=0.01).to_dict()))

    def run(out: str, kill_at: int = 0) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", KILL_RUNNER, str(config_path), str(snapshot), str(tmp_path / out)],
                              env={**subprocess_env(), "KILL_AT_STEP": str(kill_at)}, capture_output=True, text=True,
                              timeout=120)

    reference = run("reference")
    assert reference.returncode == 0, reference.stderr
    steps = len(build_mix(rows, kind="helpfulness", seed=0).train) // 4
    assert steps >= 7
    assert json.loads(reference.stdout) == {"resumed_from_step": 0, "steps": steps}

    killed = run("interrupted", kill_at=5)
    assert killed.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "interrupted" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000004"]
    # A checkpoint being written when the machine died: a temporary folder, never taken for a checkpoint.
    (checkpoints / ".step-00000006.tmp-dead").mkdir()
    (checkpoints / ".step-00000006.tmp-dead" / "model.safetensors").write_bytes(b"torn")

    resumed = run("interrupted")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout) == {"resumed_from_step": 4, "steps": steps}
    want = safetensors.torch.load_file(tmp_path / "reference" / "model" / "model.safetensors")
    got = safetensors.torch.load_file(tmp_path / "interrupted" / "model" / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name  # bit-identical, not merely close
    ref_result = json.loads((tmp_path / "reference" / "result.json").read_text())
    res_result = json.loads((tmp_path / "interrupted" / "result.json").read_text())
    assert ref_result["weights_sha256"] == res_result["weights_sha256"]
    assert ref_result["final_loss"] == res_result["final_loss"] and math.isfinite(res_result["final_loss"])
    assert ref_result["train"]["curve"] == res_result["train"]["curve"]  # the steps before the kill included


def test_command_line_trains_and_evaluates(tmp_path, rm_policy_dir) -> None:
    rows = synthetic.make_rows(60, seed=4, test_fraction=0.2, adversarial_fraction=0.2, imported_fraction=0.1)
    snapshot = synthetic.write_snapshot(rows, tmp_path / "snap.jsonl.gz")
    config_path = tmp_path / "rm.json"
    config_path.write_text(json.dumps({"base_checkpoint": str(rm_policy_dir), "max_seq_len": 96, "micro_batch_size": 4,
                                       "lr": 1e-3, "mix": {"min_train_pairs": 4}}))
    done = subprocess.run([sys.executable, "-m", "rewards.train", "--config", str(config_path), "--data", str(snapshot),
                           "--out", str(tmp_path / "out"), "--kind", "safety", "--seed", "3"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["config"]["kind"] == "safety" and summary["config"]["seed"] == 3
    assert summary["steps"] >= 1 and "all" in summary["eval"] and "curve" not in summary["train"]
    assert "step" in done.stderr and "loss=" in done.stderr  # the tqdm bar
    manifest = json.loads((tmp_path / "out" / "model" / "data_manifest.json").read_text())
    assert manifest["kind"] == "safety" and len(manifest["input_hashes"]) == 1

    evaluated = subprocess.run([sys.executable, "-m", "rewards.evaluate", "--model", str(tmp_path / "out" / "model"),
                                "--data", str(snapshot)], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)
    assert metrics["all"]["accuracy"] == pytest.approx(summary["eval"]["all"]["accuracy"])



def test_command_line_errors(tmp_path, rm_policy_dir, capsys) -> None:
    rows = synthetic.make_rows(6, seed=4)
    snapshot = synthetic.write_snapshot(rows, tmp_path / "snap.jsonl.gz")
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--data", str(snapshot), "--out", str(tmp_path / "x"), "--base-checkpoint", str(rm_policy_dir),
                    "--kind", "nonsense"])
    assert exit_info.value.code == 2 and "kind must be one of" in capsys.readouterr().err
    # Too little data: a clear message and exit status 2, nothing written.
    code = train_main(["--data", str(snapshot), "--out", str(tmp_path / "x"), "--base-checkpoint", str(rm_policy_dir)])
    assert code == 2 and "fewer than the minimum" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_torch_side_imports_no_django() -> None:
    # The web process never imports torch; the torch side never imports Django (workers call it with rows).
    code = ("import sys, rewards.config, rewards.loss, rewards.data, rewards.model, rewards.train, rewards.evaluate, "
            "rewards.cli; bad = sorted(m for m in sys.modules if m.split('.')[0] in ('django', 'rest_framework', "
            "'celery')); print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_module_entry_point_lists_its_commands(capsys) -> None:
    from rewards.cli import main

    assert main([]) == 2 and "train,evaluate" in capsys.readouterr().err
