# Generation with every engine flag on the command line (`--model`, `--dtype`, `--max-model-len`, ...) and a few
# sampling flags; unset sampling flags keep the model's generation_config defaults.
from pagoda import LLM, EngineArgs
from pagoda.utils import FlexibleArgumentParser


def build_parser() -> FlexibleArgumentParser:
    parser = FlexibleArgumentParser(description=__doc__)
    EngineArgs.add_cli_args(parser)
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=int)
    sampling.add_argument("--temperature", type=float)
    sampling.add_argument("--top-p", type=float)
    sampling.add_argument("--top-k", type=int)
    return parser


def main(args: dict) -> None:
    overrides = {name: args.pop(name) for name in ("max_tokens", "temperature", "top_p", "top_k")}
    llm = LLM(**args)
    params = llm.get_default_sampling_params()
    for name, value in overrides.items():
        if value is not None:
            setattr(params, name, value)
    prompts = ["Hello, my name is", "The capital of France is", "The future of AI is"]
    for output in llm.generate(prompts, params):
        print(f"Prompt: {output.prompt!r}\nGenerated text: {output.outputs[0].text!r}\n" + "-" * 40)


if __name__ == "__main__":
    main(vars(build_parser().parse_args()))
