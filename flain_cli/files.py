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

Signals (:mod:`flain_cli.signals`): the renames at the end are held back from SIGINT and SIGTERM
as one transaction; a signal that arrives during them puts back what was there before (no output,
no temporary file, no lock) and then ends the command.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from . import signals
from .errors import ConfigError, FlainError, opt

NAME_MAX = 255  # bytes in one file name on Linux and macOS file systems


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
        """Claim and check the outputs; yield option name -> temporary path; put all in place at the end.

        The end (renames, temporary files, claims) runs with signals held back: a signal that arrives
        there undoes the renames and is raised once every claim is released (`_commit`).
        """
        self.check()  # before claiming: two outputs on one path would otherwise look like two processes
        claims = contextlib.ExitStack()
        stage: dict[str, Path] = {}
        try:
            for name in sorted(self.outputs, key=lambda n: str(self.outputs[n])):
                claims.enter_context(_claim(name, self.outputs[name]))
            self.check()  # again: another process may have finished writing one while we waited
            stage = {name: temp_path(path) for name, path in self.outputs.items()}
            yield stage
        except BaseException:
            with signals.deferred():  # a second signal must not leave a temporary file or a lock behind
                for tmp in stage.values():
                    remove(tmp)
                claims.close()
            raise
        _commit([(stage[n], self.outputs[n]) for n in self.outputs], claims.close)


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


def _set_aside(path: Path) -> Path | None:
    """Keep what ``path`` holds under a hidden name beside it, so that a commit can put it back; None if
    nothing is there. A file stays in place (a hard link, or a copy), so that the rename over it is atomic."""
    if not (path.exists() or path.is_symlink()):
        return None
    backup = sibling_name(path, f"{os.getpid()}.old")
    remove(backup)
    if path.is_dir() and not path.is_symlink():
        os.replace(path, backup)
    else:
        try:
            os.link(path, backup, follow_symlinks=False)
        except OSError:  # a file system without hard links
            shutil.copy2(path, backup, follow_symlinks=False)
    return backup


def _commit(moves: list[tuple[Path, Path]], release: Callable[[], object]) -> None:
    """Rename every staged output into place as one transaction, then ``release`` the claims.

    Signals are held back throughout. If one arrives (or a rename fails), every output gets back what
    it held before, the temporary files go, the claims are released, and then the signal (or the
    error) is raised: the outputs appear together, or none of them does.
    """
    signals.stop_if_signalled()  # a signal that some library swallowed: write nothing
    missing = [tmp for tmp, _ in moves if not (tmp.exists() or tmp.is_symlink())]
    if missing:
        for tmp, _ in moves:
            remove(tmp)
        release()
        raise FlainError(f"internal error: the output staged at {missing[0]} was never written")
    with signals.deferred():
        placed: list[tuple[Path, Path | None]] = []
        complete = False
        try:
            for tmp, path in moves:
                placed.append((path, _set_aside(path)))
                os.replace(tmp, path)
            complete = signals.signal_received() is None
        finally:
            for path, backup in reversed(placed):
                if not complete:  # undo: what was there before, or nothing
                    if backup is None:
                        remove(path)
                    else:
                        if path.is_dir() and not path.is_symlink():
                            remove(path)
                        os.replace(backup, path)
                elif backup is not None:
                    remove(backup)
            for tmp, _ in moves:
                remove(tmp)
            release()
            if complete:
                signals.mark_written()
    signals.stop_if_signalled()
