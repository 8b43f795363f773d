"""What the suite-wide leak checks look at: this process's sockets and child processes (Linux /proc).

Kept out of ``conftest.py`` so fixtures can import :data:`SHARED_CHILDREN` as one module object.
"""

from __future__ import annotations

import os

#: Child processes owned by module- or session-scoped fixtures (shared servers), not by one test.
#: A fixture that starts such a process lazily adds its pid here and removes it when done.
SHARED_CHILDREN: set[int] = set()


def socket_fds() -> set[str]:
    """``socket:[inode]`` links of this process's open file descriptors."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


def children() -> set[int]:
    """Live (non-zombie) child processes of this process."""
    me = str(os.getpid())
    kids = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            kids.add(int(pid))
    return kids


def describe_socket(target: str) -> str:
    """Which kind of socket an fd link names (unix, tcp), for a readable leak report."""
    ino = target[len("socket:[") : -1]
    for table in ("/proc/net/unix", "/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for line in f:
                    if ino in line.split():
                        return f"{table.rsplit('/', 1)[1]} {line.split()[1:3]}"
        except OSError:
            continue
    return "unknown"
