"""Hallucination mitigation: the method interface (``base``), logits processors (``processors``), the
methods, one module each (``methods``), configs (``config``), tuned / trained run directories (``run``)
and the analyze -> mitigate -> eval pipeline (``pipeline``)."""
