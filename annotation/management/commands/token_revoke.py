"""Revoke API tokens: by user and name, by id, or every active token of a user."""
from django.core.management.base import BaseCommand, CommandError

from webapp.auth import api_token_revoke
from webapp.models import ApiToken


class Command(BaseCommand):
    help = "Revoke API tokens (they stay listed, flagged revoked). Also lists a user's tokens with --list."

    def add_arguments(self, parser):
        parser.add_argument("username", nargs="?")
        parser.add_argument("--name", help="The token's name")
        parser.add_argument("--id", type=int, dest="token_id", help="The token's id")
        parser.add_argument("--all", action="store_true", dest="revoke_all", help="Every active token of USERNAME")
        parser.add_argument("--list", action="store_true", dest="list_only", help="Only list USERNAME's tokens")

    def handle(self, *args, username, name, token_id, revoke_all, list_only, **options):
        tokens = ApiToken.objects.select_related("user")
        if username:
            tokens = tokens.filter(user__username=username)
        if list_only:
            if not username:
                raise CommandError("--list needs USERNAME.")
            for t in tokens.order_by("created_at"):
                state = f"revoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "active"
                used = f"{t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "never"
                self.stdout.write(f"{t.pk:>6}  {t.key_prefix}...  {t.name:<30} {state:<24} last used {used}")
            return
        if token_id is not None:
            tokens = tokens.filter(pk=token_id)
        elif name and username:
            tokens = tokens.filter(name=name, revoked_at__isnull=True)
        elif revoke_all and username:
            tokens = tokens.filter(revoked_at__isnull=True)
        else:
            raise CommandError("Say which: --id ID, or USERNAME --name NAME, or USERNAME --all.")
        found = list(tokens)
        if not found:
            raise CommandError("No matching token.")
        for token in found:
            api_token_revoke(token=token)
            self.stdout.write(f"Revoked token {token.pk} ({token.name!r}) of {token.user}.")

