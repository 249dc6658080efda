"""Handing a token pool's fast-path region to a client (the supervisor's side of FastMap).

Runs in the supervisor, on the lease loop's thread. A client that proved the key asks, on a
connection of its own over the supervisor's unix socket, for the region of one pool, for its
lease channel (which must be a connection of the same, kernel-verified, process: its fast
leases are tied to that channel, so they come back when it closes). The reply carries the
region's memfd with ``SCM_RIGHTS``; anything else is refused with a reason, and the client
keeps the normal path. The region is made on the first request (`fastregion.FastRegion`).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from .. import protocol as P
from .. import shm
from ..remote import PackedException
from .fastregion import FastRegion, refusal

if TYPE_CHECKING:
    from .leases import LeaseLoop


def serve_fastmap(loop: LeaseLoop, conn: Any, msg: Any) -> None:
    """Hand a token pool's region to a client that proved the key, on a connection of its
    own, over a unix socket (the fd travels with SCM_RIGHTS), for a lease channel of that
    same process. Anything else is refused with a reason, and the client keeps the normal
    path."""
    rec = loop.records.get(msg.pool_id)
    main = loop.conns.get(msg.conn)
    why: str | None = None
    if rec is None:
        why = f"no pool with id {msg.pool_id}"
    elif conn.sock.family != socket.AF_UNIX or conn.holder is None or not conn.holder.verified:
        why = "the fast path is for processes on the supervisor's host (unix socket)"
    elif main is None or main.closed or main.holder is None or main.holder.pid != conn.holder.pid:
        why = f"lease connection {msg.conn} is not one of this process"
    else:
        why = refusal(rec)
    if why is None and rec is not None and rec.fast is None:
        try:
            rec.fast = FastRegion(rec, loop, max(1, rec.pool._max_size))
        except (shm.Unavailable, OSError, ValueError) as exc:
            why = f"no shared memory here: {exc}"
        else:
            loop.fast_regions[rec.id] = rec.fast
    if why is not None or rec is None:
        conn.send_raw(P.encode_reply(msg.rid, P.ERR, PackedException(ValueError(why))))
        return
    region: FastRegion = rec.fast
    with region.lock:
        region.clients.add(msg.conn)
    region.settle()  # tokens parked before the client can look
    frame = P.encode_reply(msg.rid, P.OK, region.region.nslots)
    with conn.wlock:
        sent = 0
        if not conn.wbuf and not conn.closed:
            try:
                sent = socket.send_fds(conn.sock, [frame], [region.fd])
            except OSError:
                sent = 0
    if sent != len(frame):
        loop.call_soon(lambda: loop.close(conn, "could not send the fast-path region"))
