"""Where a command's files go: its inputs and outputs declared in one place, checked, claimed,
and written all or nothing.

Every command that writes builds one :class:`FilePlan` naming each input (files and folders it
reads) and each output, under the option that names it (``"--out"``, ``"MODEL"``...). Then:

- :meth:`FilePlan.check` refuses, before any work: an output that is an input, lies inside an
  input folder or contains an input; two outputs on one path; an existing output without
  ``force`` (``force`` never lets an output replace an input); a folder where a file is written.
- :meth:`FilePlan.writing` claims every output (an advisory lock beside it, so two processes
  cannot both write one path), checks again, and hands out temporary paths beside the outputs.
  When the block ends normally every temporary file is renamed over its output; when it raises,
  every temporary file is removed and no output is touched.

Signals: :func:`raise_on_signal` is the handler the CLI installs for SIGINT and SIGTERM. It
raises :class:`Interrupted` (a KeyboardInterrupt), so ``finally`` blocks remove temporary files,
except while outputs are being renamed into place, when it only records the signal: the renames
finish, and :func:`signal_received` tells the caller afterwards. Where the exception arrives wrapped
in another, :func:`interrupt_behind` finds the interrupt again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import stat
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from .errors import ConfigError, FlainError, opt

NAME_MAX = 255  # bytes in one file name on Linux and macOS file systems
_received: int | None = None
_deferring = False


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``exit_code`` is 128 + the signal number (130, 143)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


def raise_on_signal(signum: int, frame: object) -> None:  # noqa: ARG001 - the signal module's signature
    """Signal handler: remember the signal; raise Interrupted unless outputs are being renamed."""
    global _received
    _received = _received or signum
    if not _deferring:
        raise Interrupted(signum)


def signal_received() -> int | None:
    """The first SIGINT/SIGTERM seen by :func:`raise_on_signal` in this process, if any."""
    return _received


def stop_if_signalled() -> None:
    """Raise Interrupted if a signal arrived whose exception something swallowed.

    Python drops an exception raised inside a ``__del__`` or a weakref callback ("Exception
    ignored in ..."), so a signal landing there would let a long loop run to its end; the loops
    of training and repair call this between steps. A no-op while no signal arrived.
    """
    if _received is not None and not _deferring:
        raise Interrupted(_received)


def interrupt_behind(exc: BaseException) -> Interrupted | None:
    """The interrupt that ``exc`` stands for, if any: ``exc`` itself, an :class:`Interrupted` among its causes,
    or, failing both, a signal the handler saw. Python wraps what a handler raises inside some hooks (in 3.11
    ``__set_name__``, which runs while torch lazily imports a module, gives a RuntimeError), and a library may
    catch it and raise its own error: either way the command ends because of the signal, not of a bug."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, Interrupted):
            return link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return Interrupted(_received) if _received is not None else None


def _fit(name: str, room: int) -> str:
    """``name`` cut (keeping its last 40 bytes, so its suffix) and hashed when longer than ``room`` bytes."""
    if len(name.encode()) <= room:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    tail = name.encode()[-40:].decode(errors="ignore")
    head = name.encode()[:room - len(tail.encode()) - 12].decode(errors="ignore")
    return f"{head}~{digest}~{tail}"


def sibling_name(path: Path, tag: str) -> Path:
    """A hidden name beside ``path``: ``.NAME.TAG``, NAME shortened to fit NAME_MAX."""
    return path.with_name(f".{_fit(path.name, NAME_MAX - len(tag.encode()) - 2)}.{tag}")


def temp_path(path: Path) -> Path:
    """A hidden temporary name beside ``path``, unused by any other process, ending in ``path``'s name
    (so its suffix: writers that choose a format by suffix see the right one)."""
    tag = f".flain-{os.getpid()}-{os.urandom(3).hex()}."
    return path.with_name(tag + _fit(path.name, NAME_MAX - len(tag.encode())))


def remove(path: Path) -> None:
    """Remove a file or a folder tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, innermost first: what a ``mkdir(parents=True)``
    is about to create, so that `remove_empty` can take it back."""
    return [p for p in [folder, *folder.parents] if not p.exists()]


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders that are empty, innermost first; one that holds anything stays."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)``, then rename the temporary file over ``path``; on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        remove(tmp)


def regular_file(path: Path, what: str, *, max_bytes: int | None = None) -> Path:
    """``path`` itself if it is a regular file (no FIFO, device or folder), not over ``max_bytes``."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{what} {path} is a folder; give a file")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{what} {path} is not a regular file (a pipe or a device); give a file")
    if max_bytes is not None and info.st_size > max_bytes:
        raise ConfigError(f"{what} {path} is {info.st_size:,} bytes, more than the {max_bytes:,} such a file "
                          "can be; check that it is the right file")
    return path


def read_text(path: Path, what: str, *, max_bytes: int = 16 << 20) -> str:
    """The UTF-8 text of a regular file of at most ``max_bytes``, or one clear error."""
    data = regular_file(path, what, max_bytes=max_bytes).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {exc.start}); check that it is the right "
                          "file") from None


class Busy(FlainError):
    """Another process is writing the same output right now."""


class FilePlan:
    """A command's inputs and outputs, each under the option that names it.

    ``inputs``/``outputs``: option name -> path (None entries are ignored). ``folders``: the
    outputs that are folders (replaced whole); the others are files. ``force``: an existing
    output may be replaced (never an input, never a folder by a file).

    Example::

        plan = FilePlan({"MODEL": model, "--aux": aux}, {"--out": out, "--trace": trace}, force=False)
        with plan.writing() as stage:
            save_checkpoint(stage["--out"], state, meta)
    """

    def __init__(self, inputs: Mapping[str, Path | None], outputs: Mapping[str, Path | None], *, force: bool = False,
                 folders: tuple[str, ...] = ()) -> None:
        self.inputs = {k: Path(v) for k, v in inputs.items() if v is not None}
        self.outputs = {k: Path(v) for k, v in outputs.items() if v is not None}
        self.force, self.folders = force, folders

    def check(self) -> None:
        """Refuse every clash between the declared paths (see the module's docstring)."""
        seen: dict[Path, str] = {}
        for name, path in self.outputs.items():
            real = path.resolve()
            if real in seen:
                raise ConfigError(f"{seen[real]} and {name} are the same path ({path}); give each output its own")
            seen[real] = name
            for in_name, in_path in self.inputs.items():
                in_real = in_path.resolve()
                if real == in_real:
                    raise ConfigError(f"{name} {path} is also the input {in_name}; choose another output path")
                if in_real in real.parents:
                    raise ConfigError(f"{name} {path} lies inside the input folder {in_name} ({in_path}); "
                                      "choose a path outside it")
                if real in in_real.parents:
                    raise ConfigError(f"{name} {path} contains the input {in_name} ({in_path}); "
                                      "choose another output path")
            if real in Path.cwd().resolve().parents or real == Path.cwd().resolve():
                raise ConfigError(f"{name} {path} is the current folder or holds it; choose a new path")
            self._check_existing(name, path)

    def _check_existing(self, name: str, path: Path) -> None:
        if not (path.exists() or path.is_symlink()):
            return
        if not self.force:
            raise ConfigError(f"{name} {path} already exists; pass {opt('force')} to replace it or choose another path")
        if name not in self.folders and path.is_dir():
            raise ConfigError(f"{name} {path} is a folder; give a file name")
        if name in self.folders and not path.is_dir():
            raise ConfigError(f"{name} {path} is a file; give a folder name")

    @contextlib.contextmanager
    def writing(self) -> Iterator[dict[str, Path]]:
        """Claim and check the outputs; yield option name -> temporary path; rename all at the end."""
        self.check()  # before claiming: two outputs on one path would otherwise look like two processes
        with contextlib.ExitStack() as claims:
            for name in sorted(self.outputs, key=lambda n: str(self.outputs[n])):
                claims.enter_context(_claim(name, self.outputs[name]))
            self.check()  # again: another process may have finished writing one while we waited
            stage = {name: temp_path(path) for name, path in self.outputs.items()}
            try:
                yield stage
                _commit([(stage[n], self.outputs[n]) for n in self.outputs])
            finally:
                for tmp in stage.values():
                    remove(tmp)


@contextlib.contextmanager
def _claim(name: str, path: Path) -> Iterator[None]:
    """Hold an advisory lock on ``.NAME.lock`` beside ``path``; remove it when done."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux/macOS
        yield
        return
    lock = sibling_name(path, "lock")
    created = missing_folders(lock.parent)  # ours to remove if left empty
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{name} {path}: cannot create its folder: {exc.strerror or exc}") from None
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"{name} {path}: cannot write beside it: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(f"{name} {path} is being written by another process right now; wait for it to "
                       "finish, or choose another path") from None
        try:  # the holder before us may have removed the file we opened: then lock the new one
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)
        remove_empty(created)  # a folder that now holds the output stays


def _commit(moves: list[tuple[Path, Path]]) -> None:
    """Rename every staged output into place; a signal waits until all are renamed."""
    global _deferring
    stop_if_signalled()  # a signal that some library swallowed: write nothing
    missing = [tmp for tmp, _ in moves if not (tmp.exists() or tmp.is_symlink())]
    if missing:
        raise FlainError(f"internal error: the output staged at {missing[0]} was never written")
    _deferring = True
    try:
        for tmp, path in moves:
            if tmp.is_dir():
                old = sibling_name(path, f"{os.getpid()}.old")
                if path.exists():  # a folder replaced with --force: set it aside until the new one is in place
                    os.replace(path, old)
                os.replace(tmp, path)
                remove(old)
            else:
                os.replace(tmp, path)
    finally:
        _deferring = False

