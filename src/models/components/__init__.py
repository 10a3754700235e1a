"""Pieces shared by the model families."""
