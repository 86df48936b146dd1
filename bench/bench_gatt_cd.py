"""Ghost Attention and safety context distillation, as the round runs them (policy.round_stages), measured
on the demo world.

    .venv/bin/python -m bench.bench_gatt_cd                    # the reported run (a few CPU minutes per part)
    .venv/bin/python -m bench.bench_gatt_cd --quick            # tiny sizes: a smoke run of the machinery
    .venv/bin/python -m bench.bench_gatt_cd --demo-dir DIR --out DIR

What it does, in order (models and data are cached under --out, keyed by their config):

0. Evidence on the demo policy as built (demo-sft, demo-base): it never saw an instruction or a safety
   preprompt, and its answers with one are compared to its answers without, at the same seed.
1. The precondition both stages assume, made here: "demo-chat", demo-base fine-tuned (a) on its own sloppy
   mix without system messages (about a third of its adversarial answers comply), plus plain dialogues of
   5-20 turns so its context reaches 1,024 tokens, (b) to answer like a pirate when "Always answer like a
   pirate." is attached to the current user turn, (c) to answer safely when given the safety preprompt.
   So it follows an instruction put in front of it and is safer with the preprompt, as the paper's RLHF V3
   model was; whether it keeps the instruction over a dialogue, and is safe without the preprompt, is what
   the stages are for.
2. A safety reward model (rewards.train) on demo-world pairs judged by the oracle: the world's answer styles
   and demo-chat's own samples; its held-out accuracy is reported.
3. GAtt: policy.round_stages.gatt_stage on demo-chat with the round's training prompts; instruction adherence
   by turn (the paper's Figure 10) before and after, with the instruction only in the first turn's system
   message, on dialogues of held-out questions; the oracle's correctness by turn; and a control without any
   instruction (does the model now talk like a pirate unasked?).
4. Context distillation: policy.round_stages.context_distillation_stage on demo-chat; safety RM score and the
   oracle's safety verdict on held-out adversarial prompts, and the oracle's helpfulness on held-out ordinary
   prompts, before and after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

DEMO_DIR = "/tmp/demo/models/demo"


@dataclass
class Sizes:
    chat_plain: int = 2000  # (a) sloppy demo-base mix, no instruction
    chat_long: int = 200  # (a) plain dialogues of 5-20 turns (the 1,024-token context)
    chat_pirate: int = 900  # (b) instruction attached to the last user turn -> "Arr! " + the reference answer
    chat_safe: int = 700  # (c) safety preprompt -> the reference answer (70% adversarial)
    chat_steps: int = 300
    chat_lr: float = 1e-3
    context: int = 1024  # the demo-chat's context (the demo policy was built at 256)
    rm_world_pairs: int = 1200  # world answer styles, 60% adversarial prompts
    rm_policy_pairs: int = 400  # demo-chat's own answers to adversarial prompts, two per prompt
    rm: dict[str, Any] = field(default_factory=lambda: {"max_seq_len": 160, "micro_batch_size": 16, "lr": 5e-4,
                                                       "epochs": 2, "checkpoint_every": 0})
    round_prompts: int = 600  # the round's training prompts (train split; all 44 adversarial ones among them)
    round: dict[str, Any] = field(default_factory=lambda: {
        "seed": 0,
        "sft": {"lr": 3e-4, "epochs": 3, "batch_size": 16},
        "gatt": {"instruction": "pirate", "dialogues": 96, "turns": 6, "attempts": 2, "all_turns": True,
                 "plain_fraction": 0.5, "max_new_tokens": 32, "chunk_dialogues": 32},
        "context_distillation": {"max_new_tokens": 40},
    })
    eval_dialogues: int = 32  # held-out dialogues for adherence by turn
    eval_turns: int = 20
    eval_adversarial_samples: int = 4  # answers per held-out adversarial prompt (46 prompts)
    eval_ordinary: int = 200  # held-out ordinary prompts, one answer each
    max_new_tokens: int = 32


QUICK = Sizes(chat_plain=64, chat_long=8, chat_pirate=32, chat_safe=32, chat_steps=4, context=512, rm_world_pairs=64,
              rm_policy_pairs=16, rm={"max_seq_len": 128, "micro_batch_size": 8, "lr": 1e-3, "checkpoint_every": 0,
                                      "mix": {"min_train_pairs": 4}},
              round_prompts=40, round={"seed": 0, "sft": {"max_steps": 2, "batch_size": 4},
                                       "gatt": {"dialogues": 4, "turns": 2, "max_new_tokens": 8},
                                       "context_distillation": {"max_new_tokens": 8}},
              eval_dialogues=4, eval_turns=3, eval_adversarial_samples=1, eval_ordinary=8, max_new_tokens=8)

PIRATE = "Always answer like a pirate."


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def key_of(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --- sampling helpers ---------------------------------------------------------------------------------------

def answers(model, tokenizer, dialogs, *, max_new_tokens, seed, n=1, temperature=0.7, batch=32) -> list[str]:
    from policy.generate import generate

    out = []
    for lo in range(0, len(dialogs), batch):
        gen = generate(model, [tokenizer.encode_dialog(d) for d in dialogs[lo:lo + batch]], max_new_tokens,
                       temperature=temperature, top_p=0.9, n=n, eos_id=tokenizer.eos_id, seed=seed + lo)
        out += [tokenizer.decode(t[:-1] if t and t[-1] == tokenizer.eos_id else t).strip() for t in gen.tokens]
    return out


def dialogue_by_turn(model, tokenizer, user_turns, system: str, *, max_new_tokens, seed) -> list[list[str]]:
    """Each dialogue answered turn by turn by the model, its own replies in the history, `system` (if any) as
    the first turn's system message only. Returns the replies, per dialogue."""
    from policy.generate import generate

    histories = [[{"role": "system", "content": system}] if system else [] for _ in user_turns]
    replies: list[list[str]] = [[] for _ in user_turns]
    for t in range(len(user_turns[0])):
        prompts = [tokenizer.encode_dialog([*h, {"role": "user", "content": u[t]}])
                   for h, u in zip(histories, user_turns)]
        if max(map(len, prompts)) + max_new_tokens > model.args.max_seq_len:
            log(f"  the context ends before turn {t + 1}")
            break
        gen = generate(model, prompts, max_new_tokens, temperature=0.7, top_p=0.9, eos_id=tokenizer.eos_id,
                       seed=seed * 1000 + t)
        for d, tokens in enumerate(gen.tokens):
            reply = tokenizer.decode(tokens[:-1] if tokens and tokens[-1] == tokenizer.eos_id else tokens).strip()
            replies[d].append(reply)
            histories[d] += [{"role": "user", "content": user_turns[d][t]}, {"role": "assistant", "content": reply}]
    return replies


def by_turn(values: list[list[float]]) -> list[float]:
    turns = max(map(len, values))
    return [sum(v[t] for v in values if t < len(v)) / sum(t < len(v) for v in values) for t in range(turns)]


# --- 1. the precondition: demo-chat -------------------------------------------------------------------------

def chat_data(world, sizes: Sizes, tokenizer) -> list:
    from policy.context_distillation import ANSWER_TEMPLATE, RISK_TEMPLATES, SAFETY_PREPROMPT
    from policy.demo_policy import BASE_STYLES
    from policy.gatt import with_instruction
    from policy.round_stages import DEMO_RISK_CATEGORIES
    from policy.sft import dialog_sample

    rng = random.Random(7)
    train = world.prompts("train")
    single = [p for p in train if not p.context]
    adversarial = [p for p in train if p.is_adversarial]
    ordinary = [p for p in single if not p.is_adversarial]
    names, weights = zip(*BASE_STYLES.items())

    def sloppy(p):
        return world.answer(p, rng.choices(names, weights)[0], rng)

    samples = [dialog_sample(tokenizer, d) for d in world.dialogs(split="train", styles=BASE_STYLES,
                                                                  n=sizes.chat_plain, seed=11)]
    for _ in range(sizes.chat_long):  # (a) long plain dialogues: the context the 20-turn evaluation needs
        dialog = []
        for p in rng.sample(single, rng.randint(5, 20)):
            dialog += [{"role": "user", "content": p.text}, {"role": "assistant", "content": sloppy(p)}]
        samples.append(dialog_sample(tokenizer, dialog))
    for _ in range(sizes.chat_pirate):  # (b) the instruction in front of the current turn is followed
        history = []
        for p in rng.sample(single, rng.randint(0, 2)):
            history += [{"role": "user", "content": p.text}, {"role": "assistant", "content": sloppy(p)}]
        p = rng.choice(single)
        dialog = [*history, {"role": "user", "content": with_instruction(PIRATE, p.text)},
                  {"role": "assistant", "content": f"Arr! {world.reference_answer(p)}"}]
        samples.append(dialog_sample(tokenizer, dialog, last_turn_only=True))
    for _ in range(sizes.chat_safe):  # (c) with the safety preprompt (and a template), the safe answer
        p = rng.choice(adversarial) if rng.random() < 0.7 else rng.choice(ordinary)
        template = RISK_TEMPLATES.get(DEMO_RISK_CATEGORIES.get(p.intent.category, ""), ANSWER_TEMPLATE)
        system = f"{SAFETY_PREPROMPT} {template}" if rng.random() < 0.8 else SAFETY_PREPROMPT
        samples.append(dialog_sample(tokenizer, [{"role": "system", "content": system}, *p.dialog(),
                                                 {"role": "assistant", "content": world.reference_answer(p)}]))
    return samples


def build_chat(out: Path, demo_dir: Path, sizes: Sizes, world, tokenizer) -> Path:
    from policy.checkpoints import load_checkpoint
    from policy.sft import SFTConfig, save_checkpoint, sft_train

    fields = ("chat_plain", "chat_long", "chat_pirate", "chat_safe", "chat_steps", "chat_lr", "context")
    path = out / f"demo-chat-{key_of({f: getattr(sizes, f) for f in fields})}"
    if (path / "params.json").is_file():
        log(f"demo-chat: cached at {path}")
        return path
    log("demo-chat: demo-base fine-tuned on its sloppy mix, long dialogues, the instruction and the preprompt")
    model = load_checkpoint(demo_dir / "demo-base", dtype=torch.float32, max_seq_len=sizes.context)
    config = SFTConfig(lr=sizes.chat_lr, min_lr_ratio=0.1, max_steps=sizes.chat_steps, batch_size=32,
                       max_seq_len=sizes.context, warmup_steps=min(20, sizes.chat_steps // 4), group_by_length=True,
                       seed=3, device="cpu")
    started = time.process_time()
    metrics = sft_train(model, tokenizer, chat_data(world, sizes, tokenizer), config)
    log(f"  {metrics['steps']} steps, loss {metrics['loss_first']:.3f} -> {metrics['loss_last10']:.3f}, "
        f"{time.process_time() - started:.0f} CPU s")
    save_checkpoint(model, path, tokenizer_path=demo_dir / "demo-sft" / "tokenizer.model", config=config,
                    extra={"bench": "bench_gatt_cd demo-chat", "sizes": asdict(sizes), "metrics": metrics})
    return path


# --- 2. the safety reward model -----------------------------------------------------------------------------

def rm_rows(world, sizes: Sizes, chat, tokenizer) -> list[dict]:
    from policy.demo_world import ANSWER_STYLES, prefer

    rng = random.Random(5)
    train = world.prompts("train")
    adversarial = [p for p in train if p.is_adversarial]
    others = [p for p in train if not p.is_adversarial]
    pairs = []
    for _ in range(sizes.rm_world_pairs):
        p = rng.choice(adversarial) if rng.random() < 0.6 else rng.choice(others)
        s1, s2 = rng.sample(ANSWER_STYLES, 2)
        pairs.append((p, world.answer(p, s1, rng), world.answer(p, s2, rng)))
    asked = [rng.choice(adversarial) for _ in range(sizes.rm_policy_pairs // 2)]
    own = answers(chat, tokenizer, [p.dialog() for p in asked], max_new_tokens=sizes.max_new_tokens, seed=91, n=2,
                  temperature=1.0)
    pairs += [(p, own[2 * i], own[2 * i + 1]) for i, p in enumerate(asked)]
    rows = []
    for i, (p, a, b) in enumerate(pairs):
        if a == b:
            continue
        pref = prefer(p, a, b, world)
        chosen, rejected = (a, b) if pref.choice == "A" else (b, a)
        c_safe, r_safe = (pref.a_safe, pref.b_safe) if pref.choice == "A" else (pref.b_safe, pref.a_safe)
        safety_bin = ("both_safe" if c_safe and r_safe else "chosen_safe_other_unsafe" if c_safe
                      else "both_unsafe" if not r_safe else "chosen_unsafe_other_safe")
        rows.append({"id": i + 1, "comparison_id": i + 1, "prompt": p.dialog(),
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}], "margin": pref.strength / 3,
                     "strength": pref.strength, "safety_bin": safety_bin, "chosen_safe": c_safe,
                     "rejected_safe": r_safe,
                     "is_adversarial": p.is_adversarial, "source": "simulated", "origin": "sampled", "batch": "bench",
                     "split": "test" if rng.random() < 0.15 else "train", "annotator": "oracle",
                     "chosen_checkpoint": "a", "rejected_checkpoint": "b"})
    return rows


def build_safety_rm(out: Path, chat_dir: Path, demo_dir: Path, sizes: Sizes, world, tokenizer,
                    chat) -> tuple[Path, dict]:
    from rewards.config import RewardTrainConfig
    from rewards.data import build_mix
    from rewards.train import train_reward_model

    path = out / f"safety-rm-{key_of(chat_dir.name, sizes.rm_world_pairs, sizes.rm_policy_pairs, sizes.rm)}"
    if (path / "result.json").is_file():
        log(f"safety RM: cached at {path}")
        result = json.loads((path / "result.json").read_text())
        return Path(result["model_dir"]), result["eval"]
    log("safety RM: oracle-judged pairs (world styles and demo-chat's own answers)")
    mix = build_mix(rm_rows(world, sizes, chat, tokenizer), kind="safety", seed=0)
    config = RewardTrainConfig(kind="safety", base_checkpoint=str(demo_dir / "demo-sft"), device="cpu", **sizes.rm)
    started = time.process_time()
    result = train_reward_model(config, mix.train, mix.test_sets, path, manifest=mix.manifest)
    log(f"  {len(mix.train)} training pairs, {time.process_time() - started:.0f} CPU s; held-out accuracy "
        f"{ {k: round(v.get('accuracy', 0), 3) for k, v in result.eval.items()} }")
    return Path(result.model_dir), result.eval


# --- 0, 3, 4: the measurements --------------------------------------------------------------------------------

def evidence(demo_dir: Path, world, tokenizer, sizes: Sizes) -> dict:
    """Does the demo policy as built read a system message at all? Its answers with and without one, same seed."""
    from policy.checkpoints import load_checkpoint
    from policy.context_distillation import SAFETY_PREPROMPT
    from policy.demo_world import judge
    from policy.gatt_check import follows_instruction

    heldout = world.prompts("heldout")
    questions = [p for p in heldout if not p.context and not p.is_adversarial][: sizes.eval_ordinary // 2]
    adversarial = [p for p in heldout if p.is_adversarial]
    out = {}
    for name in ("demo-sft", "demo-base"):
        model = load_checkpoint(demo_dir / name, dtype=torch.float32).eval()
        plain = answers(model, tokenizer, [p.dialog() for p in questions], max_new_tokens=sizes.max_new_tokens, seed=1)
        told = answers(model, tokenizer, [[{"role": "system", "content": PIRATE}, *p.dialog()] for p in questions],
                       max_new_tokens=sizes.max_new_tokens, seed=1)
        adv_plain = answers(model, tokenizer, [p.dialog() for p in adversarial], max_new_tokens=sizes.max_new_tokens,
                            seed=2)
        adv_pre = answers(model, tokenizer, [[{"role": "system", "content": SAFETY_PREPROMPT}, *p.dialog()]
                                             for p in adversarial], max_new_tokens=sizes.max_new_tokens, seed=2)

        def safe_rate(said):
            return sum(judge(p, a, world).safe for p, a in zip(adversarial, said)) / len(adversarial)

        out[name] = {
            "pirate_adherence_told": sum(follows_instruction("pirate", a) for a in told) / len(told),
            "identical_with_instruction": sum(a == b for a, b in zip(plain, told)) / len(told),
            "oracle_safe_plain": safe_rate(adv_plain),
            "oracle_safe_preprompt": safe_rate(adv_pre),
            "identical_with_preprompt": sum(a == b for a, b in zip(adv_plain, adv_pre)) / len(adversarial),
        }
        log(f"  {name}: {out[name]}")
    return out


def gatt_adherence(model, world, tokenizer, sizes: Sizes) -> dict:
    from policy.demo_world import judge
    from policy.gatt_check import follows_instruction

    rng = random.Random(17)
    pool = [p for p in world.prompts("heldout") if not p.context]
    dialogues = [rng.sample(pool, sizes.eval_turns) for _ in range(sizes.eval_dialogues)]
    users = [[p.text for p in d] for d in dialogues]
    result = {}
    for name, system in (("instructed", PIRATE), ("control", "")):
        replies = dialogue_by_turn(model, tokenizer, users, system, max_new_tokens=sizes.max_new_tokens, seed=23)
        result[name] = {
            "adherence": by_turn([[float(follows_instruction("pirate", r)) for r in rs] for rs in replies]),
            "correct": by_turn([[float(judge(p, r.removeprefix("Arr!").strip(), world).correct)
                                 for p, r in zip(d, rs)] for d, rs in zip(dialogues, replies)]),
            "example": replies[0][:4],
        }
    return result


def safety_and_helpfulness(model, world, tokenizer, sizes: Sizes, safety_scorer, preprompt: str = "") -> dict:
    from policy.demo_world import judge
    from policy.reward import Prompt

    heldout = world.prompts("heldout")
    adversarial = [p for p in heldout if p.is_adversarial]
    ordinary = random.Random(29).sample([p for p in heldout if not p.is_adversarial], sizes.eval_ordinary)
    system = [{"role": "system", "content": preprompt}] if preprompt else []
    k = sizes.eval_adversarial_samples
    adv = answers(model, tokenizer, [[*system, *p.dialog()] for p in adversarial], max_new_tokens=sizes.max_new_tokens,
                  seed=31, n=k)
    asked = [p for p in adversarial for _ in range(k)]
    verdicts = [judge(p, a, world) for p, a in zip(asked, adv)]
    scores = safety_scorer([Prompt(p.dialog(), True) for p in asked], adv, [[] for _ in adv]).tolist()
    plain = answers(model, tokenizer, [[*system, *p.dialog()] for p in ordinary], max_new_tokens=sizes.max_new_tokens,
                    seed=37)
    helpful = [judge(p, a, world) for p, a in zip(ordinary, plain)]
    return {
        "adversarial_answers": len(adv),
        "oracle_safe": sum(v.safe for v in verdicts) / len(verdicts),
        "oracle_refuses": sum(v.correct for v in verdicts) / len(verdicts),
        "safety_rm_mean": sum(scores) / len(scores),
        "ordinary_prompts": len(plain),
        "oracle_helpful_score": sum(v.helpful_score for v in helpful) / len(helpful),
        "oracle_correct": sum(v.correct for v in helpful) / len(helpful),
        "refuses_harmless": sum(v.reason == "refuses a harmless request" for v in helpful) / len(helpful),
        "example_adversarial": adv[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo-dir", default=DEMO_DIR, help="folder holding demo-base and demo-sft")
    parser.add_argument("--out", default="/tmp/bench-gatt-cd", help="scratch folder (cached models, stage folders)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    from policy.checkpoints import load_checkpoint
    from policy.demo_world import default_world
    from policy.reward import Prompt, RewardModelScorer
    from policy.round_config import RoundConfig
    from policy.round_stages import context_distillation_stage, gatt_stage
    from policy.tokenizer import Tokenizer
    from rewards.model import load_reward_model

    sizes = QUICK if options.quick else Sizes()
    demo_dir, out = Path(options.demo_dir), Path(options.out) / ("quick" if options.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    world = default_world()
    tokenizer = Tokenizer(demo_dir / "demo-sft" / "tokenizer.model")
    report: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                                         f"{options.threads} torch thread(s)", "sizes": asdict(sizes)}
    cpu = {}

    def timed(name):
        class T:
            def __enter__(self):
                self.t = time.process_time()

            def __exit__(self, *exc):
                cpu[name] = round(time.process_time() - self.t, 1)
                log(f"[{name}] {cpu[name]} CPU s")
        return T()

    with timed("0 evidence"):
        log("0. the demo policy as built, with and without a system message")
        report["evidence"] = evidence(demo_dir, world, tokenizer, sizes)
    with timed("1 demo-chat"):
        chat_dir = build_chat(out, demo_dir, sizes, world, tokenizer)

    def chat():
        return load_checkpoint(chat_dir, dtype=torch.float32, max_seq_len=sizes.context).eval()

    with timed("2 safety RM"):
        rm_dir, rm_eval = build_safety_rm(out, chat_dir, demo_dir, sizes, world, tokenizer, chat())
    report["safety_rm_eval"] = {k: {m: v[m] for m in ("accuracy", "n") if m in v} for k, v in rm_eval.items()}
    safety = RewardModelScorer(load_reward_model(rm_dir).eval(), tokenizer)

    prompts = [Prompt(p.dialog(), p.is_adversarial)
               for p in world.sample(sizes.round_prompts, seed=3, split="train")]
    config = RoundConfig.from_dict(sizes.round)
    stage_dir = out / f"stages-{key_of(chat_dir.name, sizes.round, sizes.round_prompts, rm_dir.parent.name)}"

    with timed("3 GAtt"):
        log("3. GAtt: adherence by turn before (demo-chat) ...")
        before = gatt_adherence(chat(), world, tokenizer, sizes)
        policy = chat()
        log("   ... the stage ...")
        stage = gatt_stage(policy, tokenizer, prompts, config, stage_dir / "gatt", device="cpu")
        log(f"   {({k: v for k, v in stage.items() if not k.startswith('sft_') or k == 'sft_steps'})}")
        log("   ... and after")
        after = gatt_adherence(policy.eval(), world, tokenizer, sizes)
        report["gatt"] = {"before": before, "after": after, "stage": stage}
    with timed("4 context distillation"):
        log("4. context distillation: before (demo-chat, and demo-chat with the preprompt) ...")
        model = chat()
        cd_before = safety_and_helpfulness(model, world, tokenizer, sizes, safety)
        with_preprompt = safety_and_helpfulness(model, world, tokenizer, sizes, safety,
                                                preprompt=config.context_distillation.preprompt)
        log("   ... the stage ...")
        stage = context_distillation_stage(model, tokenizer, prompts, safety, config, stage_dir / "cd", device="cpu")
        log(f"   {({k: v for k, v in stage.items() if not k.startswith('sft_') or k == 'sft_steps'})}")
        log("   ... and after")
        cd_after = safety_and_helpfulness(model.eval(), world, tokenizer, sizes, safety)
        report["context_distillation"] = {"before": cd_before, "with_preprompt": with_preprompt, "after": cd_after,
                                          "stage": stage}
    report["cpu_seconds"] = cpu
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print_tables(report)
    log(f"report: {out / 'report.json'}")


def print_tables(report: dict) -> None:
    g = report["gatt"]
    print("\nInstruction adherence by turn (instruction only in turn 1's system message), 'Always answer like a "
          "pirate.'")
    print("| turn | before GAtt | after GAtt | correct before | correct after | unasked before | unasked after |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    b, a = g["before"], g["after"]
    for t in range(len(b["instructed"]["adherence"])):
        def cell(x, key):
            v = x[key]
            return f"{v[t]:.0%}" if t < len(v) else "-"
        print(f"| {t + 1} | {cell(b['instructed'], 'adherence')} | {cell(a['instructed'], 'adherence')} | "
              f"{cell(b['instructed'], 'correct')} | {cell(a['instructed'], 'correct')} | "
              f"{cell(b['control'], 'adherence')} | {cell(a['control'], 'adherence')} |")
    c = report["context_distillation"]
    print("\nContext distillation (held-out prompts, no preprompt unless said)")
    print("| | safe (oracle) | refuses (oracle) | safety RM mean | helpful score (oracle) | correct (oracle) | "
          "refuses harmless |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    from policy.stats import wilson_interval

    def ci(rate, n):
        lo, hi = wilson_interval(rate * n, n)
        return f"{rate:.1%} ({lo:.1%}-{hi:.1%})"

    for name in ("before", "with_preprompt", "after"):
        r = c[name]
        n_adv, n_ord = r["adversarial_answers"], r["ordinary_prompts"]
        print(f"| {name} | {ci(r['oracle_safe'], n_adv)} | {ci(r['oracle_refuses'], n_adv)} | "
              f"{r['safety_rm_mean']:.3f} | {r['oracle_helpful_score']:.3f} | {ci(r['oracle_correct'], n_ord)} | "
              f"{ci(r['refuses_harmless'], n_ord)} |")
    print(json.dumps({"evidence": report["evidence"], "safety_rm_eval": report["safety_rm_eval"],
                      "cpu_seconds": report["cpu_seconds"]}, indent=1))


if __name__ == "__main__":
    main()
