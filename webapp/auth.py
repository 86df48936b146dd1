"""Authentication: hashed API tokens for scripts, and a login page that slows down guessing.

Scripts send `Authorization: Bearer <token>` (or DRF's `Token <token>`). A token in the query
string is refused outright (401): URLs end up in proxy logs, browser history and Referer headers.
After TANDEM_AUTH_FAILURE_LIMIT failed tokens from one address within the window, that address
gets 429 until the window ends -- valid tokens included, so guessing cannot continue in between.
"""
import hashlib
import secrets
from datetime import datetime, timedelta

from django.contrib.auth import get_user_model
from django.contrib.auth import views as auth_views
from django.contrib.auth.models import AbstractBaseUser, Group
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.http import HttpResponse
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from . import prepared
from .models import ApiToken
from .permissions import ROLES, remember_roles
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
        found = _lookup_token(hash_token(token))
        now = timezone.now()
        if found is None or not found[1].is_active or (found[0].expires_at and found[0].expires_at <= now):
            token_failures.record(ident)
            raise exceptions.AuthenticationFailed("Invalid, expired or revoked token.")
        row, user, roles = found
        remember_roles(user, roles)
        row.user = user
        if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
            ApiToken.objects.filter(pk=row.pk).update(last_used_at=now)
        return user, row

    def authenticate_header(self, request) -> str:
        # Makes unauthenticated API requests 401 (with this challenge) rather than 403.
        return 'Bearer realm="api"'


def _lookup_token(key_hash: str):
    """(token row, its user, the user's role names) for an active token hash, or None.

    One hand-written query on every API request: the same lookup through the ORM (select_related
    plus two EXISTS annotations) spent about 1 ms compiling SQL, a sixth of a whole judgment
    submission. Column lists and value conversions still come from the models' metadata, worked
    out once per database connection (see _token_query); PostgreSQL plans it once per connection.
    """
    sql, token_attnames, user_attnames, converters = _token_query()
    with connection.cursor() as cursor:
        prepared.execute(cursor, "tandem_token_lookup", sql, [*ROLES, key_hash])
        values = cursor.fetchone()
    if values is None:
        return None
    n_token, n_user = len(token_attnames), len(user_attnames)
    fields = [value if convert is None else convert(value) for convert, value in zip(converters, values)]
    row = ApiToken.from_db(connection.alias, token_attnames, fields[:n_token])
    user = get_user_model().from_db(connection.alias, user_attnames, fields[n_token:n_token + n_user])
    return row, user, [name for name, has in zip(ROLES, values[n_token + n_user:]) if has]


def _token_query() -> tuple[str, list[str], list[str], list]:
    """The lookup's SQL, the token's and the user's attribute names, and for each selected column a
    function turning the database's value into the ORM's (None: as it is), e.g. SQLite's text
    datetimes into aware datetimes. Built from the models on a connection's first lookup (rebuilding
    them on every request was a tenth of the authentication's time) and kept on the connection object,
    since the converters belong to its backend."""
    built = getattr(connection, "_tandem_token_query", None)
    if built is not None:
        return built
    user_model = get_user_model()
    token_fields, user_fields = ApiToken._meta.concrete_fields, user_model._meta.concrete_fields
    membership = user_model.groups.through._meta
    quote = connection.ops.quote_name
    columns = [f"t.{quote(f.column)}" for f in token_fields] + [f"u.{quote(f.column)}" for f in user_fields]
    user_pk = quote(user_model._meta.pk.column)
    has_role = (f"EXISTS (SELECT 1 FROM {quote(membership.db_table)} m JOIN {quote(Group._meta.db_table)} g "
                f"ON g.{quote('id')} = m.{quote('group_id')} WHERE m.{quote('user_id')} = u.{user_pk} "
                f"AND g.{quote('name')} = %s)")
    sql = (f"SELECT {', '.join(columns)}, {', '.join([has_role] * len(ROLES))} "
           f"FROM {quote(ApiToken._meta.db_table)} t JOIN {quote(user_model._meta.db_table)} u "
           f"ON u.{user_pk} = t.{quote('user_id')} "
           f"WHERE t.{quote('key_hash')} = %s AND t.{quote('revoked_at')} IS NULL")
    built = (sql, [f.attname for f in token_fields], [f.attname for f in user_fields],
             [_converter(f) for f in [*token_fields, *user_fields]])
    connection._tandem_token_query = built
    return built


def _converter(field):
    """value -> the value as the ORM would hand it over for this column, or None if it needs nothing."""
    expression = field.get_col(field.model._meta.db_table)
    converters = [*connection.ops.get_db_converters(expression), *expression.get_db_converters(connection)]
    if not converters:
        return None

    def convert(value, expression=expression, converters=converters, connection=connection):
        for step in converters:
            value = step(value, expression, connection)
        return value

    return convert


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
