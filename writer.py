"""The files of each epoch's end (checkpoint, grid, GIF frame, plots) written on a thread of their
own, so that the training on an accelerator never waits while a PNG is encoded or a checkpoint is
fsynced. On the CPU, where such a thread takes its time from the steps, InlineWriter writes them
where they are handed over.

Jobs run one at a time in the order given (a checkpoint before its pictures). A job must own
what it writes: copies taken on the training thread before it is handed over. After a job
fails, the later ones are dropped (no picture of an epoch whose checkpoint failed) and the error
is raised on the training thread at its next hand-over, wait or close.
"""

import queue
import threading
import warnings

PENDING_JOBS = 4  # two epochs' checkpoint and pictures: training runs at most that far ahead of the disk


class BackgroundWriter:
    def __init__(self, pending_jobs=PENDING_JOBS):
        self.jobs = queue.Queue(maxsize=pending_jobs)
        self.error = None
        # not a daemon: a write under way when the program exits is finished, never cut short
        self.thread = threading.Thread(target=self.work, name="epoch-files", daemon=False)
        self.thread.start()

    def submit(self, job):
        """Queue job (a function of no arguments); blocks while the queue is full. Raises a
        failed earlier job's error instead, and then queues nothing."""
        self.raise_error()
        self.jobs.put(job)

    def wait(self):
        """Return once every queued job has run; raise the error of one that failed."""
        self.jobs.join()
        self.raise_error()

    def close(self, raise_errors=True):
        """Run what is queued, stop the thread. A failed job's error is raised, or with
        raise_errors=False (the training is failing already) shown as a warning."""
        self.jobs.put(None)
        self.thread.join()
        if raise_errors:
            self.raise_error()
        elif self.error is not None:
            warnings.warn(f"also, writing a file failed: {self.error}", stacklevel=2)

    def raise_error(self):
        error, self.error = self.error, None
        if error is not None:
            raise error

    def work(self):
        while (job := self.jobs.get()) is not None:
            try:
                if self.error is None:
                    job()
            except BaseException as error:  # handed to the training thread, which decides
                self.error = error
            finally:
                self.jobs.task_done()
        self.jobs.task_done()


class InlineWriter:
    """BackgroundWriter's interface, each job run where it is handed over: its error is raised there."""

    def submit(self, job):
        job()

    def wait(self):
        pass

    def close(self, raise_errors=True):
        pass
