"""Ghost Attention's checkable system instructions, and the checker that says whether a reply follows one.

Plain Python (no torch, no Django): the round config validates `gatt.instruction` against INSTRUCTIONS,
the GAtt stage keeps only sampled replies that follow theirs, and the benchmark measures adherence by turn
(the paper's Figure 10) with the same function.

Each instruction is one of policy.gatt's kinds (a style) in its full and short form, chosen because a
simple rule can check it on free-form text a tiny model writes:

- "pirate": "Always answer like a pirate." A reply follows it when its first word is a pirate's
  exclamation (arr, arrr, yarr, ahoy). Every demo-world answer can be given that way ("Arr! The capital
  of France is Paris."), and no answer the demo policy learned starts so, so adherence is all signal.
- "one_sentence": "Always answer in one sentence." A reply follows it when it holds exactly one sentence.
  Demo-world facts are answered in one sentence anyway; only refusals with a redirect and rambling break it.

"random" (no checker) is the paper's own recipe: 1-2 synthetic constraints (hobby, language, figure,
style) drawn per dialogue by policy.gatt.sample_instruction, every sampled reply kept.
"""

from __future__ import annotations

import re

# name -> (full form, short form), in policy.gatt.FORMS' "style" kind.
INSTRUCTIONS: dict[str, tuple[str, str]] = {
    "pirate": ("Always answer like a pirate.", "Style: like a pirate."),
    "one_sentence": ("Always answer in one sentence.", "Style: in one sentence."),
}
RANDOM = "random"  # the paper's random synthetic constraints; nothing checks them

_PIRATE_FIRST_WORD = re.compile(r"(?:ahoy|y?a+r{2,}h?)\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?]+")


def follows_instruction(name: str, reply: str) -> bool:
    """Whether `reply` follows the checkable instruction `name` (a key of INSTRUCTIONS)."""
    text = reply.strip()
    if name == "pirate":
        return bool(_PIRATE_FIRST_WORD.match(text))
    if name == "one_sentence":
        sentences = [s for s in _SENTENCE_END.split(text) if re.search(r"\w", s)]
        return len(sentences) == 1
    raise ValueError(f"no checker for instruction {name!r}; checkable: {', '.join(INSTRUCTIONS)}")
