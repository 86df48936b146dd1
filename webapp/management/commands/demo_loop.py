"""The README's loop on the demo, unattended, with one table at the end (webapp/loop.py).

    manage.py demo_loop                       # simulated judgments, freeze, twin RMs, a round, its evaluation
    manage.py demo_loop --base-url http://127.0.0.1:8000   # the simulated annotators talk to this server
    manage.py demo_loop --fast                # tiny sizes: the machinery in seconds (tests)
"""
import dataclasses
import json

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from webapp.loop import FAST, LoopSizes, report, run_loop


class Command(BaseCommand):
    help = ("Run the README's loop on the demo unattended: simulated annotators judge this week's demo-world "
            "comparisons over the REST API, the week's batch is frozen, twin reward models are trained on it, one "
            "RLHF round runs and evaluates itself against its parent; prints one table.")

    def add_arguments(self, parser):
        parser.add_argument("--policy", default="demo-base", help="The checkpoint the round improves (default demo-base)")
        parser.add_argument("--rm-base", default="demo-base",
                            help="The checkpoint the reward models start from (default demo-base: on the demo world "
                                 "it gave more accurate twins than the chat model demo-sft, see docs/benchmarks.md)")
        parser.add_argument("--base-url", help="A running server for the simulated annotators (default: one "
                                               "started in this process)")
        parser.add_argument("--seed", type=int, default=0, help="Seeds the world, the noise and the round (default 0)")
        parser.add_argument("--fast", action="store_true", help="Tiny sizes: a smoke run of the machinery")
        parser.add_argument("--sizes", default="{}",
                            help='JSON over the sizes of webapp/loop.py LoopSizes, e.g. \'{"seed_world": 1200, '
                                 '"stages": ["rejection_sampling", "sft", "ppo"]}\' (a recipe experiment)')
        parser.add_argument("--json", help="Also write the results to this file")

    def handle(self, *args, **o):
        sizes = FAST if o["fast"] else LoopSizes()
        try:
            sizes = dataclasses.replace(sizes, **json.loads(o["sizes"]))
        except (TypeError, ValueError) as error:
            raise CommandError(f"--sizes: {error}") from None
        try:
            result = run_loop(policy=o["policy"], rm_base=o["rm_base"], sizes=sizes, seed=o["seed"],
                              base_url=o["base_url"], log=self.stdout.write)
        except ValidationError as error:
            raise CommandError("; ".join(f"{field}: {' '.join(m)}" for field, m in error.message_dict.items())
                               if hasattr(error, "error_dict") else " ".join(error.messages)) from None
        except (ValueError, RuntimeError) as error:
            raise CommandError(str(error)) from None
        self.stdout.write(report(result))
        if o["json"]:
            with open(o["json"], "w") as f:
                json.dump(result, f, indent=2, default=str)
