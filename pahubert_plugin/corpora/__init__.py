"""Corpus generators in the MUSDB18-HQ layout: toy and sampled-instrument music (``pahubert-toy-corpus``,
``pahubert-midi-corpus``) and speech in machine noise (``pahubert-speech-corpus``)."""
