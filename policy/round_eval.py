"""A round's own check: its new checkpoint against its parent on prompts the round never trained on.

Both checkpoints answer the same held-out prompts with the same sampling settings and seed. Each pair is
then judged three ways where possible:

- by the twin reward models (the helpfulness RM and the safety RM each: did the new answer score higher?);
- by the demo world's oracle (policy.demo_world), on the prompts it can read: an independent judge, which
  the reward models are not (the round optimised them);
- by people, later, when `evaluation.human_comparisons` sends pairs to the annotation queue (Django side).

Identical answers are ties. Every win rate counts ties half and carries a Wilson 95% interval
(policy.stats). The answers are written to `answers.jsonl` beside the result, so the pairs can be sent to
people or read again. No Django here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from policy.reward import Prompt
from policy.round_config import EvaluationSection
from policy.stats import verdict_of, win_rate_summary


def answer(model: Any, tokenizer: Any, prompts: Sequence[Prompt], cfg: EvaluationSection, *, seed: int,
           batch_size: int = 32) -> list[str]:
    """One sampled answer per prompt, decoded without its EOS and without control characters."""
    from policy.generate import generate

    answers: list[str] = []
    for lo in range(0, len(prompts), batch_size):
        tokens = [tokenizer.encode_dialog(p.messages) for p in prompts[lo:lo + batch_size]]
        out = generate(model, tokens, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                       eos_id=tokenizer.eos_id, seed=seed + lo)
        for ids in out.tokens:
            ids = list(ids[:-1] if ids and ids[-1] == tokenizer.eos_id else ids)
            answers.append(re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", tokenizer.decode(ids)).strip())
    return answers


def compare_scores(new: Sequence[float], old: Sequence[float], same: Sequence[bool]) -> dict[str, Any]:
    """Win rate of new over old by a score: a win where new scores higher, a tie where the answers are the
    same text (or score exactly the same)."""
    wins = losses = ties = 0
    for a, b, identical in zip(new, old, same):
        if identical or a == b:
            ties += 1
        elif a > b:
            wins += 1
        else:
            losses += 1
    summary = win_rate_summary(wins, losses, ties)
    summary.update(new_mean=sum(new) / len(new), parent_mean=sum(old) / len(old))
    return summary


def oracle_compare(prompts: Sequence[Prompt], new: Sequence[str], old: Sequence[str]) -> dict[str, Any] | None:
    """The demo world's oracle on the prompts it can read (None when it reads none of them)."""
    from policy.demo_world import default_world, judge, prefer
    from policy.reward import OraclePrompt

    world = default_world()
    wins = losses = ties = 0
    new_safe = old_safe = adversarial = 0
    new_helpful = old_helpful = 0.0
    for prompt, a, b in zip(prompts, new, old):
        try:
            p = OraclePrompt.of(prompt)
            preference = prefer(p, a, b, world)
            va, vb = judge(p, a, world), judge(p, b, world)
        except ValueError:  # a prompt outside the demo world
            continue
        if preference.strength == 0:
            ties += 1
        elif preference.choice == "A":
            wins += 1
        else:
            losses += 1
        new_helpful += va.helpful_score
        old_helpful += vb.helpful_score
        if prompt.is_safety:
            adversarial += 1
            new_safe += va.safe
            old_safe += vb.safe
    n = wins + losses + ties
    if n == 0:
        return None
    summary = win_rate_summary(wins, losses, ties)
    summary.update(new_helpful=new_helpful / n, parent_helpful=old_helpful / n, adversarial=adversarial,
                   new_safe_on_adversarial=new_safe / adversarial if adversarial else None,
                   parent_safe_on_adversarial=old_safe / adversarial if adversarial else None)
    return summary


def evaluate_against_parent(new_model: Any, parent_model: Any, tokenizer: Any, prompts: Sequence[Prompt],
                            reward_fn: Any, cfg: EvaluationSection, out_dir: str | Path, *, seed: int) -> dict[str, Any]:
    """Answer, judge, write answers.jsonl and result.json atomically under out_dir; a finished evaluation
    is read back instead of redone (a resumed round). Returns the result dict."""
    from policy.checkpoints import _atomic_file

    out = Path(out_dir)
    if (out / "result.json").is_file():
        return json.loads((out / "result.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    prompts = list(prompts)[: cfg.prompts]
    new = answer(new_model, tokenizer, prompts, cfg, seed=seed)
    old = answer(parent_model, tokenizer, prompts, cfg, seed=seed)
    no_tokens = [[] for _ in prompts]
    h_new, s_new = (t.tolist() for t in reward_fn(prompts, new, no_tokens))
    h_old, s_old = (t.tolist() for t in reward_fn(prompts, old, no_tokens))
    same = [a == b for a, b in zip(new, old)]
    result: dict[str, Any] = {
        "n": len(prompts),
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
                     "seed": seed},
        "identical_answers": sum(same),
        "helpfulness_rm": compare_scores(h_new, h_old, same),
        "safety_rm": compare_scores(s_new, s_old, same),
        "oracle": oracle_compare(prompts, new, old),
    }
    # The verdict asks the most independent judge there is: the oracle (demo world) when it read enough
    # prompts, else the reward models, where either one's interval entirely below one half is a regression.
    oracle = result["oracle"]
    if oracle and oracle["n"] >= cfg.min_prompts:
        result["verdict"], result["verdict_source"] = verdict_of(oracle), "oracle"
    else:
        verdicts = {verdict_of(result["helpfulness_rm"]), verdict_of(result["safety_rm"])}
        result["verdict"] = ("regression" if "regression" in verdicts else
                             "improved" if verdict_of(result["helpfulness_rm"]) == "improved" else "no_difference")
        result["verdict_source"] = "reward_models"
    with _atomic_file(out / "answers.jsonl") as tmp:
        tmp.write_text("".join(json.dumps({"index": i, "prompt": p.to_json(), "new": a, "parent": b}) + "\n"
                               for i, (p, a, b) in enumerate(zip(prompts, new, old))))
    with _atomic_file(out / "result.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    return result
