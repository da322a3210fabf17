"""The ``ggda`` command line (Typer)."""
