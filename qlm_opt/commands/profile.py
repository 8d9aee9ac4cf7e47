"""``qlm-opt profile``: measure a live engine and write a calibration file for the simulator
and the RWT estimator (see ``qlm_opt/engines/calibration.py``)."""

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
        workload_requests: Annotated[int, typer.Option(
            help="Requests of the workload phase (Poisson arrivals), 0 to skip; it fits the "
                 "per-request overhead's distribution, so more is steadier.")] = 100,
        workload_rate: Annotated[float, typer.Option(
            help="Arrivals per second of the workload phase.")] = 4.0,
        max_num_seqs: Annotated[int | None, typer.Option(
            help="Engine max_num_seqs (default: the largest batch size).")] = None,
        swap: Annotated[bool, typer.Option(help="Measure a swap (engine restart).")] = True,
        max_model_len: Annotated[int, typer.Option()] = 512,
        kv_cache_mib: Annotated[int, typer.Option(help="KV cache size (MiB).")] = 64,
        dtype: Annotated[str, typer.Option()] = "float32",
    ) -> None:
        """Measure engine step times (idle probes, batches at each size, a Poisson workload)
        and swap time on a live vLLM; fit the simulator's iteration model to the steps, the
        per-request overhead and a load factor to the workload, and write the calibration.
        Profile with the engine settings (max_num_seqs) and request shapes of the workload
        you will simulate, on a machine as loaded as it will be."""
        import asyncio

        from qlm_opt.engines.calibration import Calibration
        from qlm_opt.profiling.tinymodel import read_model_name

        if engine != "vllm_local":
            raise typer.BadParameter("only --engine vllm_local is supported", param_hint="--engine")
        if not model.is_dir():
            raise typer.BadParameter(f"{model}: not a folder", param_hint="--model")
        bsz, plens = _ints(batch_sizes), _ints(prompt_lens)
        mname = name or read_model_name(model)
        cal, raw = asyncio.run(_run(model, mname, bsz, plens, decode_tokens, repeats, swap,
                                    max_model_len, kv_cache_mib, dtype, workload_requests,
                                    workload_rate, max_num_seqs or max(bsz)))
        new = Calibration(device, {mname: cal})
        if out.is_file():
            old = Calibration.load(out)
            if old.device == device:
                new = old.merged(new)
        new.save(out, measurements={mname: raw})
        typer.echo(
            f"{mname} on {device}: overhead {cal.overhead_s * 1e3:.2f} ms, "
            f"s_seq {(cal.s_seq or 0) * 1e3:.3f} ms/sequence, "
            f"c_tok {cal.c_tok * 1e6:.2f} us/token, m0 {cal.m0 * 1e3:.2f} ms, "
            f"m_kv {cal.m_kv * 1e9:.2f} ns/token, request overhead "
            f"{(cal.request_overhead_s or 0) * 1e3:.2f} ms{_spread(cal)}, "
            f"swap {cal.swap_s or 0:.1f} s, "
            f"step fit error {cal.fit_rel_err:.1%}, load factor {raw.get('load_factor', 1.0):.2f}"
        )
        typer.echo(f"wrote {out}")


def _spread(cal) -> str:
    q = cal.request_overhead_q
    if not q:
        return ""
    n = len(q) - 1
    p10, p90 = q[round(0.1 * n)], q[round(0.9 * n)]
    return f" ({p10 * 1e3:+.2f} .. {p90 * 1e3:+.2f} ms at p10 .. p90)"


async def _run(model: Path, name: str, bsz, plens, decode_tokens, repeats, swap,
               max_model_len, kv_cache_mib, dtype, workload_requests=100, workload_rate=4.0,
               max_num_seqs=None):
    from qlm_opt.profiling.profiler import profile_engine
    from qlm_opt.engines.vllm_local import VllmEngineConfig, VllmLocalEngine

    # per-step scheduler details for the step fit (the engine silences vLLM's line per step)
    cfg = VllmEngineConfig(max_num_seqs=max_num_seqs or max(bsz), max_model_len=max_model_len,
                           kv_cache_memory_bytes=kv_cache_mib << 20, dtype=dtype,
                           ignore_eos=True,
                           extra={"enable_logging_iteration_details": True})
    eng = VllmLocalEngine(0, name, {name: str(model)}, cfg)
    await eng.start()
    try:
        return await profile_engine(eng, name, plens, bsz, decode_tokens, repeats=repeats,
                                    measure_swap=swap, progress=lambda m: typer.echo(m),
                                    workload_requests=workload_requests,
                                    workload_rate=workload_rate)
    finally:
        await eng.shutdown()
