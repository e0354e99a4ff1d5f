"""The module the ``pagoda.plugins`` entry point names: one ``@hookimpl`` function per thing contributed.

Each hook returns classes; pagoda instantiates nothing at registration, so importing this module must stay cheap
and must not touch a device.
"""

from pagoda.plugins.hookspecs import hookimpl

from pagoda_example_accelerator.attention import ExampleAttentionBackend
from pagoda_example_accelerator.ops import ExampleRmsNorm
from pagoda_example_accelerator.platform import ExamplePlatform
from pagoda_example_accelerator.quantization import ExampleInt8Config


@hookimpl
def pagoda_register_platforms():
    return [ExamplePlatform]


@hookimpl
def pagoda_register_attention_backends():
    return [ExampleAttentionBackend]


@hookimpl
def pagoda_register_quantization_methods():
    return [ExampleInt8Config]


@hookimpl
def pagoda_register_ops():
    return [ExampleRmsNorm]
