"""Re-send the jobs whose worker died.

A worker killed midway (out of memory, a lost machine, SIGKILL) leaves its job "running". Celery
gives the message back only after the broker's visibility timeout (hours on Redis), so beat runs this
sweep every few minutes: a running reward-model run or round whose folder lock is free has no live
worker (workers/locks.py), and its task is sent again; the next worker resumes from the last complete
checkpoint. Duplicate delivery is harmless by design (lock, then a claim under a row lock), so a
re-send that races a late redelivery does no harm either; a job is re-sent at most once per
TANDEM_ORPHAN_RESEND_SECONDS, so a job waiting behind a long queue is not sent again and again.
"""
from __future__ import annotations

import logging
from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.core.cache import cache
from django.utils import timezone

from policy import rounds
from policy.models import RLHFRound
from rewards import services as reward_services
from rewards.models import RewardModelRun
from webapp.jobs import JobStatus
from workers.locks import folder_is_locked

logger = logging.getLogger(__name__)


def orphaned_jobs(*, grace: timedelta | None = None) -> dict[str, list[int]]:
    """Running jobs started more than `grace` ago whose folder no live process holds."""
    grace = timedelta(seconds=settings.TANDEM_ORPHAN_GRACE_SECONDS) if grace is None else grace
    started_before = timezone.now() - grace
    running = {"status": JobStatus.RUNNING, "started_at__lt": started_before}
    return {
        "reward_runs": [run.pk for run in RewardModelRun.objects.filter(**running).order_by("pk")
                        if not folder_is_locked(reward_services.run_output_dir(run))],
        "rounds": [rnd.pk for rnd in RLHFRound.objects.filter(**running).order_by("pk")
                   if not folder_is_locked(rounds.round_dir(rnd))],
    }


@shared_task(name="workers.sweeper.requeue_orphaned_jobs", acks_late=True)
def requeue_orphaned_jobs() -> dict[str, list[int]]:
    """Send the orphaned jobs' tasks again; returns the ids sent."""
    from workers.rewards import train_reward_model
    from workers.rounds import run_round

    sent: dict[str, list[int]] = {"reward_runs": [], "rounds": []}
    tasks = {"reward_runs": train_reward_model, "rounds": run_round}
    for kind, ids in orphaned_jobs().items():
        for job_id in ids:
            if not cache.add(f"tandem:orphan-resent:{kind}:{job_id}", 1, settings.TANDEM_ORPHAN_RESEND_SECONDS):
                continue  # sent again recently; that message may still be waiting in the queue
            logger.warning("%s %s is running but no worker holds it: sending it again", kind, job_id)
            tasks[kind].delay(job_id)
            sent[kind].append(job_id)
    return sent
