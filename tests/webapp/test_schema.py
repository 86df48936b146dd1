"""The OpenAPI schema (drf-spectacular) and its docs page, and a bounded schemathesis run against a
live server as an admin: no 5xx, and every documented response matches the schema."""
import pytest
from rest_framework.test import APIClient

from annotation import services, snapshots
from annotation.models import Batch
from webapp.auth import api_token_issue

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

MAX_EXAMPLES = 12  # per operation and pass; ~20 operations x 2 passes stays well under a minute


@pytest.fixture(autouse=True)
def _private_cache(private_cache):
    pass


def admin_client(admin_user) -> tuple[APIClient, str]:
    _, token = api_token_issue(user=admin_user, name="schema")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client, token


@pytest.mark.django_db
def test_schema_and_docs_are_served_without_a_cdn(admin_user):
    client, _ = admin_client(admin_user)
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    assert schema["openapi"].startswith("3.")
    assert {"/api/v1/judgments", "/api/v1/assignments/{id}/judgment", "/api/v1/export/preferences",
            "/api/v1/export/snapshots/{sha256}", "/api/v1/checkpoints", "/api/v1/comparisons"} <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["tokenAuth"] == {
        "type": "http", "scheme": "bearer", "description": "A Tandem API token (manage.py token_create)"}
    client.force_login(admin_user)
    docs = client.get("/api/docs/")
    assert docs.status_code == 200
    page = docs.content.decode()
    assert "swagger-ui" in page and "cdn" not in page.lower() and "unpkg" not in page
    assert "/static/drf_spectacular_sidecar/" in page


@pytest.mark.django_db(transaction=True)
def test_schemathesis_finds_no_server_errors(live_server, admin_user, make_comparison, annotator):
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    # A small world, so that some generated requests find real rows.
    for _ in range(3):
        make_comparison()
        services.judgment_submit(assignment=services.assignment_lease_next(annotator=annotator), annotator=annotator,
                                 chosen="A", strength=2, safety=services.SafetyLabels(a_safe=True, b_safe=False))
    make_comparison()
    batch = services.batch_freeze(batch=Batch.objects.get())
    snapshot = snapshots.snapshot_create(batches=[batch])
    client, token = admin_client(admin_user)
    raw = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    schema = schemathesis.openapi.from_dict(raw)
    known = {"id": 1, "label": batch.label, "sha256": snapshot.sha256}

    failures = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 18
    for operation in operations:
        names = {p.name for p in operation.path_parameters}
        for fixed in ({}, {n: known[n] for n in names}) if names else ({},):
            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(path_parameters=fixed or None))
            def run(case):  # called right below, inside this iteration
                response = case.call(base_url=live_server.url, headers={"Authorization": f"Bearer {token}"},
                                     timeout=30)
                try:
                    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
                except Exception as error:  # schemathesis' FailureGroup
                    failures.append(f"{case.operation.label} {case.path_parameters or ''} {case.query or ''}: "
                                    f"{response.status_code} {str(error)[:800]}")
                    raise

            try:
                run()
            except Exception:  # noqa: BLE001
                pass  # collected above, with the first failing example of each operation
    assert not failures, "\n\n".join(failures)
