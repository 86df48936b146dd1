"""Issue an API token for a user; the token is printed once and stored only as its sha256."""
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from webapp.auth import api_token_issue


class Command(BaseCommand):
    help = "Issue a named API token for USERNAME (send it as 'Authorization: Bearer <token>')."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", required=True, help="What the token is for (unique among the user's active tokens)")
        parser.add_argument("--expires-days", type=int, default=None, help="Expire after this many days (default: never)")

    def handle(self, *args, username, name, expires_days, **options):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"No user named {username!r}.")
        if expires_days is not None and expires_days <= 0:
            raise CommandError("--expires-days must be positive.")
        expires_at = timezone.now() + timedelta(days=expires_days) if expires_days else None
        try:
            row, token = api_token_issue(user=user, name=name, expires_at=expires_at)
        except ValidationError as error:
            raise CommandError("; ".join(error.messages)) from None
        self.stderr.write(f"Issued token {row.pk} ({row.name!r}) for {user}; it will not be shown again:")
        self.stdout.write(token)
