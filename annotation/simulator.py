"""A simulated annotator: the demo world's oracle judging comparisons through the real REST API.

For tests, the demo and benchmarks. It is clearly apart from human data: its account is in the
"simulated" group, so the server records its judgments with source "simulated" (never "human"),
and the dashboard's throughput and agreement and the default export count human judgments only.

    annotator = SimulatedAnnotator("http://127.0.0.1:8000", token, noise=0.1, seed=0)
    report = annotator.run(max_items=200)   # lease, judge, submit until 200 done or nothing waits

The client speaks HTTP only, with the standard library (POST /api/v1/assignments/next?tag=demo-world,
POST /api/v1/assignments/{id}/judgment with an Idempotency-Key), exactly as an external annotation
tool would; it imports no Django, and nothing the web server does not install.

It judges only what its oracle can: prompts of the demo world, which carry the tag "demo-world". It
asks for those, and the server leases nothing else to a simulated account anyway: never the
hand-written demo items (annotation/demo.py), prompts people wrote, or imports, whose oracle verdicts
would be noise or worse. A lease whose prompt is still not one of the world's (a person's prompt
tagged "demo-world") is skipped, which gives it back: the slot returns to people, only this account
never sees it again.

Noise model (Thurstone / Bradley-Terry style). The oracle (policy.demo_world) scores each response
(0..1: safety first, then correctness, then politeness and concision); its margin is the score
difference, and a safe answer against an unsafe one counts as the full margin 1. The simulated
person perceives margin + e, with e drawn from a logistic distribution of scale `noise`, and picks
the side the perceived margin favours: the flip probability is sigmoid(-margin / noise), one half
for a tie and falling fast as the margin grows (noise 0.1: 27% at margin 0.1, 8% at 0.25, 0.7% at
0.5). The strength is the four-level scale of the perceived margin (policy.demo_world.strength_for_gap),
so clear-cut pairs are mostly "significantly better" and near ties "negligibly better / unsure",
as people answer. Each safety label is flipped with probability `label_noise`. noise=0 is the oracle.

The Django-side helpers below (simulated_annotator_create, simulation_comparisons_create) make the
accounts and, when no policy is there to answer, a world of comparisons to judge.
"""
from __future__ import annotations

import json
import math
import random
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, NamedTuple

SIMULATED_GROUP = "simulated"  # webapp.permissions.SIMULATED: the server marks these judgments "simulated"
WORLD_TAG = "demo-world"  # the tag of every demo-world prompt: all a simulated account is leased
# Answer styles of the demo world a seeded comparison draws its two responses from (weights).
WORLD_STYLES = {"reference": 0.35, "wrong": 0.2, "rude": 0.15, "rambling": 0.1, "empty": 0.05,
                "over_refusal": 0.05, "unsafe": 0.1}  # fmt: skip


@dataclass
class SimulationReport:
    submitted: int = 0  # judgments this run made
    replayed: int = 0  # submissions the server had already recorded (a retried request)
    flipped: int = 0  # judgments against the oracle's preference (noise)
    labels_flipped: int = 0  # safety labels (two per judgment) against the oracle's
    by_strength: dict[int, int] = field(default_factory=dict)  # strength 0..3 -> judgments
    unjudgeable: int = 0  # leases given back (skipped): the prompt is not one of the oracle's world
    seconds: float = 0.0

    @property
    def flip_rate(self) -> float | None:
        return self.flipped / self.submitted if self.submitted else None

    @property
    def agreement(self) -> float | None:
        """With the oracle: 1 - flip rate."""
        return 1 - self.flipped / self.submitted if self.submitted else None

    @property
    def per_second(self) -> float | None:
        return self.submitted / self.seconds if self.seconds else None

    @classmethod
    def total(cls, reports: Sequence[SimulationReport], *, seconds: float) -> SimulationReport:
        """The sum of reports of annotators who ran side by side for `seconds` of wall time."""
        strengths: dict[int, int] = {}
        for report in reports:
            for strength, n in report.by_strength.items():
                strengths[strength] = strengths.get(strength, 0) + n
        return cls(submitted=sum(r.submitted for r in reports), replayed=sum(r.replayed for r in reports),
                   flipped=sum(r.flipped for r in reports), labels_flipped=sum(r.labels_flipped for r in reports),
                   by_strength=strengths, unjudgeable=sum(r.unjudgeable for r in reports), seconds=seconds)


class Decision(NamedTuple):
    judgment: dict[str, Any]  # the body to submit (API field names)
    flipped: bool  # noise chose the side the oracle did not
    labels_flipped: int  # safety labels (0..2) noise turned against the oracle's


def _prompt_key(text: str, context: Sequence[dict[str, str]]) -> tuple[str, tuple[str, ...]]:
    """A prompt as the world tells its prompts apart: the user's message and the turns before it."""
    from policy.demo_world import normalise

    return normalise(text), tuple(normalise(turn["content"]) for turn in context)


class SimulatedAnnotator:
    """One simulated person with an API token; deterministic for a seed and the comparisons it gets."""

    def __init__(self, base_url: str, token: str, *, noise: float = 0.1, seed: int = 0, label_noise: float | None = None,
                 timeout: float = 30.0) -> None:
        if noise < 0:
            raise ValueError("noise must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.noise = noise
        self.label_noise = noise / 5 if label_noise is None else label_noise
        if not 0 <= self.label_noise <= 1:
            raise ValueError("label_noise must be in [0, 1]")
        self.rng = random.Random(seed)
        self.timeout = timeout
        from policy.demo_world import default_world

        self.world = default_world()
        self.world_prompts = {_prompt_key(p.text, p.context) for p in self.world.prompts()}

    # --- judging ---

    def decide(self, prompt: dict[str, Any], text_a: str, text_b: str) -> Decision:
        """The judgment to submit for one comparison. ValueError if the prompt is not one of the world's:
        the oracle reads other prompts too, but its verdicts on them mean little."""
        from policy.demo_world import as_world_prompt, judge, prefer, strength_for_gap

        context = prompt.get("context") or []
        if _prompt_key(prompt["text"], context) not in self.world_prompts:
            raise ValueError("not a prompt of the demo world")
        wp = as_world_prompt(SimpleNamespace(text=prompt["text"], context=context,
                                             is_adversarial=bool(prompt.get("is_adversarial")),
                                             system_prompt=prompt.get("system_prompt", "")), self.world)
        oracle = prefer(wp, text_a, text_b, self.world)
        va, vb = judge(wp, text_a, self.world), judge(wp, text_b, self.world)
        margin = 1.0 if va.safe != vb.safe else abs(va.helpful_score - vb.helpful_score)
        # The oracle's side has margin >= 0; its ties (margin 0) are broken by length, then a hash.
        perceived = margin + (self._logistic() * self.noise if self.noise else 0.0)
        flipped = perceived < 0
        chosen = oracle.choice if not flipped else ("B" if oracle.choice == "A" else "A")
        a_flip, b_flip = self.rng.random() < self.label_noise, self.rng.random() < self.label_noise
        seconds = round(min(600.0, self.rng.lognormvariate(math.log(25), 0.5)), 1)
        judgment = {"chosen": chosen, "strength": strength_for_gap(abs(perceived)), "a_safe": oracle.a_safe != a_flip,
                    "b_safe": oracle.b_safe != b_flip, "seconds_spent": seconds}
        return Decision(judgment, flipped, a_flip + b_flip)

    def _logistic(self) -> float:
        u = min(max(self.rng.random(), 1e-12), 1 - 1e-12)
        return math.log(u / (1 - u))

    # --- the HTTP loop ---

    def _post(self, path: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
              ) -> tuple[int, Any]:
        """POST (a JSON body if given): the status and the decoded JSON answer (None if empty). An error
        status is returned like any other; a server that cannot be reached raises urllib.error.URLError."""
        request = urllib.request.Request(
            f"{self.base_url}{path}", method="POST", data=b"" if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Accept": "application/json",
                     **({} if body is None else {"Content-Type": "application/json"}), **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:  # 4xx / 5xx: the answer is the caller's to judge
            status, raw = error.code, error.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:  # not JSON (a proxy's error page): keep the text for the message
            return status, raw.decode(errors="replace")

    def run(self, max_items: int) -> SimulationReport:
        """Lease, judge and submit up to max_items demo-world comparisons; stops early when none waits (204)."""
        report = SimulationReport()
        started = time.perf_counter()
        while report.submitted + report.replayed < max_items:
            status, assignment = self._post(f"/api/v1/assignments/next?tag={WORLD_TAG}")
            if status == 204:
                break
            if status != 200:
                raise RuntimeError(f"lease refused ({status}): {str(assignment)[:500]}")
            comparison = assignment["comparison"]
            try:
                decision = self.decide(comparison["prompt"], comparison["response_a"]["text"],
                                       comparison["response_b"]["text"])
            except ValueError:  # not the oracle's to judge: give it back, its slot returns to people
                status, answer = self._post(f"/api/v1/assignments/{assignment['id']}/skip")
                if status != 200:
                    raise RuntimeError(f"giving back refused ({status}): {str(answer)[:500]}")
                report.unjudgeable += 1
                continue
            # Fresh per submission (a retry of this request would resend it and replay, never duplicate). Not
            # drawn from the seeded rng: a second run with the same seed and account would reuse old keys.
            status, answer = self._post(f"/api/v1/assignments/{assignment['id']}/judgment", decision.judgment,
                                        headers={"Idempotency-Key": uuid.uuid4().hex})
            if status not in (200, 201):
                raise RuntimeError(f"judgment refused ({status}): {str(answer)[:500]}")
            if status == 200:
                report.replayed += 1
                continue
            report.submitted += 1
            report.flipped += decision.flipped
            report.labels_flipped += decision.labels_flipped
            strength = decision.judgment["strength"]
            report.by_strength[strength] = report.by_strength.get(strength, 0) + 1
        report.seconds = time.perf_counter() - started
        return report


# --- Django side: accounts and a world to judge ------------------------------------------------------


def simulated_annotator_create(*, username: str) -> tuple[Any, str]:
    """A simulated annotator account (groups "annotator" and "simulated") and a fresh API token for it.

    An existing account of that name is reused if it is simulated; a human account is refused.
    """
    from django.contrib.auth.models import Group, User
    from django.core.exceptions import ValidationError
    from django.db import transaction

    from webapp.auth import api_token_issue

    with transaction.atomic():
        user = User.objects.filter(username=username).first()
        if user is not None and not user.groups.filter(name=SIMULATED_GROUP).exists():
            raise ValidationError({"username": f"{username} is a person's account, not a simulated one."})
        if user is None:
            user = User.objects.create_user(username=username)  # no usable password: API token only
        user.groups.add(Group.objects.get_or_create(name="annotator")[0],
                        Group.objects.get_or_create(name=SIMULATED_GROUP)[0])
        _, token = api_token_issue(user=user, name=f"simulator-{uuid.uuid4().hex[:8]}")
    return user, token


def simulation_comparisons_create(*, count: int, seed: int = 0, split: str = "all", overlap: int = 1) -> list:
    """`count` comparisons over demo-world prompts, each two answers in different styles of the world
    (reference, wrong, rude, rambling, ...), origin "simulation": something to judge when no policy
    answers. Deterministic for a seed; a prompt already in the database is reused."""
    from django.db import transaction

    from annotation import services
    from annotation.models import Comparison, Prompt, Response
    from policy.demo_world import default_world
    from policy.services import checkpoint_get_or_create_external

    world = default_world()
    rng = random.Random(f"simulation:{seed}")
    names, weights = zip(*WORLD_STYLES.items())
    created = []
    with transaction.atomic():
        arms = [checkpoint_get_or_create_external(name=n) for n in ("sim-world-a", "sim-world-b")]
        for wp in world.sample(count, seed=seed, split=split):
            style_a = rng.choices(names, weights)[0]
            text_a = world.answer(wp, style_a, rng)
            for _ in range(20):  # a second answer that reads differently (two references are the same text)
                style_b = rng.choices(names, weights)[0]
                text_b = world.answer(wp, style_b, rng)
                if text_b != text_a:
                    break
            else:
                continue
            external_id = f"sim-world:{seed}:{wp.id}"[:200]
            prompt = Prompt.objects.filter(source=Prompt.Source.GENERATED, external_id=external_id).first()
            if prompt is None:
                prompt = services.prompt_create(
                    text=wp.text, source=Prompt.Source.GENERATED, context=[dict(t) for t in wp.context],
                    system_prompt=wp.system_prompt, is_adversarial=wp.is_adversarial,
                    tags=[WORLD_TAG, wp.intent.kind, wp.split], external_id=external_id)
            elif Comparison.objects.filter(prompt=prompt, origin=Comparison.Origin.SIMULATION).exists():
                continue
            ra = Response.objects.create(prompt=prompt, checkpoint=arms[0], text=text_a, sampling={"style": style_a})
            rb = Response.objects.create(prompt=prompt, checkpoint=arms[1], text=text_b, sampling={"style": style_b})
            created.append(services.comparison_create(prompt=prompt, response_a=ra, response_b=rb,
                                                      origin=Comparison.Origin.SIMULATION, overlap=overlap))
    return created
