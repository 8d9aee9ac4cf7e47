"""``qlm-opt serve``: the OpenAI-compatible HTTP endpoint over the configured fleet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command()(serve)


def serve(
    config: Annotated[
        Path | None, typer.Option(help="Server config TOML (default: built-in server.toml).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Override server.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Override server.port.")] = None,
    policy: Annotated[str | None, typer.Option(help="Override backend.policy.")] = None,
) -> None:
    """Serve /v1/completions and /v1/chat/completions through the global queue."""
    import uvicorn

    from qlm_opt.errors import QLMError
    from qlm_opt.policies import make_policy
    from qlm_opt.server.app import create_app
    from qlm_opt.server.settings import load_settings

    try:
        settings = load_settings(config)
        if host is not None:
            settings.server.host = host
        if port is not None:
            settings.server.port = port
        if policy is not None:
            settings.backend.policy = policy
        # the policy and its options, checked before the server starts (a bad one is a
        # one-line error here, not a traceback at the app's startup)
        make_policy(settings.backend.policy, **settings.backend.policy_options)
        app = create_app(settings)
    except QLMError as e:
        typer.echo(f"qlm-opt: error: {e}", err=True)
        raise typer.Exit(2) from None
    s = settings.server
    key = next((k.key for k in settings.auth.keys if k.key), None) or "$QLM_API_KEY"
    model = app.state.gateway.backend.models()[0] if app.state.gateway.backend.models() else "MODEL"
    typer.echo(
        f"qlm-opt: serving on http://{s.host}:{s.port} ({settings.backend.kind} backend, "
        f"policy {settings.backend.policy}). Try:\n"
        f"  curl -s http://{s.host}:{s.port}/v1/chat/completions "
        f"-H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' "
        f"-d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": "
        f"\"Hello\"}}], \"max_tokens\": 16}}'",
        err=True,
    )
    uvicorn.run(app, host=s.host, port=s.port, log_level=s.log_level, access_log=s.access_log)
