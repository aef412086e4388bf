"""Work on blocks in worker processes, results in order, with a bounded number in flight."""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor


def ordered_map(
    function: Callable,
    items: Iterable,
    workers: int,
    initializer: Callable | None = None,
    initargs: tuple = (),
) -> Iterator:
    """``function(item)`` for every item, in order. With ``workers`` > 1 they run in that many
    processes and at most ``2 x workers`` items are taken from ``items`` ahead of the results,
    so memory is bounded whatever the number of items; an error in a worker is raised here."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(function, items)
        return
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, context, initializer, initargs) as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
