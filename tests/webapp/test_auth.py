"""API tokens (hashed, named, revocable), no tokens in URLs, CSRF for sessions, 429 for guessing,
413 for oversized bodies, and the token management commands."""
import hashlib
import socket
from datetime import timedelta
from io import StringIO

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.utils import timezone
from django.utils.crypto import get_random_string
from rest_framework.test import APIClient

from webapp.auth import api_token_issue, api_token_revoke
from webapp.models import ApiToken

LIMIT = 3


@pytest.fixture(autouse=True)
def _fresh_cache(settings, private_cache):
    settings.TANDEM_AUTH_FAILURE_LIMIT = LIMIT


def bearer(token: str, **extra) -> APIClient:
    client = APIClient(**extra)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


@pytest.mark.django_db
class TestTokens:
    def test_only_the_hash_is_stored_and_the_token_works(self, make_user):
        user = make_user("res", role="researcher")
        row, token = api_token_issue(user=user, name="trl export")
        assert token.startswith("tdm_") and len(token) > 40
        assert row.key_hash == hashlib.sha256(token.encode()).hexdigest()
        assert token not in str(ApiToken.objects.values().get())
        assert row.last_used_at is None
        assert bearer(token).get("/api/v1/batches").status_code == 200
        row.refresh_from_db()
        assert row.last_used_at is not None

    def test_drf_token_keyword_works_too(self, make_user):
        _, token = api_token_issue(user=make_user("res", role="researcher"), name="t")
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        assert client.get("/api/v1/batches").status_code == 200

    def test_several_named_tokens_revoked_one_by_one(self, make_user):
        user = make_user("res", role="researcher")
        first, token1 = api_token_issue(user=user, name="laptop")
        _, token2 = api_token_issue(user=user, name="cluster")
        with pytest.raises(Exception, match="already has an active token"):
            api_token_issue(user=user, name="laptop")
        api_token_revoke(token=first)
        assert bearer(token1).get("/api/v1/batches").status_code == 401
        assert bearer(token2).get("/api/v1/batches").status_code == 200
        api_token_issue(user=user, name="laptop")  # the name is free again once revoked

    def test_expired_and_inactive_users_tokens_are_refused(self, make_user):
        user = make_user("res", role="researcher")
        _, expired = api_token_issue(user=user, name="old", expires_at=timezone.now() - timedelta(seconds=1))
        assert bearer(expired).get("/api/v1/batches").status_code == 401
        _, token = api_token_issue(user=user, name="new")
        User.objects.filter(pk=user.pk).update(is_active=False)
        assert bearer(token).get("/api/v1/batches").status_code == 401

    @pytest.mark.parametrize("param", ["token", "access_token", "api_key", "key"])
    def test_token_in_query_string_is_401(self, make_user, param):
        _, token = api_token_issue(user=make_user("res", role="researcher"), name="t")
        response = APIClient().get(f"/api/v1/batches?{param}={token}")
        assert response.status_code == 401
        assert "query string" in response.json()["detail"]
        # even alongside a valid header: the URL has leaked already
        assert bearer(token).get(f"/api/v1/batches?{param}={token}").status_code == 401

    def test_guessing_tokens_gets_429_then_even_a_valid_token_waits(self, make_user):
        _, token = api_token_issue(user=make_user("res", role="researcher"), name="t")
        for i in range(LIMIT):
            assert bearer(f"tdm_guess{i}", REMOTE_ADDR="10.0.0.9").get("/api/v1/batches").status_code == 401
        blocked = bearer(f"tdm_guess{LIMIT}", REMOTE_ADDR="10.0.0.9").get("/api/v1/batches")
        assert blocked.status_code == 429 and "Retry-After" in blocked
        assert bearer(token, REMOTE_ADDR="10.0.0.9").get("/api/v1/batches").status_code == 429
        assert bearer(token, REMOTE_ADDR="10.0.0.10").get("/api/v1/batches").status_code == 200  # others unaffected


@pytest.mark.django_db
class TestSessions:
    def test_session_auth_enforces_csrf_on_unsafe_methods(self, make_comparison, annotator):
        make_comparison()
        client = Client(enforce_csrf_checks=True)
        client.force_login(annotator)
        assert client.get("/api/v1/assignments").status_code == 200  # safe method: no token needed
        refused = client.post("/api/v1/assignments/next")
        assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
        secret = get_random_string(32)  # what Django keeps in the csrftoken cookie
        client.cookies["csrftoken"] = secret
        accepted = client.post("/api/v1/assignments/next", HTTP_X_CSRFTOKEN=secret)
        assert accepted.status_code == 200

    def test_login_brute_force_gets_429(self, make_user):
        make_user("victim")
        client = Client(REMOTE_ADDR="10.0.0.7")
        for _ in range(LIMIT):
            response = client.post("/login/", {"username": "victim", "password": "wrong"})
            assert response.status_code == 200  # the form again, with its error
        assert client.post("/login/", {"username": "victim", "password": "wrong"}).status_code == 429
        # the right password from that address waits too: guessing cannot continue
        assert client.post("/login/", {"username": "victim", "password": "pw-for-tests-1"}).status_code == 429
        # another address is locked out of that username as well (per-username counter) ...
        other = Client(REMOTE_ADDR="10.0.0.8")
        assert other.post("/login/", {"username": "victim", "password": "pw-for-tests-1"}).status_code == 429
        # ... but can log in as someone else
        make_user("bystander")
        assert other.post("/login/", {"username": "bystander", "password": "pw-for-tests-1"}).status_code == 302


@pytest.mark.django_db
class TestRoles:
    def test_default_is_deny(self, make_user):
        nobody = make_user("plain", role="none")
        _, token = api_token_issue(user=nobody, name="t")
        client = bearer(token)
        for url in ("/api/v1/judgments", "/api/v1/batches", "/api/v1/assignments", "/api/v1/checkpoints",
                    "/api/v1/snapshots", "/api/v1/export/preferences", "/api/v1/comparisons"):
            assert client.get(url).status_code == 403, url


class TestBodyLimit:
    def test_50_mb_body_is_413(self, db, admin_user):
        client = Client()
        client.force_login(admin_user)
        body = b"x" * (50 * 1024 * 1024)
        response = client.generic("POST", "/api/v1/comparisons", body, content_type="application/json")
        assert response.status_code == 413

    def test_413_comes_from_the_header_before_the_body_is_sent(self, live_server):
        """Only the headers go out: the server answers 413 without waiting for 50 MB."""
        host, port = live_server.thread.host, live_server.thread.port
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"POST /api/v1/comparisons HTTP/1.1\r\nHost: localhost\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 52428800\r\n\r\n")
            reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 413")


@pytest.mark.django_db
class TestCommands:
    def test_create_list_revoke(self, make_user):
        make_user("res", role="researcher")
        out = StringIO()
        call_command("token_create", "res", "--name", "cluster", stdout=out, stderr=StringIO())
        token = out.getvalue().strip()
        assert bearer(token).get("/api/v1/batches").status_code == 200
        listing = StringIO()
        call_command("token_revoke", "res", "--list", stdout=listing)
        assert "cluster" in listing.getvalue() and "active" in listing.getvalue() and token not in listing.getvalue()
        call_command("token_revoke", "res", "--name", "cluster", stdout=StringIO())
        assert bearer(token).get("/api/v1/batches").status_code == 401
        with pytest.raises(CommandError, match="No matching token"):
            call_command("token_revoke", "res", "--name", "cluster", stdout=StringIO())
        with pytest.raises(CommandError, match="No user"):
            call_command("token_create", "ghost", "--name", "x", stdout=StringIO(), stderr=StringIO())


@pytest.mark.django_db
class TestAdmin:
    def test_issue_in_the_admin_shows_the_token_once_and_revoke_action(self, admin_user, make_user):
        user = make_user("res", role="researcher")
        client = Client()
        client.force_login(admin_user)
        response = client.post("/admin/webapp/apitoken/add/", {"user": user.pk, "name": "from admin",
                                                                "expires_at_0": "", "expires_at_1": ""}, follow=True)
        assert response.status_code == 200
        [message] = [str(m) for m in response.context["messages"] if "Token for" in str(m)]
        token = message.split(": ", 1)[1].split(" ")[0]
        row = ApiToken.objects.get(name="from admin")
        assert row.user == user and row.key_hash == hashlib.sha256(token.encode()).hexdigest()
        assert bearer(token).get("/api/v1/batches").status_code == 200
        duplicate = client.post("/admin/webapp/apitoken/add/", {"user": user.pk, "name": "from admin",
                                                                 "expires_at_0": "", "expires_at_1": ""})
        assert duplicate.status_code == 200 and ApiToken.objects.count() == 1  # the form refused it
        client.post("/admin/webapp/apitoken/", {"action": "revoke", "_selected_action": [row.pk]})
        row.refresh_from_db()
        assert row.revoked_at is not None
        assert bearer(token).get("/api/v1/batches").status_code == 401
