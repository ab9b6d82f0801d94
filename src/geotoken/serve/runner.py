"""The model thread of `geotoken serve`: a queue in front of one predictor, admission on a wait budget.

A request is admitted while its expected wait in the queue fits `max_queue_wait_s`:

    expected wait = (what is left of the batch now running) + seconds_per_image x (images queued)

`seconds_per_image` is busy seconds per image over the recent images (`ServiceRate`). A batch that
runs longer than the estimate says counts, provisionally, as if it finished now, so a stalled or suddenly
slow model fills the budget too (before the first batch has finished, that is the only measurement).
Refused requests get `Busy` with `retry_after_s`: the seconds until the expected wait would fit again if
nothing else came, rounded up (at least 1). Requests that wait together with the same options are
predicted as one batch of up to `max_batch` images (micro-batching). Decoded photos wait in memory, so
their pixels are bounded too (`max_queued_pixels`: beyond it, `Busy`; one photo is always admitted into
an empty queue). `close()` refuses new requests and returns once every admitted one has been answered.

The clock and the service-rate estimate are injectable, so tests decide the numbers instead of timing
real work.
"""

import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from PIL import Image

from geotoken.errors import GeoTokenError


class Predictor(Protocol):
    """What the server needs: `geotoken.predict.Geolocator`, or anything with the same two methods."""

    def predict(
        self, images: list, top_k: int = 5, strategy: str | None = None, select: str | None = None
    ): ...

    def info(self) -> dict: ...


class Busy(Exception):
    """A request is refused; `retry_after_s` (integer seconds, >= 1) says when to try again."""

    def __init__(self, message: str, retry_after_s: int = 1, expected_wait_s: float = math.inf):
        super().__init__(message)
        self.message, self.retry_after_s, self.expected_wait_s = message, retry_after_s, expected_wait_s

    @classmethod
    def over_budget(cls, expected_wait_s: float, budget_s: float) -> "Busy":
        """Retry after the seconds until the expected wait would fit if nothing else came, rounded up."""
        retry = max(1, math.ceil(expected_wait_s - budget_s))
        message = (
            f"busy: the expected wait is {expected_wait_s:.1f} s, over the {budget_s:g} s budget; "
            f"retry after {retry} s"
        )
        return cls(message, retry, expected_wait_s)


class ShuttingDown(Busy):
    """The server is stopping: it answers what it admitted and takes nothing new."""

    def __init__(self):
        super().__init__("the server is shutting down; retry shortly", 1)


class ServiceRate:
    """Seconds per image of recent work: busy seconds / images served, over roughly the last `window` images.

    Each batch adds its seconds and its images; what came before decays by (1 - 1 / window) per image
    added. A slow batch weighs by its share of the work, so a single slow call (lazy initialisation, a
    burst of load from another process) moves the estimate little, and a sustained change takes over
    within about `window` images. `value` is None until something was measured; `initial` counts as one
    image measured at that many seconds. `frozen` keeps `value` at `initial` for good (tests).
    """

    def __init__(self, initial: float | None = None, window: float = 64.0, frozen: bool = False):
        if not window >= 1:
            raise GeoTokenError(f"ServiceRate window must be >= 1 image, got {window}")
        if initial is not None and initial < 0:
            raise GeoTokenError(f"ServiceRate initial must be >= 0, got {initial}")
        self.window, self.frozen = window, frozen
        self._seconds, self._images = (initial, 1.0) if initial is not None else (0.0, 0.0)

    @property
    def value(self) -> float | None:
        return self._seconds / self._images if self._images else None

    def observe(self, seconds: float, images: int) -> None:
        if not self.frozen:
            self._seconds, self._images = self._after(seconds, images)

    def peek(self, seconds: float, images: int) -> float:
        """What `value` would become if a batch of `images` took `seconds` (nothing is changed)."""
        if self.frozen:
            return self.value or 0.0
        total, count = self._after(seconds, images)
        return total / count

    def _after(self, seconds: float, images: int) -> tuple[float, float]:
        keep = (1 - 1 / self.window) ** images
        return self._seconds * keep + max(seconds, 0.0), self._images * keep + images


def warm_up(predictor: Predictor, calls: int = 5) -> ServiceRate:
    """Predictions of a blank photo before a server listens: the first pays lazy initialisation (not the
    first client), and the fastest of the others is the first estimate of the service rate admission works
    from (the second call alone still ran several times slower than the steady rate: a tight wait budget
    then refused nearly every request of the first bursts)."""
    warm = [Image.new("RGB", (64, 64))]
    predictor.predict(warm, top_k=1)
    seconds = []
    for _ in range(max(1, calls - 1)):
        t0 = time.perf_counter()
        predictor.predict(warm, top_k=1)
        seconds.append(time.perf_counter() - t0)
    return ServiceRate(initial=min(seconds))


_STOP = object()


class Runner:
    """One model thread fed by a queue; admission on the expected queue wait (see the module doc)."""

    def __init__(
        self,
        predictor: Predictor,
        max_queue_wait_s: float = 10.0,
        max_batch: int = 8,
        *,
        max_queued_pixels: float = math.inf,
        rate: ServiceRate | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.predictor, self.max_queue_wait_s, self.max_batch = predictor, max_queue_wait_s, max_batch
        self.max_queued_pixels = max_queued_pixels
        self.queued_pixels = 0  # of the decoded images waiting: memory, bounded by max_queued_pixels
        self.rate, self.clock = rate or ServiceRate(), clock
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.queued = 0  # images admitted and not yet handed to the predictor
        self.running = 0  # images in the predict call now running
        self._started = 0.0  # clock() when it started
        self.served = self.rejected = self.batches = 0
        self.closing = False
        self._thread: threading.Thread | None = None
        self.start()

    @property
    def alive(self) -> bool:
        """Whether the model thread runs (False once `close` has answered everything)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def in_flight(self) -> int:
        """Admitted requests not answered yet (queued + running)."""
        return self.queued + self.running

    @property
    def seconds_per_image(self) -> float:
        """The service-rate estimate admission uses now (0 before anything was measured)."""
        with self._lock:
            return self._seconds_per_image(self.clock())

    def expected_wait_s(self) -> float:
        """How long a request admitted now would wait before its batch starts."""
        with self._lock:
            return self._expected_wait(self.clock())

    def _seconds_per_image(self, now: float) -> float:
        per_image = self.rate.value or 0.0
        elapsed = now - self._started
        if self.running and elapsed > per_image * self.running:
            # running longer than the estimate says: counted as if it finished now (provisionally)
            per_image = self.rate.peek(elapsed, self.running)
        return per_image

    def _expected_wait(self, now: float) -> float:
        per_image = self._seconds_per_image(now)
        rest_of_running = max(0.0, per_image * self.running - (now - self._started)) if self.running else 0.0
        return rest_of_running + per_image * self.queued

    def check(self) -> None:
        """Raise `Busy` / `ShuttingDown` if a request arriving now would be refused (admits nothing)."""
        with self._lock:
            self._check(self.clock())

    def _check(self, now: float) -> None:
        if self.closing:
            raise ShuttingDown()
        wait = self._expected_wait(now)
        if wait > self.max_queue_wait_s:
            self.rejected += 1
            raise Busy.over_budget(wait, self.max_queue_wait_s)

    def submit(self, image, **options) -> Future:
        """Admit one image -> Future of (Prediction, ms waited in the queue, batch size); else `Busy`."""
        future: Future = Future()
        pixels = getattr(image, "width", 0) * getattr(image, "height", 0)
        with self._lock:  # check, count and enqueue at once: concurrent arrivals see each other
            now = self.clock()
            self._check(now)
            if self.queued and self.queued_pixels + pixels > self.max_queued_pixels:
                self.rejected += 1
                retry = max(1, math.ceil(self._expected_wait(now)))
                raise Busy(
                    f"busy: {self.queued_pixels / 1e6:.0f} MP of photos are waiting, the limit is "
                    f"{self.max_queued_pixels / 1e6:g} MP; retry after {retry} s",
                    retry,
                )
            self.queued += 1
            self.queued_pixels += pixels
            self._queue.put((image, options, future, now, pixels))
        return future

    def run(self, image, **options) -> tuple[Any, float, int]:
        """`submit` and wait (for callers without an event loop)."""
        return self.submit(image, **options).result()

    def start(self) -> None:
        """Start the model thread (again, after `close`: an app may go through several lifespans)."""
        with self._lock:
            old = self._thread
            if old is not None and old.is_alive() and not self.closing:
                return
        if old is not None:
            old.join()  # a close in progress answers what it admitted first
        with self._lock:
            if self._thread is not old:  # another start() won
                return
            self.closing = False
            self._thread = threading.Thread(target=self._loop, name="geotoken-model", daemon=True)
            self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, answer every admitted one, stop the model thread."""
        with self._lock:
            if not self.closing:
                self.closing = True
                self._queue.put(_STOP)  # behind everything admitted
        self._thread.join(timeout)

    def _loop(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            if batch[0] is _STOP:
                return
            while len(batch) < self.max_batch:  # whatever else is already waiting
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            groups: dict[tuple, list] = {}
            for item in batch:
                groups.setdefault(tuple(sorted(item[1].items())), []).append(item)
            for options, items in groups.items():
                self._predict(dict(options), items)

    def _predict_one(self, options: dict, item: tuple, t0: float):
        try:
            (pred,) = self.predictor.predict([item[0]], **options)
            return pred, 1e3 * (t0 - item[3]), 1
        except Exception as exc:  # noqa: BLE001  handed to the request's future
            return exc

    def _predict(self, options: dict, items: list) -> None:
        with self._lock:
            self.queued -= len(items)
            self.queued_pixels -= sum(it[4] for it in items)
            # a request cancelled while it waited (its client gone, a shutdown past its grace) is skipped;
            # the others cannot be cancelled from here on, so answering them cannot fail this thread
            items = [it for it in items if it[2].set_running_or_notify_cancel()]
            if not items:
                return
            self.running, self._started = len(items), self.clock()
            t0 = self._started
        try:
            preds = self.predictor.predict([it[0] for it in items], **options)
            results = [(p, 1e3 * (t0 - it[3]), len(items)) for p, it in zip(preds, items, strict=True)]
        except Exception as exc:
            # one bad photo must not fail the others of its batch: each alone, so each gets its own answer
            results = [exc] if len(items) == 1 else [self._predict_one(options, it, t0) for it in items]
        with self._lock:
            if not all(isinstance(r, Exception) for r in results):  # refusals say nothing about the speed
                self.rate.observe(self.clock() - t0, len(items))
            self.batches += 1
            self.served += sum(not isinstance(r, Exception) for r in results)
            self.running = 0
        for it, r in zip(items, results):
            if isinstance(r, Exception):
                it[2].set_exception(r)
            else:
                it[2].set_result(r)
