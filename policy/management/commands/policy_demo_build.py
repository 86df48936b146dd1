"""Build the demo policy (demo-base and demo-sft) and register it; optionally have it answer some of
the demo world's prompts so annotators find its answers among the comparisons.

The build is a job (policy.demo_services, shown on /jobs/). By default this command runs it here, in
this process, through the task function the workers run (workers.demo.run_build); with --background
it hands it to the workers and returns at once, which is what scripts/run does so that the site
starts while a worker trains."""
import dataclasses
import time

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from policy import demo_services, services
from policy.demo_config import DemoBuildConfig
from policy.models import Checkpoint, DemoPolicyBuild, GenerationJob
from webapp.jobs import JobStatus


def _override(config, assignments: list[str]):
    """--set field=value pairs applied to a DemoBuildConfig, each value parsed as its field's type."""
    types = {f.name: f.type for f in dataclasses.fields(config)}
    changes = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep or name not in types:
            raise CommandError(f"--set takes field=value with a field of DemoBuildConfig ({', '.join(types)}); got {item!r}")
        declared = types[name] if isinstance(types[name], str) else types[name].__name__
        kind = {"int": int, "float": float, "str": str}[declared]
        try:
            changes[name] = kind(value)
        except ValueError:
            raise CommandError(f"--set {name}: {value!r} is not a {kind.__name__}") from None
    return dataclasses.replace(config, **changes)


def _messages(error: ValidationError) -> str:
    return "; ".join(error.messages)


class Command(BaseCommand):
    help = "Train the tiny demo policy (demo-base, demo-sft) on the demo world and register its checkpoints."

    def add_arguments(self, parser):
        parser.add_argument("--if-missing", action="store_true",
                            help="Do nothing when the checkpoints are registered; register them when they are on disk.")
        parser.add_argument("--out", help="Directory for the checkpoints (default: first model root / demo).")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                            help="Override a DemoBuildConfig field, e.g. --set base_steps=50 (repeatable).")
        parser.add_argument("--answer", type=int, default=0, metavar="N",
                            help="Then have the default arms answer N prompts of the demo world (a generation job).")
        parser.add_argument("--background", action="store_true",
                            help="Queue the build for the workers (progress on /jobs/) and return at once.")

    def handle(self, *args, if_missing=False, out=None, overrides=(), answer=0, background=False, **options):
        config = _override(DemoBuildConfig(), list(overrides))
        names = [config.base_name, config.sft_name]
        try:  # refused now rather than after minutes of training: checkpoints live inside the model roots
            out_dir = demo_services.demo_out_dir(out)
        except ValidationError as error:
            raise CommandError(_messages(error)) from None
        registered = demo_services.demo_checkpoints_registered(config=config)
        if registered == set(names):
            if not if_missing:
                raise CommandError(f"Checkpoints {', '.join(names)} exist already; pass --if-missing to keep them, "
                                   "or --set base_name=... --set sft_name=... to build new ones.")
            self.stdout.write(f"Demo policy present ({', '.join(names)}); not rebuilding.")
            waiting = services.prompts_answer_waiting()  # prompts written while no checkpoint could answer
            self._report_jobs(waiting, services.demo_prompts_answer(count=answer) if answer > 0 else None, answer)
            return
        if registered:
            raise CommandError(f"Only {', '.join(sorted(registered))} of {', '.join(names)} is registered; delete it "
                               "or build under other names (--set base_name=... --set sft_name=...).")
        if not if_missing and demo_services.demo_checkpoints_found(out_dir=out_dir, config=config):
            raise CommandError(f"Checkpoints {', '.join(names)} exist already in {out_dir}; pass --if-missing to "
                               "register them, or --set base_name=... --set sft_name=... to build new ones.")
        try:
            build = demo_services.demo_build_request(config=config, out=str(out_dir), answer=answer,
                                                     enqueue=background)
        except ValidationError as error:
            raise CommandError(_messages(error)) from None
        if build.config != dataclasses.asdict(config):
            raise CommandError(f"Demo policy build {build.pk} into {out_dir} is {build.status} with another config; "
                               "wait for it (see /jobs/) or build into another --out.")
        if background:
            then = f", then answers {build.answer} demo prompts" if build.answer else ""
            self.stdout.write(f"Demo policy build {build.pk}: a worker trains {' and '.join(names)} into {out_dir} "
                              f"and registers them{then}; progress at /jobs/.")
            return
        self._run(build, config)

    def _run(self, build: DemoPolicyBuild, config: DemoBuildConfig) -> None:
        from tqdm import tqdm

        from workers.demo import run_build  # the task's own code, run here; torch loads only if it trains

        bars: dict[str, tqdm] = {}

        def echo(phase, step, total, metrics):
            bar = bars.get(phase)
            if bar is None:
                for other in bars.values():
                    other.close()
                bar = bars[phase] = tqdm(total=total, desc=f"{phase:>9}", unit="step", leave=True)
            bar.update(step - bar.n)
            if "loss" in metrics:
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")

        self.stdout.write(f"Demo policy build {build.pk}: {config.base_name} and {config.sft_name} into "
                          f"{build.out_dir} (training takes a few CPU minutes) ...")
        started = time.perf_counter()
        outcome = run_build(build.pk, echo)
        for bar in bars.values():
            bar.close()
        build.refresh_from_db()
        if outcome == "busy":
            raise CommandError(f"Another process is running demo policy build {build.pk} now; see /jobs/.")
        if build.status != JobStatus.SUCCEEDED:
            raise CommandError(f"Demo policy build {build.pk} {build.status}: {build.error or build.progress_message}")
        metrics = build.metrics
        if metrics["source"] == "trained":
            self.stdout.write(f"Built in {time.perf_counter() - started:.0f} s.")
        elif metrics["source"] == "found on disk":
            self.stdout.write(f"Registered the demo checkpoints already in {build.out_dir}.")
        evaluation = metrics.get("eval")
        if evaluation:
            self.stdout.write(
                f"Oracle on {evaluation['n']} held-out prompts: {config.sft_name}@{config.sft_temperature} beats "
                f"{config.base_name}@{config.base_temperature} {evaluation['win_rate']:.0%} of the time "
                f"({evaluation['wins']} wins, {evaluation['losses']} losses, {evaluation['ties']} ties); "
                f"mean helpfulness {evaluation['sft_helpful']:.2f} vs {evaluation['base_helpful']:.2f}, "
                f"safe on adversarial {evaluation['sft_safe_on_adversarial']:.0%} vs "
                f"{evaluation['base_safe_on_adversarial']:.0%}."
            )
        for checkpoint in Checkpoint.objects.filter(name__in=[config.base_name, config.sft_name]).select_related(
                "parent").order_by("id"):
            parent = f" (parent {checkpoint.parent.name})" if checkpoint.parent else ""
            self.stdout.write(f"Registered {checkpoint.name}{parent}: {checkpoint.path}")
        jobs = GenerationJob.objects.in_bulk([metrics[key] for key in ("waiting_job", "answer_job") if key in metrics])
        self._report_jobs(jobs.get(metrics.get("waiting_job")), jobs.get(metrics.get("answer_job")), build.answer)

    def _report_jobs(self, waiting: GenerationJob | None, answering: GenerationJob | None, answer: int) -> None:
        if waiting is not None:
            self.stdout.write(f"Generation job {waiting.pk}: the workers answer {waiting.prompts.count()} "
                              "waiting prompts.")
        if answer <= 0:
            return
        if answering is None:
            self.stdout.write("The demo prompts are answered already (or no checkpoint can answer).")
        else:
            self.stdout.write(f"Generation job {answering.pk}: the workers answer {answering.prompts.count()} demo "
                              f"prompts ({answering.arm_a_checkpoint}@{answering.arm_a_temperature} vs "
                              f"{answering.arm_b_checkpoint}@{answering.arm_b_temperature}).")
