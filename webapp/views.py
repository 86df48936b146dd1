"""The researchers' pages: the dashboard (batches, throughput, agreement) and live job progress."""
from functools import wraps

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from . import dashboard as reads
from .permissions import is_researcher


def researcher_required(view):
    """Researchers and admins only; anonymous users go to the login page, others get 403."""
    @login_required
    @wraps(view)
    def wrapped(request, *args, **kwargs):
        if not is_researcher(request.user):
            raise PermissionDenied("This page is for researchers and admins.")
        return view(request, *args, **kwargs)

    return wrapped


@researcher_required
def dashboard(request: HttpRequest) -> HttpResponse:
    overall, by_batch = reads.agreement_by_batch()
    batches = list(reads.batches_overview())
    for batch in batches:
        batch.agreement = by_batch.get(batch.label)
    return render(request, "dashboard.html", {
        "batches": batches, "throughput": reads.throughput(), "agreement": overall,
    })


@researcher_required
def jobs(request: HttpRequest) -> HttpResponse:
    return render(request, "jobs.html", {"jobs": reads.recent_jobs()})


@require_GET
def jobs_status(request: HttpRequest) -> JsonResponse:
    """What the jobs page polls every 2 s. JSON errors rather than a login redirect for scripts."""
    if not request.user.is_authenticated:
        return JsonResponse({"detail": "Log in first."}, status=401)
    if not is_researcher(request.user):
        return JsonResponse({"detail": "This needs the researcher role."}, status=403)
    rows = reads.recent_jobs()
    return JsonResponse({"jobs": [row.as_json() for row in rows], "any_active": any(row.active for row in rows)})
