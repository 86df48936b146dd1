"""Create the demo users and content (idempotent) and print where to log in: the address and the
demo logins are its last lines."""
import os

from django.contrib.auth.models import Group, User
from django.core.management.base import BaseCommand

from annotation.demo import ITEMS, demo_load

DEMO_USERS = [
    # (username, password, role)
    ("annotator", "annotate-me", "annotator"),
    ("annotator2", "annotate-me-too", "annotator"),
    ("researcher", "research-me", "researcher"),
    ("admin", "admin-me", "admin"),
]


def demo_url() -> str:
    """The site's address as scripts/run serves it: http://$HOST:$PORT/ (default 127.0.0.1:8000)."""
    return f"http://{os.environ.get('HOST') or '127.0.0.1'}:{os.environ.get('PORT') or '8000'}/"


class Command(BaseCommand):
    help = "Create the demo users and content for the embedded default (safe to run again)."

    def add_arguments(self, parser):
        parser.add_argument("--url", default=None,
                            help="The address to print (default: http://$HOST:$PORT/, else http://127.0.0.1:8000/)")

    def handle(self, *args, url: str | None = None, **options):
        for username, password, role in DEMO_USERS:
            user, created = User.objects.get_or_create(username=username)
            if created:
                user.set_password(password)
                user.is_staff = user.is_superuser = role == "admin"
                user.save()
            if role != "admin":
                user.groups.add(Group.objects.get_or_create(name=role)[0])
        result = demo_load()
        self.stdout.write(
            f"Demo content: {len(ITEMS)} prompts with two responses each "
            f"({result.comparisons_created} comparisons added now"
            f"{', guidelines added' if result.guidelines_created else ''})."
        )
        url = url or demo_url()
        # The last lines, from "Tandem is at": scripts/run shows them last, just before the server log.
        self.stdout.write(f"Tandem is at {url}  (admin: {url.rstrip('/')}/admin/); log in as:")
        for username, password, role in DEMO_USERS:
            self.stdout.write(f"  {role:<11} {username} / {password}")
