"""Progress bars and timed steps. Bars switch off when not on a terminal or under CI; library code
never prints, it logs."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("apt_deploy")


def bars_enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI") and not os.environ.get("APT_DEPLOY_NO_PROGRESS")


def progress(items: Iterable[T], total: int | None = None, desc: str = "", **kwargs: Any) -> Iterator[T]:
    """tqdm on a terminal; otherwise plain iteration with a log line every ~10 %."""
    if bars_enabled():
        from tqdm.auto import tqdm

        yield from tqdm(items, total=total, desc=desc, leave=False, **kwargs)
        return
    step = max(1, (total or 0) // 10)
    for i, item in enumerate(items, 1):
        yield item
        if total and (i % step == 0 or i == total):
            log.info("%s: %d/%d", desc, i, total)


@contextlib.contextmanager
def timed_step(what: str, logger: logging.Logger | None = None) -> Iterator[dict[str, float]]:
    """Log start and finish with the duration; yields a dict that receives ``seconds``."""
    logger = logger or log
    logger.info("%s ...", what)
    t0, info = time.perf_counter(), {}
    yield info
    info["seconds"] = time.perf_counter() - t0
    logger.info("%s done in %.1f s", what, info["seconds"])
