from django.urls import path

from . import views

app_name = "annotation"
urlpatterns = [
    path("", views.home, name="home"),
    path("annotate/", views.queue, name="queue"),
    path("annotate/next/", views.next_comparison, name="next"),
    path("assignments/<int:assignment_id>/", views.assignment_page, name="assignment"),
    path("assignments/<int:assignment_id>/skip/", views.assignment_skip, name="skip"),
    path("assignments/<int:assignment_id>/submitted/", views.submitted, name="submitted"),
    path("assignments/<int:assignment_id>/continue/", views.dialogue_continue, name="continue"),
    path("prompts/new/", views.prompt_new, name="prompt_new"),
]
