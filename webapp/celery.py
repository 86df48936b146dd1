"""The Celery app. Tasks live in workers/; they take ids and call services."""
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")

# Each worker module is listed here; GPU work is declared with queue="gpu" on the task itself.
app = Celery("tandem", include=["workers.batches", "workers.demo", "workers.generation", "workers.rewards",
                               "workers.rounds", "workers.sweeper"])
app.config_from_object("django.conf:settings", namespace="CELERY")

