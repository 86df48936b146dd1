"""Ghost Attention (GAtt), Llama 2 §3.3: data that teaches the model to keep following a system
instruction for the whole dialogue, not only the turn after it.

The paper's recipe, which this module follows:

1. Instructions are synthetic constraints: hobbies ("You enjoy tennis"), a language ("Speak in French"),
   a public figure to act as ("Always act as Napoleon from now on"); the paper also combines them at
   random. We add a style constraint (answer as a haiku, in one sentence, ...) beside those three.
2. The instruction is concatenated to *every* user message of a multi-turn dialogue, and the latest
   policy samples the assistant's replies to that synthetic dialogue (`sample_fn`): with the instruction
   in front of it at every turn, the policy follows it at every turn.
3. The training sample keeps the instruction only in the first user turn, as its system message, and
   "sets the loss to 0 for all the tokens from the previous turns, including assistant messages": the
   loss falls only on the last assistant reply, which the model must now produce with the instruction
   many turns back. Half of the time the system message is the instruction's shorter form ("Always act
   as Napoleon from now on" -> "Figure: Napoleon."), as the paper did for the final system message.

The instruction is attached to each user message the way Llama 2's chat format attaches a system prompt
(`<<SYS>>\\n{instruction}\\n<</SYS>>\\n\\n{message}`), so the sampled first turn reads exactly as the first
turn of a training sample whose system message is the full instruction.

`all_turns=True` also makes one sample per earlier prefix of the dialogue (loss on that prefix's last
reply); the paper's recipe, the default, is one sample per dialogue.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from policy.generate import generate
from policy.model import Transformer
from policy.sft import SFTSample
from policy.tokenizer import B_SYS, E_SYS, Tokenizer

# (full form, short form) of each kind of constraint; the paper's examples are the first three kinds.
FORMS = {
    "hobby": ("You enjoy {}.", "Hobby: {}."),
    "language": ("Always answer in {}.", "Language: {}."),
    "figure": ("Always act as {} from now on.", "Figure: {}."),
    "style": ("Always answer {}.", "Style: {}."),
}
HOBBIES = ("tennis", "chess", "gardening", "astronomy", "baking", "hiking", "painting", "jazz", "sailing", "origami")
LANGUAGES = ("French", "Spanish", "German", "Italian", "Portuguese", "Dutch")
FIGURES = ("Napoleon", "Cleopatra", "Shakespeare", "Marie Curie", "Albert Einstein", "Ada Lovelace", "Mozart")
STYLES = ("as a haiku", "in one sentence", "like a pirate", "in rhyme", "with a short list", "very formally")

Dialog = list[dict[str, str]]
SampleFn = Callable[[Dialog], Sequence[str]]  # user turns (instruction attached) -> one assistant reply per turn


@dataclass
class GAttConfig:
    max_constraints: int = 2  # each instruction combines 1..max_constraints constraints of different kinds
    shorten_probability: float = 0.5  # how often the training system message is the short form (paper: half)
    all_turns: bool = False  # also one sample per earlier prefix of each dialogue (paper: the whole dialogue only)
    seed: int = 0  # seeds the choice of instructions and of their forms
    hobbies: tuple[str, ...] = HOBBIES  # values of each kind (the paper had Llama 2-Chat generate its lists)
    languages: tuple[str, ...] = LANGUAGES
    figures: tuple[str, ...] = FIGURES
    styles: tuple[str, ...] = STYLES

    def __post_init__(self) -> None:
        if not 1 <= self.max_constraints <= len(FORMS):
            raise ValueError(f"max_constraints must lie in 1..{len(FORMS)}, got {self.max_constraints}")
        if not 0.0 <= self.shorten_probability <= 1.0:
            raise ValueError(f"shorten_probability must lie in [0, 1], got {self.shorten_probability}")

    def values(self, kind: str) -> tuple[str, ...]:
        return {"hobby": self.hobbies, "language": self.languages, "figure": self.figures, "style": self.styles}[kind]


@dataclass(frozen=True)
class Instruction:
    full: str  # what is attached to every user turn while sampling: "You enjoy chess. Always answer in French."
    short: str  # the less verbose form: "Hobby: chess. Language: French."
    constraints: tuple[tuple[str, str], ...]  # (kind, value) pairs


@dataclass(frozen=True)
class GAttSample:
    dialog: Dialog  # the training dialogue: system message (the instruction), then the turns
    instruction: Instruction
    shortened: bool  # the system message is instruction.short
    sample: SFTSample  # its tokens and loss mask, for policy.sft.sft_train


def sample_instruction(rng: random.Random, config: GAttConfig) -> Instruction:
    """1..max_constraints constraints of different kinds, each with a random value, in a random order."""
    kinds = rng.sample(sorted(FORMS), rng.randint(1, config.max_constraints))
    constraints = tuple((kind, rng.choice(config.values(kind))) for kind in kinds)
    full = " ".join(FORMS[kind][0].format(value) for kind, value in constraints)
    short = " ".join(FORMS[kind][1].format(value) for kind, value in constraints)
    return Instruction(full, short, constraints)


def with_instruction(instruction: str, user_message: str) -> str:
    """A user message with the instruction attached as Llama 2's chat format attaches a system prompt."""
    return f"{B_SYS}{instruction}{E_SYS}{user_message}"


def build_gatt_samples(
    dialogs: Sequence[Sequence[Mapping[str, str]]],
    sample_fn: SampleFn,
    tokenizer: Tokenizer,
    config: GAttConfig,
    instructions: Sequence[Instruction] | None = None,
) -> list[GAttSample]:
    """GAtt training samples from dialogues (their user turns are used; their assistant turns, if any, are
    replaced by the policy's replies). instructions: one per dialogue, or None to draw them at random."""
    if instructions is not None and len(instructions) != len(dialogs):
        raise ValueError(f"{len(instructions)} instructions for {len(dialogs)} dialogues")
    rng = random.Random(config.seed)
    samples = []
    for i, dialog in enumerate(dialogs):
        users = _user_turns(dialog, i)
        instruction = instructions[i] if instructions is not None else sample_instruction(rng, config)
        shortened = rng.random() < config.shorten_probability
        # Sampling: the instruction attached to every user turn.
        replies = list(sample_fn([{"role": "user", "content": with_instruction(instruction.full, u)} for u in users]))
        if len(replies) != len(users) or not all(isinstance(r, str) for r in replies):
            raise ValueError(f"sample_fn returned {len(replies)} replies for the {len(users)} user turns "
                             f"of dialogue {i}")
        # Training: the instruction only once, as the system message of the first turn.
        system = {"role": "system", "content": instruction.short if shortened else instruction.full}
        turns = [m for u, r in zip(users, replies) for m in ({"role": "user", "content": u},
                                                             {"role": "assistant", "content": r})]
        ends = range(1, len(users) + 1) if config.all_turns else [len(users)]
        for n in ends:
            training = [system, *turns[: 2 * n]]
            # last_turn_only: loss 0 on every token of the earlier turns, assistant replies included.
            tokens, mask = tokenizer.encode_dialog_with_loss_mask(training, last_turn_only=True)
            samples.append(GAttSample(training, instruction, shortened, SFTSample(tokens, mask)))
    return samples


def policy_sample_fn(
    model: Transformer,
    tokenizer: Tokenizer,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
) -> SampleFn:
    """A sample_fn that answers the user turns one after another with `model`, each reply conditioned on the
    dialogue so far (its own earlier replies included). Each call draws from the next seed."""
    calls = 0

    def sample(user_turns: Dialog) -> list[str]:
        nonlocal calls
        calls += 1
        history: Dialog = []
        replies = []
        for t, user in enumerate(user_turns):
            history.append(dict(user))
            out = generate(model, [tokenizer.encode_dialog(history)], max_new_tokens, temperature=temperature,
                           top_p=top_p, eos_id=tokenizer.eos_id, seed=seed * 1_000_003 + calls * 1_009 + t)
            tokens = out.tokens[0]
            reply = tokenizer.decode(tokens[:-1] if tokens and tokens[-1] == tokenizer.eos_id else tokens)
            history.append({"role": "assistant", "content": reply})
            replies.append(reply)
        return replies

    return sample


@dataclass(frozen=True)
class SampledDialogue:
    users: list[str]  # the user turns answered (fewer than asked where the model's context ended first)
    replies: list[str]  # one per user turn: the first sampled reply that followed the instruction, else the first
    followed: list[bool | None]  # per turn: some attempt followed the instruction (None: nothing checks it)


def sample_dialogues(
    model: Transformer,
    tokenizer: Tokenizer,
    user_turns: Sequence[Sequence[str]],
    instructions: Sequence[str],
    *,
    check: Callable[[str], bool] | None = None,
    attempts: int = 1,
    max_new_tokens: int = 48,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
) -> list[SampledDialogue]:
    """Step 2 of the recipe for many dialogues at once: turn t of every dialogue is sampled in one batch, with
    instructions[d] attached to each user message of dialogue d and the replies chosen so far as its history.

    With `check`, `attempts` replies are drawn per turn and the first that follows the instruction is kept: the
    paper's model followed an instruction put in front of it, a smaller one does so only some of the time.
    An empty instruction attaches nothing and checks nothing (followed None): a plain dialogue.
    A dialogue ends early when its next prompt and reply would not fit the model's context."""
    if len(instructions) != len(user_turns):
        raise ValueError(f"{len(instructions)} instructions for {len(user_turns)} dialogues")
    histories: list[Dialog] = [[] for _ in user_turns]
    out = [SampledDialogue([], [], []) for _ in user_turns]
    open_ = [bool(turns) for turns in user_turns]
    for t in range(max((len(turns) for turns in user_turns), default=0)):
        batch, prompts = [], []
        for d, turns in enumerate(user_turns):
            if not open_[d] or t >= len(turns):
                continue
            history = [*histories[d], {"role": "user", "content": _attached(instructions[d], turns[t])}]
            tokens = tokenizer.encode_dialog(history)
            if len(tokens) + max_new_tokens > model.args.max_seq_len:
                open_[d] = False  # the context is full: the dialogue ends at turn t - 1
                continue
            batch.append(d)
            prompts.append(tokens)
        if not batch:
            break
        gen = generate(model, prompts, max_new_tokens, temperature=temperature, top_p=top_p, n=attempts,
                       eos_id=tokenizer.eos_id, seed=(seed * 1_000_003 + t) % 2**63)
        for i, d in enumerate(batch):
            candidates = [_decode(tokenizer, gen.tokens[i * attempts + a]) for a in range(attempts)]
            checked = check is not None and bool(instructions[d])
            passing = [c for c in candidates if check(c)] if checked else candidates
            reply = passing[0] if passing else candidates[0]
            out[d].users.append(user_turns[d][t])
            out[d].replies.append(reply)
            out[d].followed.append(bool(passing) if checked else None)
            histories[d] += [{"role": "user", "content": _attached(instructions[d], user_turns[d][t])},
                             {"role": "assistant", "content": reply}]
    return out


def _attached(instruction: str, user_message: str) -> str:
    return with_instruction(instruction, user_message) if instruction else user_message


def _decode(tokenizer: Tokenizer, tokens: Sequence[int]) -> str:
    tokens = list(tokens)
    return tokenizer.decode(tokens[:-1] if tokens and tokens[-1] == tokenizer.eos_id else tokens).strip()


def _user_turns(dialog: Sequence[Mapping[str, str]], index: int) -> list[str]:
    roles = [m["role"] for m in dialog]
    if not roles or "system" in roles:
        raise ValueError(f"dialogue {index}: GAtt needs user (and assistant) turns and brings its own system message")
    users = [m["content"] for m in dialog if m["role"] == "user"]
    expected = ["user", "assistant"] * len(users)
    if roles != expected[: len(roles)] or len(roles) < 2 * len(users) - 1:
        raise ValueError(f"dialogue {index}: roles must alternate user, assistant, ... starting with user")
    return users
