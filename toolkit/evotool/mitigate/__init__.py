"""Hallucination mitigation: decoding methods (``methods``) and tuned / trained run directories (``run``)."""

from evotool.mitigate.methods import METHODS, Method, build_method, make_config
from evotool.mitigate.run import TRAINED, MethodSpec, MitigateConfig, method_for, resolve_spec, run_mitigate

__all__ = ["METHODS", "TRAINED", "Method", "MethodSpec", "MitigateConfig", "build_method", "make_config", "method_for",
           "resolve_spec", "run_mitigate"]
