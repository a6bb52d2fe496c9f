"""Procedural data for training and evaluating the tiny shipped models."""
