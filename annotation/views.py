"""The annotator's pages: home, the comparison page, the page after a judgment, writing prompts.

Each view checks the role, calls one service or selector, and renders. Every assignment is looked
up through selectors.assignment_for_annotator, which 404s on anyone else's.
"""
import secrets
import time
from functools import wraps

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from webapp.permissions import ANNOTATOR, is_annotator, is_researcher, roles_of

from . import selectors, services
from .forms import JudgmentForm, PromptContinueForm, PromptWriteForm, sign_started
from .markdown import render_markdown
from .models import Assignment, Judgment


def annotator_required(view):
    @login_required
    @wraps(view)
    def wrapped(request, *args, **kwargs):
        if not is_annotator(request.user):
            raise PermissionDenied("These pages are for annotators.")
        return view(request, *args, **kwargs)

    return wrapped


def _error_messages(error: ValidationError) -> list[str]:
    if hasattr(error, "error_dict"):
        return [str(m) for messages_ in error.message_dict.values() for m in messages_]
    return [str(m) for m in error.messages]


@login_required
def home(request: HttpRequest) -> HttpResponse:
    """Annotators land on their queue; researchers and admins on the dashboard."""
    if ANNOTATOR not in roles_of(request.user) and is_researcher(request.user):
        return redirect("dashboard")
    return queue(request)


@annotator_required
def queue(request: HttpRequest) -> HttpResponse:
    return render(request, "annotation/home.html", {
        "progress": selectors.annotator_progress(annotator=request.user),
        "awaiting": list(selectors.prompts_awaiting_responses(author=request.user)),
    })


@require_POST
@annotator_required
def next_comparison(request: HttpRequest) -> HttpResponse:
    assignment = services.assignment_lease_next(annotator=request.user)
    if assignment is None:
        messages.info(request, "No comparisons are waiting right now. Write a prompt, or check back later.")
        return redirect("annotation:queue")
    return redirect("annotation:assignment", assignment_id=assignment.pk)


def _compare_context(assignment: Assignment, form: JudgmentForm) -> dict:
    comparison = assignment.comparison
    shown = [comparison.response_a, comparison.response_b]
    if assignment.displayed_order == Assignment.Order.BA:
        shown.reverse()
    guidelines = selectors.guidelines_current()
    return {
        "assignment": assignment, "comparison": comparison, "prompt": comparison.prompt, "form": form,
        "left": shown[0], "right": shown[1],
        "guidelines": guidelines, "guidelines_html": render_markdown(guidelines.body_markdown) if guidelines else "",
    }


@annotator_required
def assignment_page(request: HttpRequest, assignment_id: int) -> HttpResponse:
    assignment = selectors.assignment_for_annotator(annotator=request.user, assignment_id=assignment_id)
    if request.method == "POST":
        form = JudgmentForm(request.POST)
        if form.is_valid():
            try:
                services.judgment_submit(assignment=assignment, annotator=request.user,
                                         **form.judgment_fields(assignment=assignment, now=time.time()))
            except ValidationError as error:
                form.add_error(None, _error_messages(error))
            except IntegrityError:  # a guard in the database refused it (e.g. frozen meanwhile)
                form.add_error(None, "The database refused this judgment; nothing was saved. Reload the page.")
            else:
                return redirect("annotation:submitted", assignment_id=assignment.pk)
        return render(request, "annotation/compare.html", _compare_context(assignment, form), status=400)
    if assignment.status == Assignment.Status.SUBMITTED:
        return redirect("annotation:submitted", assignment_id=assignment.pk)
    if assignment.status != Assignment.Status.LEASED:
        messages.warning(request, f"That comparison is {assignment.get_status_display().lower()}; "
                                  "it can no longer be judged.")
        return redirect("annotation:queue")
    form = JudgmentForm(initial={
        "idempotency_key": secrets.token_urlsafe(16),
        "started": sign_started(assignment_id=assignment.pk, at=time.time()),
    })
    return render(request, "annotation/compare.html", _compare_context(assignment, form))


@require_POST
@annotator_required
def assignment_skip(request: HttpRequest, assignment_id: int) -> HttpResponse:
    assignment = selectors.assignment_for_annotator(annotator=request.user, assignment_id=assignment_id)
    try:
        services.assignment_skip(assignment=assignment, annotator=request.user)
    except ValidationError as error:
        messages.warning(request, " ".join(_error_messages(error)))
        return redirect("annotation:queue")
    return next_comparison(request)


def _own_judgment(request: HttpRequest, assignment_id: int) -> Judgment | None:
    assignment = selectors.assignment_for_annotator(annotator=request.user, assignment_id=assignment_id)
    judgment = Judgment.objects.filter(assignment=assignment).first()
    if judgment is not None:
        judgment.assignment = assignment  # already loaded with its comparison, prompt and responses
        judgment.comparison = assignment.comparison
    return judgment


def _submitted_context(judgment: Judgment, continue_form: PromptContinueForm, write_form: PromptWriteForm) -> dict:
    assignment, comparison = judgment.assignment, judgment.comparison
    chosen_response = comparison.response_a if judgment.chosen == Judgment.Choice.A else comparison.response_b
    left_is_a = assignment.displayed_order == Assignment.Order.AB
    return {
        "assignment": assignment, "judgment": judgment, "prompt": comparison.prompt, "chosen": chosen_response,
        "chosen_side": "A (left)" if (judgment.chosen == Judgment.Choice.A) == left_is_a else "B (right)",
        "left_safe": judgment.a_safe if left_is_a else judgment.b_safe,
        "right_safe": judgment.b_safe if left_is_a else judgment.a_safe,
        "continue_form": continue_form, "write_form": write_form,
    }


@annotator_required
def submitted(request: HttpRequest, assignment_id: int) -> HttpResponse:
    judgment = _own_judgment(request, assignment_id)
    if judgment is None:
        return redirect("annotation:assignment", assignment_id=assignment_id)
    return render(request, "annotation/submitted.html",
                  _submitted_context(judgment, PromptContinueForm(), PromptWriteForm()))


@require_POST
@annotator_required
def dialogue_continue(request: HttpRequest, assignment_id: int) -> HttpResponse:
    judgment = _own_judgment(request, assignment_id)
    if judgment is None:
        return redirect("annotation:assignment", assignment_id=assignment_id)
    form = PromptContinueForm(request.POST)
    if form.is_valid():
        try:
            services.prompt_continue(judgment=judgment, author=request.user, text=form.cleaned_data["text"])
        except ValidationError as error:
            form.add_error(None, _error_messages(error))
        else:
            messages.success(request, "Your next message is saved. It waits for the model to answer.")
            return redirect("annotation:queue")
    return render(request, "annotation/submitted.html",
                  _submitted_context(judgment, form, PromptWriteForm()), status=400)


@annotator_required
def prompt_new(request: HttpRequest) -> HttpResponse:
    form = PromptWriteForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            services.prompt_write(author=request.user, text=form.cleaned_data["text"],
                                  is_adversarial=form.cleaned_data["is_adversarial"])
        except ValidationError as error:
            form.add_error(None, _error_messages(error))
        else:
            messages.success(request, "Your prompt is saved. It waits for the model to answer.")
            return redirect("annotation:queue")
    status = 400 if request.method == "POST" else 200
    return render(request, "annotation/prompt_new.html", {"form": form}, status=status)
