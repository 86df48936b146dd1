"""Authentication: hashed API tokens for scripts, and a login page that slows down guessing.

Scripts send `Authorization: Bearer <token>` (or DRF's `Token <token>`). A token in the query
string is refused outright (401): URLs end up in proxy logs, browser history and Referer headers.
After TANDEM_AUTH_FAILURE_LIMIT failed tokens from one address within the window, that address
gets 429 until the window ends -- valid tokens included, so guessing cannot continue in between.
"""
import hashlib
import secrets
from datetime import datetime, timedelta

from django.contrib.auth import views as auth_views
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.http import HttpResponse
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from .models import ApiToken
from .throttling import client_ident, login_failures, token_failures

TOKEN_PREFIX = "tdm_"
QUERY_STRING_TOKEN_PARAMS = ("token", "access_token", "api_key", "apikey", "key", "auth_token", "auth")
LAST_USED_RESOLUTION = timedelta(minutes=1)  # last_used_at is written at most once a minute per token


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --- services -----------------------------------------------------------------------------------

@transaction.atomic
def api_token_issue(*, user: AbstractBaseUser, name: str, expires_at: datetime | None = None) -> tuple[ApiToken, str]:
    """A new token for `user`; returns the row and the token, which is never retrievable again."""
    name = (name or "").strip()
    if not name:
        raise ValidationError({"name": "Give the token a name (what it is for)."})
    if len(name) > 100:
        raise ValidationError({"name": "At most 100 characters."})
    if not user.is_active:
        raise ValidationError(f"User {user} is inactive.")
    if ApiToken.objects.filter(user=user, name=name, revoked_at__isnull=True).exists():
        raise ValidationError({"name": f"{user} already has an active token named {name!r}."})
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken.objects.create(user=user, name=name, key_prefix=token[:12], key_hash=hash_token(token),
                                  expires_at=expires_at)
    return row, token


@transaction.atomic
def api_token_revoke(*, token: ApiToken) -> ApiToken:
    """Revoke (flag, keep the row for the audit trail); revoking twice is a no-op."""
    token = ApiToken.objects.select_for_update().get(pk=token.pk)
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
    return token


# --- DRF authentication -------------------------------------------------------------------------

class ApiTokenAuthentication(authentication.BaseAuthentication):
    keywords = ("bearer", "token")

    def authenticate(self, request):
        if any(p in request.query_params for p in QUERY_STRING_TOKEN_PARAMS):
            raise exceptions.AuthenticationFailed(
                "Tokens in the query string are refused; send the header 'Authorization: Bearer <token>'."
            )
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].decode(errors="replace").lower() not in self.keywords:
            return None  # not ours: session authentication may still apply
        ident = client_ident(request)
        if token_failures.blocked(ident):
            raise exceptions.Throttled(wait=token_failures.window, detail="Too many failed token attempts.")
        if len(header) != 2:
            token_failures.record(ident)
            raise exceptions.AuthenticationFailed("Malformed Authorization header: expected 'Bearer <token>'.")
        token = header[1].decode(errors="replace")
        row = (
            ApiToken.objects.select_related("user").filter(key_hash=hash_token(token), revoked_at__isnull=True).first()
        )
        now = timezone.now()
        if row is None or not row.user.is_active or (row.expires_at and row.expires_at <= now):
            token_failures.record(ident)
            raise exceptions.AuthenticationFailed("Invalid, expired or revoked token.")
        if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
            ApiToken.objects.filter(pk=row.pk).update(last_used_at=now)
        return row.user, row

    def authenticate_header(self, request) -> str:
        # Makes unauthenticated API requests 401 (with this challenge) rather than 403.
        return 'Bearer realm="api"'


# --- HTML login ---------------------------------------------------------------------------------

class ThrottledLoginView(auth_views.LoginView):
    """Django's login page with a failure counter per address and per username (429 when exceeded).

    A successful login clears the username's counter but not the address's, so one valid account
    cannot be used to reset an attacker's budget for guessing others.
    """

    def post(self, request, *args, **kwargs):
        idents = self._idents(request)
        if login_failures.blocked(*idents):
            response = HttpResponse(
                "Too many failed logins. Try again later.", status=429, content_type="text/plain; charset=utf-8"
            )
            response["Retry-After"] = str(login_failures.window)
            return response
        return super().post(request, *args, **kwargs)

    def form_invalid(self, form):
        login_failures.record(*self._idents(self.request))
        return super().form_invalid(form)

    def form_valid(self, form):
        login_failures.reset(self._idents(self.request)[1])
        return super().form_valid(form)

    @staticmethod
    def _idents(request) -> tuple[str, str]:
        username = (request.POST.get("username") or "").strip().lower()[:150]
        return f"ip:{client_ident(request)}", f"user:{username}"


class ApiTokenScheme(OpenApiAuthenticationExtension):
    """How the OpenAPI schema describes ApiTokenAuthentication."""

    target_class = "webapp.auth.ApiTokenAuthentication"
    name = "tokenAuth"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "A Tandem API token (manage.py token_create)"}
