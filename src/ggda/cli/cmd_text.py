"""``ggda text-train`` and ``ggda text-bench``: the transformer text classifier (issue #9).

Both parse their options and call :mod:`ggda.applications.text` (see there for what they do).
"""

from __future__ import annotations

from pathlib import Path

import typer

from ggda.cli.main import _threads, app


@app.command("text-train")
def text_train_cmd(
    out: Path = typer.Option(
        ..., help="Run directory to write (run.json, split.npz, model.pt), read by attribute/gold/evaluate."
    ),
    target: str = typer.Option("sentiment", help="sentiment (rating <=2 vs >=4), recommended or rating."),
    n: int = typer.Option(None, help="Use a seeded sample of this many reviews (default all)."),
    balanced: bool = typer.Option(False, help="Equal number of reviews per class."),
    mode: str = typer.Option("finetune", help="frozen (head on cached embeddings) or finetune."),
    train_layers: int = typer.Option(1, help="Last encoder layers fine-tuned (finetune mode)."),
    head: str = typer.Option("linear", help="linear or mlp."),
    max_len: int = typer.Option(128, help="Tokens per review (padding/truncation)."),
    lp_epochs: int = typer.Option(30),
    ft_epochs: int = typer.Option(3),
    ft_lr: float = typer.Option(1e-4),
    test_fraction: float = typer.Option(0.2),
    seed: int = typer.Option(0),
    model_path: Path = typer.Option(None, help="Model directory (default: the packaged MiniLM)."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    threads: int = typer.Option(None),
) -> None:
    """Train the MiniLM review classifier, report held-out accuracy and write a run directory."""
    _threads(threads)
    from ggda.applications.text import train_text_model
    from ggda.outputs import check_output_dir

    check_output_dir(out)

    options = {
        k: v
        for k, v in locals().items()
        if k not in ("out", "threads", "train_text_model", "check_output_dir")
    }
    metrics = train_text_model(out, **options, log=typer.echo)
    typer.echo(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    typer.echo(f"wrote the run directory {out}/ (next: ggda attribute --run {out} --method grad-dot)")


@app.command("text-bench")
def text_bench_cmd(
    out: Path = typer.Option(Path("runs/text-bench.json"), help="JSON file for every measured figure."),
    n: int = typer.Option(None, help="Reviews (balanced; default all 4,740 balanced negative+positive)."),
    max_len: int = typer.Option(128),
    train_layers: int = typer.Option(1),
    methods: str = typer.Option("grad-dot,tracin", help="Comma-separated registered methods."),
    fractions: str = typer.Option("0.05,0.1,0.2", help="Fractions of training points removed."),
    seeds: str = typer.Option("0,1,2", help="Retraining seeds."),
    group_sizes: str = typer.Option("100", help="Comma-separated target group sizes (K = n / size)."),
    ft_epochs: int = typer.Option(3),
    model_path: Path = typer.Option(None, help="Model directory (default: the packaged MiniLM)."),
    device: str = typer.Option("auto"),
    threads: int = typer.Option(None),
) -> None:
    """Per-point vs group attribution on the fine-tuned MiniLM: time ratio and retraining score."""
    _threads(threads)
    from ggda.applications.text import run_text_benchmark, write_json
    from ggda.outputs import check_output_file

    check_output_file(out)

    result = run_text_benchmark(
        n=n,
        max_len=max_len,
        train_layers=train_layers,
        methods=tuple(m for m in methods.split(",") if m),
        fractions=tuple(float(f) for f in fractions.split(",") if f),
        group_sizes=tuple(int(g) for g in group_sizes.split(",") if g),
        seeds=tuple(int(s) for s in seeds.split(",") if s),
        ft_epochs=ft_epochs,
        device=device,
        model_path=model_path,
        log=typer.echo,
        save=lambda r: write_json(out, r),
    )
    write_json(out, result)
    typer.echo(f"wrote {out}")
