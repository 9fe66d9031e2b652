"""Data: preprocessing, datasets and synthetic text."""
