"""Build the demo policy (demo-base and demo-sft) and register it; optionally have it answer some of
the demo world's prompts so annotators find its answers among the comparisons."""
import dataclasses
import os
import time
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from policy import services
from policy.models import Checkpoint


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


class Command(BaseCommand):
    help = "Train the tiny demo policy (demo-base, demo-sft) on the demo world and register its checkpoints."

    def add_arguments(self, parser):
        parser.add_argument("--if-missing", action="store_true", help="Do nothing when the checkpoints exist.")
        parser.add_argument("--out", help="Directory for the checkpoints (default: first model root / demo).")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                            help="Override a DemoBuildConfig field, e.g. --set base_steps=50 (repeatable).")
        parser.add_argument("--answer", type=int, default=0, metavar="N",
                            help="Then have the default arms answer N prompts of the demo world (a generation job).")

    def handle(self, *args, if_missing=False, out=None, overrides=(), answer=0, **options):
        # OpenMP threads that spin while waiting for a core another process holds make each training
        # step several times slower on a busy machine; passive waiting costs little on an idle one.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from policy.demo_policy import DemoBuildConfig  # torch: only when this command runs, after the line above

        config = _override(DemoBuildConfig(), list(overrides))
        names = [config.base_name, config.sft_name]
        existing = {c.name for c in Checkpoint.objects.filter(name__in=names)}
        try:  # refused now rather than after minutes of training: checkpoints live inside the model roots
            out_root = services.resolve_in_model_roots(out or str(Path(settings.TANDEM_MODEL_ROOTS[0]) / "demo"),
                                                       field="out")
        except ValidationError as error:
            raise CommandError("; ".join(error.messages)) from None
        if existing == set(names):
            if not if_missing:
                raise CommandError(f"Checkpoints {', '.join(names)} exist already; pass --if-missing to keep them, "
                                   "or --set base_name=... --set sft_name=... to build new ones.")
            self.stdout.write(f"Demo policy present ({', '.join(names)}); not rebuilding.")
        elif existing:
            raise CommandError(f"Only {', '.join(sorted(existing))} of {', '.join(names)} is registered; delete it "
                               "or build under other names (--set base_name=... --set sft_name=...).")
        elif if_missing and all((out_root / n / "params.json").is_file() for n in names):
            self._register(self._found_on_disk(out_root, config))
        else:
            self._register(self._build(out_root, config))
        waiting = services.prompts_answer_waiting()  # prompts written while no checkpoint could answer
        if waiting is not None:
            self.stdout.write(f"Generation job {waiting.pk}: the workers answer {waiting.prompts.count()} waiting prompts.")
        if answer > 0:
            job = services.demo_prompts_answer(count=answer)
            if job is None:
                self.stdout.write("The demo prompts are answered already (or no checkpoint can answer).")
            else:
                self.stdout.write(f"Generation job {job.pk}: the workers answer {job.prompts.count()} demo prompts "
                                  f"({job.arm_a_checkpoint}@{job.arm_a_temperature} vs "
                                  f"{job.arm_b_checkpoint}@{job.arm_b_temperature}).")

    def _build(self, out_root: Path, config) -> list[dict]:
        from tqdm import tqdm

        from policy.demo_policy import build_demo_policy

        bars: dict[str, tqdm] = {}

        def progress(phase, step, total, metrics):
            bar = bars.get(phase)
            if bar is None:
                for other in bars.values():
                    other.close()
                bar = bars[phase] = tqdm(total=total, desc=f"{phase:>9}", unit="step", leave=True)
            bar.update(step - bar.n)
            if "loss" in metrics:
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")

        self.stdout.write(f"Training the demo policy into {out_root} (a few CPU minutes) ...")
        started = time.perf_counter()
        built = build_demo_policy(out_root, config, progress)
        for bar in bars.values():
            bar.close()
        self.stdout.write(f"Built in {time.perf_counter() - started:.0f} s.")
        evaluation = built[-1]["metrics"].get("eval")
        if evaluation:
            self.stdout.write(
                f"Oracle on {evaluation['n']} held-out prompts: {config.sft_name}@{config.sft_temperature} beats "
                f"{config.base_name}@{config.base_temperature} {evaluation['win_rate']:.0%} of the time "
                f"({evaluation['wins']} wins, {evaluation['losses']} losses, {evaluation['ties']} ties); "
                f"mean helpfulness {evaluation['sft_helpful']:.2f} vs {evaluation['base_helpful']:.2f}, "
                f"safe on adversarial {evaluation['sft_safe_on_adversarial']:.0%} vs "
                f"{evaluation['base_safe_on_adversarial']:.0%}."
            )
        return built

    def _found_on_disk(self, out_root: Path, config) -> list[dict]:
        self.stdout.write(f"Registering the demo checkpoints already in {out_root}.")
        return [
            {"name": config.base_name, "path": str(out_root / config.base_name), "parent": None,
             "tokenizer_path": str(out_root / config.base_name / "tokenizer.model")},
            {"name": config.sft_name, "path": str(out_root / config.sft_name), "parent": config.base_name,
             "tokenizer_path": str(out_root / config.sft_name / "tokenizer.model")},
        ]  # fmt: skip

    def _register(self, built: list[dict]) -> None:
        try:
            checkpoints = services.demo_checkpoints_register(built=built)
        except ValidationError as error:
            raise CommandError("; ".join(error.messages)) from None
        for checkpoint in checkpoints:
            parent = f" (parent {checkpoint.parent.name})" if checkpoint.parent else ""
            self.stdout.write(f"Registered {checkpoint.name}{parent}: {checkpoint.path}")
