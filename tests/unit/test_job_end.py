"""The pull job's end: libvirt is asked to end the job before the point is committed, and the
pipeline waits for the job to be gone only after the commit (``pull._JobEnder``)."""

from __future__ import annotations

import threading

import pytest

from libvbackup import pull
from libvbackup.errors import LibvirtError


class FakeDomain:
    def __init__(self, fail: bool = False):
        self.calls: list[str] = []
        self.asked = threading.Event()  # the test lets abortJob return
        self.gone = threading.Event()  # the test lets the job end
        self.fail = fail

    def request_abort(self) -> None:
        self.asked.wait(10)
        self.calls.append("request_abort")
        if self.fail:
            raise LibvirtError("cannot end the backup job of VM 'v': no")

    def wait_job_gone(self, wait: float = 30.0) -> None:
        self.gone.wait(10)
        self.calls.append("wait_job_gone")


def returns(fn) -> threading.Event:
    done = threading.Event()
    threading.Thread(target=lambda: (fn(), done.set()), daemon=True).start()
    return done


def test_requested_returns_once_libvirt_was_asked_and_wait_once_the_job_is_gone():
    dom = FakeDomain()
    ender = pull._JobEnder(dom)
    ender.start()
    requested = returns(ender.requested)
    assert not requested.wait(0.2)  # abortJob has not returned: no commit yet
    dom.asked.set()
    assert requested.wait(5)
    waited = returns(ender.wait)
    assert not waited.wait(0.2)  # the job is still ending
    dom.gone.set()
    assert waited.wait(5)
    assert dom.calls == ["request_abort", "wait_job_gone"]


def test_a_refused_abort_is_raised_before_the_commit():
    dom = FakeDomain(fail=True)
    dom.asked.set()
    ender = pull._JobEnder(dom)
    ender.start()
    with pytest.raises(LibvirtError, match="cannot end the backup job"):
        ender.requested()
    ender.join()
    assert dom.calls == ["request_abort"]


def test_without_the_thread_the_job_is_ended_in_place_once():
    dom = FakeDomain()
    dom.asked.set()
    dom.gone.set()
    ender = pull._JobEnder(dom)
    ender.requested()
    ender.wait()
    assert dom.calls == ["request_abort", "wait_job_gone"]
