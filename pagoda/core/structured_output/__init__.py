"""Structured outputs: constraining generation to a JSON schema, regex, choice, grammar or structural tag with
xgrammar (see ``docs/architecture.md``)."""

from pagoda.core.structured_output.config import StructuredOutputsConfig, check_backend
from pagoda.core.structured_output.grammar_spec import GrammarSpec, grammar_spec, parse_grammar
from pagoda.core.structured_output.manager import StructuredOutputManager

__all__ = ["GrammarSpec", "StructuredOutputManager", "StructuredOutputsConfig", "check_backend", "grammar_spec",
           "parse_grammar"]
