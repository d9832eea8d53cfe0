"""The `claude-runtime` command: fake-api, demo, report, status, reconcile, serve, keys."""

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


keys_app = typer.Typer(no_args_is_help=True, help="API keys of the HTTP front door (stored hashed under data_dir).")
app.add_typer(keys_app, name="keys")


def _key_store(data_dir: Optional[Path]):
    from runtime.keys import KeyStore
    from runtime.settings import Settings

    return KeyStore.in_dir(Settings(data_dir=data_dir).data_dir if data_dir else Settings().data_dir)


_DATA_DIR = typer.Option(None, "--data-dir", help="the runtime's data_dir (default: from settings)")


@keys_app.command("create")
def keys_create(user: str = typer.Option(..., help="the user every request of this key runs as"),
                tenant: Optional[str] = typer.Option(None, help="the tenant (cache scope, budgets, caps)"),
                budget_usd: Optional[float] = typer.Option(None, "--budget-usd", help="this key's daily budget"),
                rpm: Optional[int] = typer.Option(None, help="this key's requests per minute"),
                label: Optional[str] = typer.Option(None, help="a note for `keys list`"),
                data_dir: Optional[Path] = _DATA_DIR) -> None:
    """Create a key; it is printed once, as the last word of the output, and stored only as a hash."""
    store = _key_store(data_dir)
    key, entry = store.create(user, tenant, budget_usd=budget_usd, rpm=rpm, label=label)
    typer.echo(f"created key {entry.key_id} for user {user}"
               + (f" (tenant {tenant})" if tenant else "") + f"; it is shown only now: {key}")


@keys_app.command("list")
def keys_list(all_keys: bool = typer.Option(False, "--all", help="include revoked keys"),
              data_dir: Optional[Path] = _DATA_DIR) -> None:
    """The keys (ids, users, limits; never the keys themselves)."""
    import json

    for e in _key_store(data_dir).list(include_revoked=all_keys):
        typer.echo(json.dumps(e.public()))


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="the key id (or the key)"),
                data_dir: Optional[Path] = _DATA_DIR) -> None:
    """Revoke a key: its next request gets 401."""
    if not _key_store(data_dir).revoke(key_id):
        typer.echo(f"no active key {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


@app.command()
def serve(host: str = typer.Option("127.0.0.1", help="address to bind"),
          port: int = typer.Option(8000, help="port to listen on"),
          name: str = typer.Option("default", help="the runtime to serve (runtime.start(name=...))"),
          replicas: int = typer.Option(1, min=1, help="front-door replicas (a key's rpm is split among them)"),
          access_log: bool = typer.Option(False, "--access-log", help="log every request"),
          address: Optional[str] = typer.Option(
              None, help="Ray cluster to join ('local' starts one here; default: RAY_ADDRESS, else a running "
                         "cluster, else a new local one)")) -> None:
    """Serve the Anthropic-compatible HTTP front door (POST /v1/messages, /v1/messages/count_tokens) on Ray
    Serve. Attaches to a running runtime, or starts one from the settings (env / CLAUDE_RUNTIME_CONFIG)."""
    import ray

    import runtime
    from actors.serve import run_front_door
    from runtime.errors import ConfigurationError

    if address is not None:
        ray.init(address=address)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        try:
            ray.init(address="auto")
        except ConnectionError:
            ray.init()
    try:
        runtime.connect(name)
    except ConfigurationError:
        runtime.start(runtime.Settings(), name=name)
    url = run_front_door(host=host, port=port, runtime_name=name, replicas=replicas, access_log=access_log)
    typer.echo(f"claude-runtime front door on {url} (ANTHROPIC_BASE_URL={url}; keys: claude-runtime keys create)")
    import signal
    import time

    # serve until told to stop (Ctrl-C or SIGTERM), then take the front door down cleanly
    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve as ray_serve

        ray_serve.shutdown()


if __name__ == "__main__":
    app()
