"""``qlm-opt profile``: measure a live engine and write a calibration file for the simulator
and the RWT estimator (see ``qlm_opt/calibration.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _ints(s: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {s!r}") from None
    if not vals or min(vals) <= 0:
        raise typer.BadParameter("expected positive integers")
    return vals


def register(app: typer.Typer) -> None:
    @app.command("profile")
    def profile(
        model: Annotated[Path, typer.Option(help="Model folder (Hugging Face format).")],
        engine: Annotated[str, typer.Option(help="vllm_local (in-process AsyncLLM).")] = (
            "vllm_local"),
        name: Annotated[
            str | None, typer.Option(help="Catalog model name (default: qlm_model.toml's).")
        ] = None,
        device: Annotated[str, typer.Option(help="Device name (a GPU type, or 'cpu').")] = "cpu",
        out: Annotated[Path, typer.Option(help="Calibration TOML (merged if it exists).")] = (
            Path("calibration.toml")),
        batch_sizes: Annotated[str, typer.Option(help="Decode batch sizes.")] = "1,2,4,8,16",
        prompt_lens: Annotated[str, typer.Option(help="Prefill lengths.")] = "16,64,128,256,448",
        decode_tokens: Annotated[int, typer.Option(help="Tokens per decode probe.")] = 64,
        repeats: Annotated[int, typer.Option(help="Repeats per point.")] = 3,
        swap: Annotated[bool, typer.Option(help="Measure a swap (engine restart).")] = True,
        max_model_len: Annotated[int, typer.Option()] = 512,
        kv_cache_mib: Annotated[int, typer.Option(help="KV cache size (MiB).")] = 64,
        dtype: Annotated[str, typer.Option()] = "float32",
    ) -> None:
        """Measure prefill and decode iteration times against batch size, and swap time, on a
        live vLLM; fit the simulator's iteration model to them and write the calibration."""
        import asyncio

        from qlm_opt.calibration import Calibration
        from qlm_opt.tinymodel import read_model_name

        if engine != "vllm_local":
            raise typer.BadParameter("only --engine vllm_local is supported", param_hint="--engine")
        if not model.is_dir():
            raise typer.BadParameter(f"{model}: not a folder", param_hint="--model")
        bsz, plens = _ints(batch_sizes), _ints(prompt_lens)
        mname = name or read_model_name(model)
        cal, raw = asyncio.run(_run(model, mname, bsz, plens, decode_tokens, repeats, swap,
                                    max_model_len, kv_cache_mib, dtype))
        new = Calibration(device, {mname: cal})
        if out.is_file():
            old = Calibration.load(out)
            if old.device == device:
                new = old.merged(new)
        new.save(out, measurements={mname: raw})
        typer.echo(
            f"{mname} on {device}: overhead {cal.overhead_s * 1e3:.2f} ms, "
            f"c_tok {cal.c_tok * 1e6:.2f} us/token, m0 {cal.m0 * 1e3:.2f} ms, "
            f"m_kv {cal.m_kv * 1e9:.2f} ns/token, swap {cal.swap_s or 0:.1f} s, "
            f"fit error {cal.fit_rel_err:.1%}"
        )
        typer.echo(f"wrote {out}")


async def _run(model: Path, name: str, bsz, plens, decode_tokens, repeats, swap,
               max_model_len, kv_cache_mib, dtype):
    from qlm_opt.calibration import profile_engine
    from qlm_opt.engines.vllm_local import VllmEngineConfig, VllmLocalEngine

    cfg = VllmEngineConfig(max_num_seqs=max(bsz), max_model_len=max_model_len,
                           kv_cache_memory_bytes=kv_cache_mib << 20, dtype=dtype,
                           ignore_eos=True)
    eng = VllmLocalEngine(0, name, {name: str(model)}, cfg)
    await eng.start()
    try:
        return await profile_engine(eng, name, plens, bsz, decode_tokens, repeats=repeats,
                                    measure_swap=swap, progress=lambda m: typer.echo(m))
    finally:
        await eng.shutdown()
