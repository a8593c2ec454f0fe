"""Corpus generators: synthetic multi-stem corpora in the MUSDB18-HQ layout (``pahubert-toy-corpus``, ``pahubert-midi-corpus``)."""
