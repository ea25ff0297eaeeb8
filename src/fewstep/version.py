"""The package version, in a module of its own so that any module can read it without importing
the `fewstep` package it lives in."""

__version__ = "0.1.0"
