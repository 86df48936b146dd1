"""Safety context distillation, Llama 2 §4.2.4.

The model answers safety-tagged (adversarial) prompts twice: once with a safety preprompt in front of
the prompt, once without. The preprompt is the paper's kind: a generic "You are a safe and responsible
assistant", optionally followed by an answer template (the paper's targeted variant names the risk and
asks for an answer that addresses the safety concern, then the prompt, then adds context). Both answers
are scored by the safety reward model on the prompt *without* the preprompt, the prompt the model will
be fine-tuned on, and the preprompted answer is kept only where it scores higher than the plain one:
the paper found that context distillation can also make answers worse (vaguer, over-refusing), and used
the safety RM to decide, per prompt, whether to use the distilled answer.

What comes out is (prompt without the preprompt, preprompted answer) pairs for SFT, so the model learns
to answer as if the preprompt were there without being shown it.

Targeted preprompts: the paper's answer templates are written per risk category (illicit and criminal
activities, hateful and harmful activities, unqualified advice). RISK_TEMPLATES holds ours; a caller that
knows a prompt's category passes its system message per prompt (`system_messages`), the generic template
serving the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from policy.generate import generate
from policy.model import Transformer
from policy.reward import Prompt, Scorer
from policy.tokenizer import Tokenizer

SAFETY_PREPROMPT = "You are a safe and responsible assistant."
ANSWER_TEMPLATE = (
    "The following is a question that can elicit unsafe behavior from you. You should answer using the following "
    "template: 1. Address immediate safety concerns, if there are any. 2. Address the prompt by offering a safe "
    "alternative or explaining the risk. 3. Add context and additional information, if applicable."
)
# The paper's risk categories, each with its answer template (Llama 2, Table 39's kind): what the answer
# should address first, how to refuse, and what safe alternative to offer.
RISK_TEMPLATES = {
    "illicit_and_criminal": (
        "The following is a question that can elicit unsafe behavior from you. The question was classified as "
        "belonging to the violating category: 'Illicit & criminal activities'. You should answer using the following "
        "template: 1. Refuse to help with the activity, stating that it is illegal and can cause harm. 2. Address the "
        "need behind the request by offering a legal alternative. 3. Add context and additional information, if "
        "applicable."
    ),
    "hateful_and_harmful": (
        "The following is a question that can elicit unsafe behavior from you. The question was classified as "
        "belonging to the violating category: 'Hateful & harmful activities'. You should answer using the following "
        "template: 1. Address immediate safety concerns, if there are any. 2. Refuse to hurt, demean or insult anyone. "
        "3. Offer a kind or peaceful alternative, or point to someone who can help."
    ),
    "unqualified_advice": (
        "The following is a question that can elicit unsafe behavior from you. The question was classified as "
        "belonging to the violating category: 'Unqualified advice'. You should answer using the following template: "
        "1. Say that you are not a qualified professional. 2. Give general, safe information only. 3. Recommend "
        "asking a qualified professional."
    ),
}  # fmt: skip

Dialog = list[dict[str, str]]
AnswerFn = Callable[[Sequence[Dialog]], Sequence[str]]  # dialogs ending with a user turn -> one answer each


@dataclass
class ContextDistillationConfig:
    preprompt: str = SAFETY_PREPROMPT  # the safety preprompt, given as (the start of) the system message
    answer_template: str = ANSWER_TEMPLATE  # appended to the preprompt; "" for the generic preprompt alone
    margin: float = 0.0  # keep an answer only if its safety score beats the plain answer's by more than this

    def __post_init__(self) -> None:
        if not self.preprompt.strip():
            raise ValueError("the safety preprompt is empty")

    @property
    def system_message(self) -> str:
        return self.system_message_with(self.answer_template)

    def system_message_with(self, answer_template: str) -> str:
        """The preprompt followed by an answer template ("" for the preprompt alone)."""
        return " ".join(part for part in (self.preprompt.strip(), answer_template.strip()) if part)


@dataclass(frozen=True)
class DistilledSample:
    prompt: Prompt  # as asked, without the preprompt
    answer: str  # the answer given with the preprompt
    score_with: float  # safety RM score of that answer (to the prompt without the preprompt)
    score_without: float  # safety RM score of the answer given without the preprompt
    answer_without: str
    system_message: str = ""  # the preprompt (and answer template) the answer was given with

    @property
    def dialog(self) -> Dialog:
        """The SFT dialogue: the prompt as asked, the distilled answer as the assistant's turn."""
        return [*(dict(m) for m in self.prompt.messages), {"role": "assistant", "content": self.answer}]


def with_preprompt(messages: Sequence[dict[str, str]], system_message: str) -> Dialog:
    """The dialog with the preprompt as its system message, in front of any system message it already has."""
    messages = [dict(m) for m in messages]
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{system_message}\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": system_message}, *messages]


def context_distillation(
    prompts: Sequence[Prompt],
    answer_fn: AnswerFn,
    safety_scorer: Scorer,
    tokenizer: Tokenizer,
    config: ContextDistillationConfig,
    system_messages: Sequence[str | None] | None = None,
) -> tuple[list[DistilledSample], dict[str, float]]:
    """Distilled samples for the safety-tagged prompts (others are skipped and counted), and metrics.
    system_messages: one per prompt, the preprompt to answer it with (None: config.system_message)."""
    candidates = distill_candidates(prompts, answer_fn, safety_scorer, tokenizer, config, system_messages)
    return select(candidates, config, skipped_untagged=len(prompts) - len(candidates))


def distill_candidates(
    prompts: Sequence[Prompt],
    answer_fn: AnswerFn,
    safety_scorer: Scorer,
    tokenizer: Tokenizer,
    config: ContextDistillationConfig,
    system_messages: Sequence[str | None] | None = None,
) -> list[DistilledSample]:
    """Every safety-tagged prompt answered with and without its preprompt, both answers scored: the
    candidates `select` keeps or drops."""
    if system_messages is not None and len(system_messages) != len(prompts):
        raise ValueError(f"{len(system_messages)} system messages for {len(prompts)} prompts")
    systems = [s or config.system_message for s in (system_messages or [None] * len(prompts))]
    tagged = [(p, s) for p, s in zip(prompts, systems) if p.is_safety]
    if not tagged:
        return []
    with_pre = list(answer_fn([with_preprompt(p.messages, s) for p, s in tagged]))
    without = list(answer_fn([[dict(m) for m in p.messages] for p, _ in tagged]))
    if len(with_pre) != len(tagged) or len(without) != len(tagged):
        raise ValueError(f"answer_fn returned {len(with_pre)} and {len(without)} answers for {len(tagged)} prompts")
    # Both answers scored on the prompt as asked: the question is which answer to train on for *that* prompt.
    n = len(tagged)
    asked = [p for p, _ in tagged]
    answers = [*with_pre, *without]
    answer_tokens = [tokenizer.encode(a, bos=False, eos=False) for a in answers]
    scores = torch.as_tensor(safety_scorer([*asked, *asked], answers, answer_tokens), dtype=torch.float64).reshape(-1)
    if scores.shape != (2 * n,) or not torch.isfinite(scores).all():
        raise ValueError(f"the safety scorer returned {tuple(scores.shape)} scores (finite: "
                         f"{bool(torch.isfinite(scores).all())}) for {2 * n} answers")
    score_with, score_without = scores[:n].tolist(), scores[n:].tolist()
    return [DistilledSample(p, a, s_with, s_without, a_without, system)
            for (p, system), a, a_without, s_with, s_without
            in zip(tagged, with_pre, without, score_with, score_without)]


def select(
    candidates: Sequence[DistilledSample], config: ContextDistillationConfig, skipped_untagged: int = 0
) -> tuple[list[DistilledSample], dict[str, float]]:
    """The candidates whose preprompted answer the safety RM scores above the plain one (by more than the
    margin), and the metrics of the choice."""
    n = len(candidates)
    if not n:
        return [], {"prompts": 0, "skipped_untagged": skipped_untagged, "kept": 0, "kept_fraction": 0.0}
    kept = [c for c in candidates if c.score_with > c.score_without + config.margin]
    metrics = {
        "prompts": n,
        "skipped_untagged": skipped_untagged,
        "kept": len(kept),
        "kept_fraction": len(kept) / n,
        "safety_with_preprompt": sum(c.score_with for c in candidates) / n,
        "safety_without_preprompt": sum(c.score_without for c in candidates) / n,
        "safety_kept": sum(s.score_with for s in kept) / len(kept) if kept else 0.0,
    }
    return kept, metrics


def policy_answer_fn(
    model: Transformer,
    tokenizer: Tokenizer,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    batch_size: int = 16,
) -> AnswerFn:
    """An answer_fn sampling from `model`, batch_size dialogs at a time; each call draws from the next seeds."""
    calls = 0

    def answer(dialogs: Sequence[Dialog]) -> list[str]:
        nonlocal calls
        calls += 1
        answers = []
        for lo in range(0, len(dialogs), batch_size):
            prompt_tokens = [tokenizer.encode_dialog(d) for d in dialogs[lo : lo + batch_size]]
            out = generate(model, prompt_tokens, max_new_tokens, temperature=temperature, top_p=top_p,
                           eos_id=tokenizer.eos_id, seed=seed * 1_000_003 + calls * 1_009 + lo)
            answers += [tokenizer.decode(t[:-1] if t and t[-1] == tokenizer.eos_id else t) for t in out.tokens]
        return answers

    return answer
