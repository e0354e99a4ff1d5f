"""The tool-parser interface and the registry of parsers by name (vLLM's ``ToolParser`` / ``ToolParserManager``).

A parser turns a model's raw output into OpenAI's ``tool_calls`` and the content around them: all at once
(``extract_tool_calls``) or while the output streams in (``extract_tool_calls_streaming``, one call per engine
delta, returning the ``DeltaMessage`` to send or ``None``). The server makes one parser per choice of a
request, so a parser may keep its streaming state in ``self``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pagoda.entrypoints.openai.protocol import DeltaMessage, DeltaToolCall, ToolCall
from pagoda.logger import init_logger

logger = init_logger(__name__)


@dataclass
class ExtractedToolCallInformation:
    tools_called: bool
    tool_calls: list[ToolCall] = field(default_factory=list)
    content: str | None = None


class ToolParser:
    """Base of the tool parsers; subclasses register with ``@ToolParserManager.register_module("name")``."""

    def __init__(self, tokenizer: Any):
        self.model_tokenizer = tokenizer

    def adjust_request(self, request: Any) -> Any:
        """Change the request before it is sampled (e.g. keep the special tokens the parser looks for)."""
        return request

    def extract_tool_calls(self, model_output: str, request: Any) -> ExtractedToolCallInformation:
        raise NotImplementedError

    def extract_tool_calls_streaming(self, previous_text: str, current_text: str, delta_text: str,
                                     previous_token_ids: Sequence[int], current_token_ids: Sequence[int],
                                     delta_token_ids: Sequence[int], request: Any) -> DeltaMessage | None:
        raise NotImplementedError

    def finish_streaming(self, current_text: str, request: Any) -> DeltaMessage | None:
        """What the stream still owes once the output has ended (text held back in case it began a tool call);
        parsers that hold nothing back keep this default."""
        return None


def delta_message(content: str = "", tool_calls: list[DeltaToolCall] | None = None) -> DeltaMessage | None:
    """A delta with what there is to send, or ``None`` when there is nothing."""
    if not content and not tool_calls:
        return None
    return DeltaMessage(content=content or None, tool_calls=tool_calls or None)


class ToolParserManager:
    """Tool parsers by name: pagoda's own, plus those a ``--tool-parser-plugin`` file registers."""

    tool_parsers: dict[str, type[ToolParser]] = {}

    @classmethod
    def register_module(cls, name: str | list[str] | None = None, force: bool = True,
                        module: type[ToolParser] | None = None) -> Any:
        """Register ``module`` under ``name`` (default: its class name); used bare as a class decorator."""
        def register(parser: type[ToolParser]) -> type[ToolParser]:
            names = [name] if isinstance(name, str) else list(name or [parser.__name__])
            for each in names:
                if not force and each in cls.tool_parsers:
                    raise KeyError(f"a tool parser named {each!r} is already registered")
                cls.tool_parsers[each] = parser
            return parser

        if module is not None:
            return register(module)
        return register

    @classmethod
    def get_tool_parser(cls, name: str) -> type[ToolParser]:
        if name not in cls.tool_parsers:
            raise KeyError(f"--tool-call-parser: unknown tool parser {name!r}; registered parsers: "
                           f"{', '.join(sorted(cls.tool_parsers))}")
        return cls.tool_parsers[name]

    @classmethod
    def import_tool_parser(cls, plugin_path: str) -> None:
        """Run a Python file that registers parsers (``--tool-parser-plugin``)."""
        if not os.path.isfile(plugin_path):
            raise FileNotFoundError(f"--tool-parser-plugin: no such file: {plugin_path}")
        module_name = "pagoda_tool_parser_plugin_" + os.path.splitext(os.path.basename(plugin_path))[0]
        spec = importlib.util.spec_from_file_location(module_name, plugin_path)
        if spec is None or spec.loader is None:
            raise ValueError(f"--tool-parser-plugin: can't import {plugin_path} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        logger.info("loaded tool parser plugin %s; registered parsers: %s", plugin_path,
                    ", ".join(sorted(cls.tool_parsers)))

