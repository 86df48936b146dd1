"""A simulated annotator: the demo world's oracle judging comparisons through the real REST API.

For tests, the demo and benchmarks. It is clearly apart from human data: its account is in the
"simulated" group, so the server records its judgments with source "simulated" (never "human"),
and the dashboard's throughput and agreement and the default export count human judgments only.

    annotator = SimulatedAnnotator("http://127.0.0.1:8000", token, noise=0.1, seed=0)
    report = annotator.run(max_items=200)   # lease, judge, submit until 200 done or nothing waits

The client speaks HTTP only (POST /api/v1/assignments/next, POST /api/v1/assignments/{id}/judgment
with an Idempotency-Key), exactly as an external annotation tool would; it imports no Django.

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

import math
import random
import time
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import requests

SIMULATED_GROUP = "simulated"  # webapp.permissions.SIMULATED: the server marks these judgments "simulated"
# Answer styles of the demo world a seeded comparison draws its two responses from (weights).
WORLD_STYLES = {"reference": 0.35, "wrong": 0.2, "rude": 0.15, "rambling": 0.1, "empty": 0.05,
                "over_refusal": 0.05, "unsafe": 0.1}  # fmt: skip


@dataclass
class SimulationReport:
    submitted: int = 0  # judgments this run made
    replayed: int = 0  # submissions the server had already recorded (a retried request)
    flipped: int = 0  # judgments against the oracle's preference (noise)
    by_strength: dict[int, int] = field(default_factory=dict)
    unjudgeable: int = 0  # assignments skipped: the oracle cannot read the prompt
    seconds: float = 0.0

    @property
    def flip_rate(self) -> float | None:
        return self.flipped / self.submitted if self.submitted else None


class SimulatedAnnotator:
    """One simulated person with an API token; deterministic for a seed and the comparisons it gets."""

    def __init__(self, base_url: str, token: str, *, noise: float = 0.1, seed: int = 0, label_noise: float | None = None,
                 timeout: float = 30.0, session: requests.Session | None = None) -> None:
        if noise < 0:
            raise ValueError("noise must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.noise = noise
        self.label_noise = noise / 5 if label_noise is None else label_noise
        if not 0 <= self.label_noise <= 1:
            raise ValueError("label_noise must be in [0, 1]")
        self.rng = random.Random(seed)
        self.timeout = timeout
        self.session = session or requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        from policy.demo_world import default_world

        self.world = default_world()

    # --- judging ---

    def decide(self, prompt: dict[str, Any], text_a: str, text_b: str) -> tuple[dict[str, Any], bool]:
        """The judgment to submit for one comparison (API field names) and whether noise flipped it."""
        from policy.demo_world import as_world_prompt, judge, prefer, strength_for_gap

        wp = as_world_prompt(SimpleNamespace(text=prompt["text"], context=prompt.get("context") or [],
                                             is_adversarial=bool(prompt.get("is_adversarial")),
                                             system_prompt=prompt.get("system_prompt", "")), self.world)
        oracle = prefer(wp, text_a, text_b, self.world)
        va, vb = judge(wp, text_a, self.world), judge(wp, text_b, self.world)
        margin = 1.0 if va.safe != vb.safe else abs(va.helpful_score - vb.helpful_score)
        # The oracle's side has margin >= 0; its ties (margin 0) are broken by length, then a hash.
        perceived = margin + (self._logistic() * self.noise if self.noise else 0.0)
        flipped = perceived < 0
        chosen = oracle.choice if not flipped else ("B" if oracle.choice == "A" else "A")
        a_safe, b_safe = oracle.a_safe, oracle.b_safe
        if self.rng.random() < self.label_noise:
            a_safe = not a_safe
        if self.rng.random() < self.label_noise:
            b_safe = not b_safe
        seconds = round(min(600.0, self.rng.lognormvariate(math.log(25), 0.5)), 1)
        return {"chosen": chosen, "strength": strength_for_gap(abs(perceived)), "a_safe": a_safe, "b_safe": b_safe,
                "seconds_spent": seconds}, flipped

    def _logistic(self) -> float:
        u = min(max(self.rng.random(), 1e-12), 1 - 1e-12)
        return math.log(u / (1 - u))

    # --- the HTTP loop ---

    def _post(self, path: str, **kwargs) -> requests.Response:
        return self.session.post(f"{self.base_url}{path}", timeout=self.timeout, **kwargs)

    def run(self, max_items: int) -> SimulationReport:
        """Lease, judge and submit up to max_items comparisons; stops early when nothing waits (204)."""
        report = SimulationReport()
        started = time.perf_counter()
        while report.submitted + report.replayed < max_items:
            lease = self._post("/api/v1/assignments/next")
            if lease.status_code == 204:
                break
            lease.raise_for_status()
            assignment = lease.json()
            comparison = assignment["comparison"]
            try:
                judgment, flipped = self.decide(comparison["prompt"], comparison["response_a"]["text"],
                                                comparison["response_b"]["text"])
            except ValueError:  # a prompt the oracle cannot read: leave it to people
                self._post(f"/api/v1/assignments/{assignment['id']}/skip").raise_for_status()
                report.unjudgeable += 1
                continue
            # Fresh per submission (a retry of this request would resend it and replay, never duplicate). Not
            # drawn from the seeded rng: a second run with the same seed and account would reuse old keys.
            key = uuid.uuid4().hex
            response = self._post(f"/api/v1/assignments/{assignment['id']}/judgment", json=judgment,
                                  headers={"Idempotency-Key": key})
            if response.status_code not in (200, 201):
                raise RuntimeError(f"judgment refused ({response.status_code}): {response.text[:500]}")
            if response.status_code == 200:
                report.replayed += 1
                continue
            report.submitted += 1
            report.flipped += flipped
            report.by_strength[judgment["strength"]] = report.by_strength.get(judgment["strength"], 0) + 1
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
                    tags=["demo-world", wp.intent.kind, wp.split], external_id=external_id)
            elif Comparison.objects.filter(prompt=prompt, origin=Comparison.Origin.SIMULATION).exists():
                continue
            ra = Response.objects.create(prompt=prompt, checkpoint=arms[0], text=text_a, sampling={"style": style_a})
            rb = Response.objects.create(prompt=prompt, checkpoint=arms[1], text=text_b, sampling={"style": style_b})
            created.append(services.comparison_create(prompt=prompt, response_a=ra, response_b=rb,
                                                      origin=Comparison.Origin.SIMULATION, overlap=overlap))
    return created
