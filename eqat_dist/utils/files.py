"""Files as the user's umask says. Some writers make their files private whatever the umask: the
safetensors library writes every file mode 0600 (a temporary file renamed in), and tempfile's folders
are 0700. On a shared cluster disk that hides the model from a colleague, a serving job under another
account or a group-shared project folder, so what we write through them is given the usual mode."""
from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    """This process's umask, read without changing it where Linux says it in /proc (elsewhere it is set
    and set back)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_umask_says(path: str | os.PathLike) -> None:
    """The mode a plain open() or mkdir() would have given `path`: 0644 / 0755 under umask 022."""
    mode = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, mode & ~umask())


def tree_as_umask_says(folder: str | os.PathLike) -> None:
    """`folder` and everything in it."""
    as_umask_says(folder)
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            as_umask_says(os.path.join(root, name))


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors.torch.save_file, the file then readable as the umask says."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    as_umask_says(path)
