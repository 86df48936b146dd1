"""Ghost Attention and safety context distillation as round stages: the instruction checker, the config
sections, the launch's stage order, each stage alone with stand-ins whose every answer and score is known
here, and rounds with both stages run by the worker on the tiny fixture world (metrics, lineage, resume)."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from django.core.exceptions import ValidationError

from policy import round_stages, rounds
from policy.context_distillation import ANSWER_TEMPLATE, RISK_TEMPLATES, SAFETY_PREPROMPT
from policy.gatt import SampledDialogue
from policy.gatt_check import INSTRUCTIONS, follows_instruction
from policy.models import RLHFRound
from policy.reward import Prompt
from policy.round_config import ConfigError, RoundConfig
from tests.policy import round_fixtures as rf
from tests.policy.rl_helpers import tiny_policy, tiny_tokenizer  # noqa: F401
from tests.policy.test_rounds import launch, round_world, world  # noqa: F401
from webapp.jobs import JobStatus
from workers import rounds as round_worker

# --- the checker -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply, pirate, one_sentence", [
    ("Arr! The capital of France is Paris.", True, False),
    ("arrr, a cat says meow", True, True),
    ("Ahoy, 2 plus 2 is 4.", True, True),
    ("Yarr! I'm sorry, but I can't help with that.", True, False),
    ("  ARRH the sky is blue", True, True),
    ("The capital of France is Paris.", False, True),
    ("Ar! too short a growl.", False, False),
    ("Arrival is at noon.", False, True),  # "arr" must be the whole first word
    ("Barr the door.", False, True),
    ("I'm sorry, but I can't help with that. If you are locked out, a locksmith can help.", False, False),
    ("", False, False),
    ("...", False, False),
    ("Yes!!! It is.", False, False),
])  # fmt: skip
def test_the_checker_reads_the_rule_of_each_instruction(reply, pirate, one_sentence):
    assert follows_instruction("pirate", reply) is pirate
    assert follows_instruction("one_sentence", reply) is one_sentence


def test_the_checker_refuses_an_instruction_it_cannot_check():
    with pytest.raises(ValueError, match="no checker"):
        follows_instruction("random", "Arr!")


# --- config ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data, field", [
    ({"gatt": {"instruction": "french"}}, "gatt.instruction"),
    ({"gatt": {"instruction": 3}}, "gatt.instruction"),
    ({"gatt": {"turns": 0}}, "gatt.turns"),
    ({"gatt": {"turns": 65}}, "gatt.turns"),
    ({"gatt": {"dialogues": 0}}, "gatt.dialogues"),
    ({"gatt": {"attempts": 0}}, "gatt.attempts"),
    ({"gatt": {"temperature": 0}}, "gatt.temperature"),
    ({"gatt": {"shorten_probability": 1.5}}, "gatt.shorten_probability"),
    ({"gatt": {"plain_fraction": 1.0}}, "gatt.plain_fraction"),
    ({"gatt": {"max_constraints": 5}}, "gatt.max_constraints"),
    ({"gatt": {"keep_unfollowed": "yes"}}, "gatt.keep_unfollowed"),
    ({"gatt": {"turn": 3}}, "gatt.turn"),
    ({"context_distillation": {"preprompt": "   "}}, "context_distillation.preprompt"),
    ({"context_distillation": {"margin": -0.5}}, "context_distillation.margin"),
    ({"context_distillation": {"max_new_tokens": 0}}, "context_distillation.max_new_tokens"),
    ({"context_distillation": {"answer_templates": 1}}, "context_distillation.answer_templates"),
])  # fmt: skip
def test_config_errors_name_the_field(data, field):
    with pytest.raises(ConfigError) as caught:
        RoundConfig.from_dict(data)
    assert caught.value.field == field


def test_accepted_sections_are_accepted_by_the_algorithms_too():
    for data in [{}, {"gatt": {"instruction": "random", "max_constraints": 4, "shorten_probability": 0.0},
                      "context_distillation": {"answer_templates": False, "margin": 0.0}},
                 {"gatt": {"instruction": "one_sentence", "shorten_probability": 1.0, "all_turns": True}}]:
        config = RoundConfig.from_dict(data)
        gatt = config.gatt_config()
        assert (gatt.max_constraints, gatt.shorten_probability, gatt.all_turns, gatt.seed) == (
            config.gatt.max_constraints, config.gatt.shorten_probability, config.gatt.all_turns, config.seed)
        cd = config.context_distillation_config()
        templated = config.context_distillation.answer_templates
        assert cd.system_message == (f"{SAFETY_PREPROMPT} {ANSWER_TEMPLATE}" if templated else SAFETY_PREPROMPT)
    assert RoundConfig.from_dict(RoundConfig().to_dict()) == RoundConfig()
    # The paper's recipe for 7B+ policies: its longer replies.
    paper = RoundConfig.for_policy({}, {"dim": 4096, "n_layers": 32, "n_heads": 32, "vocab_size": 32000})
    assert paper.gatt.max_new_tokens == paper.context_distillation.max_new_tokens == 512


# --- each stage alone, with stand-ins ----------------------------------------------------------------------------

USERS = [Prompt([{"role": "user", "content": f"question {i}"}]) for i in range(3)]


def test_gatt_keeps_the_dialogues_that_followed_and_trains_with_the_instruction_once(tiny_tokenizer, tmp_path,
                                                                                   monkeypatch):
    """Dialogue 0 follows at every turn, dialogue 1 misses at turn 2: only dialogue 0 is trained on, with the
    instruction as its system message only, and the files record what was sampled."""
    calls = []

    def sampled(model, tokenizer, user_turns, instructions, *, check, attempts, **kwargs):
        calls.append((user_turns, instructions, attempts))
        replies = [["Arr! one.", "Arr! two."], ["Arr! one.", "Sorry, no."]]
        return [SampledDialogue(list(u), r, [check(x) for x in r]) for u, r in zip(user_turns, replies)]

    monkeypatch.setattr(round_stages, "sample_dialogues", sampled)
    config = RoundConfig.from_dict({"gatt": {"dialogues": 2, "turns": 2, "attempts": 3, "shorten_probability": 0.0,
                                             "plain_fraction": 0.0}, "sft": {"max_steps": 1, "batch_size": 2}})
    policy = tiny_policy(tiny_tokenizer.n_words, max_seq_len=256)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    metrics = round_stages.gatt_stage(policy, tiny_tokenizer, USERS, config, tmp_path / "gatt", device="cpu")

    full = INSTRUCTIONS["pirate"][0]
    [(user_turns, instructions, attempts)] = calls
    assert instructions == [full, full] and attempts == 3
    assert all(len(u) == 2 and set(u) <= {p.messages[0]["content"] for p in USERS} for u in user_turns)
    assert (metrics["kept"], metrics["dropped"], metrics["samples"], metrics["fine_tuned"]) == (1, 1, 1, True)
    assert metrics["followed_by_turn"] == [1.0, 0.5]
    train = [json.loads(line) for line in (tmp_path / "gatt" / "train.jsonl").read_text().splitlines()]
    assert [m["role"] for m in train[0]["dialog"]] == ["system", "user", "assistant", "user", "assistant"]
    assert train[0]["dialog"][0]["content"] == full and train[0]["dialog"][-1]["content"] == "Arr! two."
    assert [m["content"] for m in train[0]["dialog"][1::2]] == user_turns[0]  # without the instruction
    assert metrics["train_sha256"] == hashlib.sha256((tmp_path / "gatt" / "train.jsonl").read_bytes()).hexdigest()
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())

    # Done once: a second call reads the result and the weights back, and samples nothing.
    again = tiny_policy(tiny_tokenizer.n_words, max_seq_len=256)
    assert round_stages.gatt_stage(again, tiny_tokenizer, USERS, config, tmp_path / "gatt", device="cpu") == metrics
    assert len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), policy.state_dict().values()))
    # A changed config is not resumed from that folder.
    with pytest.raises(ValueError, match="cannot resume"):
        round_stages.gatt_stage(again, tiny_tokenizer, USERS, RoundConfig.from_dict({"gatt": {"turns": 3}}),
                                tmp_path / "gatt", device="cpu")


def test_gatt_trains_plain_dialogues_beside_the_instructed_ones(tiny_tokenizer, tmp_path, monkeypatch):
    """The contrast: a share of the dialogues is sampled with nothing attached and trained with no system
    message, so the instruction is what tells the two apart."""
    seen = []

    def sampled(model, tokenizer, user_turns, instructions, *, check, attempts, **kwargs):
        seen.extend(instructions)
        return [SampledDialogue(list(u), ["Arr! yes." if i else "no."] * len(u), [check(x) if i else None for x in
                                                                               ["Arr! yes." if i else "no."] * len(u)])
                for u, i in zip(user_turns, instructions)]

    monkeypatch.setattr(round_stages, "sample_dialogues", sampled)
    config = RoundConfig.from_dict({"gatt": {"dialogues": 8, "turns": 2, "shorten_probability": 0.0,
                                             "all_turns": True}, "sft": {"max_steps": 1, "batch_size": 4}})
    policy = tiny_policy(tiny_tokenizer.n_words, max_seq_len=256)
    metrics = round_stages.gatt_stage(policy, tiny_tokenizer, USERS, config, tmp_path / "gatt", device="cpu")
    n_plain = seen.count("")
    assert 0 < n_plain < 8 and set(seen) == {"", INSTRUCTIONS["pirate"][0]}
    assert (metrics["plain"], metrics["kept"], metrics["dropped"]) == (n_plain, 8 - n_plain, 0)
    assert metrics["samples"] == 2 * 8 and metrics["plain_samples"] == 2 * n_plain  # every prefix: all_turns
    train = [json.loads(line) for line in (tmp_path / "gatt" / "train.jsonl").read_text().splitlines()]
    for row in train:
        roles = [m["role"] for m in row["dialog"]]
        if row["instruction"] is None:
            assert "system" not in roles and row["dialog"][-1]["content"] == "no."
        else:
            assert roles[0] == "system" and row["dialog"][-1]["content"] == "Arr! yes."
    assert metrics["followed_by_turn"] == [1.0, 1.0]  # over the instructed dialogues only


def test_context_distillation_answers_with_the_category_template_and_keeps_what_the_safety_rm_prefers(
        tiny_tokenizer, tmp_path, monkeypatch):
    hurt = Prompt([{"role": "user", "content": "How can I hurt my neighbor?"}], is_safety=True)
    steal = Prompt([{"role": "user", "content": "Tell me how to steal a bike."}], is_safety=True)
    odd = Prompt([{"role": "user", "content": "Say the magic words."}], is_safety=True)  # no category known
    plain = Prompt([{"role": "user", "content": "What is the capital of France?"}])
    seen = []

    def answerer(model, tokenizer, **kwargs):
        def answer(dialogs):
            seen.append(dialogs)
            return ["sorry" if d[0]["role"] == "system" and "magic" not in d[-1]["content"] else "sure"
                    for d in dialogs]
        return answer

    monkeypatch.setattr(round_stages, "policy_answer_fn", answerer)
    scored = []

    def safety(prompts, responses, tokens):
        scored.append(list(prompts))
        return [1.0 if r == "sorry" else -1.0 for r in responses]

    config = RoundConfig.from_dict({"sft": {"max_steps": 1, "batch_size": 2}})
    policy = tiny_policy(tiny_tokenizer.n_words, max_seq_len=256)
    metrics = round_stages.context_distillation_stage(policy, tiny_tokenizer, [hurt, plain, steal, odd], safety,
                                                      config, tmp_path / "cd", device="cpu")
    preprompted = seen[0]
    assert [d[0]["content"] for d in preprompted] == [
        f"{SAFETY_PREPROMPT} {RISK_TEMPLATES['hateful_and_harmful']}",
        f"{SAFETY_PREPROMPT} {RISK_TEMPLATES['illicit_and_criminal']}", f"{SAFETY_PREPROMPT} {ANSWER_TEMPLATE}"]
    assert seen[1] == [hurt.messages, steal.messages, odd.messages]  # then without the preprompt
    assert scored == [[hurt, steal, odd] * 2]  # both answers judged on the prompt as asked
    assert {k: metrics[k] for k in ("prompts", "skipped_untagged", "kept", "dropped", "fine_tuned")} == {
        "prompts": 3, "skipped_untagged": 1, "kept": 2, "dropped": 1, "fine_tuned": True}
    train = [json.loads(line)["dialog"] for line in (tmp_path / "cd" / "train.jsonl").read_text().splitlines()]
    assert train == [[*hurt.messages, {"role": "assistant", "content": "sorry"}],
                     [*steal.messages, {"role": "assistant", "content": "sorry"}]]  # without the preprompt
    rows = [json.loads(line) for line in (tmp_path / "cd" / "samples.jsonl").read_text().splitlines()]
    assert [(r["kept"], r["score_with"], r["score_without"]) for r in rows] == [
        (True, 1.0, -1.0), (True, 1.0, -1.0), (False, -1.0, -1.0)]
    assert metrics["train_sha256"] == hashlib.sha256((tmp_path / "cd" / "train.jsonl").read_bytes()).hexdigest()

    # Nothing tagged: nothing to distil, the policy stays as it was.
    untouched = tiny_policy(tiny_tokenizer.n_words, max_seq_len=256)
    before = [v.clone() for v in untouched.state_dict().values()]
    none = round_stages.context_distillation_stage(untouched, tiny_tokenizer, [plain], safety, config,
                                                   tmp_path / "cd-none", device="cpu")
    assert (none["prompts"], none["kept"], none["fine_tuned"]) == (0, 0, False)
    assert all(torch.equal(a, b) for a, b in zip(before, untouched.state_dict().values()))


# --- launch -----------------------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_the_launch_takes_the_new_stages_in_order_only(world):
    def refused(stages, field="stages", **overrides):
        with pytest.raises(ValidationError) as caught:
            launch(world, stages=stages, **overrides)
        assert field in caught.value.message_dict, caught.value.message_dict
        assert not RLHFRound.objects.exists()
        return " ".join(caught.value.message_dict[field])

    assert "cannot" in refused(["ppo", "gatt"])
    assert "write gatt, ppo" in refused(["ppo", "gatt"])
    refused(["context_distillation", "ppo"])
    refused(["gatt", "rejection_sampling", "sft"])
    refused(["context_distillation", "gatt"])
    assert "add the sft stage" in refused(["rejection_sampling", "gatt"])
    benign = [p for p in world["prompts"] if not p.is_adversarial]
    assert "no" in refused(["context_distillation"], field="prompts", prompts=benign)
    everything = ["rejection_sampling", "sft", "gatt", "ppo", "context_distillation"]
    rnd = launch(world, stages=everything)
    assert rnd.stages == everything


# --- rounds through the worker --------------------------------------------------------------------------------

TINY_STAGES = {**rf.TINY_ROUND, "gatt": {"dialogues": 3, "turns": 2, "attempts": 2, "max_new_tokens": 6,
                                         "chunk_dialogues": 2, "keep_unfollowed": True},
               "context_distillation": {"max_new_tokens": 6}}


@pytest.fixture
def adversarial_world(world):
    """The fixture world with prompts of which a few adversarial ones are training prompts."""
    return {**world, "prompts": rf.demo_prompts(12, seed=2)}


@pytest.mark.django_db
def test_a_round_with_both_stages_records_its_data_and_resumes_after_them(adversarial_world, monkeypatch):
    world = adversarial_world
    rnd = launch(world, stages=["gatt", "ppo", "context_distillation"], config=TINY_STAGES)
    folder = rounds.round_dir(rnd)
    held_out = rounds.eval_split([p.pk for p in world["prompts"]], RoundConfig.from_dict(rnd.config))
    adversarial = [p for p in world["prompts"] if p.is_adversarial and p.pk not in held_out]
    assert adversarial  # the test below means something

    sampled = []
    real_sample = round_stages.sample_dialogues
    monkeypatch.setattr(round_stages, "sample_dialogues", lambda *a, **k: sampled.append(1) or real_sample(*a, **k))
    stages_seen = []
    progress = rounds.round_progress

    def recorded(**kwargs):
        stages_seen.append(kwargs.get("stage"))
        return progress(**kwargs)

    monkeypatch.setattr(rounds, "round_progress", recorded)
    real_candidates = round_stages.distill_candidates

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as abrupt as a kill, once GAtt and PPO are done

    monkeypatch.setattr(round_stages, "distill_candidates", killed)
    with pytest.raises(KeyboardInterrupt):
        round_worker.run_round(rnd.pk)
    rnd.refresh_from_db()
    assert rnd.status == JobStatus.RUNNING and rnd.current_stage == "context_distillation"
    assert len(sampled) == 2  # three dialogues in chunks of two
    gatt_files = sorted(p for p in (folder / "gatt").rglob("*") if p.is_file())
    written = {p: p.stat().st_mtime_ns for p in gatt_files}

    monkeypatch.setattr(round_stages, "distill_candidates", real_candidates)
    assert round_worker.run_round(rnd.pk) == "succeeded"
    rnd.refresh_from_db()
    assert len(sampled) == 2 and {p: p.stat().st_mtime_ns for p in gatt_files} == written  # GAtt not redone
    seen = [s for s in stages_seen if s]
    assert seen.index("gatt") < seen.index("ppo") < seen.index("context_distillation") < seen.index("output")

    # GAtt's data: what was sampled, kept and trained on, as the files say.
    gatt = rnd.metrics["gatt"]
    rows = [json.loads(line) for p in sorted((folder / "gatt" / "samples").iterdir())
            for line in p.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2] and gatt["dialogues"] == 3
    for row in rows:  # the flag is the checker's verdict on the reply kept; plain dialogues are not checked
        if row["instruction"]:
            assert row["followed"] == [follows_instruction("pirate", reply) for reply in row["replies"]]
        else:
            assert row["followed"] == [None] * len(row["replies"])
    instructed = sum(bool(r["instruction"]) for r in rows)
    assert (gatt["kept"], gatt["plain"], gatt["samples"]) == (instructed, 3 - instructed, 3)  # keep_unfollowed
    train = (folder / "gatt" / "train.jsonl").read_bytes()
    assert gatt["train_sha256"] == hashlib.sha256(train).hexdigest()
    for line in train.decode().splitlines():
        sample = json.loads(line)
        dialog = sample["dialog"]
        if sample["instruction"]:
            assert dialog[0] == {"role": "system", "content": INSTRUCTIONS["pirate"][1 if sample["shortened"] else 0]}
        assert [m["role"] for m in dialog].count("system") == (1 if sample["instruction"] else 0)
        assert not any("<<SYS>>" in m["content"] for m in dialog[1:] if m["role"] == "user")

    # Context distillation's: one candidate per adversarial training prompt.
    cd = rnd.metrics["context_distillation"]
    assert cd["prompts"] == len(adversarial) and cd["kept"] + cd["dropped"] == len(adversarial)
    candidates = [json.loads(line) for line in (folder / "context_distillation" / "samples.jsonl").read_text()
                  .splitlines()]
    assert sorted(c["prompt"]["messages"][-1]["content"] for c in candidates) == sorted(p.text for p in adversarial)
    assert sum(c["kept"] for c in candidates) == cd["kept"]
    assert all(c["kept"] == (c["score_with"] > c["score_without"]) for c in candidates)
    assert cd["train_sha256"] == hashlib.sha256(Path(cd["train_path"]).read_bytes()).hexdigest()

    # The lineage in the checkpoint names both stages' training data by path and hash.
    record = json.loads((Path(rnd.checkpoint_out.path) / "training.json").read_text())
    data = record["lineage"]["training_data"]
    assert data["gatt"] == {k: gatt[k] for k in ("train_path", "train_sha256", "samples", "kept", "dropped")}
    assert data["context_distillation"]["train_sha256"] == cd["train_sha256"]
    assert record["metrics"]["gatt"]["samples"] == 3 and record["stages"] == ["gatt", "ppo", "context_distillation"]
    assert record["config"]["gatt"]["turns"] == 2
