# The smallest pagoda program: generate completions for a few prompts. Runs as a plain script (no
# `if __name__ == "__main__":` guard needed: pagoda starts no worker processes).
from pagoda import LLM, SamplingParams

prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]
sampling_params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=32)

llm = LLM()  # the bundled SmolLM2-135M-Instruct; pass model="..." for another
outputs = llm.generate(prompts, sampling_params)
for output in outputs:
    print(f"Prompt: {output.prompt!r}, Generated text: {output.outputs[0].text!r}")
