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
        return " ".join(part for part in (self.preprompt.strip(), self.answer_template.strip()) if part)


@dataclass(frozen=True)
class DistilledSample:
    prompt: Prompt  # as asked, without the preprompt
    answer: str  # the answer given with the preprompt
    score_with: float  # safety RM score of that answer (to the prompt without the preprompt)
    score_without: float  # safety RM score of the answer given without the preprompt
    answer_without: str

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
) -> tuple[list[DistilledSample], dict[str, float]]:
    """Distilled samples for the safety-tagged prompts (others are skipped and counted), and metrics."""
    tagged = [p for p in prompts if p.is_safety]
    if not tagged:
        return [], {"prompts": 0, "skipped_untagged": len(prompts), "kept": 0, "kept_fraction": 0.0}
    with_pre = list(answer_fn([with_preprompt(p.messages, config.system_message) for p in tagged]))
    without = list(answer_fn([[dict(m) for m in p.messages] for p in tagged]))
    if len(with_pre) != len(tagged) or len(without) != len(tagged):
        raise ValueError(f"answer_fn returned {len(with_pre)} and {len(without)} answers for {len(tagged)} prompts")
    # Both answers scored on the prompt as asked: the question is which answer to train on for *that* prompt.
    n = len(tagged)
    answers = [*with_pre, *without]
    answer_tokens = [tokenizer.encode(a, bos=False, eos=False) for a in answers]
    scores = torch.as_tensor(safety_scorer([*tagged, *tagged], answers, answer_tokens), dtype=torch.float64).reshape(-1)
    if scores.shape != (2 * n,) or not torch.isfinite(scores).all():
        raise ValueError(f"the safety scorer returned {tuple(scores.shape)} scores (finite: "
                         f"{bool(torch.isfinite(scores).all())}) for {2 * n} answers")
    score_with, score_without = scores[:n].tolist(), scores[n:].tolist()
    kept = [
        DistilledSample(p, a, s_with, s_without, a_without)
        for p, a, a_without, s_with, s_without in zip(tagged, with_pre, without, score_with, score_without)
        if s_with > s_without + config.margin
    ]  # fmt: skip
    metrics = {
        "prompts": n,
        "skipped_untagged": len(prompts) - n,
        "kept": len(kept),
        "kept_fraction": len(kept) / n,
        "safety_with_preprompt": sum(score_with) / n,
        "safety_without_preprompt": sum(score_without) / n,
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
