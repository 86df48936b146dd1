"""Simulated annotators judging through the real REST API (annotation/simulator.py).

    manage.py simulate_annotators --base-url http://127.0.0.1:8000 --annotators 3 --items 200 [--noise 0.1]
    manage.py simulate_annotators --base-url ... --seed-world 500     # first make 500 demo-world comparisons

Each simulated person gets an account in the "simulated" group (reused across runs) and a fresh API
token; their judgments are recorded with source "simulated". The server must be running at base-url.
"""
from concurrent.futures import ThreadPoolExecutor

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from annotation.simulator import SimulatedAnnotator, simulated_annotator_create, simulation_comparisons_create


class Command(BaseCommand):
    help = "Run simulated annotators (the demo world's oracle with noise) against the REST API."

    def add_arguments(self, parser):
        parser.add_argument("--base-url", required=True, help="Where the Tandem server answers, e.g. http://127.0.0.1:8000")
        parser.add_argument("--annotators", type=int, default=1, help="How many simulated people, judging in parallel")
        parser.add_argument("--items", type=int, default=100, help="Judgments per simulated person at most")
        parser.add_argument("--noise", type=float, default=0.1, help="Logistic noise scale on the oracle's margin")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--seed-world", type=int, default=0, metavar="N",
                            help="First create N demo-world comparisons to judge (origin 'simulation')")
        parser.add_argument("--overlap", type=int, default=1, help="Annotators per seeded comparison")
        parser.add_argument("--prefix", default="sim-annotator", help="Usernames: PREFIX-1, PREFIX-2, ...")

    def handle(self, *args, **options):
        if options["annotators"] < 1 or options["items"] < 0 or options["noise"] < 0:
            raise CommandError("Need --annotators >= 1, --items >= 0 and --noise >= 0.")
        if options["seed_world"]:
            made = simulation_comparisons_create(count=options["seed_world"], seed=options["seed"],
                                                 overlap=options["overlap"])
            self.stdout.write(f"Created {len(made)} demo-world comparisons.")
        people = []
        for i in range(1, options["annotators"] + 1):
            try:
                people.append(simulated_annotator_create(username=f"{options['prefix']}-{i}"))
            except ValidationError as error:
                raise CommandError(" ".join(error.messages)) from None

        def work(i: int):
            user, token = people[i]
            client = SimulatedAnnotator(options["base_url"], token, noise=options["noise"], seed=options["seed"] * 1000 + i)
            return user.username, client.run(options["items"])

        with ThreadPoolExecutor(max_workers=len(people)) as pool:
            results = list(pool.map(work, range(len(people))))
        for username, report in results:
            flip = f"{100 * report.flip_rate:.1f}%" if report.flip_rate is not None else "-"
            self.stdout.write(f"{username}: {report.submitted} judgments in {report.seconds:.1f} s "
                              f"(against the oracle: {flip}; strengths {dict(sorted(report.by_strength.items()))}; "
                              f"skipped {report.unjudgeable})")
