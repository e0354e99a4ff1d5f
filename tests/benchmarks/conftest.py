"""The benchmark tests reuse the server tests' tiny chat model (SmolLM2 tokenizer, 2 layers) and server process."""

from tests.entrypoints.openai.conftest import tiny_chat_model_dir  # noqa: F401  (a fixture)
