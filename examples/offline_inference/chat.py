# Chat completions offline: one conversation, then a batch of conversations, optionally with a custom template.
from pagoda import LLM, EngineArgs, SamplingParams
from pagoda.utils import FlexibleArgumentParser


def build_parser() -> FlexibleArgumentParser:
    parser = FlexibleArgumentParser()
    EngineArgs.add_cli_args(parser)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--chat-template-path", type=str, default=None)
    return parser


def main(args: dict) -> None:
    params = SamplingParams(max_tokens=args.pop("max_tokens"), temperature=args.pop("temperature"))
    template_path = args.pop("chat_template_path")
    llm = LLM(**args)
    conversation = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello! How can I assist you today?"},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    for output in llm.chat(conversation, params, use_tqdm=False):
        print(f"Generated text: {output.outputs[0].text!r}")
    template = open(template_path).read() if template_path else None
    for output in llm.chat([conversation] * 3, params, use_tqdm=False, chat_template=template):
        print(f"Generated text: {output.outputs[0].text!r}")


if __name__ == "__main__":
    main(vars(build_parser().parse_args()))
