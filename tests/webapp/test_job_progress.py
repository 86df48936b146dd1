"""Job.set_progress: the one place progress is clamped and the message cut to its column."""
from policy.models import GenerationJob


def test_progress_is_clamped_and_the_message_cut_to_fit():
    job = GenerationJob()
    assert job.set_progress(progress=1.7, message="x" * 500) == ["progress", "progress_message"]
    assert job.progress == 1.0 and len(job.progress_message) == 300
    assert job.set_progress(progress=-0.2) == ["progress"] and job.progress == 0.0
    assert job.set_progress() == []
