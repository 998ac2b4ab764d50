"""Scores, keep plan (pure), the timm rewrite, and model loading."""
