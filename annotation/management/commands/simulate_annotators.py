"""Simulated annotators judging through the real REST API (annotation/simulator.py).

    manage.py simulate_annotators --base-url http://127.0.0.1:8000 --annotators 3 --items 200 [--noise 0.1]
    manage.py simulate_annotators --base-url ... --seed-world 500     # first make 500 demo-world comparisons

Each simulated person gets an account in the "simulated" group (reused across runs) and a fresh API
token; their judgments are recorded with source "simulated". The server must be running at base-url.
"""
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from annotation.models import Judgment
from annotation.simulator import (
    WORLD_TAG,
    SimulatedAnnotator,
    SimulationReport,
    simulated_annotator_create,
    simulation_comparisons_create,
)


class Command(BaseCommand):
    help = (f"Simulated annotators (the demo world's oracle with noise) judge open comparisons through the REST "
            f"API of a running server. They judge only prompts of the demo world (tagged {WORLD_TAG}): never "
            "the hand-written demo items, prompts people wrote, or imports. Their judgments are recorded as "
            "'simulated' and kept out of human statistics and default exports.")

    def add_arguments(self, parser):
        parser.add_argument("--base-url", required=True, help="Where the Tandem server answers, e.g. http://127.0.0.1:8000")
        parser.add_argument("--annotators", type=int, default=1,
                            help="How many simulated people judge in parallel, accounts PREFIX-1, PREFIX-2, ... "
                                 "(default 1)")
        parser.add_argument("--items", type=int, default=100,
                            help="Judgments per simulated person at most; each stops earlier when nothing is "
                                 "left for it (default 100)")
        parser.add_argument("--noise", type=float, default=0.1,
                            help="Scale of the logistic noise on the oracle's margin: 0 is the oracle itself; at "
                                 "0.1 about 1 judgment in 10 goes against it on the demo world (default 0.1)")
        parser.add_argument("--seed", type=int, default=0,
                            help="Seeds the world --seed-world makes (the same seed makes the same comparisons, "
                                 "once) and each annotator's noise (default 0)")
        parser.add_argument("--seed-world", type=int, default=0, metavar="N",
                            help="First create N comparisons of the demo world to judge (origin 'simulation'; two "
                                 "answers of different styles per prompt). Needed when no policy answers "
                                 "demo-world prompts (default 0: judge only what is waiting)")
        parser.add_argument("--overlap", type=int, default=1,
                            help="How many annotators judge each comparison --seed-world makes (default 1)")
        parser.add_argument("--prefix", default="sim-annotator",
                            help="Usernames: PREFIX-1, PREFIX-2, ... (default sim-annotator)")

    def handle(self, *args, **options):
        if options["annotators"] < 1 or options["items"] < 0 or options["noise"] < 0:
            raise CommandError("Need --annotators >= 1, --items >= 0 and --noise >= 0.")
        if options["seed_world"] < 0 or options["overlap"] < 1:
            raise CommandError("Need --seed-world >= 0 and --overlap >= 1.")
        if options["seed_world"]:
            made = simulation_comparisons_create(count=options["seed_world"], seed=options["seed"],
                                                 overlap=options["overlap"])
            already = "" if made else f" (seed {options['seed']} made them before; another --seed makes new ones)"
            self.stdout.write(f"Created {len(made)} demo-world comparisons{already}.")
        people = []
        for i in range(1, options["annotators"] + 1):
            try:
                people.append(simulated_annotator_create(username=f"{options['prefix']}-{i}"))
            except ValidationError as error:
                raise CommandError(" ".join(error.messages)) from None

        def work(i: int) -> SimulationReport:
            _, token = people[i]
            return SimulatedAnnotator(options["base_url"], token, noise=options["noise"],
                                      seed=options["seed"] * 1000 + i).run(options["items"])

        started = time.perf_counter()
        try:
            with ThreadPoolExecutor(max_workers=len(people)) as pool:
                reports = list(pool.map(work, range(len(people))))
        except urllib.error.URLError as error:
            raise CommandError(f"No Tandem server answers at {options['base_url']} ({error.reason}).") from None
        except RuntimeError as error:  # the server refused a request
            raise CommandError(str(error)) from None
        total = SimulationReport.total(reports, seconds=time.perf_counter() - started)
        for (user, _), report in zip(people, reports):
            self.stdout.write(f"{user.username}: {describe(report)}")
        self.stdout.write(f"total, {len(people)} annotator{'s' * (len(people) != 1)}: {describe(total)}")
        if options["items"] and total.submitted + total.replayed == 0:
            self.stdout.write(
                f"Nothing to judge: no open comparison of a demo-world prompt (tag {WORLD_TAG}) is waiting for "
                f"these {len(people)} simulated annotators (each judges a comparison once, and only its world's "
                "prompts). Make some with --seed-world N (a new --seed for new ones), or let a policy answer "
                "demo-world prompts.")


def describe(report: SimulationReport) -> str:
    """Every number of a report, each with its name: four lines."""
    percent = (lambda x: "-" if x is None else f"{100 * x:.1f}%")
    strengths = ", ".join(f"{Judgment.Strength(k).label.lower()} {report.by_strength.get(k, 0)}"
                          for k in sorted(Judgment.Strength.values, reverse=True))
    per_second = "-" if report.per_second is None else f"{report.per_second:.1f}"
    return (f"submitted {report.submitted}, replayed {report.replayed}, "
            f"given back (prompt not of the demo world) {report.unjudgeable}\n"
            f"  agreement with the oracle {percent(report.agreement)}, flip rate {percent(report.flip_rate)}, "
            f"safety labels flipped {report.labels_flipped} of {2 * report.submitted}\n"
            f"  strength: {strengths}\n"
            f"  time: {report.seconds:.1f} s, {per_second} judgments/s")
