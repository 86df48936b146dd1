"""What a round needs, tiny: a demo policy (base + sft) and twin reward models trained on it directly with
rewards.train, plus helpers that register them as rows (Checkpoints, succeeded RewardModelRuns)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from django.conf import settings as django_settings

from tests.rewards import synthetic

# Inside the first model root, which every process of the run shares (workers started later included,
# whatever other test modules add to TANDEM_MODEL_ROOTS), so no root needs to be added anywhere.
MODEL_ROOT = Path(django_settings.TANDEM_MODEL_ROOTS[0]) / f"test-rounds{os.environ.get('TANDEM_TEST_DB_SUFFIX', '')}-{os.getpid()}"

TINY_POLICY = dict(base_name="round-base", sft_name="round-sft", vocab_size=400, dim=32, n_layers=1, n_heads=2,
                   n_kv_heads=1, multiple_of=16, max_seq_len=128, base_steps=2, base_dialogs=32, knowledge_repeats=1,
                   sft_steps=2, sft_dialogs=32, batch_size=8, warmup_steps=1, eval_prompts=0, device="cpu")


def build_world(name: str) -> dict:
    """Build the tiny policy and both reward models under MODEL_ROOT/name (once per session and module)."""
    from policy.demo_policy import DemoBuildConfig, build_demo_policy
    from rewards.config import RewardTrainConfig
    from rewards.data import build_mix
    from rewards.train import train_reward_model

    root = MODEL_ROOT / name
    shutil.rmtree(root, ignore_errors=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        built = build_demo_policy(root / "demo", DemoBuildConfig(**TINY_POLICY))
        sft = next(b for b in built if b["name"] == "round-sft")
        rows = synthetic.make_rows(48, seed=3, adversarial_fraction=0.4, imported_fraction=0.0)
        rms = {}
        for kind in ("helpfulness", "safety"):
            mix = build_mix(rows, kind=kind, seed=0)
            config = RewardTrainConfig(kind=kind, base_checkpoint=sft["path"], max_seq_len=96, micro_batch_size=8,
                                       lr=3e-3, checkpoint_every=0, mix={"min_train_pairs": 4}, device="cpu")
            result = train_reward_model(config, mix.train, None, root / "rm" / kind, manifest=mix.manifest)
            rms[kind] = {"artifact_path": result.model_dir, "manifest_sha256": mix.manifest["sha256"]}
    finally:
        torch.set_num_threads(threads)
    return {"checkpoints": built, "rms": rms}


def register(world: dict, *, other_tokenizer_sha: str | None = None):
    """Checkpoint rows for the policy and succeeded RewardModelRun rows for the twins: (sft, helpful, safety)."""
    from policy import services
    from policy.models import Checkpoint
    from rewards.models import RewardModelRun
    from webapp.jobs import JobStatus

    base, sft = services.demo_checkpoints_register(built=world["checkpoints"])
    runs = []
    for kind in ("helpfulness", "safety"):
        rm = world["rms"][kind]
        runs.append(RewardModelRun.objects.create(
            kind=kind, base_checkpoint=sft, manifest_sha256=rm["manifest_sha256"], status=JobStatus.SUCCEEDED,
            tokenizer_sha256=other_tokenizer_sha or sft.tokenizer_sha256, artifact_path=rm["artifact_path"],
            progress=1.0,
        ))  # fmt: skip
    assert isinstance(sft, Checkpoint)
    return sft, runs[0], runs[1]


def demo_prompts(n: int, *, seed: int = 0):
    """n demo-world prompts as Prompt rows (a few adversarial among them)."""
    from annotation import services as annotation_services
    from annotation.models import Prompt
    from policy.demo_world import default_world

    return [annotation_services.prompt_create(text=wp.text, source=Prompt.Source.GENERATED,
                                              context=[dict(t) for t in wp.context], system_prompt=wp.system_prompt,
                                              is_adversarial=wp.is_adversarial, tags=["demo-world", wp.split])
            for wp in default_world().sample(n, seed=seed)]  # fmt: skip


TINY_ROUND = {
    "eval_fraction": 0.25, "seed": 1,
    "rejection_sampling": {"k": 2, "max_new_tokens": 8, "chunk_prompts": 3},
    "sft": {"batch_size": 4, "max_steps": 2, "lr": 1e-3},
    "ppo": {"n_iterations": 3, "batch_size": 4, "mini_batch_size": 2, "max_new_tokens": 8, "eval_every": 0,
            "checkpoint_every": 1, "lr": 1e-4},
    "next_batch": {"prompts": 3, "max_new_tokens": 6},
    "evaluation": {"prompts": 8, "min_prompts": 2, "max_new_tokens": 6},
}  # fmt: skip
