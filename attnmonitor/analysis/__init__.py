"""Analyses of the example each publication keeps (the batch row with the most distinct tokens): head
roles, attention flow, similarity, token classes and the interpretation table. Computation only; publishing is in
:mod:`attnmonitor.tensorboard`."""

from attnmonitor.analysis.example import ExampleAnalysis, analyse_example, interpretation_table, role_changes

__all__ = ["ExampleAnalysis", "analyse_example", "interpretation_table", "role_changes"]
