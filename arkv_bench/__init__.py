"""arkv-bench: how much KV memory can you save, at what accuracy and speed?"""

__version__ = "0.1.0"
