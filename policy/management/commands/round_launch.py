"""Launch an RLHF round from the command line (the same checks as the admin and the API), optionally
waiting for it with a progress bar."""
import json
import time
from pathlib import Path

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from annotation.models import Batch
from policy import rounds
from policy.rounds import round_warnings
from policy.models import Checkpoint, RLHFRound
from rewards.models import RewardModelRun
from webapp.jobs import ACTIVE_STATUSES, JobStatus


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text  # a bare string; the config's type check names the field if it is not one


def _set(config: dict, assignment: str) -> None:
    """--set ppo.kl_coef=0.02 into {"ppo": {"kl_coef": 0.02}}."""
    path, sep, value = assignment.partition("=")
    if not sep or not path:
        raise CommandError(f"--set takes section.field=value, got {assignment!r}")
    *sections, name = path.split(".")
    node = config
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise CommandError(f"--set {path}: {section} is not a section")
    node[name] = _parse_value(value)


def _newest_rm(kind: str, policy: Checkpoint) -> RewardModelRun | None:
    return (RewardModelRun.objects.filter(kind=kind, status=JobStatus.SUCCEEDED, tokenizer_sha256=policy.tokenizer_sha256)
            .order_by("-created_at", "-id").first())


class Command(BaseCommand):
    help = ("Launch an RLHF round (rejection sampling, SFT, Ghost Attention, PPO, context distillation) on a "
            "policy with the twin reward models.")

    def add_arguments(self, parser):
        parser.add_argument("--policy", help="Checkpoint name (default: the newest one with weights)")
        parser.add_argument("--helpfulness-rm", type=int, help="RewardModelRun id (default: the newest succeeded "
                                                               "helpfulness run on the policy's tokenizer)")
        parser.add_argument("--safety-rm", type=int, help="RewardModelRun id (default: likewise, safety)")
        parser.add_argument("--batch", action="append", default=[], help="Prompts of this batch's comparisons")
        parser.add_argument("--tag", action="append", default=[], help="Prompts carrying this tag (all given tags)")
        parser.add_argument("--prompt-ids", default="", help="Comma-separated prompt ids")
        parser.add_argument("--limit", type=int, help="A seeded sample of this many prompts")
        parser.add_argument("--eval-tag", action="append", default=[],
                            help="Evaluate on prompts carrying this tag (all given tags), none of them a training "
                                 "prompt; default: a held-out share (eval_fraction) of the prompts")
        parser.add_argument("--stages", help="Comma-separated, in the order rejection_sampling, sft, gatt, ppo, "
                                             "context_distillation (default: the recipe's for the policy's "
                                             "size: rejection_sampling,sft under 1B parameters, +ppo from 1B)")
        parser.add_argument("--config", help="A JSON file of RoundConfig fields")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                            help="Override one config field, e.g. --set ppo.kl_coef=0.02 (repeatable)")
        parser.add_argument("--wait", action="store_true", help="Wait for the round, with a progress bar")
        parser.add_argument("--timeout", type=float, default=0, help="With --wait: give up after this many seconds")

    def handle(self, *args, **o):
        policy = self._policy(o["policy"])
        helpful = self._rm(o["helpfulness_rm"], RewardModelRun.Kind.HELPFULNESS, policy)
        safety = self._rm(o["safety_rm"], RewardModelRun.Kind.SAFETY, policy)
        config = {}
        if o["config"]:
            try:
                config = json.loads(Path(o["config"]).read_text())
            except (OSError, ValueError) as error:
                raise CommandError(f"--config {o['config']}: {error}") from None
        for assignment in o["overrides"]:
            _set(config, assignment)
        batches = list(Batch.objects.filter(label__in=o["batch"]))
        if missing := sorted(set(o["batch"]) - {b.label for b in batches}):
            raise CommandError(f"Unknown batch(es): {', '.join(missing)}")
        try:
            ids = [int(x) for x in o["prompt_ids"].split(",") if x.strip()]
        except ValueError:
            raise CommandError("--prompt-ids takes whole numbers separated by commas") from None
        prompts = rounds.prompts_for_round(ids=ids, batches=batches, tags=o["tag"], limit=o["limit"])
        stages = [s.strip() for s in o["stages"].split(",") if s.strip()] if o["stages"] else None
        eval_prompts = rounds.prompts_for_round(tags=o["eval_tag"]) if o["eval_tag"] else None
        try:
            rnd = rounds.round_launch(policy=policy, helpfulness_rm=helpful, safety_rm=safety, prompts=prompts,
                                      stages=stages, config=config, eval_prompts=eval_prompts)
        except ValidationError as error:
            raise CommandError("; ".join(f"{field}: {' '.join(msgs)}" for field, msgs in error.message_dict.items())
                               if hasattr(error, "error_dict") else " ".join(error.messages)) from None
        self.stdout.write(f"Round {rnd.pk} launched on {policy.name} ({len(prompts)} prompts, stages "
                          f"{', '.join(rnd.stages)}, reward models {helpful.pk} and {safety.pk}).")
        if o["wait"]:
            self._wait(rnd, o["timeout"])

    def _policy(self, name: str | None) -> Checkpoint:
        with_weights = Checkpoint.objects.exclude(format=Checkpoint.Format.EXTERNAL)
        policy = with_weights.filter(name=name).first() if name else with_weights.order_by("-created_at", "-id").first()
        if policy is None:
            raise CommandError(f"No checkpoint named {name!r} with weights." if name else "No checkpoint with weights.")
        return policy

    def _rm(self, pk: int | None, kind: str, policy: Checkpoint) -> RewardModelRun:
        run = RewardModelRun.objects.filter(pk=pk).first() if pk else _newest_rm(kind, policy)
        if run is None:
            raise CommandError(f"No reward-model run {pk}." if pk else
                               f"No succeeded {kind} reward-model run on the tokenizer of {policy.name}; train one or "
                               f"pass --{kind}-rm.")
        return run

    def _wait(self, rnd: RLHFRound, timeout: float) -> None:
        from tqdm import tqdm

        deadline = time.monotonic() + timeout if timeout > 0 else None
        with tqdm(total=100, desc=f"round {rnd.pk}", unit="%", file=self.stdout._out, disable=None,
                  bar_format="{l_bar}{bar}| {n:.0f}% {postfix}") as bar:
            while True:
                rnd.refresh_from_db(fields=["status", "progress", "progress_message", "current_stage", "error",
                                            "checkpoint_out"])
                bar.n = round(rnd.progress * 100, 1)
                bar.set_postfix_str(f"{rnd.current_stage or rnd.status}: {rnd.progress_message}"[:80])
                if rnd.status not in ACTIVE_STATUSES:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise CommandError(f"Round {rnd.pk} is still {rnd.status} after {timeout:g} s (it goes on).")
                time.sleep(1)
        if rnd.status == JobStatus.SUCCEEDED:
            rnd.refresh_from_db()
            self.stdout.write(f"Round {rnd.pk} succeeded: {rnd.checkpoint_out.name}.")
            self.stdout.write(rounds.evaluation_line((rnd.metrics or {}).get("evaluation")))
            for line in round_warnings(rnd):
                self.stdout.write(self.style.WARNING(f"Warning: {line}"))
            self.stdout.write(rnd.progress_message)
        else:
            raise CommandError(f"Round {rnd.pk} {rnd.status}: {rnd.error or rnd.progress_message}")

