"""`opsft submit --wait` follows a job through Ray's log stream (JobSubmissionClient.tail_job_logs),
here against fake clients with the same methods (an async generator of log chunks); the real job API
is exercised in tests/test_schedule.py::test_submit_wait_streams_a_real_jobs_logs (slow, a Ray head).

    .venv/bin/python -m pytest -q tests/test_submit.py
"""

from __future__ import annotations

import io

import pytest
from opsft.cli.submit import follow, wait


class FakeJobClient:
    """Log chunks pushed one by one; the status turns terminal after the stream ends (as on a real
    cluster, where it may lag a moment). `breaks`: how many streams end in an abnormal close after
    `break_after` chunks (a reconnected stream starts again at the log's beginning, as Ray's does)."""

    def __init__(self, chunks, final="SUCCEEDED", lag=2, breaks=0, break_after=2, message=None):
        self.chunks, self.final, self.lag, self.breaks, self.break_after = chunks, final, lag, breaks, break_after
        self.message = message
        self.streams = 0
        self.status_calls = 0
        self.ended = False

    async def tail_job_logs(self, job_id):
        assert job_id == "job-1"
        self.streams += 1
        for n, chunk in enumerate(self.chunks):
            if self.breaks and n == self.break_after:
                self.breaks -= 1
                raise RuntimeError("WebSocket connection closed unexpectedly with close code 1006")
            yield chunk
        self.ended = True

    def get_job_status(self, job_id):
        from ray.job_submission import JobStatus

        self.status_calls += 1
        if not self.ended:
            return JobStatus.RUNNING
        if self.lag:
            self.lag -= 1
            return JobStatus.RUNNING
        return JobStatus[self.final]

    def get_job_logs(self, job_id):
        raise AssertionError("the whole log is never downloaded")

    def get_job_info(self, job_id):
        class Info:
            message = self.message
        return Info()


def test_follow_streams_each_chunk_once_and_returns_the_final_status():
    client = FakeJobClient(["a\n", "b", "c\n", "done\n"])
    out = io.StringIO()
    assert follow(client, "job-1", out, poll=0) == "SUCCEEDED"
    assert out.getvalue() == "a\nbc\ndone\n"
    assert client.streams == 1
    assert client.status_calls == 3  # the stream's end, then the status until it is terminal


def test_a_broken_stream_is_reopened_without_repeating_what_was_shown(capsys):
    client = FakeJobClient(["one\n", "two\n", "three\n", "four\n"], breaks=2, break_after=2)
    out = io.StringIO()
    assert follow(client, "job-1", out, poll=0) == "SUCCEEDED"
    assert out.getvalue() == "one\ntwo\nthree\nfour\n"
    assert client.streams == 3
    assert capsys.readouterr().err.count("reconnecting") == 2


def test_a_stream_that_keeps_breaking_still_waits_for_the_end(capsys):
    client = FakeJobClient(["x\n", "y\n"], breaks=10, break_after=1)
    client.ended = True  # the status says the job ends
    assert follow(client, "job-1", io.StringIO(), poll=0, reconnects=2) == "SUCCEEDED"
    assert "waiting for the job's end" in capsys.readouterr().err


@pytest.mark.parametrize("final, code", [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 1)])
def test_wait_exits_with_the_jobs_status(final, code, capsys):
    client = FakeJobClient(["log\n"], final=final, message="Job entrypoint command failed with exit code 3")
    out = io.StringIO()
    assert wait(client, "job-1", out, poll=0) == code
    err = capsys.readouterr().err
    assert out.getvalue() == "log\n"
    if final == "SUCCEEDED":
        assert err.strip() == "job job-1: SUCCEEDED"
    else:
        assert err.strip() == f"job job-1: {final} (Job entrypoint command failed with exit code 3)"
