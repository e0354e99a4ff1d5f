"""Tool parsers: model output → OpenAI ``tool_calls``, one module per output format, registered by name."""

from pagoda.entrypoints.openai.tool_parsers.abstract_tool_parser import (ExtractedToolCallInformation, ToolParser,
                                                                         ToolParserManager)
from pagoda.entrypoints.openai.tool_parsers.hermes_tool_parser import Hermes2ProToolParser
from pagoda.entrypoints.openai.tool_parsers.llama_tool_parser import Llama3JsonToolParser

__all__ = ["ExtractedToolCallInformation", "Hermes2ProToolParser", "Llama3JsonToolParser", "ToolParser",
           "ToolParserManager"]
