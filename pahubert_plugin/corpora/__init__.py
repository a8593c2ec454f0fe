"""Corpus generators beyond music: speech, machine recordings and their mixtures."""
