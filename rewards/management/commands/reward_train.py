"""Launch reward-model training on frozen batches, and optionally wait for it or run it right here.

    manage.py reward_train --base demo-sft --batch 2026-W48 [--batch ...] [--kind pair] [--set lr=1e-4] [--wait]
    manage.py reward_train --base demo-sft --batch 2026-W48 --inline      # train in this process, no worker
    manage.py reward_train --resend 12                                   # send a queued/running run again
"""
import json
import time
from pathlib import Path

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from annotation.models import Batch
from policy.models import Checkpoint
from rewards import services
from rewards.evaluate import accuracy_warnings
from rewards.models import RewardKind, RewardModelRun


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text  # a bare string: --set device=cpu


class Command(BaseCommand):
    help = "Launch helpfulness / safety reward-model training on frozen batches (both twins by default)."

    def add_arguments(self, parser):
        parser.add_argument("--base", help="Name of the base checkpoint (a registered policy with weights)")
        parser.add_argument("--batch", action="append", default=[], help="Label of a frozen batch; repeatable")
        parser.add_argument("--kind", choices=[*RewardKind.values, services.PAIR], default=services.PAIR)
        parser.add_argument("--config", help="JSON file of RewardTrainConfig fields to override")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="Override one config field (VALUE is JSON, or a bare string); repeatable")
        parser.add_argument("--wait", action="store_true", help="Wait for the workers and print progress")
        parser.add_argument("--inline", action="store_true", help="Train here, in this process, instead of a worker")
        parser.add_argument("--timeout", type=float, default=0, help="With --wait: give up after this many seconds")
        parser.add_argument("--resend", type=int, metavar="RUN_ID", help="Send a queued or running run to the workers again")

    def handle(self, *args, **options):
        if options["resend"] is not None:
            run = RewardModelRun.objects.filter(pk=options["resend"]).first()
            if run is None:
                raise CommandError(f"No reward-model run #{options['resend']}.")
            try:
                services.reward_run_enqueue(run=run)
            except ValidationError as error:
                raise CommandError(" ".join(error.messages)) from None
            self.stdout.write(f"Sent run #{run.pk} to the workers again.")
            return
        runs = self._launch(options)
        self.stdout.write("Launched " + ", ".join(f"{r.kind} run #{r.pk}" for r in runs) + ".")
        if options["inline"]:
            from workers.rewards import train_reward_model

            for run in runs:
                train_reward_model(run.pk)
        elif options["wait"]:
            self._wait(runs, options["timeout"])
        else:
            return
        failed = False
        for run in runs:
            run.refresh_from_db()
            overall = (run.metrics or {}).get("eval", {}).get("all") or {}
            accuracy, baseline = overall.get("accuracy"), (overall.get("length_baseline") or {}).get("accuracy")
            line = f"{run.kind} run #{run.pk}: {run.status}. {run.progress_message}"
            if run.error:
                line += f" Error: {run.error}"
            if run.artifact_path:
                line += f" Model: {run.artifact_path}"
            self.stdout.write(line)
            if accuracy is not None:
                self.stdout.write(f"  held-out accuracy {accuracy:.3f} on {overall.get('n')} pairs; length-only "
                                  f"baseline {baseline:.3f}" if baseline is not None else f"  held-out accuracy {accuracy:.3f}")
            if run.status == "succeeded":
                for warning in accuracy_warnings((run.metrics or {}).get("eval")):
                    self.stdout.write(self.style.WARNING(f"  Warning: {warning}"))
            failed |= run.status != "succeeded"
        if failed:
            raise CommandError("Not every run succeeded.")

    def _launch(self, options) -> list[RewardModelRun]:
        if not options["base"] or not options["batch"]:
            raise CommandError("Give --base and at least one --batch (or --resend RUN_ID).")
        base = Checkpoint.objects.filter(name=options["base"]).first()
        if base is None:
            raise CommandError(f"base_checkpoint: no checkpoint named {options['base']!r}.")
        batches = list(Batch.objects.filter(label__in=options["batch"]))
        if missing := sorted(set(options["batch"]) - {b.label for b in batches}):
            raise CommandError(f"batches: no batch labelled {', '.join(missing)}.")
        config = {}
        if options["config"]:
            try:
                config = json.loads(Path(options["config"]).read_text())
            except (OSError, ValueError) as error:
                raise CommandError(f"config: {error}") from None
        for item in options["set"]:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise CommandError(f"--set takes KEY=VALUE, not {item!r}.")
            config[key.strip()] = _value(value)
        kinds = list(RewardKind.values) if options["kind"] == services.PAIR else [options["kind"]]
        try:
            return services.reward_runs_launch(kinds=kinds, base_checkpoint=base, batches=batches, config=config,
                                               enqueue=not options["inline"])
        except ValidationError as error:
            messages = error.message_dict if hasattr(error, "error_dict") else {"error": error.messages}
            raise CommandError("; ".join(f"{field}: {' '.join(m)}" for field, m in messages.items())) from None

    def _wait(self, runs: list[RewardModelRun], timeout: float) -> None:
        deadline = time.monotonic() + timeout if timeout else None
        last = {}
        while True:
            pending = False
            for run in runs:
                run.refresh_from_db(fields=["status", "progress_message", "step", "total_steps"])
                if last.get(run.pk) != run.progress_message:
                    last[run.pk] = run.progress_message
                    self.stdout.write(f"{run.kind} run #{run.pk} [{run.status}] {run.progress_message}")
                pending |= run.is_active
            if not pending:
                return
            if deadline and time.monotonic() > deadline:
                raise CommandError(f"Gave up waiting after {timeout:g} s; the runs go on.")
            time.sleep(1.0)
