"""modelyard's private descriptor pool (see generate.py for why it is not the default one)."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
