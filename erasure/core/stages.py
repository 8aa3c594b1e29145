"""Run folders: one per stage (base model, classifier, each erasure), reused when finished.

A stage folder holds ``config.yaml`` (the resolved config), its outputs, a ``checkpoint/``
while it runs and ``done.json`` when it has finished. While a job works in it, the job
holds ``.lock`` (see :class:`RunLock`), so a second job on the same folder refuses at once;
``started.json`` records the fingerprint of the unfinished run, so partial outputs made
with other settings are never mixed into a new run. ``done.json`` records a fingerprint
of the config the stage depends on (:func:`config_fingerprint`): a finished stage with the
same fingerprint is reused, and one with a different fingerprint is an error rather than
an overwrite. Every path (DDPM, SD, classification) runs its stages through
:meth:`Stage.run`, the one lifecycle: reuse, begin, work, finish.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator

from erasure.core.config import fingerprint, to_yaml
from erasure.core.errors import ErasureError
from erasure.core.io import make_folder, read_json, write_errors, write_json, write_text
from erasure.core.saliency import Mask

# Settings that cannot change what a stage produces: where it runs, how often (and to which trackers) it logs or saves.
# They stay out of fingerprints, so a resumed or re-evaluated run need not repeat them.
RUN_ONLY_KEYS = frozenset({"workdir", "device", "checkpoint_every", "log_every", "log_with", "gpu_recipe"})
FINGERPRINT_SCHEME = 2  # bump when the fingerprint rule changes; older done.json files say so clearly


def config_fingerprint(config: Any, sections: Iterable[str] | None = None, skip: Iterable[str] = (), **extra: Any) -> str:
    """A hash of everything in ``config`` a stage's output can depend on.

    Derived, not listed: the whole resolved config (or only its top-level ``sections``),
    minus :data:`RUN_ONLY_KEYS` at any depth and the keys in ``skip`` (top-level or dotted, e.g. other
    methods' sections), plus ``extra`` values. A setting added to a section later is
    covered without anyone remembering to add it here.
    """
    values = dataclasses.asdict(config)
    if sections is not None:
        values = {k: values[k] for k in sections}
    for key in skip:  # "section" or "section.key"
        *parents, last = key.split(".")
        where = values
        for part in parents:
            where = where.get(part, {})
        where.pop(last, None)
    extra = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in extra.items()}
    return fingerprint(_drop_run_only(values), _drop_run_only(extra), FINGERPRINT_SCHEME)


def _drop_run_only(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_run_only(v) for k, v in value.items() if k not in RUN_ONLY_KEYS}
    return value


def is_main_process() -> bool:
    """Rank 0 of an ``accelerate launch`` job (or a plain process).

    Read from the launcher's environment rather than accelerate's state, so asking does not
    initialise that process-wide state with other settings than the stage's Accelerator.
    """
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_everyone() -> None:
    """A barrier across the job's processes, once they have joined a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


T = TypeVar("T")


def on_main_process(work: Callable[[], T]) -> T | None:
    """``work()`` on the main process only; every process then waits for it (None elsewhere).

    If ``work`` fails there, every process stops with an error, instead of the others waiting
    at a barrier for a process that will never arrive.
    """
    error, result = None, None
    if is_main_process():
        try:
            result = work()
        except BaseException as e:  # noqa: B036  (re-raised below, after telling the other processes)
            error = e
    failed = any_process(error is not None)
    if error is not None:
        raise error
    if failed:
        raise ErasureError("the main process failed (its error is printed above it); this process stops too.")
    return result


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is set on any process of the job; a barrier too.

    The processes agree over a CPU (gloo) group: a flag on the GPU would have to be read
    back, making the host wait for the GPU's whole queue (the training loop asks every step).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    t = torch.tensor([float(flag)])
    torch.distributed.all_reduce(t, group=_host_group())
    return bool(t.item() > 0)


@functools.cache  # made once per process; every rank reaches the first call at the same point
def _host_group() -> Any:
    """A gloo group over all of the job's processes, for small host-side agreements beside NCCL's GPU traffic."""
    return torch.distributed.new_group(backend="gloo")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class RunLock:
    """One job at a time in a folder: an exclusive ``flock`` on ``folder/.lock``, which records the holder.

    The kernel drops the lock when its process dies, however it dies, so the lock of a
    killed job is simply taken over by the next one (with a note naming the dead holder);
    a live holder makes :meth:`acquire` refuse at once with its PID and host. The file is
    never deleted: deleting it would let two jobs lock two different files of one name.
    Where the filesystem has no locks (some network mounts), the recorded PID decides:
    a holder on this host whose process is gone is stale; any other holder is respected.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self.fd is not None

    def _holder(self, fd: int) -> dict[str, Any]:
        try:
            text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            return json.loads(text) if text else {}
        except (OSError, json.JSONDecodeError):
            return {"pid": "?", "host": "?"}

    def _refuse(self, holder: dict[str, Any]) -> ErasureError:
        stamp = holder.get("since")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if isinstance(stamp, (int, float)) else "?"
        return ErasureError(
            f"'{self.folder}' is in use by another job (PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"since {since}); two jobs in one folder would mix their outputs. Wait for it to finish, stop it, or use another workdir."
        )

    def acquire(self) -> None:
        """Take the lock or raise :class:`ErasureError` naming the job that holds it."""
        if self.fd is not None:
            return
        make_folder(self.folder)
        with write_errors(self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise self._refuse(holder) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            holder = self._holder(fd)  # no locks here: fall back to the recorded holder
            pid = holder.get("pid")
            stale = holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)
            if holder and not stale:
                os.close(fd)
                raise self._refuse(holder) from None
        previous = self._holder(fd)
        if previous:
            print(
                f"note: taking over '{self.path}' from a job that ended without releasing it "
                f"(PID {previous.get('pid', '?')} on host {previous.get('host', '?')}).",
                file=sys.stderr,
            )
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": round(time.time(), 1)})
        with write_errors(self.path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
        self.fd = fd

    def release(self) -> None:
        """Clear the record and drop the lock (a no-op when not held)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)  # an empty record: the next job knows this one ended cleanly
        except OSError:
            pass
        finally:
            os.close(fd)  # closing drops the flock


# Files of a stage folder that are not outputs: the lock, the markers, the config, and the
# training log (rewritten from step 0 when there is no checkpoint to resume).
_BOOKKEEPING = frozenset({".lock", "started.json", "config.yaml", "log.csv"})


class Stage:
    """A stage's folder and the fingerprint of what it depends on."""

    def __init__(self, folder: str | Path, fingerprint: str) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.started = time.time()
        self.lock = RunLock(self.folder)

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint"

    def done(self) -> bool:
        """True if finished with the same inputs; an error if finished with different ones."""
        marker = self.folder / "done.json"
        if not marker.is_file():
            return False
        previous = read_json(marker).get("fingerprint")
        if previous != self.fingerprint and read_json(marker).get("fingerprint_scheme") != FINGERPRINT_SCHEME:
            raise ErasureError(
                f"'{self.folder}' was finished by an older version of erasure, whose settings fingerprint "
                "cannot be compared with this one. Its outputs are still there to read; to redo the stage "
                "here, delete the folder (or use another workdir)."
            )
        if previous != self.fingerprint:
            raise ErasureError(
                f"'{self.folder}' already holds a finished run with different settings "
                f"(fingerprint {previous}, now {self.fingerprint}). Use another workdir, or delete the folder to redo it."
            )
        return True

    def finished(self) -> bool:
        """True if the folder holds a finished run, whatever its settings (they are in its config.yaml)."""
        return (self.folder / "done.json").is_file()

    def begin(self, config: Any) -> None:
        """Take the folder's lock, check that no unfinished run with other settings is there, and save the config.

        Only the main process of an ``accelerate launch`` job locks and writes; the other
        ranks work in the folder under its lock. The lock is held until :meth:`finish` or
        :meth:`release`.
        """
        if is_main_process():
            self.lock.acquire()
            try:
                self._claim()
                write_text(self.folder / "config.yaml", to_yaml(config))
            except BaseException:
                self.lock.release()
                raise
        self.started = time.time()

    def _claim(self) -> None:
        """Record this run's fingerprint in ``started.json``, refusing a folder left unfinished by other settings.

        An interrupted run's partial outputs (generated images, cached latents, a mask, a
        checkpoint) were made with its settings; resuming with other settings would mix them
        into outputs that claim the new ones.
        """
        marker = self.folder / "started.json"
        if marker.is_file():
            previous = read_json(marker)
            same = previous.get("fingerprint") == self.fingerprint and previous.get("fingerprint_scheme") == FINGERPRINT_SCHEME
            if same:
                return
            # A run that failed before making anything (a wrong model path, say) leaves nothing to mix up.
            leftovers = sorted(p.name for p in self.folder.iterdir() if p.name not in _BOOKKEEPING)
            if leftovers:
                raise ErasureError(
                    f"'{self.folder}' holds an unfinished run with other settings (fingerprint {previous.get('fingerprint')}, "
                    f"now {self.fingerprint}); its partial outputs ({', '.join(leftovers[:4])}) would be mixed with the new ones. "
                    "Rerun with the old settings to finish it (config.yaml there has them), delete the folder to start over, "
                    "or use another workdir."
                )
        write_json(marker, {"fingerprint": self.fingerprint, "fingerprint_scheme": FINGERPRINT_SCHEME})

    def finish(self, summary: dict[str, Any]) -> None:
        """Mark the stage finished (with the wall time of the run that finished it), drop its checkpoint and lock.

        The main process writes; every process then waits, so no rank reads outputs before they exist.
        """

        def write() -> None:
            seconds = round(time.time() - self.started, 1)
            record = {"fingerprint": self.fingerprint, "fingerprint_scheme": FINGERPRINT_SCHEME, "seconds": seconds, **summary}
            write_json(self.folder / "done.json", record)
            shutil.rmtree(self.checkpoint, ignore_errors=True)
            self.release()

        on_main_process(write)

    def release(self) -> None:
        """Drop the folder's lock, if this process holds it (after a failure, or when done)."""
        self.lock.release()

    def run(self, config: Any, work: Callable[[], dict[str, Any]]) -> bool:
        """The stage lifecycle: reuse a finished run, else begin (lock), ``work()``, finish with its summary.

        ``work`` writes the outputs (main process) and returns the summary for ``done.json``.
        Returns True if the work ran, False if a finished run was reused (also when
        another job finished it while this one waited to start).
        """
        if self.done():
            return False
        try:
            if is_main_process():
                self.lock.acquire()
                if self.done():  # finished by another job between the first look and the lock
                    return False
            self.begin(config)
            error, summary = None, {}
            try:
                summary = work()
            except BaseException as e:  # noqa: B036  (re-raised below)
                error = e
            # Every process agrees before finishing: one that failed alone (saving, say) must not
            # leave the others waiting for it at the barrier in finish().
            if any_process(error is not None):
                if error is not None:
                    raise error
                raise ErasureError("another process of this job failed (its error is printed above); this one stops too.")
            self.finish(summary)
        finally:
            self.release()
        return True


def shared_mask(stage: Stage, accelerator: Accelerator, model: torch.nn.Module, make: Callable[[], Mask | None]) -> Mask | None:
    """The stage's mask, made once by the main process and loaded by every process.

    All ranks of a multi-GPU job must train the same weights, so they share one file; a
    resumed run keeps the mask it started with instead of recomputing it.
    """
    path = stage.folder / "mask.safetensors"
    resuming = (stage.checkpoint / "state.json").is_file() and path.is_file()
    if accelerator.is_main_process and not resuming:
        path.unlink(missing_ok=True)
        mask = make()
        if mask is not None:
            mask.save(path)
    accelerator.wait_for_everyone()
    return Mask.load(path, model) if path.is_file() else None
