"""Test and offline tools for the pipeline; never imported by a stage."""
