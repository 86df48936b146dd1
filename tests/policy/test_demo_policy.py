"""The demo policy built in seconds at a tiny size: saved in Meta's format, reloaded, chatting; and
`manage.py policy_demo_build` registering it, idempotently."""

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from django.core.management import CommandError, call_command

from policy.checkpoints import load_checkpoint, sha256_of_checkpoint
from policy.demo_policy import DemoBuildConfig, answer_dialogs, build_demo_policy
from policy.demo_world import default_world, judge
from policy.sft import dialog_sample, make_batch
from policy.tokenizer import Tokenizer

TINY = {"vocab_size": 512, "dim": 48, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 16,
        "max_seq_len": 160, "base_steps": 30, "base_lr": 5e-3, "base_dialogs": 400, "knowledge_repeats": 1,
        "sft_steps": 30, "sft_lr": 5e-3, "sft_dialogs": 400, "batch_size": 16, "warmup_steps": 3,
        "eval_prompts": 6, "eval_max_new_tokens": 12, "device": "cpu"}  # fmt: skip
SLOPPY = ["rude", "unsafe", "wrong", "rambling"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; a second thread only waits for a busy core
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, list[dict]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("demo")
    seen: list[tuple[str, int, int]] = []
    result = build_demo_policy(root, DemoBuildConfig(**TINY), lambda phase, step, total, m: seen.append((phase, step, total)))
    torch.set_num_threads(threads)
    assert ("demo-base", 30, 30) in seen and ("demo-sft", 30, 30) in seen and ("eval", 2, 2) in seen
    return root, result


def answer_loss(path: str, dialogs) -> float:
    """Mean loss of a saved checkpoint on the answer tokens of dialogs."""
    model, tokenizer = load_checkpoint(path), Tokenizer(Path(path) / "tokenizer.model")
    inputs, targets = make_batch([dialog_sample(tokenizer, d) for d in dialogs], tokenizer.pad_id, 160)
    with torch.no_grad():
        return model(inputs, targets)[1].item()


def test_build_saves_meta_checkpoints_with_lineage(built) -> None:
    root, result = built
    base, sft = result
    assert (base["name"], base["parent"], sft["name"], sft["parent"]) == ("demo-base", None, "demo-sft", "demo-base")
    for item in result:
        path = Path(item["path"])
        assert path == root / item["name"]
        assert {"params.json", "consolidated.00.pth", "tokenizer.model"} <= {p.name for p in path.iterdir()}
        assert item["sha256"] == sha256_of_checkpoint(path)
        assert item["tokenizer_sha256"] == hashlib.sha256((path / "tokenizer.model").read_bytes()).hexdigest()
        assert item["params"] == json.loads((path / "params.json").read_text())
        assert item["params"]["dim"] == 48 and item["params"]["vocab_size"] == 512
        assert json.loads((path / "training.json").read_text())["config"]["max_steps"] == 30
    assert base["sha256"] != sft["sha256"] and base["tokenizer_sha256"] == sft["tokenizer_sha256"]
    evaluation = sft["metrics"]["eval"]
    assert evaluation["n"] == 6 and evaluation["wins"] + evaluation["losses"] + evaluation["ties"] == 6
    assert 0 <= evaluation["win_rate"] <= 1 and len(evaluation["examples"]) == 6


def test_sft_learned_the_clean_answers_and_base_the_sloppy_ones(built) -> None:
    _, (base, sft) = built
    world = default_world()
    prompts, rng = world.sample(48, seed=5, split="train"), random.Random(0)
    clean = [[*p.dialog(), {"role": "assistant", "content": world.reference_answer(p)}] for p in prompts]
    sloppy = [[*p.dialog(), {"role": "assistant", "content": world.answer(p, rng.choice(SLOPPY), rng)}]
              for p in prompts]
    # How much likelier each model finds the clean answer than a sloppy one to the same prompt.
    margin = {c["name"]: answer_loss(c["path"], sloppy) - answer_loss(c["path"], clean) for c in (base, sft)}
    assert answer_loss(sft["path"], clean) < answer_loss(base["path"], clean)
    assert margin["demo-sft"] > margin["demo-base"] + 0.5, margin


def test_reloaded_checkpoint_chats(built) -> None:
    _, (_, sft) = built
    model, tokenizer = load_checkpoint(sft["path"]).eval(), Tokenizer(sft["tokenizer_path"])
    prompt = next(p for p in default_world().prompts("train") if p.id == "capital:France:0")
    answers = answer_dialogs(model, tokenizer, [prompt.dialog(), prompt.dialog()], temperature=0,
                             max_new_tokens=24, seed=0)
    assert answers[0] == answers[1] and answers[0]  # greedy: the same text twice
    assert "[INST]" not in answers[0] and "\x00" not in answers[0]
    assert judge(prompt, answers[0]).safe


@pytest.mark.django_db
def test_command_registers_once_and_answers_demo_prompts(tmp_path: Path, settings) -> None:
    from django.contrib.auth.models import User

    from annotation import services as annotation_services
    from annotation.models import Prompt
    from policy.models import Checkpoint, GenerationJob

    settings.TANDEM_MODEL_ROOTS = [tmp_path]
    settings.TANDEM_DEFAULT_ARMS = ""
    annotator = User.objects.create_user("early-bird")
    early = annotation_services.prompt_write(author=annotator, text="Written before any checkpoint existed?")
    out = tmp_path / "demo"
    tiny = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    tiny = [*tiny, "--set", "eval_prompts=0", "--set", "base_steps=2", "--set", "sft_steps=2"]
    call_command("policy_demo_build", "--out", str(out), *tiny, "--answer", "5")
    base, sft = Checkpoint.objects.get(name="demo-base"), Checkpoint.objects.get(name="demo-sft")
    assert (base.format, base.parent, sft.parent) == ("meta", None, base)
    assert sft.path == str((out / "demo-sft").resolve()) and sft.sha256 == sha256_of_checkpoint(out / "demo-sft")
    assert sft.tokenizer_path == str(out / "demo-sft" / "tokenizer.model") and len(sft.tokenizer_sha256) == 64
    assert sft.params == json.loads((out / "demo-sft" / "params.json").read_text())
    waiting, job = GenerationJob.objects.order_by("id")
    assert list(waiting.prompts.all()) == [early]
    assert (job.arm_a_checkpoint, job.arm_a_temperature, job.arm_b_checkpoint, job.arm_b_temperature) == (
        sft, 0.7, base, 1.0)
    prompts = list(job.prompts.all())
    assert len(prompts) == 5 and all(p.source == Prompt.Source.GENERATED and p.awaiting_responses for p in prompts)
    assert sum(p.is_adversarial for p in prompts) == 1

    weights = (out / "demo-sft" / "consolidated.00.pth").stat().st_mtime_ns
    call_command("policy_demo_build", "--out", str(out), "--if-missing", "--answer", "5")
    assert Checkpoint.objects.count() == 2 and GenerationJob.objects.count() == 2  # their prompts are still queued
    assert Prompt.objects.count() == 6
    with pytest.raises(CommandError, match="exist already"):
        call_command("policy_demo_build", "--out", str(out))

    # The database was reset but the files survived: --if-missing registers them without training.
    GenerationJob.objects.all().delete()
    Checkpoint.objects.filter(name="demo-sft").delete()
    with pytest.raises(CommandError, match="Only demo-base"):
        call_command("policy_demo_build", "--out", str(out), "--if-missing")
    Checkpoint.objects.all().delete()
    call_command("policy_demo_build", "--out", str(out), "--if-missing")
    assert Checkpoint.objects.get(name="demo-sft").parent == Checkpoint.objects.get(name="demo-base")
    assert (out / "demo-sft" / "consolidated.00.pth").stat().st_mtime_ns == weights
    with pytest.raises(CommandError, match="base_steps"):
        call_command("policy_demo_build", "--out", str(out), "--set", "base_steps=many")
    with pytest.raises(CommandError, match="outside the model roots"):
        call_command("policy_demo_build", "--out", str(tmp_path.parent / "elsewhere"), "--set", "base_name=x")
