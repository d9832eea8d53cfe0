"""The `claude-runtime` command: fake-api, demo, report, status."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="claude-runtime: the Claude API at production scale on Ray.")


@app.command("fake-api")
def fake_api(
    host: str = typer.Option("127.0.0.1", help="address to bind"),
    port: int = typer.Option(8080, help="port to listen on"),
    rpm: Optional[int] = typer.Option(None, help="requests/min per model class (default: the settings' limits)"),
    itpm: Optional[int] = typer.Option(None, help="input tokens/min per model class"),
    otpm: Optional[int] = typer.Option(None, help="output tokens/min per model class"),
    p529: float = typer.Option(0.0, help="probability of a 529 overloaded_error"),
    p500: float = typer.Option(0.0, help="probability of a 500 api_error"),
    latency_ms: float = typer.Option(0.0, "--latency-ms", help="added latency per request"),
    output_tokens_per_s: Optional[float] = typer.Option(
        None, "--output-tokens-per-s", min=0.001,
        help="generation speed: a response of N output tokens takes N/rate s, streams spread over it "
             "(default: instant)"),
    seed: int = typer.Option(0, help="seed for fault injection and reply text"),
    billing: Optional[Path] = typer.Option(None, help="append one JSON line per billed response here"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="FAKE_API_KEY",
                                          help="require this key (default: any non-empty key)"),
) -> None:
    """Serve the local Anthropic-compatible API (same JSON, SSE, limits, 429/529 and headers as the real one)."""
    from runtime.fake_api import FakeApiConfig, serve
    from runtime.settings import Settings

    cfg = FakeApiConfig.from_settings(Settings(), p529=p529, p500=p500, latency_ms=latency_ms, seed=seed,
                                      billing_path=billing, api_key=api_key,
                                      output_tokens_per_s=output_tokens_per_s)
    if rpm is not None or itpm is not None or otpm is not None:
        cfg = cfg.with_uniform_limits(rpm or 10**9, itpm or 10**12, otpm or 10**12)
    typer.echo(f"fake Anthropic API on http://{host}:{port} (ANTHROPIC_BASE_URL=http://{host}:{port})")
    serve(cfg, host=host, port=port)


@app.command()
def demo(requests: int = typer.Option(120, help="how many requests to send"),
         data_dir: Optional[Path] = typer.Option(None, help="where the ledger and cache go (default: temp)")) -> None:
    """Run a short mixed load through the runtime on a local Ray and print a summary table."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from runtime.demo import main

    main(requests, str(data_dir) if data_dir else None)


@app.command()
def report(since: str = typer.Option("7d", help="span to report, e.g. 24h, 7d, 4w"),
           ledger: Optional[Path] = typer.Option(None, help="ledger file (default: from settings)"),
           png: Path = typer.Option(Path("cost_report.png"), help="where to write the plot")) -> None:
    """Spend by day and model, what the cache saved, and prompt-cache reads, writes and savings: a table and
    a PNG."""
    from runtime.client import _since_ts
    from runtime.report import main as report_main
    from runtime.settings import Settings
    import time

    settings = Settings()
    path = ledger or settings.ledger_path
    if not path.exists():
        typer.echo(f"no ledger at {path}", err=True)
        raise typer.Exit(1)
    # the settings price the prompt-cache savings (the rows carry token counts)
    report_main(path, time.time() - _since_ts(since), png, settings=settings)


@app.command()
def reconcile(billing: Optional[Path] = typer.Option(None, help="a billing log (the local API's) to settle against"),
              admin_key: Optional[str] = typer.Option(None, "--admin-key", envvar="ANTHROPIC_ADMIN_KEY",
                                                      help="an Admin API key: settle against the usage report"),
              min_age_s: float = typer.Option(60.0, help="leave placeholders younger than this (their call may "
                                                          "still be running)")) -> None:
    """Settle the ledger's unreconciled rows (calls whose answer was lost) against what the API billed."""
    import json

    import runtime

    rt = runtime.connect()
    out = rt.reconcile(billing=billing, admin_key=admin_key, min_age_s=min_age_s)
    typer.echo(json.dumps(out, indent=2))


@app.command()
def status(name: str = typer.Option("default", help="the runtime's name (runtime.start(name=...))"),
           as_json: bool = typer.Option(False, "--json", help="print the raw state as JSON")) -> None:
    """Attach to a running runtime (RAY_ADDRESS or auto) and print its live state: callers and requests in
    flight, rate-limit buckets, budgets, cache size, leases."""
    import json

    import runtime
    from runtime.status import render

    rt = runtime.connect(name)
    state = rt.status()
    typer.echo(json.dumps(state, indent=2, default=str) if as_json else render(state))


if __name__ == "__main__":
    app()
