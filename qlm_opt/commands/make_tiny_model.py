"""``qlm-opt make-tiny-model DIR --seed N``: a tiny random Llama + local tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("make-tiny-model")
    def make_tiny_model(
        out_dir: Annotated[Path, typer.Argument(help="Folder to write the model into.")],
        seed: Annotated[int, typer.Option(help="Seed: weights and tokenizer corpus.")] = 0,
        name: Annotated[
            str | None, typer.Option(help="Catalog name (default tiny-llama-s<seed>).")
        ] = None,
    ) -> None:
        """Build a tiny random-weights Llama and a locally trained tokenizer (no downloads).
        Writes qlm_model.toml (the catalog entry) next to the Hugging Face files."""
        from qlm_opt.profiling.tinymodel import build_tiny_model, read_model_name

        out = build_tiny_model(out_dir, seed=seed, name=name)
        typer.echo(f"wrote {read_model_name(out)} to {out}")
