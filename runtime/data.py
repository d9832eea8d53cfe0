"""Ray Data: a dataset's rows through the runtime, in the manner of ``ray.data.llm.build_llm_processor``.

    from runtime.data import build_processor
    proc = build_processor(lambda row: {"model": "auto", "max_tokens": 256,
                                        "messages": [{"role": "user", "content": row["question"]}]},
                           postprocess=lambda row: {**row, "answer": row["response_text"]},
                           user_id="etl", tenant="acme")
    out = proc(ray.data.read_parquet("questions/"))   # a Dataset: the input columns + the answer's

Output rows keep their input columns and add ``response_text``, ``model``, ``cache``, ``cost_usd``,
``input_tokens``, ``output_tokens``, ``request_id`` and ``error_type`` (None when answered; a failed request is a
row with its error's type, never a failed job). ``postprocess(row)`` runs last.

Backpressure comes from the runtime's limiter, not from a queue: each of the ``concurrency`` workers (an actor
pool under ``map_batches``) holds one batch of ``batch_size`` rows and has at most ``max_in_flight`` of them
submitted at a time (``rt.map``), waiting while the limiter paces them. Ray Data's streaming executor stops
reading ahead when workers are busy, so a dataset of any size never has more than ``concurrency x
max_in_flight`` requests queued in the runtime's actors, and the driver's memory stays flat. Every request runs
the whole path (cache, limiter, router, fallback, ledger, budgets), as ``rt.submit`` does.
"""

from __future__ import annotations

from typing import Any, Callable

OUTPUT_COLUMNS = ("response_text", "model", "cache", "cost_usd", "input_tokens", "output_tokens", "request_id",
                  "error_type")


def _columns_of(rows: list[Any]) -> dict[str, list[Any]]:
    """The added columns for a list of ``Result``s or typed errors, in input order."""
    from runtime.result import Result

    cols: dict[str, list[Any]] = {c: [] for c in OUTPUT_COLUMNS}
    for r in rows:
        if isinstance(r, Result):
            u = r.message.usage
            vals = (r.text, r.model, r.cache, float(r.cost_usd), int(u.input_tokens), int(u.output_tokens),
                    r.request_id, None)
        else:
            vals = (None, None, None, None, None, None, getattr(r, "request_id", None), type(r).__name__)
        for c, v in zip(OUTPUT_COLUMNS, vals):
            cols[c].append(v)
    return cols


class _RuntimeWorker:
    """One actor of the pool: attaches to the runtime once, then answers batches of rows."""

    def __init__(self, preprocess: Callable[[dict], dict], options: dict[str, Any], max_in_flight: int,
                 runtime_name: str) -> None:
        import runtime

        self.rt = runtime.connect(runtime_name)
        self.preprocess = preprocess
        self.options = options
        self.max_in_flight = max_in_flight

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows = batch.to_pylist()
        answers = list(self.rt.map((self.preprocess(row) for row in rows), max_in_flight=self.max_in_flight,
                                   progress=False, **self.options))
        cols = _columns_of(answers)
        types = {"response_text": pa.string(), "model": pa.string(), "cache": pa.string(),
                 "cost_usd": pa.float64(), "input_tokens": pa.int64(), "output_tokens": pa.int64(),
                 "request_id": pa.string(), "error_type": pa.string()}
        keep = [c for c in batch.column_names if c not in OUTPUT_COLUMNS]
        out = batch.select(keep)
        for c in OUTPUT_COLUMNS:
            out = out.append_column(pa.field(c, types[c]), pa.array(cols[c], type=types[c]))
        return out


def build_processor(preprocess: Callable[[dict], dict], postprocess: Callable[[dict], dict] | None = None, *,
                    user_id: str | None = None, tenant: str | None = None, priority: str = "bulk",
                    cache: bool = True, deadline_s: float | None = None, concurrency: int | tuple[int, int] = 1,
                    batch_size: int = 64, max_in_flight: int = 32, runtime_name: str = "default",
                    num_cpus: float = 0.25, **ray_remote_args: Any) -> Callable[[Any], Any]:
    """``proc = build_processor(preprocess, ...)``; ``proc(ds)`` is a Dataset of answered rows (module doc).

    ``preprocess(row)`` returns a request dict (as ``rt.submit`` takes); ``user_id`` / ``tenant`` /
    ``priority`` / ``cache`` / ``deadline_s`` apply to every request. ``concurrency`` workers (an int, or a
    (min, max) autoscaling range) each take ``batch_size`` rows at a time with up to ``max_in_flight`` requests
    outstanding; they are I/O bound, hence ``num_cpus=0.25`` each. Other keyword arguments (``resources``,
    ``scheduling_strategy``, ...) go to the workers as Ray remote arguments."""
    from runtime.settings import PRIORITIES

    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}, not {priority!r}")
    if max_in_flight < 1 or batch_size < 1:
        raise ValueError("max_in_flight and batch_size must be >= 1")
    options = {"user_id": user_id, "tenant": tenant, "priority": priority, "cache": cache, "deadline_s": deadline_s}

    def proc(ds: Any) -> Any:
        out = ds.map_batches(_RuntimeWorker, batch_format="pyarrow", batch_size=batch_size,
                             concurrency=concurrency, num_cpus=num_cpus,
                             fn_constructor_kwargs={"preprocess": preprocess, "options": options,
                                                    "max_in_flight": max_in_flight, "runtime_name": runtime_name},
                             **ray_remote_args)
        return out.map(postprocess) if postprocess is not None else out

    return proc
