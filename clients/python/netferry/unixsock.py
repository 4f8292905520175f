"""Unix socket paths that netferry creates: replace a stale socket, never anything else.

Every daemon here (hostd's links and API, network-setup, wsl-proxy) binds unix sockets at
paths users give it. gvproxy's API could be made to delete any file that way; ours only
ever removes a socket file whose server is gone. A regular file, a directory, a symlink or
a live socket (of any type) at the path is an error that says which.
"""

from __future__ import annotations

import errno
import os
import socket
import stat


def clear_stale_socket(path: str, type_: int = socket.SOCK_STREAM, make_parent: bool = False):
    """Make `path` free to bind: remove a socket file nobody listens on; raise
    FileExistsError for anything else there. `make_parent` creates the directory 0700."""
    parent = os.path.dirname(path)
    if make_parent and parent and not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, type_)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: the process that bound it is gone
    except OSError as e:
        if e.errno == errno.EPROTOTYPE:  # alive, but a socket of another type
            raise FileExistsError(f"{path} is in use by a running process") from None
        os.unlink(path)
    else:
        raise FileExistsError(f"{path} is in use by a running process")
    finally:
        probe.close()
