"""The application layer: the orchestration the commands share, reports and their rendering, and every CLI."""
