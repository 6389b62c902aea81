"""What both services share: Redis keys, the output contract, the model registry and its watcher, the stream
interfaces with their Kafka adapters, connections with one retry policy, the baseline reservoir and test doubles.
"""
