"""HTML reports with plots (matplotlib, Agg backend)."""
