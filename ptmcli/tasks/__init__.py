"""Fine-tuning tasks, picked by `task.kind`. Each encodes records into features, computes the loss sums and
summable statistics of a batch (like an objective), turns totals into metrics, and predicts."""

from ptmcli.tasks.classification import Classification
from ptmcli.tasks.spans import ExtractiveQA
from ptmcli.tasks.tokens import TokenClassification

TASKS = {"text-cls": Classification, "pair-cls": Classification, "token-cls": TokenClassification, "qa": ExtractiveQA}
