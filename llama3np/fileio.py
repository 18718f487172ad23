"""Writing a file so that a crash never leaves half of it.

Every file the project writes (checkpoints, tokenizers, configs, traces, plots) goes through `atomic_write`: the
bytes go to a temporary file in the same folder, which is flushed to disk (fsync) and then renamed over
the final name. A rename within one filesystem is atomic on POSIX, so a reader - or a resumed run after a
SIGKILL - sees either the old file or the complete new one. The folder is fsynced too, so that the
rename itself survives a power cut. Leftover temporaries are named `.NAME.XXXX.tmp`.

One exception, on purpose: a run's `log.jsonl` is appended line by line during training (rewriting
it atomically every step would cost time growing with the run). A kill can cut its last line short,
so every reader takes complete lines only and every start of a run rewrites it atomically up to its
last complete line of a step that counts (llama3np.training.run_folder.trim_log).
"""
import os
import tempfile


def atomic_write(path, write) -> None:
    """Call `write(f)` on a temporary binary file next to `path`, fsync it, rename it over `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def remove_stale_temporaries(folder) -> int:
    """Delete the `.NAME.XXXX.tmp` files a killed writer left in `folder` (recursively) -> how many. Call it
    when a run resumes, before anything writes: a live writer's temporary would be deleted too."""
    n = 0
    for root, _, files in os.walk(folder):
        for name in files:
            if name.startswith(".") and name.endswith(".tmp"):
                os.unlink(os.path.join(root, name))
                n += 1
    return n


def atomic_write_bytes(path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def fsync_dir(folder) -> None:
    """Make a rename in `folder` durable (best effort: some filesystems cannot fsync a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
