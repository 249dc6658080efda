"""Budgets: one token pool caps the live objects of many pools, in many processes.

    a process: Pool(fun, budget=b)                        the budget b: a token pool, e.g.
                                                          client.token_pool(name, n)
      create (PoolState._create): draw_token() ── get ──▶ one token out per live object
                              obj = fun(i), kept with its token in its Entry  (FIFO queue of
      close (PoolState._settle): closer(obj),             the processes waiting for one)
                              give_back(token) ── put ──▶ the token goes to the oldest waiter
      recall, a round every RECALL_PERIOD (sooner when an idle object falls due):
                              b.waiting() ◀────────────── how many processes wait
                              idle objects that are due are closed now; objects in use are
                              closed at a return once due, if b.waiting() still says so

A token is drawn before ``fun`` runs and given back after ``closer`` returned, so the objects
alive across every process never exceed the budget, not even for a moment. Filling
``min_size`` never waits for a token (a constructor or a housekeeping round must not block on
other processes): it tries again at the next round. The common path, get and ret of an idle
object, never talks to the budget: the token stays with its object.

Recall keeps that from starving the other processes, without churning connections: a token
moves only when keeping it costs somebody else, and then from the process that needs it least.

- Only demand moves tokens: a pool gives nothing back unless ``waiting()`` says another process
  waits, and never more objects than there are waiters.
- Hysteresis, in time: an object is due when its idle time plus the demand's age (counted
  from the object's creation if later) reaches ``RECALL_PATIENCE`` (`recall_score`). An
  object idle that long goes back at the first round that sees a waiter (within
  ``RECALL_PERIOD``); one its process just used is kept a little longer; one in use is
  closed at a return, so a waiting process waits for a busy process to finish its use
  before a close is forced; and a new object always serves its process for at least the
  patience.
- Hysteresis, in uses: an object its process keeps using (never idle for the patience) is
  due only once it has served ``RECALL_MIN_USES`` uses, so every open that recall causes is
  paid for by that many uses: under continuous demand, at most 1000 / RECALL_MIN_USES opens
  per 1,000 uses (50 at 20). ``RECALL_MAX_HOLD`` bounds how long demand waits for a busy
  object's uses (`recall_wait`).
- The process idle longest gives first: each pool runs its next round when its own next
  object falls due and asks ``waiting()`` again then (and again at a return, before closing
  an object in use), so once the longest idle process has fed the waiter, the others find
  nobody waiting and keep their connections.

The guarantees do not depend on this policy: the cap is the token pool's, the supervisor
takes back the tokens of a process that dies, and waiters are served first come, first
served by the token pool. Recall needs the budget's optional ``waiting()``; a budget without
it is only a cap.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ServerUnavailable
from .sched import Scheduler, default_scheduler

log = logging.getLogger("mppool")

# How often a pool with a shared budget asks whether another process waits for it.
RECALL_PERIOD = 0.05
# How long an object is kept for its process while others wait for the budget, counting its
# idle time and the demand's age (see recall_score): an object idle this long goes back at
# the first round that sees a waiter; one in use goes back at a return this long after the
# demand was seen (or after its creation, if later). The hysteresis of recall.
RECALL_PATIENCE = 0.1
# The shortest wait between two rounds, when an idle object falls due sooner than a period.
RECALL_MIN_DELAY = 0.005
# The other half of the hysteresis: an object its process keeps using goes back only once it
# has served this many uses since it was made, so that the open it cost is paid for: under
# continuous demand, recall makes at most one object per RECALL_MIN_USES uses (at most 50 per
# 1,000 queries at 20). An object idle for the patience goes back whatever its uses (its
# process does not need it), and RECALL_MAX_HOLD bounds how long demand waits for the uses.
RECALL_MIN_USES = 20
RECALL_MAX_HOLD = 1.0


class Budget(Protocol):
    """A token pool that caps live objects across processes (a shared token pool)."""

    def get(self, timeout: float | None = None) -> Any: ...
    def put(self, token: Any) -> None: ...


def check_budget(budget: Any) -> None:
    """A budget is a token pool: something with get() and put() (a shared token pool)."""
    if budget is not None and not (callable(getattr(budget, "get", None))
                                   and callable(getattr(budget, "put", None))):
        raise TypeError(f"budget must be a token pool with get() and put(), got {budget!r}")


def draw_token(budget: Budget | None, fill: bool, timeout: float | None) -> Any:
    """A token for an object about to be made (None without a budget), drawn before ``fun``
    runs; ``fill`` (for min_size) never waits for one."""
    if budget is None:
        return None
    return budget.get(0 if fill else timeout)


def give_back(budget: Budget | None, token: Any, pool_name: str) -> None:
    """Return the token of a closed object, or of one ``fun`` failed to make; never raises
    (the object is gone either way, and fun's own error must be the one the caller sees)."""
    if token is None:
        return
    try:
        budget.put(token)  # type: ignore[union-attr]
    except ServerUnavailable as exc:
        # The supervisor is gone: so is the budget, nothing to give back.
        log.info("mppool: pool %r: budget token not returned: %s", pool_name, exc)
    except Exception:
        log.warning("mppool: pool %r: could not return a budget token", pool_name, exc_info=True)


def recall_score(now: float, idle_since: float | None, created: float,
                 demand_since: float) -> float:
    """How strongly an object is owed to the processes that wait for the budget, in seconds:
    how long it has been idle (0 for one in use, ``idle_since`` None) plus how long the demand
    has lasted since the object was made. It goes back once this reaches ``RECALL_PATIENCE``.

    The idle time ranks processes: the one idle longest reaches the patience first and gives
    its token back, and every other pool, asking the budget again when its own object gets
    there, finds nobody left waiting and keeps its connection. Counting the demand from the
    object's creation gives every new object the whole patience in its process: under
    continuous demand a token then moves at most once per patience, not at every query.
    """
    idle = 0.0 if idle_since is None else max(0.0, now - idle_since)
    return idle + max(0.0, now - max(demand_since, created))


def recall_wait(now: float, idle_since: float | None, created: float, demand_since: float,
                uses: int | None, patience: float) -> float:
    """In how many seconds an object falls due for recall (0: it is due now); inf when only
    a use can make it due (one in use that is short of uses is re-examined at its return).

    Due means both: the score (`recall_score`) reached ``patience``, and the object has paid
    for its open: it served ``RECALL_MIN_USES`` uses (``uses`` None: not counted), or it sat
    idle for the patience (its process does not need it), or demand has waited
    ``RECALL_MAX_HOLD`` for it (since the object was made, if later).
    """
    idle = 0.0 if idle_since is None else max(0.0, now - idle_since)
    demand = max(0.0, now - max(demand_since, created))
    # An idle object's score grows twice as fast as the clock (idle time and demand age).
    rate = 2.0 if idle_since is not None else 1.0
    score_wait = max(0.0, patience - idle - demand) / rate
    if uses is None or uses >= RECALL_MIN_USES:
        return score_wait
    paid_wait = max(0.0, RECALL_MAX_HOLD - demand)
    if idle_since is not None:
        paid_wait = min(paid_wait, max(0.0, patience - idle))
    return max(score_wait, paid_wait)


def plan_recall(now: float, wanted: int, idle: list[tuple[float, float]],
                demand_since: float, patience: float,
                uses: list[int] | None = None) -> tuple[list[int], float | None]:
    """The recall decision of one round, pure (a fake clock tests it): ``idle`` holds
    (last return, creation) of the idle objects above min_size, ``uses`` (if counted) how
    many uses each has served, and ``wanted`` processes wait for the budget since
    ``demand_since`` (as this pool saw it).

    Returns the indexes of the idle objects to close now, most owed first (see
    `recall_score` and `recall_wait`; never more than ``wanted``), and in how many seconds
    the next one falls due while demand is left over (None: none will, or nothing is left
    over).
    """
    waits = [recall_wait(now, last_ret, created, demand_since,
                         None if uses is None else uses[i], patience)
             for i, (last_ret, created) in enumerate(idle)]
    scores = [recall_score(now, last_ret, created, demand_since) for last_ret, created in idle]
    due = sorted((i for i, w in enumerate(waits) if w <= 0.0), key=lambda i: -scores[i])
    close = due[:max(0, wanted)]
    later = [w for w in waits if w > 0.0]
    return close, (min(later) if later and len(close) < wanted else None)


# state.py draws and gives back tokens with the functions above, so this module cannot
# import it at run time: the mixin below is typed against PoolState, a plain class at run time.
if TYPE_CHECKING:
    from .state import Entry
    from .state import PoolState as _State
else:
    _State = object


class Budgeted(_State):
    """Recall, the budget side of the core `mppool.Pool` (combined there with PoolState)."""

    def _start_recall(self, scheduler: Scheduler | None, own_clock: bool) -> None:
        """Poll the budget every RECALL_PERIOD, if it can say whether anybody waits; on
        ``scheduler`` if given (else housekeeping's, else one of its own)."""
        self._recall_n = 0  # returns that may close their object (see _recall_wanted)
        self._recall_since = None  # since when others wait, as this pool saw it
        self._recall_rounds = 0  # rounds that asked the budget (tests wait on it)
        self._recall_task = None
        self._weak_recall = self._weak_task("_recall_tick")
        budget = self._budget
        if budget is not None and callable(getattr(budget, "waiting", None)):
            if self._sched is None:
                if scheduler is not None:
                    self._sched = scheduler
                else:
                    self._sched = (Scheduler(self._clock, workers=1) if own_clock
                                   else default_scheduler())
                    self._own_sched = own_clock
            self._recall_task = self._sched.enter(RECALL_PERIOD, self._weak_recall)

    def _recall_due(self, entry: Entry, now: float) -> bool:
        """Under the lock: may this object, in use until now, go back to the budget?"""
        since = self._recall_since
        return (self._recall_n > 0 and since is not None
                and recall_wait(now, None, entry.created, since, entry.uses,
                                RECALL_PATIENCE) <= 0.0)

    def _recall_wanted(self, entry: Entry) -> bool:
        """Outside the lock, for an object coming back while recall is armed: True if it
        is due and somebody still waits for the budget, asked again now (a round trip only
        on such returns: the demand seen by the last round may have been served since)."""
        with self._lock:
            if not self._recall_due(entry, self._clock.now()):
                return False
        try:
            wanted = int(self._budget.waiting())  # type: ignore[union-attr]
        except Exception:
            log.debug("mppool: pool %r: budget.waiting() failed", self._name, exc_info=True)
            return False
        if wanted <= 0:
            with self._lock:
                self._recall_n = 0
                self._recall_since = None
        return wanted > 0

    def _recall_on_return(self) -> bool:
        """Under the lock, for an object coming back that `_recall_wanted` found due: True if
        it must be closed instead of kept (the pool keeps min_size without it)."""
        if self._recall_n > 0 and len(self._avail) + len(self._using) >= self._min_size:
            self._recall_n -= 1
            self._counts["nrecalled"] += 1
            return True
        return False

    def _recall_tick(self) -> None:
        delay = [RECALL_PERIOD]

        def job() -> None:
            try:
                later = self._recall_round()[1]  # asks the budget (a round trip), closes
                if later is not None:
                    delay[0] = min(RECALL_PERIOD, max(RECALL_MIN_DELAY, later))
            except Exception:
                log.exception("mppool: pool %r: budget recall failed", self._name)

        try:
            self._offload("recall", job)
        except Exception:  # only a broken runner gets here: keep ticking
            log.exception("mppool: pool %r: budget recall failed", self._name)
        with self._lock:
            if self._shutdown or self._sched is None:
                return
        self._recall_task = self._sched.enter(delay[0], self._weak_recall)

    def recall(self) -> int:
        """One recall round now: give idle objects above min_size back to a budget that
        other processes wait for, when they are due (see `recall_score`). Returns how many
        were closed now; objects in use go back at a return once due."""
        return self._recall_round()[0]

    def _recall_round(self) -> tuple[int, float | None]:
        """Ask the budget whether anybody waits (only when this pool holds something above
        min_size), close the idle objects that are due, arm the returns of objects in use.
        Returns how many were closed, and in how many seconds the next idle object falls
        due (None: none)."""
        with self._lock:
            spare = len(self._avail) + len(self._using) - self._min_size
            if self._shutdown or spare <= 0:
                self._recall_n = 0
                self._recall_since = None
                return 0, None
        try:
            wanted = int(self._budget.waiting())  # type: ignore[union-attr]
        except Exception:
            log.debug("mppool: pool %r: budget.waiting() failed", self._name, exc_info=True)
            return 0, None
        with self._lock:
            self._recall_rounds += 1
            if wanted <= 0:
                self._recall_n = 0
                self._recall_since = None
                return 0, None
            now = self._clock.now()
            if self._recall_since is None:
                self._recall_since = now
            spare = min(len(self._avail), len(self._avail) + len(self._using) - self._min_size)
            idle = list(self._avail)[:max(0, spare)]  # the left end idles longest
            close, later = plan_recall(now, wanted, [(e.last_ret, e.created) for e in idle],
                                       self._recall_since, RECALL_PATIENCE,
                                       [e.uses for e in idle])
            n = len(close)
            for i in close:
                self._avail.remove(idle[i])
                self._to_close.append(idle[i])
            self._counts["nrecalled"] += n
            # The rest of the demand falls on objects in use: each may go back at a return
            # once due (_recall_due), after asking the budget again (_recall_wanted).
            self._recall_n = min(wanted - n, len(self._using))
        if n:
            log.debug("mppool: pool %r: gave %d idle object(s) back to the budget", self._name, n)
            self._settle()
        return n, later
