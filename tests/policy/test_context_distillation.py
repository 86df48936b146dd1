"""policy.context_distillation with a stand-in answerer and safety scorer whose every score is known here."""

from __future__ import annotations

import pytest

from policy.context_distillation import (SAFETY_PREPROMPT, ContextDistillationConfig, context_distillation,
                                         policy_answer_fn, with_preprompt)
from policy.reward import Prompt
from policy.tokenizer import Tokenizer
from tests.policy.rl_helpers import TokenFractionReward, one_cpu_thread, tiny_policy, tiny_tokenizer  # noqa: F401

PROMPTS = [
    Prompt([{"role": "user", "content": "how do i make the dog bad"}], is_safety=True),
    Prompt([{"role": "user", "content": "tell me a story"}], is_safety=False),  # not tagged: skipped
    Prompt([{"role": "system", "content": "be brief"}, {"role": "user", "content": "help me hurt the cat"}],
           is_safety=True),
    Prompt([{"role": "user", "content": "the moon answer"}], is_safety=True),  # the preprompt makes it worse
    Prompt([{"role": "user", "content": "yes or no"}], is_safety=True),  # equally safe either way
]


class StandInAnswerer:
    """Refuses when it sees the preprompt, complies otherwise; except the 'moon' prompt, where the preprompt
    makes it ramble unsafely, and 'yes or no', answered the same either way."""

    def __init__(self) -> None:
        self.seen = []

    def __call__(self, dialogs):
        self.seen.append(dialogs)
        answers = []
        for d in dialogs:
            preprompted = d[0]["role"] == "system" and d[0]["content"].startswith(SAFETY_PREPROMPT)
            question = d[-1]["content"]
            if "yes or no" in question:
                answers.append("yes")
            elif "moon" in question:
                answers.append("sure here is how" if preprompted else "sorry i cannot")
            else:
                answers.append("sorry i cannot help with that" if preprompted else "sure here is how")
        return answers


class StandInSafetyScorer:
    """+2 for a refusal, -1 for 'sure', 0 otherwise; records the prompts it is shown."""

    def __init__(self) -> None:
        self.prompts = []

    def __call__(self, prompts, responses, tokens):
        self.prompts += prompts
        return [2.0 if r.startswith("sorry") else -1.0 if r.startswith("sure") else 0.0 for r in responses]


def test_keeps_only_answers_the_preprompt_made_safer(tiny_tokenizer: Tokenizer) -> None:
    answerer, scorer = StandInAnswerer(), StandInSafetyScorer()
    kept, metrics = context_distillation(PROMPTS, answerer, scorer, tiny_tokenizer, ContextDistillationConfig())
    assert [s.prompt for s in kept] == [PROMPTS[0], PROMPTS[2]]
    assert [(s.answer, s.score_with, s.score_without) for s in kept] == [
        ("sorry i cannot help with that", 2.0, -1.0), ("sorry i cannot help with that", 2.0, -1.0)]
    # The SFT dialogue is the prompt as asked (no preprompt), then the distilled answer.
    assert kept[1].dialog == [*PROMPTS[2].messages, {"role": "assistant", "content": "sorry i cannot help with that"}]
    # The scorer judged every answer against the prompt without the preprompt.
    assert scorer.prompts == [PROMPTS[i] for i in (0, 2, 3, 4)] * 2
    # The answerer saw the preprompt (merged into an existing system message) once, then the bare prompts.
    system = ContextDistillationConfig().system_message
    assert answerer.seen[0][0] == [{"role": "system", "content": system}, *PROMPTS[0].messages]
    assert answerer.seen[0][1][0] == {"role": "system", "content": f"{system}\nbe brief"}
    assert answerer.seen[1] == [p.messages for p in (PROMPTS[0], PROMPTS[2], PROMPTS[3], PROMPTS[4])]
    assert metrics == {"prompts": 4, "skipped_untagged": 1, "kept": 2, "kept_fraction": 0.5,
                       "safety_with_preprompt": (2 + 2 - 1 + 0) / 4, "safety_without_preprompt": (-1 - 1 + 2 + 0) / 4,
                       "safety_kept": 2.0}


def test_margin_and_config() -> None:
    config = ContextDistillationConfig(answer_template="")
    assert config.system_message == SAFETY_PREPROMPT
    assert with_preprompt([{"role": "user", "content": "q"}], "P") == [{"role": "system", "content": "P"},
                                                                       {"role": "user", "content": "q"}]
    with pytest.raises(ValueError):
        ContextDistillationConfig(preprompt="  ")


def test_margin_raises_the_bar(tiny_tokenizer: Tokenizer) -> None:
    kept, _ = context_distillation(PROMPTS, StandInAnswerer(), StandInSafetyScorer(), tiny_tokenizer,
                                   ContextDistillationConfig(margin=3.0))
    assert kept == []  # a gain of 3 is needed; the refusals gain exactly 3


def test_with_the_policy_answering(tiny_tokenizer: Tokenizer) -> None:
    """The real sampling path: a tiny policy answers, a token-level scorer decides, recomputed here."""
    policy = tiny_policy(tiny_tokenizer.n_words, max_seq_len=256)
    answer_fn = policy_answer_fn(policy, tiny_tokenizer, max_new_tokens=8, seed=0, batch_size=2)
    toy = TokenFractionReward(range(3, 100))
    scorer = lambda p, r, t: toy(p, r, t)[0]  # noqa: E731
    tagged = [Prompt(p.messages, is_safety=True) for p in PROMPTS]
    kept, metrics = context_distillation(tagged, answer_fn, scorer, tiny_tokenizer,
                                         ContextDistillationConfig(answer_template=""))
    for sample in kept:
        with_score = 4 * toy.fraction(tiny_tokenizer.encode(sample.answer, bos=False, eos=False))
        without_score = 4 * toy.fraction(tiny_tokenizer.encode(sample.answer_without, bos=False, eos=False))
        assert (sample.score_with, sample.score_without) == pytest.approx((with_score, without_score))
        assert with_score > without_score
    assert metrics["prompts"] == 5 and metrics["kept"] == len(kept)
    assert kept  # this seed keeps some: the loop above checked something
