"""Create the demo users (idempotent) and print their logins."""
from django.contrib.auth.models import Group, User
from django.core.management.base import BaseCommand

DEMO_USERS = [
    # (username, password, role)
    ("annotator", "annotate-me", "annotator"),
    ("researcher", "research-me", "researcher"),
    ("admin", "admin-me", "admin"),
]


class Command(BaseCommand):
    help = "Create the demo users and content for the embedded default (safe to run again)."

    def handle(self, *args, **options):
        for username, password, role in DEMO_USERS:
            user, created = User.objects.get_or_create(username=username)
            if created:
                user.set_password(password)
                user.is_staff = user.is_superuser = role == "admin"
                user.save()
            if role != "admin":
                user.groups.add(Group.objects.get_or_create(name=role)[0])
        self.stdout.write("Demo logins:")
        for username, password, role in DEMO_USERS:
            self.stdout.write(f"  {role:<11} {username} / {password}")
