"""The platform's loop: admit queued jobs whose memory fits, watch running ones, recover lost ones.

One tick a second. A running job whose run is gone without an exit record was lost (the platform or
the machine died under it, or the run was killed by a signal the platform did not send): it goes
back to the queue and starts again with train's `resume: auto`, so it continues from its last
checkpoint. Jobs are claimed in the store with their owner (this instance's name), so several
instances sharing one store never start the same job twice; each watches the jobs it owns.
"""

from __future__ import annotations

import logging
import threading
import time

from jobs.admission import never_fits, reason_to_wait
from jobs.model import Job
from jobs.store import JobStore

log = logging.getLogger("guardtune.platform")
MAX_ATTEMPTS = 3  # starts of one job, resumes included


class Queue:
    def __init__(self, store: JobStore, executor, *, instance: str, max_running: int = 1, poll_s: float = 1.0):
        self.store, self.executor, self.instance = store, executor, instance
        self.max_running, self.poll_s = max_running, poll_s
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(self, job: Job) -> None:
        with self.lock:
            self.store.add(job)
        try:
            self.tick()  # start it now if it fits; a failure here is the loop's to retry, not the caller's
        except Exception:
            log.exception("platform queue tick after submit failed")

    def cancel(self, job_id: str) -> Job | None:
        with self.lock:
            job = self.store.get(job_id)
            if job is None or job.state not in ("queued", "running"):
                return job
            was_running = job.state == "running"
            job.state, job.finished, job.waiting_for = "cancelled", time.time(), None
            self.store.save(job)  # first: the watcher must not take the killed run for a lost one
        if was_running and job.host == self.instance:
            self._stop_run(job)  # another owner stops it at its next tick
        return job

    def _stop_run(self, job: Job) -> None:
        self.executor.cancel(job)
        job.stopped = True
        self.store.save(job, if_state="cancelled")

    def tick(self) -> None:
        with self.lock:
            running = []
            for job in self.store.list(("running",), limit=None):
                if job.host != self.instance:
                    continue
                try:
                    if self._watch(job).state == "running":
                        running.append(job)
                except Exception:  # one run's executor error must not stop the others being watched
                    log.exception("platform: watching job %s failed", job.id)
            for job in self.store.list(("cancelled",), limit=100):  # cancelled through another instance
                if job.host == self.instance and job.handle and not job.stopped:
                    self._stop_run(job)
            self._admit(running)

    def _admit(self, running: list[Job]) -> None:
        memory = getattr(self.executor, "admits_by_memory", True)
        for job in reversed(self.store.list(("queued",), limit=None)):  # oldest first
            too_big = never_fits(job) if memory else None
            if too_big:
                job.state, job.finished, job.error, job.waiting_for = "failed", time.time(), too_big, None
                self.store.save(job, if_state="queued")
                continue
            reason = reason_to_wait(job, running, max_running=self.max_running, memory=memory)
            if reason is not None:
                if job.waiting_for != reason:
                    job.waiting_for = reason
                    self.store.save(job, if_state="queued")
                return  # first come, first served: a big job is not overtaken forever
            job.state, job.started, job.waiting_for, job.host = "running", time.time(), None, self.instance
            job.attempts += 1
            if not self.store.claim(job):
                continue  # another instance took it
            self._start(job)
            running.append(job)

    def _start(self, job: Job) -> None:
        try:
            job.handle = self.executor.start(job)
        except Exception as exc:  # the executor refused (a bad image, the cluster said no): the job fails, not the loop
            job.state, job.finished, job.error = "failed", time.time(), f"could not start: {exc}"
        self._save_running(job)

    def _save_running(self, job: Job) -> None:
        """Save a job this instance runs, unless it was cancelled meanwhile: then its run is stopped."""
        if not self.store.save(job, if_state="running"):
            fresh = self.store.get(job.id)
            if fresh is not None and fresh.state == "cancelled" and job.handle:
                self.executor.cancel(job)

    def _watch(self, job: Job) -> Job:
        st = self.executor.state(job)
        if st.state == "running":
            if st.rss_bytes:
                job.sample_rss(time.time(), st.rss_bytes)
                self._save_running(job)
            return job
        if st.state == "lost":
            if job.attempts >= MAX_ATTEMPTS:
                job.state, job.finished, job.error = "failed", time.time(), f"lost {job.attempts} times; not retried"
            else:
                job.state, job.waiting_for = "queued", "its run was lost; it resumes from the last checkpoint"
            log.warning("job %s: run lost; %s", job.id, job.state)
        else:
            job.state, job.finished, job.exit_code = st.state, time.time(), st.exit_code
            job.peak_rss_bytes = max(st.peak_rss_bytes or 0, job.peak_rss_bytes or 0) or None
            if st.state == "failed":
                job.error = f"train exited with {st.exit_code}; see the log"
        self.store.save(job, if_state="running")
        return job

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="platform-queue", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.tick()
            except Exception:  # a store hiccup: log it and try again next tick
                log.exception("platform queue tick failed")
