"""An example pagoda plugin: platform ``example``, attention backend ``EXAMPLE_ATTN``, quantization
``example_int8``. The hook implementations are in :mod:`.plugin`."""
