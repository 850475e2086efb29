"""What a plan costs: parameters, FLOPs, or latency measured in onnxruntime (one protocol, see ``params``)."""
